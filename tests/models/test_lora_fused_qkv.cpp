// Batched q/k/v under LoRA (Transformer::set_fused_qkv, docs/lora.md "Batched q/k/v"): the fused
// and the three-projection paths on the same model give the same loss and adapter gradients, with
// and without dropout, for every Llama-family fixture (no bias, q/k/v bias, GQA, MQA); the weights
// are views of one buffer (no copy), and exports and merges are unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "core/allocator.h"
#include "io/file_util.h"
#include "models/lora.h"
#include "tests/io/io_test_util.h"
#include "tests/models/model_test_util.h"
#include "tests/test_util.h"

namespace ftune::test {
namespace {

// Fixtures with separate q/k/v: llama (GQA 4/2), llama_bias (q/k/v bias, MQA 4/1, head_dim 16),
// qwen2 (q/k/v bias, GQA), mistral (GQA).
const std::vector<std::string>& qkv_fixtures() {
  static const std::vector<std::string> v{"llama", "llama_bias", "qwen2", "mistral"};
  return v;
}

double rel_diff(const Tensor& a, const Tensor& b) {
  auto va = a.to_vector<double>(), vb = b.to_vector<double>();
  EXPECT_EQ(va.size(), vb.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < va.size() && i < vb.size(); ++i) {
    num = std::max(num, std::fabs(va[i] - vb[i]));
    den = std::max(den, std::fabs(vb[i]));
  }
  return num / std::max(den, 1e-30);
}

void randomize_b(Transformer& m, uint64_t seed) {
  Generator g(seed);
  NoGradGuard ng;
  for (auto& [n, t] : lora_parameters(m))
    if (n.find(".lora_B.") != std::string::npos) t.copy_(randn(t.shape(), g, 0.0, 0.2));
}

struct StepResult {
  double loss = 0;
  std::map<std::string, Tensor> grads;
};

// One training forward + backward under a fixed dropout seed; the gradients of the adapters.
StepResult step(Transformer& m, const Tensor& ids) {
  m.train();
  m.zero_grad();
  set_lora_dropout_seed(m, 0x5eed);
  Tensor loss = lm_loss(m.forward(ids), ids);
  loss.backward();
  StepResult r{loss.item(), {}};
  for (auto& [n, t] : lora_parameters(m)) r.grads[n] = t.grad().clone();
  return r;
}

void expect_same(const StepResult& a, const StepResult& b, const std::string& what,
                 double loss_tol = 1e-5, double grad_tol = 1e-5) {
  EXPECT_LT(std::fabs(a.loss - b.loss), loss_tol * std::fabs(b.loss)) << what;
  ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
  for (auto& [n, g] : b.grads) {
    ASSERT_TRUE(a.grads.at(n).defined()) << what << " " << n;
    EXPECT_LT(rel_diff(a.grads.at(n), g), grad_tol) << what << " " << n;
  }
}

TEST(LoraFusedQkv, SameLossAndGradientsAsThreeProjections) {
  const std::vector<std::vector<std::string>> targets{{"q_proj", "v_proj"}, {"all-linear"}};
  for (const std::string& fx : qkv_fixtures())
    for (const auto& tm : targets)
      for (double p : {0.0, 0.2}) {
        const std::string what = fx + " " + tm[0] + " dropout " + std::to_string(p);
        SCOPED_TRACE(what);
        auto m = Transformer::from_pretrained(fixture_dir(fx));
        LoraOptions o;
        o.r = 4;
        o.alpha = 8;
        o.dropout = p;
        o.target_modules = tm;
        apply_lora(*m, o);
        randomize_b(*m, 7);
        const Tensor ids = load_expected(fx).ids;
        ASSERT_TRUE(m->fused_qkv());  // apply_lora turned it on
        StepResult fused = step(*m, ids);
        EXPECT_TRUE(m->fused_qkv());
        m->set_fused_qkv(false);
        EXPECT_FALSE(m->fused_qkv());
        StepResult plain = step(*m, ids);
        expect_same(fused, plain, what);
        for (auto& [n, g] : plain.grads) {  // the comparison is not between zeros
          double s = 0;
          for (double v : g.to_vector<double>()) s += v * v;
          EXPECT_GT(s, 0.0) << n;
        }
        if (p > 0) {  // the masks matter: without them the loss moves
          NoGradGuard ng;
          m->eval();
          const double no_drop = lm_loss(m->forward(ids), ids).item();
          EXPECT_GT(std::fabs(no_drop - plain.loss), 1e-4);
        }
        // Eval (no dropout, no grad): the same logits both ways.
        NoGradGuard ng;
        m->eval();
        Tensor a = m->forward(ids);
        m->set_fused_qkv(true);
        EXPECT_TRUE(m->fused_qkv());
        Tensor b = m->forward(ids);
        EXPECT_LT(rel_diff(b, a), 1e-5);
      }
}

// q/k/v weights and biases are consecutive row blocks of one buffer (no second copy), with the
// loaded values, names and frozen state; named_parameters lists the same tensors as before.
TEST(LoraFusedQkv, WeightsAreViewsOfOneBufferWithTheLoadedValues) {
  for (const std::string fx : {"llama", "qwen2"}) {
    SCOPED_TRACE(fx);
    auto ref = Transformer::from_pretrained(fixture_dir(fx));
    auto m = Transformer::from_pretrained(fixture_dir(fx));
    LoraOptions o;
    o.target_modules = {"q_proj"};
    apply_lora(*m, o);
    ASSERT_TRUE(m->fused_qkv());
    std::map<std::string, Tensor> got;
    for (auto& [n, t] : m->named_parameters()) got[n] = t;
    int checked = 0;
    for (auto& [n, t] : ref->named_parameters()) {
      ASSERT_TRUE(got.count(n)) << n;
      EXPECT_EQ(got[n].to_vector<float>(), t.to_vector<float>()) << n;
      if (n.find(".q_proj.") == std::string::npos) continue;
      const std::string suffix = n.substr(n.rfind('.'));  // ".weight" or ".bias"
      const std::string stem = n.substr(0, n.find(".q_proj."));
      const Tensor& q = got[n];
      const Tensor& k = got[stem + ".k_proj" + suffix];
      const Tensor& v = got[stem + ".v_proj" + suffix];
      auto* base = static_cast<char*>(q.raw_data());
      EXPECT_EQ(k.raw_data(), base + q.numel() * 4) << n;
      EXPECT_EQ(v.raw_data(), base + (q.numel() + k.numel()) * 4) << n;
      EXPECT_FALSE(q.requires_grad() || k.requires_grad() || v.requires_grad()) << n;
      ++checked;
    }
    EXPECT_EQ(checked, ref->config().num_hidden_layers * (fx == "qwen2" ? 2 : 1));
  }
}

// Module::to_ replaces the parameters (here f32 -> f64 on the CPU): the next forward fuses again
// (from the moved values) and still equals the three projections.
TEST(LoraFusedQkv, FusesAgainAfterTheModelIsMoved) {
  auto m = Transformer::from_pretrained(fixture_dir("qwen2"));
  LoraOptions o;
  o.target_modules = {"all-linear"};
  apply_lora(*m, o);
  randomize_b(*m, 5);
  m->to_(Device::cpu(), DType::f64);
  EXPECT_FALSE(m->fused_qkv());  // the views were replaced
  const Tensor ids = load_expected("qwen2").ids;
  StepResult fused = step(*m, ids);
  EXPECT_TRUE(m->fused_qkv());
  for (auto& [n, t] : m->named_parameters()) EXPECT_EQ(t.dtype(), DType::f64) << n;
  m->set_fused_qkv(false);
  StepResult plain = step(*m, ids);
  EXPECT_LT(std::fabs(fused.loss - plain.loss), 1e-12 * std::fabs(plain.loss));
  for (auto& [n, g] : plain.grads) EXPECT_LT(rel_diff(fused.grads.at(n), g), 1e-10) << n;
}

// A trainable base (full fine-tuning after merge_lora) runs the three projections: the weights
// get their own gradients.
TEST(LoraFusedQkv, TrainableBaseIsNotBatched) {
  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  apply_lora(*m, LoraOptions{});
  ASSERT_TRUE(m->fused_qkv());
  merge_lora(*m);
  EXPECT_FALSE(m->fused_qkv());
  const Tensor ids = load_expected("llama").ids;
  m->train();
  lm_loss(m->forward(ids), ids).backward();
  for (auto& [n, t] : m->named_parameters()) EXPECT_TRUE(t.grad().defined()) << n;
}

// Exports and merges do not see the fusion: the PEFT folder and the merged model's save_pretrained
// are byte for byte those of the unfused model.
TEST(LoraFusedQkv, ExportsAndMergeAreUnchanged) {
  TempDir tmp;
  for (const std::string fx : {"llama_bias", "mistral"}) {
    SCOPED_TRACE(fx);
    std::map<bool, std::string> dirs;
    std::map<bool, nn::NamedTensors> merged;
    for (bool fuse : {false, true}) {
      auto m = Transformer::from_pretrained(fixture_dir(fx));
      LoraOptions o;
      o.target_modules = {"all-linear"};
      apply_lora(*m, o);
      randomize_b(*m, 11);
      m->set_fused_qkv(fuse);
      ASSERT_EQ(m->fused_qkv(), fuse);
      const std::string d = tmp.path() + "/" + fx + (fuse ? "_fused" : "_plain");
      save_peft_adapter(d + "/peft", *m, o, "base");
      merge_lora(*m);  // the merge writes into the views
      m->save_pretrained(d + "/merged");
      merged[fuse] = m->named_parameters();
      dirs[fuse] = d;
    }
    for (const char* f : {"/peft/adapter_model.safetensors", "/peft/adapter_config.json",
                          "/merged/model.safetensors", "/merged/config.json"}) {
      const std::string want = test_util::slurp(dirs[false] + f);
      EXPECT_FALSE(want.empty()) << f;
      EXPECT_EQ(test_util::slurp(dirs[true] + f), want) << f;
    }
    ASSERT_EQ(merged[true].size(), merged[false].size());
    for (size_t i = 0; i < merged[true].size(); ++i)
      EXPECT_EQ(merged[true][i].second.to_vector<float>(),
                merged[false][i].second.to_vector<float>())
          << merged[true][i].first;
  }
}

// On the GPU (the trainer applies LoRA on the CPU, then Module::to_ moves the model: the first
// forward fuses again there): fused against three projections on the same GPU model, and against
// the CPU, f32 and bf16, with and without dropout (the GPU draws the CPU's masks). Skips here.
TEST(LoraFusedQkv, GpuMatchesThreeProjectionsAndTheCpu) {
  if (!cuda_available())
    GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  for (const std::string fx : {"llama", "qwen2"})
    for (double p : {0.0, 0.2})
      for (DType dt : {DType::f32, DType::bf16}) {
        const std::string what = fx + " dropout " + std::to_string(p) + " " + dtype_name(dt);
        SCOPED_TRACE(what);
        LoraOptions o;
        o.r = 4;
        o.alpha = 8;
        o.dropout = p;
        o.target_modules = {"all-linear"};
        const Tensor ids = load_expected(fx).ids;
        auto cpu = Transformer::from_pretrained(fixture_dir(fx));
        apply_lora(*cpu, o);
        randomize_b(*cpu, 7);
        StepResult ref = step(*cpu, ids);
        auto m = Transformer::from_pretrained(fixture_dir(fx));
        apply_lora(*m, o);
        randomize_b(*m, 7);
        m->to_(Device::cuda(0), dt);
        EXPECT_FALSE(m->fused_qkv());
        const Tensor gids = ids.to(Device::cuda(0));
        StepResult fused = step(*m, gids);
        EXPECT_TRUE(m->fused_qkv());
        for (auto& [n, t] : m->named_parameters()) EXPECT_TRUE(t.device().is_cuda()) << n;
        m->set_fused_qkv(false);
        StepResult plain = step(*m, gids);
        // f32: summation order only (cuBLASLt picks per shape); bf16: outputs rounded to 8 bits.
        const bool f32 = dt == DType::f32;
        expect_same(fused, plain, what + " fused vs plain", f32 ? 1e-5 : 1e-2, f32 ? 1e-4 : 3e-2);
        expect_same(fused, ref, what + " gpu vs cpu", f32 ? 1e-4 : 2e-2, f32 ? 1e-3 : 6e-2);
      }
}

}  // namespace
}  // namespace ftune::test
