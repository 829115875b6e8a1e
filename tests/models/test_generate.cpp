// Generation (models/generate.h): batched equals alone, the KV cache equals recomputing the whole
// forward, stop tokens, max_new_tokens, thread-count determinism, bad input, and greedy parity with
// transformers' generate on the fixture models of tests/fixtures/models.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/error.h"
#include "core/rng.h"
#include "io/hf_config.h"
#include "models/generate.h"
#include "models/sampling.h"
#include "models/transformer.h"

namespace ftune {
namespace {

using Ids = std::vector<int32_t>;

// A tiny random model of each family (GPT-2: learned positions, LayerNorm, tied; Llama: GQA,
// untied; Qwen2: q/k/v biases, tied). Weights drawn wide enough that logits spread out, so that
// greedy choices are not near-ties that float rounding could flip.
std::unique_ptr<Transformer> tiny_model(const std::string& family, int64_t vocab = 97,
                                        uint64_t seed = 1) {
  nlohmann::json j;
  if (family == "gpt2") {
    j = {{"architectures", {"GPT2LMHeadModel"}},
         {"model_type", "gpt2"},
         {"n_embd", 32},
         {"n_head", 4},
         {"n_layer", 2},
         {"n_positions", 48},
         {"activation_function", "gelu_new"},
         {"tie_word_embeddings", true}};
  } else if (family == "llama") {
    j = {{"architectures", {"LlamaForCausalLM"}},
         {"model_type", "llama"},
         {"hidden_size", 32},
         {"intermediate_size", 64},
         {"num_attention_heads", 4},
         {"num_key_value_heads", 2},
         {"num_hidden_layers", 2},
         {"max_position_embeddings", 48},
         {"rms_norm_eps", 1e-6},
         {"tie_word_embeddings", false}};
  } else {
    j = {{"architectures", {"Qwen2ForCausalLM"}},
         {"model_type", "qwen2"},
         {"hidden_size", 32},
         {"intermediate_size", 64},
         {"num_attention_heads", 4},
         {"num_key_value_heads", 1},
         {"num_hidden_layers", 2},
         {"max_position_embeddings", 48},
         {"rms_norm_eps", 1e-6},
         {"tie_word_embeddings", true}};
  }
  j["vocab_size"] = vocab;
  auto m = std::make_unique<Transformer>(parse_hf_config(j, family));
  m->init_random(seed, 0.3);
  return m;
}

const std::vector<std::string> kFamilies = {"gpt2", "llama", "qwen2"};

Ids random_prompt(int64_t len, uint64_t seed, int64_t vocab = 97) {
  Generator g(seed);
  return Tensor(randint({len}, g, 1, vocab, DType::i32)).to_vector<int32_t>();
}

// The reference: no cache, the whole sequence through the model at every step, one draw per step
// with the uniform generate would use for row `stream`.
Ids generate_by_recompute(Transformer& m, Ids seq, int64_t n, const SamplingOptions& s,
                          uint64_t stream, const Ids& stops = {}) {
  NoGradGuard ng;
  Ids out;
  for (int64_t t = 0; t < n; ++t) {
    std::vector<int64_t> ids(seq.begin(), seq.end());
    Tensor logits = m.forward(Tensor::from_vector(ids, {1, int64_t(ids.size())}));
    Tensor last = logits.slice(1, logits.size(1) - 1, logits.size(1)).contiguous();
    const float u = s.greedy() ? 0.0f : philox_uniform(s.seed, stream, uint64_t(t));
    const int32_t tok = sample_row(last.data<float>(), last.size(2), s, u);
    out.push_back(tok);
    seq.push_back(tok);
    if (std::find(stops.begin(), stops.end(), tok) != stops.end()) break;
  }
  return out;
}

GenerateOptions greedy_opts(int64_t n) {
  GenerateOptions o;
  o.max_new_tokens = n;
  return o;
}

GenerateOptions sampling_opts(int64_t n) {
  GenerateOptions o;
  o.max_new_tokens = n;
  o.temperature = 0.9;
  o.top_k = 30;
  o.top_p = 0.95;
  o.seed = 2024;
  return o;
}

class Generate : public ::testing::TestWithParam<std::string> {};

TEST_P(Generate, KVCacheEqualsRecomputingTheFullForward) {
  auto m = tiny_model(GetParam());
  for (uint64_t p = 0; p < 3; ++p) {
    Ids prompt = random_prompt(int64_t(3 + 4 * p), 10 + p);
    auto g = greedy_opts(12);
    EXPECT_EQ(generate(*m, {prompt}, g)[0], generate_by_recompute(*m, prompt, 12, g.sampling(), 0))
        << "greedy, prompt " << p;
    auto s = sampling_opts(12);
    EXPECT_EQ(generate(*m, {prompt}, s)[0], generate_by_recompute(*m, prompt, 12, s.sampling(), 0))
        << "sampled, prompt " << p;
  }
}

TEST_P(Generate, BatchedEqualsEachPromptAlone) {
  auto m = tiny_model(GetParam());
  const std::vector<Ids> prompts = {random_prompt(5, 1), random_prompt(1, 2), random_prompt(9, 3),
                                    random_prompt(9, 4)};
  for (bool sample : {false, true}) {
    GenerateOptions o = sample ? sampling_opts(10) : greedy_opts(10);
    auto batched = generate(*m, prompts, o);
    ASSERT_EQ(batched.size(), prompts.size());
    for (size_t r = 0; r < prompts.size(); ++r) {
      GenerateOptions alone = o;
      alone.stream_offset = r;  // row r of the batch draws from stream r
      EXPECT_EQ(generate(*m, {prompts[r]}, alone)[0], batched[r])
          << (sample ? "sampled" : "greedy") << " row " << r;
      EXPECT_EQ(batched[r].size(), 10u);
    }
  }
  // the padding id does not matter
  GenerateOptions o = greedy_opts(6);
  auto a = generate(*m, prompts, o);
  o.pad_token_id = 96;
  EXPECT_EQ(generate(*m, prompts, o), a);
}

TEST_P(Generate, SamplingDependsOnTheSeedAndStream) {
  auto m = tiny_model(GetParam());
  Ids prompt = random_prompt(4, 8);
  GenerateOptions o = sampling_opts(16);
  o.temperature = 1.5;
  o.top_k = 0;
  o.top_p = 1.0;
  auto base = generate(*m, {prompt, prompt}, o);
  EXPECT_NE(base[0], base[1]) << "two rows with the same prompt draw from different streams";
  EXPECT_EQ(generate(*m, {prompt, prompt}, o), base);  // and the same seed repeats
  o.seed += 1;
  EXPECT_NE(generate(*m, {prompt, prompt}, o)[0], base[0]);
}

TEST_P(Generate, StopsAtAStopTokenAndIncludesIt) {
  auto m = tiny_model(GetParam());
  Ids p0 = random_prompt(6, 21), p1 = random_prompt(3, 22);
  auto free_run = generate(*m, {p0, p1}, greedy_opts(12));
  // stop row 0 at its 4th token (at its first occurrence of that id)
  const int32_t stop = free_run[0][3];
  const size_t first =
      size_t(std::find(free_run[0].begin(), free_run[0].end(), stop) - free_run[0].begin());
  GenerateOptions o = greedy_opts(12);
  o.stop_token_ids = {stop};
  std::vector<std::pair<int64_t, int32_t>> calls;
  auto out = generate(*m, {p0, p1}, o, [&](int64_t r, int32_t t) { calls.emplace_back(r, t); });
  EXPECT_EQ(out[0], Ids(free_run[0].begin(), free_run[0].begin() + ptrdiff_t(first + 1)));
  EXPECT_EQ(out[0].back(), stop);
  // row 1 runs on unaffected (up to its own first `stop`) though row 0 is fed padding
  auto it = std::find(free_run[1].begin(), free_run[1].end(), stop);
  Ids expect1(free_run[1].begin(), it == free_run[1].end() ? it : it + 1);
  EXPECT_EQ(out[1], expect1);
  // the callback saw exactly the output tokens: per step, the running rows in order
  std::vector<std::pair<int64_t, int32_t>> expect_calls;
  for (size_t step = 0; step < 12; ++step)
    for (int64_t r = 0; r < 2; ++r)
      if (step < out[size_t(r)].size()) expect_calls.emplace_back(r, out[size_t(r)][step]);
  EXPECT_EQ(calls, expect_calls);

  // every row stopping ends the generation early: both stop at their first token
  GenerateOptions both = greedy_opts(12);
  both.stop_token_ids = {free_run[0][0], free_run[1][0]};
  auto early = generate(*m, {p0, p1}, both);
  EXPECT_EQ(early, (std::vector<Ids>{{free_run[0][0]}, {free_run[1][0]}}));
}

TEST_P(Generate, MaxNewTokens) {
  auto m = tiny_model(GetParam());
  std::vector<Ids> prompts = {random_prompt(4, 31), random_prompt(2, 32)};
  EXPECT_EQ(generate(*m, prompts, greedy_opts(0)), (std::vector<Ids>{{}, {}}));
  auto one = generate(*m, prompts, greedy_opts(1));
  auto many = generate(*m, prompts, greedy_opts(20));
  for (size_t r = 0; r < 2; ++r) {
    ASSERT_EQ(one[r].size(), 1u);
    ASSERT_EQ(many[r].size(), 20u);
    EXPECT_EQ(one[r][0], many[r][0]);
  }
  EXPECT_TRUE(generate(*m, {}, greedy_opts(5)).empty());
  // up to the model's length: 4 + 45 - 1 = 48 = max_position_embeddings slots
  EXPECT_EQ(generate(*m, {prompts[0]}, greedy_opts(45))[0].size(), 45u);
  EXPECT_THROW(generate(*m, {prompts[0]}, greedy_opts(46)), Error);
}

TEST_P(Generate, DeterministicAcrossThreadCounts) {
  auto m = tiny_model(GetParam());
  std::vector<Ids> prompts = {random_prompt(7, 41), random_prompt(2, 42), random_prompt(5, 43)};
  const int saved = omp_get_max_threads();
  for (bool sample : {false, true}) {
    GenerateOptions o = sample ? sampling_opts(10) : greedy_opts(10);
    omp_set_num_threads(1);
    auto one = generate(*m, prompts, o);
    omp_set_num_threads(2);
    auto two = generate(*m, prompts, o);
    EXPECT_EQ(one, two) << (sample ? "sampled" : "greedy");
  }
  omp_set_num_threads(saved);
}

TEST_P(Generate, RestoresTrainingModeAndRecordsNoGraph) {
  auto m = tiny_model(GetParam());
  m->train();
  ASSERT_TRUE(grad_enabled());
  generate(*m, {random_prompt(3, 51)}, greedy_opts(3));
  EXPECT_TRUE(m->is_training());
  EXPECT_TRUE(grad_enabled());
  m->eval();
  generate(*m, {random_prompt(3, 51)}, greedy_opts(3));
  EXPECT_FALSE(m->is_training());
}

TEST_P(Generate, BadInputThrows) {
  auto m = tiny_model(GetParam());
  Ids ok = random_prompt(3, 61);
  EXPECT_THROW(generate(*m, {ok, {}}, greedy_opts(2)), Error);   // empty prompt
  EXPECT_THROW(generate(*m, {{1, 97}}, greedy_opts(2)), Error);  // id == vocab
  EXPECT_THROW(generate(*m, {{1, -1}}, greedy_opts(2)), Error);  // negative id
  EXPECT_THROW(generate(*m, {ok}, greedy_opts(-1)), Error);      // max_new_tokens < 0
  GenerateOptions pad = greedy_opts(2);
  pad.pad_token_id = 97;
  EXPECT_THROW(generate(*m, {ok}, pad), Error);
  GenerateOptions temp = greedy_opts(2);
  temp.temperature = -0.5;
  EXPECT_THROW(generate(*m, {ok}, temp), Error);
  GenerateOptions top_p = sampling_opts(2);
  top_p.top_p = 1.5;
  EXPECT_THROW(generate(*m, {ok}, top_p), Error);
  EXPECT_THROW(generate(*m, {random_prompt(49, 62)}, greedy_opts(1)), Error);  // > 48 positions
  try {
    generate(*m, {ok, {5, 200}}, greedy_opts(2));
    FAIL() << "no throw";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("[generate] prompt 1 token 1 has id 200"), std::string::npos) << msg;
  }
}

INSTANTIATE_TEST_SUITE_P(Families, Generate, ::testing::ValuesIn(kFamilies),
                         [](const auto& info) { return info.param; });

// transformers' model.generate(do_sample=False) on the committed fixture models, alone and as a
// left-padded batch (tests/fixtures/make_model_fixtures.py). transformers keeps generating pad
// after a row's eos; ftune stops the row there, so its output is the reference up to the eos.
class GenerateParity : public ::testing::TestWithParam<std::string> {};

Ids until_eos(const Ids& ids, int32_t eos) {
  auto it = std::find(ids.begin(), ids.end(), eos);
  return Ids(ids.begin(), it == ids.end() ? it : it + 1);
}

TEST_P(GenerateParity, GreedyMatchesTransformers) {
  const std::string dir = std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/models/" + GetParam();
  auto m = Transformer::from_pretrained(dir);
  std::ifstream f(dir + "/generate.json");
  ASSERT_TRUE(f) << dir << "/generate.json";
  nlohmann::json g = nlohmann::json::parse(f);
  GenerateOptions o;
  o.max_new_tokens = g["max_new_tokens"];
  const int32_t eos = g["eos_token_id"];
  o.stop_token_ids = {eos};
  o.pad_token_id = g["pad_token_id"];
  auto prompts = g["prompts"].get<std::vector<Ids>>();
  auto single = g["single"].get<std::vector<Ids>>();
  auto batched = g["batched"]["new_tokens"].get<std::vector<Ids>>();
  ASSERT_EQ(prompts.size(), single.size());
  for (size_t i = 0; i < prompts.size(); ++i)
    EXPECT_EQ(generate(*m, {prompts[i]}, o)[0], until_eos(single[i], eos)) << "prompt " << i;
  auto out = generate(*m, prompts, o);
  ASSERT_EQ(out.size(), batched.size());
  for (size_t i = 0; i < out.size(); ++i)
    EXPECT_EQ(out[i], until_eos(batched[i], eos)) << "batched row " << i;
  // our own left padding is the fixture's
  auto padded = g["batched"]["input_ids"].get<std::vector<Ids>>();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const size_t pad = padded[i].size() - prompts[i].size();
    EXPECT_TRUE(
        std::equal(prompts[i].begin(), prompts[i].end(), padded[i].begin() + ptrdiff_t(pad)));
  }
}

std::vector<std::string> fixture_models() {
  std::vector<std::string> names;
  const std::filesystem::path root = std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/models";
  if (std::filesystem::is_directory(root))
    for (const auto& e : std::filesystem::directory_iterator(root))
      if (std::filesystem::exists(e.path() / "generate.json"))
        names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GenerateParity, ::testing::ValuesIn(fixture_models()),
                         [](const auto& info) { return info.param; });

TEST(GenerateParityFixtures, EveryFamilyIsThere) {
  auto names = fixture_models();
  for (const char* family : {"gpt2", "llama", "mistral", "qwen2"})
    EXPECT_NE(std::find(names.begin(), names.end(), family), names.end()) << family;
}

}  // namespace
}  // namespace ftune
