// Helpers for the model tests: the fixtures of tests/fixtures/models (made by
// tests/fixtures/make_model_fixtures.py with transformers) and small tensor utilities.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/ops.h"
#include "io/safetensors.h"
#include "models/transformer.h"

namespace ftune::test {

// Every fixture model: the four families plus Llama's optional biases / explicit head_dim / MQA.
inline const std::vector<std::string>& model_fixtures() {
  static const std::vector<std::string> names{"gpt2", "llama", "llama_bias", "qwen2", "mistral"};
  return names;
}

inline std::string fixture_dir(const std::string& name) {
  return std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/models/" + name;
}

// expected.safetensors: input_ids i64 [2, T], logits f32 [2, T, V], loss f32 [].
struct Expected {
  Tensor ids, logits, loss;
};

inline Expected load_expected(const std::string& name) {
  SafetensorsFile f(fixture_dir(name) + "/expected.safetensors");
  return {f.get("input_ids"), f.get("logits"), f.get("loss")};
}

// Rows [b0, b1) and columns [t0, t1) of ids [B, T], contiguous.
inline Tensor crop(const Tensor& ids, int64_t b0, int64_t b1, int64_t t0, int64_t t1) {
  return ids.slice(0, b0, b1).slice(1, t0, t1).contiguous();
}

// The fixture's loss: mean cross-entropy of logits[:, :-1] against ids[:, 1:].
inline Tensor lm_loss(const Tensor& logits, const Tensor& ids) {
  const int64_t B = logits.size(0), T = logits.size(1), V = logits.size(2);
  Tensor l = logits.slice(1, 0, T - 1).reshape({B * (T - 1), V});
  Tensor tgt = ids.slice(1, 1, T).contiguous().reshape({B * (T - 1)});
  return ops::cross_entropy(l, tgt);
}

inline std::vector<int64_t> ids_row(const Tensor& ids, int64_t b) {
  return ids.slice(0, b, b + 1).contiguous().to_vector<int64_t>();
}

}  // namespace ftune::test
