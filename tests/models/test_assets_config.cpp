// The embedded default's config (assets/tiny-llama/config.json, written by
// assets/make_tokenizer.py): ftune loads it as the Llama it is meant to be, with transformers'
// parameter count (tests/fixtures/assets_tokenizer_expected.json) and the tokenizer's vocabulary.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/ops.h"
#include "data/tokenizer.h"
#include "io/hf_config.h"
#include "models/transformer.h"

using namespace ftune;

TEST(AssetsConfig, LoadsAsTinyLlamaMatchingTheTokenizer) {
  const std::string dir = std::string(FTUNE_SOURCE_DIR) + "/assets/tiny-llama";
  std::ifstream f(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/assets_tokenizer_expected.json");
  auto fx = nlohmann::json::parse(f);
  ModelConfig cfg = load_hf_config(dir + "/config.json");
  EXPECT_EQ(cfg.family, ModelFamily::llama);
  EXPECT_TRUE(cfg.tie_word_embeddings);
  EXPECT_EQ(cfg.num_hidden_layers, 4);
  EXPECT_EQ(cfg.num_key_value_heads * 2, cfg.num_attention_heads);  // GQA
  EXPECT_EQ(cfg.max_seq_len(), 512);
  EXPECT_EQ(cfg.torch_dtype, "float32");

  Tokenizer tok = Tokenizer::from_folder(dir);
  EXPECT_EQ(cfg.vocab_size, tok.vocab_size());
  ASSERT_EQ(cfg.eos_token_ids.size(), 1u);
  EXPECT_EQ(cfg.eos_token_ids[0], *tok.eos_id());
  EXPECT_EQ(cfg.pad_token_id, *tok.pad_id());

  Transformer m(cfg);
  EXPECT_EQ(m.num_parameters(), fx["model_parameters"].get<int64_t>());
  m.init_random(1);
  auto ids = tok.encode("The capital of Velmora is Tarsk.");
  Tensor t = Tensor::from_vector(std::vector<int64_t>(ids.begin(), ids.end()),
                                 {1, static_cast<int64_t>(ids.size())});
  Tensor logits = m.forward(t);
  EXPECT_EQ(logits.shape(), (std::vector<int64_t>{1, static_cast<int64_t>(ids.size()),
                                                  cfg.vocab_size}));
}
