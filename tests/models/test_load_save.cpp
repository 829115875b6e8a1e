// from_pretrained / save_pretrained: round trips, dtype conversion, sharding, the checkpoint
// variants transformers produces, and every refusal (with the file and tensor named).
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "io/file_util.h"
#include "io/hf_config.h"
#include "tests/io/io_test_util.h"
#include "tests/models/model_test_util.h"

namespace ftune::test {
namespace {

// The fixture's tensors, to edit and write back as a variant checkpoint.
NamedTensors fixture_tensors(const std::string& name) {
  SafetensorsFile f(fixture_dir(name) + "/model.safetensors");
  NamedTensors out;
  for (const auto& n : f.names()) out.emplace_back(n, f.get(n));
  return out;
}

// A model folder in `dir` with the fixture's config.json (or `config` when given) and `tensors`.
void write_folder(const std::string& dir, const std::string& fixture, const NamedTensors& tensors,
                  const std::string& config = "") {
  std::filesystem::create_directories(dir);
  std::string text =
      config.empty() ? read_text_file(fixture_dir(fixture) + "/config.json", "test") : config;
  std::ofstream(dir + "/config.json") << text;
  save_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
}

// Runs f, which must throw ftune::Error whose message contains every one of `parts`.
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

void expect_same_params(const Transformer& a, const Transformer& b) {
  auto pa = a.named_parameters(), pb = b.named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) {
    EXPECT_EQ(pa[i].first, pb[i].first);
    EXPECT_EQ(pa[i].second.dtype(), pb[i].second.dtype());
    EXPECT_EQ(pa[i].second.to_vector<float>(), pb[i].second.to_vector<float>()) << pa[i].first;
  }
}

Tensor logits_of(Transformer& m, const std::string& fixture) {
  NoGradGuard ng;
  return m.forward(load_expected(fixture).ids);
}

class LoadSave : public ::testing::TestWithParam<std::string> {};

// ftune's save of a loaded fixture is transformers' file byte for byte (same names, layout and
// metadata), and loading it back gives the same parameters and config.
TEST_P(LoadSave, RoundTripIsBitwise) {
  auto m = Transformer::from_pretrained(fixture_dir(GetParam()));
  TempDir d;
  m->save_pretrained(d.path());
  EXPECT_EQ(read_bytes(d.file("model.safetensors")),
            read_bytes(fixture_dir(GetParam()) + "/model.safetensors"));
  auto m2 = Transformer::from_pretrained(d.path());
  expect_same_params(*m, *m2);
  EXPECT_EQ(m->config().to_json(), m2->config().to_json());
  EXPECT_EQ(m2->config().torch_dtype, "float32");
}

// Sharded save (index + shards) loads back to the same model.
TEST_P(LoadSave, ShardedRoundTrip) {
  auto m = Transformer::from_pretrained(fixture_dir(GetParam()));
  TempDir d;
  m->save_pretrained(d.path(), 40'000);
  EXPECT_TRUE(file_exists(d.file("model.safetensors.index.json")));
  EXPECT_FALSE(file_exists(d.file("model.safetensors")));
  EXPECT_TRUE(file_exists(d.file("model-00001-of-00004.safetensors")) ||
              file_exists(d.file("model-00001-of-00003.safetensors")) ||
              file_exists(d.file("model-00001-of-00005.safetensors")));
  auto m2 = Transformer::from_pretrained(d.path());
  expect_same_params(*m, *m2);
}

// bf16 and f16 checkpoints load as f32 (the stored values, exactly).
TEST_P(LoadSave, HalfPrecisionCheckpointsConvertToF32) {
  for (DType dt : {DType::bf16, DType::f16}) {
    NamedTensors half;
    for (auto& [n, t] : fixture_tensors(GetParam())) half.emplace_back(n, t.to(dt));
    TempDir d;
    write_folder(d.path(), GetParam(), half);
    auto m = Transformer::from_pretrained(d.path());
    for (auto& [n, t] : half) {
      Tensor p = m->parameter(n);
      EXPECT_EQ(p.dtype(), DType::f32);
      EXPECT_EQ(p.to_vector<float>(), t.to(DType::f32).to_vector<float>()) << n;
    }
    // Still close to the f32 model.
    auto ref = Transformer::from_pretrained(fixture_dir(GetParam()));
    EXPECT_LE(ops::max_abs_diff(logits_of(*m, GetParam()), logits_of(*ref, GetParam())), 0.5);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, LoadSave, ::testing::ValuesIn(model_fixtures()),
                         [](const auto& info) { return info.param; });

TEST(LoadVariants, GPT2CausalMaskBuffersAreSkipped) {
  NamedTensors t = fixture_tensors("gpt2");
  t.emplace_back("transformer.h.0.attn.bias", Tensor::ones({1, 1, 64, 64}, DType::f32));
  t.emplace_back("transformer.h.0.attn.masked_bias", Tensor::scalar(-1e4));
  t.emplace_back("transformer.h.1.attn.bias", Tensor::ones({1, 1, 64, 64}, DType::f32));
  TempDir d;
  write_folder(d.path(), "gpt2", t);
  auto m = Transformer::from_pretrained(d.path());
  auto ref = Transformer::from_pretrained(fixture_dir("gpt2"));
  expect_same_params(*m, *ref);
}

TEST(LoadVariants, RotaryInvFreqIsSkipped) {
  NamedTensors t = fixture_tensors("llama");
  t.emplace_back("model.layers.0.self_attn.rotary_emb.inv_freq", Tensor::ones({4}));
  t.emplace_back("model.rotary_emb.inv_freq", Tensor::ones({4}));
  TempDir d;
  write_folder(d.path(), "llama", t);
  EXPECT_NO_THROW(Transformer::from_pretrained(d.path()));
}

// GPT2Model saves (the original openai-community/gpt2 file) have no "transformer." prefix.
TEST(LoadVariants, BaseModelNamesWithoutPrefix) {
  NamedTensors t;
  for (auto& [n, x] : fixture_tensors("gpt2")) t.emplace_back(n.substr(strlen("transformer.")), x);
  t.emplace_back("h.0.attn.bias", Tensor::ones({1, 1, 64, 64}));
  TempDir d;
  write_folder(d.path(), "gpt2", t);
  auto m = Transformer::from_pretrained(d.path());
  auto ref = Transformer::from_pretrained(fixture_dir("gpt2"));
  EXPECT_EQ(ops::max_abs_diff(logits_of(*m, "gpt2"), logits_of(*ref, "gpt2")), 0.0);
}

TEST(LoadVariants, TiedLmHeadStoredTwice) {
  NamedTensors t = fixture_tensors("qwen2");
  Tensor emb;
  for (auto& [n, x] : t)
    if (n == "model.embed_tokens.weight") emb = x;
  t.emplace_back("lm_head.weight", emb.clone());
  TempDir d;
  write_folder(d.path(), "qwen2", t);
  EXPECT_NO_THROW(Transformer::from_pretrained(d.path()));

  Tensor other = emb.clone();
  other.data<float>()[5] += 1.0f;
  t.back().second = other;
  TempDir d2;
  write_folder(d2.path(), "qwen2", t);
  expect_error([&] { Transformer::from_pretrained(d2.path()); },
               {"lm_head.weight", "tie_word_embeddings", d2.path()});
}

TEST(LoadErrors, MissingTensorsAreListed) {
  NamedTensors t;
  for (auto& [n, x] : fixture_tensors("llama"))
    if (n != "model.layers.1.mlp.up_proj.weight" && n != "lm_head.weight") t.emplace_back(n, x);
  TempDir d;
  write_folder(d.path(), "llama", t);
  expect_error([&] { Transformer::from_pretrained(d.path()); },
               {"[from_pretrained]", d.path(), "missing tensors (2)",
                "model.layers.1.mlp.up_proj.weight", "lm_head.weight"});
}

TEST(LoadErrors, UnexpectedTensorsAreListedWithTheirFile) {
  NamedTensors t = fixture_tensors("llama");
  t.emplace_back("model.layers.0.self_attn.extra.weight", Tensor::ones({2}));
  t.emplace_back("model.layers.2.mlp.up_proj.weight", Tensor::ones({64, 32}));  // a third layer
  TempDir d;
  write_folder(d.path(), "llama", t);
  expect_error([&] { Transformer::from_pretrained(d.path()); },
               {"unexpected tensors (2)", "model.layers.0.self_attn.extra.weight",
                "model.layers.2.mlp.up_proj.weight", d.file("model.safetensors")});
}

TEST(LoadErrors, ShapeMismatchNamesFileAndTensor) {
  NamedTensors t = fixture_tensors("llama");
  for (auto& [n, x] : t)  // k_proj [16, 32] stored transposed
    if (n == "model.layers.1.self_attn.k_proj.weight") x = x.transpose(0, 1).contiguous();
  TempDir d;
  write_folder(d.path(), "llama", t);
  expect_error([&] { Transformer::from_pretrained(d.path()); },
               {d.file("model.safetensors"), "model.layers.1.self_attn.k_proj.weight", "[32, 16]",
                "[16, 32]", "config.json"});
}

TEST(LoadErrors, GPT2Conv1DWeightsInLinearLayoutAreRefused) {
  NamedTensors t = fixture_tensors("gpt2");
  for (auto& [n, x] : t)  // c_fc [32, 128] as nn.Linear would store it: [128, 32]
    if (n == "transformer.h.0.mlp.c_fc.weight") x = x.transpose(0, 1).contiguous();
  TempDir d;
  write_folder(d.path(), "gpt2", t);
  expect_error([&] { Transformer::from_pretrained(d.path()); },
               {"transformer.h.0.mlp.c_fc.weight", "[128, 32]", "[32, 128]"});
}

TEST(LoadErrors, IntegerWeightsAreRefused) {
  NamedTensors t = fixture_tensors("llama");
  for (auto& [n, x] : t)
    if (n == "model.norm.weight") x = Tensor::ones({32}, DType::i32);
  TempDir d;
  write_folder(d.path(), "llama", t);
  expect_error([&] { Transformer::from_pretrained(d.path()); }, {"model.norm.weight", "I32"});
}

TEST(LoadErrors, UnsupportedArchitecture) {
  TempDir d;
  write_folder(d.path(), "llama", fixture_tensors("llama"),
               R"({"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": 256,
                   "hidden_size": 32})");
  expect_error([&] { Transformer::from_pretrained(d.path()); },
               {"BertForMaskedLM", "config.json", "LlamaForCausalLM"});
}

TEST(LoadErrors, ExactGeluIsRefused) {
  nlohmann::json j =
      nlohmann::json::parse(read_text_file(fixture_dir("gpt2") + "/config.json", "t"));
  j["activation_function"] = "gelu";
  TempDir d;
  write_folder(d.path(), "gpt2", fixture_tensors("gpt2"), j.dump());
  expect_error([&] { Transformer::from_pretrained(d.path()); }, {"gelu", "tanh"});
}

// A Mistral window shorter than max_position_embeddings loads only with max_seq_len <= window,
// and longer sequences are then refused.
TEST(LoadVariants, SlidingWindowNeedsMaxSeqLen) {
  nlohmann::json j =
      nlohmann::json::parse(read_text_file(fixture_dir("mistral") + "/config.json", "t"));
  j["sliding_window"] = 8;
  TempDir d;
  write_folder(d.path(), "mistral", fixture_tensors("mistral"), j.dump());
  expect_error([&] { Transformer::from_pretrained(d.path()); }, {"sliding_window 8"});
  auto m = Transformer::from_pretrained(d.path(), {.max_seq_len = 8});
  auto ref = Transformer::from_pretrained(fixture_dir("mistral"));
  NoGradGuard ng;
  Tensor ids = crop(load_expected("mistral").ids, 0, 2, 0, 8);
  EXPECT_EQ(ops::max_abs_diff(m->forward(ids), ref->forward(ids)), 0.0);
  expect_error([&] { m->forward(crop(load_expected("mistral").ids, 0, 2, 0, 9)); },
               {"position 8", "sliding_window"});
}

TEST(LoadErrors, MissingFiles) {
  TempDir d;
  expect_error([&] { Transformer::from_pretrained(d.file("nope")); }, {"does not exist"});
  expect_error([&] { Transformer::from_pretrained(d.path()); }, {"config.json"});
  std::ofstream(d.file("config.json"))
      << read_text_file(fixture_dir("llama") + "/config.json", "t");
  expect_error([&] { Transformer::from_pretrained(d.path()); }, {"model.safetensors"});
}

// ---------------------------------------------------------------- init and naming

ModelConfig fixture_config(const std::string& name) {
  return load_hf_config(fixture_dir(name) + "/config.json");
}

TEST(Init, NamesFollowTransformers) {
  Transformer llama(fixture_config("llama"));
  auto names = llama.named_parameters();
  EXPECT_EQ(names.front().first, "model.embed_tokens.weight");
  EXPECT_EQ(names[1].first, "model.layers.0.self_attn.q_proj.weight");
  EXPECT_EQ(names.back().first, "lm_head.weight");
  Transformer qwen(fixture_config("qwen2"));  // tied: the head is the embedding, listed once
  EXPECT_EQ(qwen.named_parameters().back().first, "model.norm.weight");
  EXPECT_EQ(qwen.num_parameters(), 26912);  // as transformers counts them
  Transformer gpt2(fixture_config("gpt2"));
  EXPECT_EQ(gpt2.named_parameters()[2].first, "transformer.h.0.ln_1.weight");
  EXPECT_EQ(gpt2.parameter("transformer.h.0.attn.c_attn.weight").shape(), (Shape{32, 96}));
  EXPECT_EQ(gpt2.num_parameters(), 35712);
}

TEST(Init, RandomInitIsSeededAndFollowsHF) {
  for (const auto& name : model_fixtures()) {
    ModelConfig c = fixture_config(name);
    Transformer a(c), b(c), other(c);
    a.init_random(7);
    b.init_random(7);
    other.init_random(8);
    expect_same_params(a, b);
    EXPECT_NE(a.named_parameters()[0].second.to_vector<float>(),
              other.named_parameters()[0].second.to_vector<float>());
    for (auto& [n, p] : a.named_parameters()) {
      std::vector<double> v = p.to_vector<double>();
      const bool norm = n.find("norm") != std::string::npos || n.find("ln_") != std::string::npos;
      if (p.dim() == 1) {  // norm weights 1, every bias and norm bias 0
        const double want = norm && n.ends_with(".weight") ? 1.0 : 0.0;
        for (double x : v) ASSERT_EQ(x, want) << n;
        continue;
      }
      double s2 = 0.0;
      for (double x : v) s2 += x * x;
      const double sd = std::sqrt(s2 / double(v.size()));
      // GPT-2's residual projections: 0.02 / sqrt(2 * n_layer).
      const bool scaled = name == "gpt2" && n.find("c_proj.weight") != std::string::npos;
      EXPECT_NEAR(sd, scaled ? 0.01 : 0.02, 0.15 * (scaled ? 0.01 : 0.02)) << n;
    }
    // The tied head is still the embedding: logits use it.
    if (c.tie_word_embeddings)
      EXPECT_EQ(a.named_parameters().back().first.find("lm_head"), std::string::npos);
  }
}

TEST(Init, RandomModelsRoundTrip) {
  for (const auto& name : model_fixtures()) {
    Transformer m(fixture_config(name));
    m.init_random(3);
    TempDir d;
    m.save_pretrained(d.path());
    auto m2 = Transformer::from_pretrained(d.path());
    expect_same_params(m, *m2);
    NoGradGuard ng;
    Tensor ids = Tensor::from_vector(std::vector<int64_t>{5, 6, 7, 8}, {1, 4});
    EXPECT_EQ(ops::max_abs_diff(m.forward(ids), m2->forward(ids)), 0.0);
  }
}

// ---------------------------------------------------------------- forward errors

TEST(ForwardErrors, BadInputsAreRefused) {
  auto gpt2 = Transformer::from_pretrained(fixture_dir("gpt2"));
  auto llama = Transformer::from_pretrained(fixture_dir("llama"));
  NoGradGuard ng;
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{5, 6, 7, 8}, {1, 4});
  expect_error([&] { llama->forward(ids.to(DType::f32)); }, {"[transformer] ids"});
  expect_error([&] { llama->forward(ids.view({4})); }, {"[transformer] ids"});
  expect_error(
      [&] {
        llama->forward(Tensor::from_vector(std::vector<int64_t>{1, 256}, {1, 2}));
      },
      {"[embedding]", "256"});
  // GPT-2's learned positions end at n_positions (64).
  ForwardOptions far;
  far.positions = Tensor::from_vector(std::vector<int64_t>{60, 61, 62, 64}, {4});
  expect_error([&] { gpt2->forward(ids, far); }, {"position 64", "[0, 64)", "n_positions"});
  ForwardOptions badpos;
  badpos.positions = Tensor::arange(3);
  expect_error([&] { llama->forward(ids, badpos); }, {"positions must be"});
  // Packing needs positions.
  ForwardOptions packed;
  packed.cu_seqlens = Tensor::from_vector(std::vector<int32_t>{0, 2, 4}, {3});
  expect_error([&] { llama->forward(ids, packed); }, {"cu_seqlens", "positions"});
  // cu_seqlens that do not cover the tokens.
  packed.positions = Tensor::from_vector(std::vector<int64_t>{0, 1, 0, 1}, {1, 4});
  packed.cu_seqlens = Tensor::from_vector(std::vector<int32_t>{0, 2, 5}, {3});
  expect_error([&] { llama->forward(ids, packed); }, {"cu_seqlens"});
}

TEST(ForwardErrors, KVCacheMisuse) {
  auto llama = Transformer::from_pretrained(fixture_dir("llama"));
  NoGradGuard ng;
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{5, 6, 7, 8}, {1, 4});
  KVCache c = llama->make_cache(1, 6, {0});
  ForwardOptions o;
  o.cache = &c;
  llama->forward(ids, o);
  EXPECT_EQ(c.length, 4);
  expect_error([&] { llama->forward(ids, o); }, {"KV cache full", "max_len 6"});
  EXPECT_EQ(c.length, 4);
  KVCache c2 = llama->make_cache(2, 6, {0, 0});
  o.cache = &c2;
  expect_error([&] { llama->forward(ids, o); }, {"KV cache holds 2 rows"});
  KVCache c3 = KVCache::make(1, 1, 8, 2, 8, {0});  // one layer, the model has two
  o.cache = &c3;
  expect_error([&] { llama->forward(ids, o); }, {"1 layers"});
  o.cu_seqlens = Tensor::from_vector(std::vector<int32_t>{0, 4}, {2});
  o.cache = &c;
  expect_error([&] { llama->forward(ids, o); }, {"cannot be used together"});
  expect_error([&] { KVCache::make(2, 2, 8, 2, 8, {0}); }, {"pad has 1 entries"});
  expect_error([&] { KVCache::make(2, 1, 8, 2, 8, {8}); }, {"pad[0] = 8"});
}

