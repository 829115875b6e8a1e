// Helpers shared by the tests that run the ftune binary or the trainer end to end
// (tests/launch, tests/mpi): shell quoting, reading a file, the tiny training setup, and
// comparing loss curves.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "io/hf_config.h"
#include "models/transformer.h"

namespace ftune::test_util {

namespace fs = std::filesystem;

// The curves of a run's metrics.jsonl (trainers/sft.cpp): one entry per train line, and the
// eval lines' losses.
struct Metrics {
  std::vector<int64_t> steps;
  std::vector<double> train_loss, grad_norm, lr;
  std::vector<double> eval_loss, eval_accuracy;
};

inline Metrics read_metrics(const fs::path& p) {
  Metrics m;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["split"] == "train") {
      m.steps.push_back(j["step"]);
      m.train_loss.push_back(j["loss"]);
      m.grad_norm.push_back(j["grad_norm"]);
      m.lr.push_back(j["lr"]);
    } else {
      m.eval_loss.push_back(j["loss"]);
      if (j.contains("accuracy")) m.eval_accuracy.push_back(j["accuracy"]);
    }
  }
  return m;
}

// Two loss (or grad-norm) curves step by step, each value within rtol of b's.
inline void expect_same_curve(const std::vector<double>& a, const std::vector<double>& b,
                              double rtol, const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  ASSERT_FALSE(a.empty()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(a[i], b[i], rtol * std::fabs(b[i])) << what << " at step " << i + 1;
}

// s as one single-quoted sh word.
inline std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

// The whole file ("" when it cannot be read).
inline std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A random tiny Llama (vocab 832, d 32, 2 layers, 4 heads, 2 kv heads, seeded) saved as a HF
// folder in `dir`, with the gpt2 fixture tokenizer (byte-level, ChatML template).
inline void write_tiny_llama(const fs::path& dir) {
  const fs::path tok = fs::path(FTUNE_SOURCE_DIR) / "tests/fixtures/tokenizers/gpt2";
  fs::create_directories(dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(tok / f, dir / f, fs::copy_options::overwrite_existing);
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                        {"model_type", "llama"},
                        {"vocab_size", 832},
                        {"hidden_size", 32},
                        {"intermediate_size", 64},
                        {"num_hidden_layers", 2},
                        {"num_attention_heads", 4},
                        {"num_key_value_heads", 2},
                        {"max_position_embeddings", 128},
                        {"rms_norm_eps", 1e-6},
                        {"rope_theta", 10000.0},
                        {"tie_word_embeddings", false}};
  Transformer m(parse_hf_config(cfg, "test"));
  m.init_random(7);
  m.save_pretrained(dir.string());
}

// A random tiny GPT-2 (vocab 832, d 32, 2 layers, 4 heads: fused [q | k | v] c_attn, seeded)
// saved as a HF folder in `dir`, with the gpt2 fixture tokenizer.
inline void write_tiny_gpt2(const fs::path& dir) {
  const fs::path tok = fs::path(FTUNE_SOURCE_DIR) / "tests/fixtures/tokenizers/gpt2";
  fs::create_directories(dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(tok / f, dir / f, fs::copy_options::overwrite_existing);
  nlohmann::json cfg = {{"architectures", {"GPT2LMHeadModel"}},
                        {"model_type", "gpt2"},
                        {"vocab_size", 832},
                        {"n_embd", 32},
                        {"n_layer", 2},
                        {"n_head", 4},
                        {"n_positions", 128},
                        {"layer_norm_epsilon", 1e-5},
                        {"activation_function", "gelu_new"}};
  Transformer m(parse_hf_config(cfg, "test"));
  m.init_random(7);
  m.save_pretrained(dir.string());
}

// n chat examples of a learnable toy task, "add A and B" -> "A + B = C", drawn from rng.
inline void write_add_dataset(const fs::path& path, int n, std::mt19937& rng) {
  std::ofstream d(path);
  for (int i = 0; i < n; ++i) {
    int a = int(rng() % 10), b = int(rng() % 10);
    nlohmann::json ex = {
        {"messages",
         {{{"role", "user"}, {"content", "add " + std::to_string(a) + " and " + std::to_string(b)}},
          {{"role", "assistant"},
           {"content",
            std::to_string(a) + " + " + std::to_string(b) + " = " + std::to_string(a + b)}}}}};
    d << ex.dump() << "\n";
  }
}

}  // namespace ftune::test_util
