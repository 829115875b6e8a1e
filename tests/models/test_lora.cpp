// LoRA adapters on the Transformer: parity with peft (tests/fixtures/lora, made by
// tests/fixtures/make_lora.py), PEFT folder round trips, merging, the frozen base during training,
// reproducible dropout, and every refusal.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/file_util.h"
#include "models/lora.h"
#include "tests/io/io_test_util.h"
#include "tests/models/model_test_util.h"

namespace ftune::test {
namespace {

using json = nlohmann::json;

std::string lora_dir(const std::string& c) {
  return std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/lora/" + c;
}

const std::vector<std::string>& lora_cases() {
  static const std::vector<std::string> v{"llama_qv", "qwen2_all_linear", "mistral_rslora",
                                          "gpt2_c_attn"};
  return v;
}

struct LoraExpected {
  std::string base;
  Tensor ids, logits, merged_logits;
};

LoraExpected load_case(const std::string& c) {
  SafetensorsFile f(lora_dir(c) + "/expected.safetensors");
  return {f.metadata().at("base"), f.get("input_ids"), f.get("logits"), f.get("merged_logits")};
}

Tensor eval_logits(Transformer& m, const Tensor& ids) {
  NoGradGuard ng;
  m.eval();
  return m.forward(ids);
}

template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "no error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

// Gives every lora_B (zero after apply_lora) random values, so the adapters change the output.
void randomize_b(Transformer& m, uint64_t seed, double std = 0.2) {
  Generator g(seed);
  NoGradGuard ng;
  for (auto& [n, t] : lora_parameters(m))
    if (n.find(".lora_B.") != std::string::npos) t.copy_(randn(t.shape(), g, 0.0, std));
}

// ---------------------------------------------------------------- parity with peft

TEST(LoraPeft, LoadedAdapterMatchesPeftLogits) {
  for (const auto& c : lora_cases()) {
    SCOPED_TRACE(c);
    LoraExpected e = load_case(c);
    auto m = Transformer::from_pretrained(fixture_dir(e.base));
    const Tensor base = eval_logits(*m, e.ids);
    LoraOptions opt = load_peft_adapter(lora_dir(c), *m);
    EXPECT_EQ(opt.r, 4);
    EXPECT_TRUE(has_lora(*m));
    const Tensor got = eval_logits(*m, e.ids);
    EXPECT_LT(ops::max_abs_diff(got, e.logits), 1e-4);
    EXPECT_GT(ops::max_abs_diff(base, e.logits), 0.05);  // the adapter matters
  }
}

TEST(LoraPeft, ConfigIsReadAsPeftWroteIt) {
  auto m = Transformer::from_pretrained(fixture_dir("mistral"));
  LoraOptions o = load_peft_adapter(lora_dir("mistral_rslora"), *m);
  EXPECT_TRUE(o.use_rslora);
  EXPECT_DOUBLE_EQ(o.alpha, 8.0);
  EXPECT_DOUBLE_EQ(o.scale(), 8.0 / 2.0);
  EXPECT_EQ(lora_modules(*m).size(), 2u * 4u);

  auto q = Transformer::from_pretrained(fixture_dir("qwen2"));
  load_peft_adapter(lora_dir("qwen2_all_linear"), *q);
  EXPECT_EQ(lora_modules(*q).size(), 2u * 7u);  // every projection of both blocks

  auto l = Transformer::from_pretrained(fixture_dir("llama"));
  LoraOptions lo = load_peft_adapter(lora_dir("llama_qv"), *l);
  EXPECT_DOUBLE_EQ(lo.dropout, 0.1);
  EXPECT_EQ(lora_modules(*l),
            (std::vector<std::string>{
                "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}));
}

TEST(LoraPeft, SavedAdapterIsPeftsFile) {
  for (const auto& c : lora_cases()) {
    SCOPED_TRACE(c);
    LoraExpected e = load_case(c);
    auto m = Transformer::from_pretrained(fixture_dir(e.base));
    LoraOptions opt = load_peft_adapter(lora_dir(c), *m);
    TempDir d;
    save_peft_adapter(d.path(), *m, opt, "tests/fixtures/models/" + e.base);
    SafetensorsFile ours(d.file("adapter_model.safetensors"));
    SafetensorsFile theirs(lora_dir(c) + "/adapter_model.safetensors");
    std::vector<std::string> a = ours.names(), b = theirs.names();
    std::sort(a.begin(), a.end());
    std::sort(b.begin(), b.end());
    ASSERT_EQ(a, b);
    for (const auto& n : a) {
      EXPECT_EQ(ours.info(n).dtype, theirs.info(n).dtype) << n;
      EXPECT_EQ(ours.get(n).to_vector<float>(), theirs.get(n).to_vector<float>()) << n;
    }
    EXPECT_EQ(ours.metadata(), theirs.metadata());
    // The same tensors in safetensors' canonical layout: the very same bytes as peft's file.
    EXPECT_EQ(read_bytes(d.file("adapter_model.safetensors")),
              read_bytes(lora_dir(c) + "/adapter_model.safetensors"));

    // The config says what peft's does (peft adds keys of its own version that are all unset).
    json mine = json::parse(read_text_file(d.file("adapter_config.json"), "test"));
    json ref = json::parse(read_text_file(lora_dir(c) + "/adapter_config.json", "test"));
    for (const char* k : {"peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "use_rslora",
                          "fan_in_fan_out", "bias", "base_model_name_or_path"})
      EXPECT_EQ(mine[k], ref[k]) << k;
    auto sorted = [](json t) {
      std::vector<std::string> v = t.get<std::vector<std::string>>();
      std::sort(v.begin(), v.end());
      return v;
    };
    EXPECT_EQ(sorted(mine["target_modules"]), sorted(ref["target_modules"]));

    // And it loads back onto a fresh base with the same logits.
    auto m2 = Transformer::from_pretrained(fixture_dir(e.base));
    load_peft_adapter(d.path(), *m2);
    EXPECT_EQ(eval_logits(*m2, e.ids).to_vector<float>(),
              eval_logits(*m, e.ids).to_vector<float>());
  }
}

TEST(LoraPeft, MergedMatchesPeftMergeAndUnmerged) {
  for (const auto& c : lora_cases()) {
    SCOPED_TRACE(c);
    LoraExpected e = load_case(c);
    auto m = Transformer::from_pretrained(fixture_dir(e.base));
    load_peft_adapter(lora_dir(c), *m);
    const Tensor unmerged = eval_logits(*m, e.ids);
    TempDir unmerged_dir;
    expect_error([&] { m->save_pretrained(unmerged_dir.path()); }, {"LoRA adapter", "merge_lora"});
    const size_t n_base =
        Transformer::from_pretrained(fixture_dir(e.base))->named_parameters().size();
    merge_lora(*m);
    EXPECT_FALSE(has_lora(*m));
    EXPECT_TRUE(lora_parameters(*m).empty());
    auto params = m->named_parameters();
    EXPECT_EQ(params.size(), n_base);
    for (auto& [n, t] : params) {
      EXPECT_EQ(n.find("lora"), std::string::npos) << n;
      EXPECT_TRUE(t.requires_grad()) << n;
    }
    const Tensor merged = eval_logits(*m, e.ids);
    EXPECT_LT(ops::max_abs_diff(merged, unmerged), 1e-4);
    EXPECT_LT(ops::max_abs_diff(merged, e.merged_logits), 1e-4);

    // A plain HF folder: it reloads as a model without adapters, logits unchanged.
    TempDir d;
    m->save_pretrained(d.path());
    auto m2 = Transformer::from_pretrained(d.path());
    EXPECT_EQ(eval_logits(*m2, e.ids).to_vector<float>(), merged.to_vector<float>());
    // After a merge, adapters can be applied again.
    LoraOptions o;
    o.target_modules = {"all-linear"};
    EXPECT_FALSE(apply_lora(*m, o).empty());
  }
}

// ---------------------------------------------------------------- apply_lora

TEST(Lora, ApplyAddsPeftNamedTrainableAdaptersAndFreezesTheBase) {
  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  const auto before = m->named_parameters();
  LoraOptions o;
  o.r = 3;
  o.seed = 7;
  auto names = apply_lora(*m, o);
  ASSERT_EQ(names.size(), 4u);
  EXPECT_EQ(names[0], "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(names[1], "model.layers.0.self_attn.v_proj");
  auto lp = lora_parameters(*m);
  ASSERT_EQ(lp.size(), 8u);
  EXPECT_EQ(lp[0].first, "model.layers.0.self_attn.q_proj.lora_A.weight");
  EXPECT_EQ(lp[1].first, "model.layers.0.self_attn.q_proj.lora_B.weight");
  EXPECT_EQ(lp[0].second.shape(), Shape({3, 32}));     // [r, in]
  EXPECT_EQ(lp[3].second.shape(), Shape({2 * 8, 3}));  // v_proj [Hkv * D, r]
  for (auto& [n, t] : lp) {
    EXPECT_TRUE(t.requires_grad()) << n;
    EXPECT_EQ(t.dtype(), DType::f32);
    auto v = t.to_vector<float>();
    if (n.find("lora_B") != std::string::npos) {
      for (float x : v) EXPECT_EQ(x, 0.0f) << n;
    } else {  // U(+-1/sqrt(in)), in = 32: spread over the range, never beyond
      float lo = 1, hi = -1;
      for (float x : v) lo = std::min(lo, x), hi = std::max(hi, x);
      EXPECT_GE(lo, -1 / std::sqrt(32.0f));
      EXPECT_LE(hi, 1 / std::sqrt(32.0f));
      EXPECT_LT(lo, -0.1f);
      EXPECT_GT(hi, 0.1f);
    }
  }
  // named_parameters lists the adapters too, next to their base weight.
  auto all = m->named_parameters();
  EXPECT_EQ(all.size(), before.size() + 8);
  int64_t trainable = 0;
  for (auto& [n, t] : all) {
    const bool is_lora = n.find(".lora_") != std::string::npos;
    EXPECT_EQ(t.requires_grad(), is_lora) << n;
    trainable += is_lora ? t.numel() : 0;
  }
  EXPECT_EQ(m->num_parameters(true), trainable);
  // Zero B: the adapted model computes the base model exactly with the three q/k/v projections,
  // and up to f32 summation order with them batched (one GEMM over [W_q; W_k; W_v]: OpenBLAS
  // blocks it otherwise; docs/lora.md "Batched q/k/v").
  Expected e = load_expected("llama");
  auto base = Transformer::from_pretrained(fixture_dir("llama"));
  const auto want = eval_logits(*base, e.ids).to_vector<float>();
  ASSERT_TRUE(m->fused_qkv());
  const auto fused = eval_logits(*m, e.ids).to_vector<float>();
  ASSERT_EQ(fused.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(fused[i], want[i], 1e-5) << i;
  m->set_fused_qkv(false);
  EXPECT_EQ(eval_logits(*m, e.ids).to_vector<float>(), want);
  m->set_fused_qkv(true);
  // Seeded init: the same seed, the same A; another seed, another A.
  auto m2 = Transformer::from_pretrained(fixture_dir("llama"));
  apply_lora(*m2, o);
  EXPECT_EQ(lora_parameters(*m2)[0].second.to_vector<float>(), lp[0].second.to_vector<float>());
  auto m3 = Transformer::from_pretrained(fixture_dir("llama"));
  o.seed = 8;
  apply_lora(*m3, o);
  EXPECT_NE(lora_parameters(*m3)[0].second.to_vector<float>(), lp[0].second.to_vector<float>());
}

TEST(Lora, TargetSelection) {
  auto count = [](const std::string& fixture, std::vector<std::string> targets) {
    auto m = Transformer::from_pretrained(fixture_dir(fixture));
    LoraOptions o;
    o.target_modules = std::move(targets);
    return apply_lora(*m, o).size();
  };
  EXPECT_EQ(count("llama", {"all-linear"}), 14u);
  EXPECT_EQ(count("gpt2", {"all-linear"}), 8u);  // c_attn, attn.c_proj, c_fc, mlp.c_proj
  EXPECT_EQ(count("gpt2", {"c_proj"}), 4u);
  EXPECT_EQ(count("gpt2", {"attn.c_proj"}), 2u);
  EXPECT_EQ(count("llama", {"model.layers.1.mlp.down_proj"}), 1u);
  EXPECT_EQ(count("llama", {"gate_proj", "up_proj", "down_proj"}), 6u);

  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  LoraOptions o;
  o.target_regex = R"(.*layers\.1\.self_attn\.(q|k)_proj)";
  EXPECT_EQ(apply_lora(*m, o), (std::vector<std::string>{"model.layers.1.self_attn.q_proj",
                                                         "model.layers.1.self_attn.k_proj"}));
}

TEST(Lora, RefusesBadTargetsAndOptions) {
  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  LoraOptions o;
  o.target_modules = {"q_proj", "qproj"};
  expect_error([&] { apply_lora(*m, o); }, {"[lora]", "'qproj'", "q_proj", "all-linear"});
  o.target_modules = {"lm_head"};
  expect_error([&] { apply_lora(*m, o); }, {"[lora]", "lm_head", "not a linear projection"});
  o.target_modules = {"embed_tokens"};
  expect_error([&] { apply_lora(*m, o); }, {"embed_tokens", "not a linear projection"});
  o.target_modules = {"c_attn"};
  expect_error([&] { apply_lora(*m, o); }, {"'c_attn'", "matches no projection"});
  o.target_modules = {"q_proj"};
  o.r = 0;
  expect_error([&] { apply_lora(*m, o); }, {"r must be >= 1"});
  o.r = 4;
  o.dropout = 1.0;
  expect_error([&] { apply_lora(*m, o); }, {"dropout"});
  o.dropout = 0.0;
  EXPECT_FALSE(has_lora(*m));
  for (auto& [n, t] : m->named_parameters()) EXPECT_TRUE(t.requires_grad()) << n;  // untouched
  apply_lora(*m, o);
  expect_error([&] { apply_lora(*m, o); }, {"already has LoRA"});
  auto plain = Transformer::from_pretrained(fixture_dir("llama"));
  expect_error([&] { merge_lora(*plain); }, {"no adapters"});
  expect_error([&] { save_peft_adapter("/tmp/unused", *plain, o, "x"); }, {"no adapters"});
  LoraOptions other = o;
  other.r = 8;
  expect_error([&] { save_peft_adapter("/tmp/unused", *m, other, "x"); }, {"do not describe"});
}

// ---------------------------------------------------------------- training

TEST(Lora, TrainingStepMovesOnlyTheAdapters) {
  for (const std::string fixture : {"llama", "gpt2"}) {
    SCOPED_TRACE(fixture);
    auto m = Transformer::from_pretrained(fixture_dir(fixture));
    LoraOptions o;
    o.target_modules = {"all-linear"};
    o.dropout = 0.1;
    apply_lora(*m, o);
    randomize_b(*m, 3);  // else dA is zero at the first step
    std::vector<std::pair<std::string, std::vector<float>>> before;
    for (auto& [n, t] : m->named_parameters()) before.emplace_back(n, t.to_vector<float>());
    Expected e = load_expected(fixture);
    m->train();
    double first = 0, last = 0;
    for (int step = 0; step < 3; ++step) {
      set_lora_dropout_seed(*m, uint64_t(step));
      Tensor loss = lm_loss(m->forward(e.ids), e.ids);
      (step == 0 ? first : last) = loss.item();
      loss.backward();
      for (auto& [n, t] : m->named_parameters()) {
        const bool is_lora = n.find(".lora_") != std::string::npos;
        EXPECT_EQ(t.grad().defined(), is_lora) << n;
        if (is_lora) {
          auto g = t.grad().to_vector<float>();
          double norm = 0;
          for (float x : g) norm += double(x) * x;
          EXPECT_GT(norm, 0.0) << n;
        }
      }
      NoGradGuard ng;
      for (auto& [n, t] : lora_parameters(*m)) ops::add_(t, t.grad(), -0.05);
      m->zero_grad();
    }
    EXPECT_LT(last, first);
    auto after = m->named_parameters();
    ASSERT_EQ(after.size(), before.size());
    for (size_t i = 0; i < after.size(); ++i) {
      const bool is_lora = after[i].first.find(".lora_") != std::string::npos;
      if (is_lora)
        EXPECT_NE(after[i].second.to_vector<float>(), before[i].second) << after[i].first;
      else
        EXPECT_EQ(after[i].second.to_vector<float>(), before[i].second) << after[i].first;
    }
  }
}

TEST(Lora, DropoutIsSeededPerForwardAndOffInEval) {
  for (const std::string fixture : {"llama", "gpt2"}) {
    SCOPED_TRACE(fixture);
    auto m = Transformer::from_pretrained(fixture_dir(fixture));
    LoraOptions o;
    o.target_modules = {"all-linear"};
    o.dropout = 0.3;
    apply_lora(*m, o);
    randomize_b(*m, 5);
    Expected e = load_expected(fixture);
    m->train();
    auto fwd = [&](uint64_t seed) {
      set_lora_dropout_seed(*m, seed);
      NoGradGuard ng;
      return m->forward(e.ids).to_vector<float>();
    };
    const auto a1 = fwd(1), a2 = fwd(1), b = fwd(2);
    EXPECT_EQ(a1, a2);
    EXPECT_NE(a1, b);
    m->eval();
    const auto e1 = fwd(1), e2 = fwd(2);
    EXPECT_EQ(e1, e2);  // no dropout in eval
    EXPECT_NE(e1, a1);
    // Eval equals the same adapter without dropout in training mode.
    auto m0 = Transformer::from_pretrained(fixture_dir(fixture));
    o.dropout = 0.0;
    apply_lora(*m0, o);
    randomize_b(*m0, 5);
    m0->train();
    NoGradGuard ng;
    EXPECT_EQ(m0->forward(e.ids).to_vector<float>(), e1);
  }
}

TEST(Lora, DropoutSeedsDifferPerModule) {
  // Under one seed every adapted module must draw its own mask (q_proj and v_proj see the same
  // input and would otherwise drop the same features). The same adapter on layer 1 is module 0 of
  // `one` and module 1 of `two` (whose module 0 has B = 0, a no-op): the outputs must differ in
  // training and agree in eval.
  auto one = Transformer::from_pretrained(fixture_dir("llama"));
  auto two = Transformer::from_pretrained(fixture_dir("llama"));
  LoraOptions o;
  o.dropout = 0.5;
  o.target_modules = {"model.layers.1.self_attn.q_proj"};
  apply_lora(*one, o);
  o.target_modules = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"};
  apply_lora(*two, o);
  // Copy one's adapter into two's layer-1 adapter; zero two's layer-0 B (so layer 0 is the base).
  {
    NoGradGuard ng;
    Generator g(9);
    auto p1 = lora_parameters(*one), p2 = lora_parameters(*two);
    Tensor b = randn(p1[1].second.shape(), g, 0.0, 0.3);
    p1[1].second.copy_(b);
    p2[3].second.copy_(b);
    p2[2].second.copy_(p1[0].second);
  }
  Expected e = load_expected("llama");
  one->train();
  two->train();
  NoGradGuard ng;
  set_lora_dropout_seed(*one, 4);
  set_lora_dropout_seed(*two, 4);
  // Layer 1's adapter is module 0 in `one` and module 1 in `two`: different masks.
  EXPECT_NE(one->forward(e.ids).to_vector<float>(), two->forward(e.ids).to_vector<float>());
  one->eval();
  two->eval();
  EXPECT_LT(ops::max_abs_diff(one->forward(e.ids), two->forward(e.ids)), 1e-6);
}

// ---------------------------------------------------------------- refusals of adapter folders

// A copy of a fixture adapter with its config edited by `edit`.
std::string edited_copy(const TempDir& d, const std::string& c,
                        const std::function<void(json&)>& edit) {
  std::filesystem::copy_file(lora_dir(c) + "/adapter_model.safetensors",
                             d.file("adapter_model.safetensors"));
  json j = json::parse(read_text_file(lora_dir(c) + "/adapter_config.json", "test"));
  edit(j);
  std::ofstream(d.file("adapter_config.json")) << j.dump(2);
  return d.path();
}

TEST(LoraPeft, RefusesUnsupportedAdapters) {
  struct Bad {
    std::function<void(json&)> edit;
    std::vector<std::string> msg;
  };
  const std::vector<Bad> bad = {
      {[](json& j) { j["use_dora"] = true; }, {"use_dora", "DoRA"}},
      {[](json& j) { j["bias"] = "all"; }, {"bias 'all'"}},
      {[](json& j) { j["lora_bias"] = true; }, {"lora_bias"}},
      {[](json& j) { j["modules_to_save"] = {"lm_head"}; }, {"modules_to_save"}},
      {[](json& j) { j["layers_to_transform"] = {0}; }, {"layers_to_transform"}},
      {[](json& j) {
         j["rank_pattern"] = {{"q_proj", 8}};
       },
       {"rank_pattern"}},
      {[](json& j) {
         j["alpha_pattern"] = {{"q_proj", 8}};
       },
       {"alpha_pattern"}},
      {[](json& j) { j["peft_type"] = "IA3"; }, {"peft_type is 'IA3'"}},
      {[](json& j) { j["task_type"] = "SEQ_CLS"; }, {"SEQ_CLS"}},
      {[](json& j) {
         j["target_modules"] = {"q_proj", "v_proj", "lm_head"};
       },
       {"lm_head"}},
      {[](json& j) { j["target_modules"] = {"gate_proj"}; }, {"missing", "unexpected"}},
      {[](json& j) { j["target_modules"] = {"nothing"}; }, {"match no projection"}},
      {[](json& j) { j["r"] = 8; }, {"has shape", "r 8"}},
      {[](json& j) { j["r"] = "4"; }, {"'r' must be a number"}},
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    SCOPED_TRACE(i);
    TempDir d;
    edited_copy(d, "llama_qv", bad[i].edit);
    auto m = Transformer::from_pretrained(fixture_dir("llama"));
    auto msg = bad[i].msg;
    msg.push_back("[peft]");
    msg.push_back(d.path());  // the file is named
    try {
      load_peft_adapter(d.path(), *m);
      ADD_FAILURE() << "no error thrown";
    } catch (const Error& e) {
      for (const auto& p : msg)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << p << " not in " << e.what();
    }
    EXPECT_FALSE(has_lora(*m));
    for (auto& [n, t] : m->named_parameters()) EXPECT_TRUE(t.requires_grad()) << n;
  }
  TempDir d;
  expect_error(
      [&] { load_peft_adapter(d.path(), *Transformer::from_pretrained(fixture_dir("llama"))); },
      {"no adapter_config.json"});
  std::ofstream(d.file("adapter_config.json")) << "{}";
  std::ofstream(d.file("adapter_model.bin")) << "pickle";
  expect_error(
      [&] { load_peft_adapter(d.path(), *Transformer::from_pretrained(fixture_dir("llama"))); },
      {"adapter_model.bin", "pickle"});
  // An adapter of another base (shapes) is refused too.
  auto g = Transformer::from_pretrained(fixture_dir("gpt2"));
  expect_error([&] { load_peft_adapter(lora_dir("llama_qv"), *g); }, {"match no projection"});
}

// ---------------------------------------------------------------- export for the Python check

// Trains adapters a few steps with ftune, then writes for tests/fixtures/check_export.py:
//   <out>/<fixture>_peft/     save_peft_adapter (base: the fixture folder, absolute)
//   <out>/<fixture>_merged/   merge_lora + save_pretrained
//   <out>/<fixture>_expected.safetensors   input_ids, logits (ftune, adapter, eval mode)
// Set FTUNE_LORA_OUT=DIR to keep them; otherwise a temp folder, also checked here in C++.
TEST(LoraExport, WritesPeftAndMergedFolders) {
  const char* env = std::getenv("FTUNE_LORA_OUT");
  TempDir tmp;
  const std::string out = env ? std::string(env) : tmp.path();
  for (const std::string fixture : {"llama", "qwen2", "gpt2"}) {
    SCOPED_TRACE(fixture);
    auto m = Transformer::from_pretrained(fixture_dir(fixture));
    LoraOptions o;
    o.r = 4;
    o.alpha = 8;
    o.dropout = 0.1;
    o.use_rslora = fixture == "qwen2";
    o.target_modules = fixture == "gpt2" ? std::vector<std::string>{"c_attn", "c_fc"}
                                         : std::vector<std::string>{"all-linear"};
    o.seed = 11;
    apply_lora(*m, o);
    Expected e = load_expected(fixture);
    m->train();
    for (int step = 0; step < 4; ++step) {
      set_lora_dropout_seed(*m, uint64_t(step));
      Tensor loss = lm_loss(m->forward(e.ids), e.ids);
      loss.backward();
      NoGradGuard ng;
      for (auto& [n, t] : lora_parameters(*m)) ops::add_(t, t.grad(), -0.5);
      m->zero_grad();
    }
    const Tensor logits = eval_logits(*m, e.ids);
    auto base = Transformer::from_pretrained(fixture_dir(fixture));
    ASSERT_GT(ops::max_abs_diff(logits, eval_logits(*base, e.ids)), 1e-3);  // training moved it

    save_peft_adapter(out + "/" + fixture + "_peft", *m, o, fixture_dir(fixture));
    save_safetensors(out + "/" + fixture + "_expected.safetensors",
                     {{"input_ids", e.ids}, {"logits", logits}}, {{"format", "pt"}});
    merge_lora(*m);
    m->save_pretrained(out + "/" + fixture + "_merged");

    // The C++ side of the same check.
    load_peft_adapter(out + "/" + fixture + "_peft", *base);
    EXPECT_EQ(eval_logits(*base, e.ids).to_vector<float>(), logits.to_vector<float>());
    auto merged = Transformer::from_pretrained(out + "/" + fixture + "_merged");
    EXPECT_LT(ops::max_abs_diff(eval_logits(*merged, e.ids), logits), 1e-4);
  }
}

}  // namespace
}  // namespace ftune::test