// A cached forward records no graph (it is for generation); the cache holds RoPE'd keys.
TEST(KVCacheTest, RecordsNoGraphAndStoresRotatedKeys) {
  auto llama = Transformer::from_pretrained(fixture_dir("llama"));
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{5, 6, 7}, {1, 3});
  KVCache c = llama->make_cache(1, 4, {0});
  ForwardOptions o;
  o.cache = &c;
  Tensor logits = llama->forward(ids, o);
  EXPECT_FALSE(logits.requires_grad());
  EXPECT_EQ(c.k[0].shape(), (Shape{1, 4, 2, 8}));
  // Slot 3 untouched, slots 0..2 written.
  std::vector<float> k = c.k[1].to_vector<float>();
  float written = 0.0f, tail = 0.0f;
  for (size_t i = 0; i < 3 * 16; ++i) written += std::abs(k[i]);
  for (size_t i = 3 * 16; i < k.size(); ++i) tail += std::abs(k[i]);
  EXPECT_GT(written, 0.0f);
  EXPECT_EQ(tail, 0.0f);
}

// ---------------------------------------------------------------- ScalarHead

class RewardModel : public nn::Module {
 public:
  explicit RewardModel(int64_t hidden) {
    score = register_module("score", std::make_shared<ScalarHead>(hidden));
  }
  std::shared_ptr<ScalarHead> score;
};

TEST(ScalarHeadTest, ScoresTheLastRealToken) {
  RewardModel rm(4);
  EXPECT_EQ(rm.named_parameters().front().first, "score.weight");
  EXPECT_EQ(rm.score->weight.shape(), (Shape{1, 4}));
  rm.score->init_random(1, 0.5);
  Tensor hidden = Tensor::from_vector(std::vector<float>{0,  1,  2,  3,  4, 5, 6, 7, 8, 9, 10, 11,
                                                         -1, -2, -3, -4, 5, 5, 5, 5, 9, 9, 9,  9},
                                      {2, 3, 4})
                      .set_requires_grad(true);
  Tensor lengths = Tensor::from_vector(std::vector<int64_t>{3, 1}, {2});
  Tensor s = rm.score->forward(hidden, lengths);
  ASSERT_EQ(s.shape(), (Shape{2}));
  std::vector<float> w = rm.score->weight.to_vector<float>();
  const float s0 = 8 * w[0] + 9 * w[1] + 10 * w[2] + 11 * w[3];
  const float s1 = -1 * w[0] - 2 * w[1] - 3 * w[2] - 4 * w[3];
  EXPECT_NEAR(s.to_vector<float>()[0], s0, 1e-5);
  EXPECT_NEAR(s.to_vector<float>()[1], s1, 1e-5);
  ops::sum(s).backward();
  std::vector<float> gh = hidden.grad().to_vector<float>();
  for (int64_t i = 0; i < 24; ++i) {
    const bool read = (i >= 8 && i < 12) || (i >= 12 && i < 16);
    EXPECT_EQ(gh[size_t(i)], read ? w[size_t(i % 4)] : 0.0f) << i;
  }
  EXPECT_EQ(rm.score->weight.grad().to_vector<float>(),
            (std::vector<float>{7, 7, 7, 7}));  // [8..11] + [-1..-4]
  expect_error(
      [&] {
        rm.score->forward(hidden, Tensor::from_vector(std::vector<int64_t>{4, 1}, {2}));
      },
      {"lengths[0] = 4"});
  expect_error(
      [&] {
        rm.score->forward(hidden, Tensor::from_vector(std::vector<int64_t>{0, 1}, {2}));
      },
      {"lengths[0] = 0"});
  expect_error([&] { rm.score->forward(hidden.slice(2, 0, 3), lengths); },
               {"[scalar_head] hidden"});
}

TEST(ScalarHeadTest, OnTopOfATransformerWithBias) {
  auto llama = Transformer::from_pretrained(fixture_dir("llama"));
  ScalarHead head(32, true);
  head.init_random(2);
  EXPECT_EQ(head.named_parameters().size(), 2u);
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{5, 6, 7, 8, 9, 10}, {2, 3});
  Tensor h = llama->hidden_states(ids);
  Tensor s = head.forward(h, Tensor::from_vector(std::vector<int32_t>{2, 3}, {2}));
  // Row 0 read at token 1: the same as scoring the prefix alone (causal).
  Tensor h0 = llama->hidden_states(crop(ids, 0, 1, 0, 2));
  Tensor s0 = head.forward(h0, Tensor::from_vector(std::vector<int64_t>{2}, {1}));
  EXPECT_NEAR(s.to_vector<float>()[0], s0.item(), 1e-5);
  ops::sum(s).backward();
  EXPECT_TRUE(head.bias.grad().defined());
  EXPECT_EQ(head.bias.grad().item(), 2.0);
  EXPECT_TRUE(llama->parameter("model.layers.0.mlp.up_proj.weight").grad().defined());
}

// ---------------------------------------------------------------- interop

// Writes save_pretrained of every fixture under $FTUNE_MODELS_OUT/<name> for
// `make_model_fixtures.py --check` (transformers loads them). Skips without the variable.
TEST(ModelInterop, WritesFoldersForTransformers) {
  const char* out = std::getenv("FTUNE_MODELS_OUT");
  if (!out) GTEST_SKIP() << "set FTUNE_MODELS_OUT=DIR to write the folders for the Python check";
  for (const auto& name : model_fixtures())
    Transformer::from_pretrained(fixture_dir(name))->save_pretrained(std::string(out) + "/" + name);
}

}  // namespace
}  // namespace ftune::test
