// One decoder-only transformer for GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM and
// Qwen2ForCausalLM (see io/hf_config.h for what each family switches): learned or rotary
// positions, LayerNorm or RMSNorm, GELU MLP or SwiGLU, grouped-query attention, biases where the
// family has them, tied or untied embeddings. Parameter names are the HF names, so weights
// round-trip through safetensors.
#pragma once
#include <memory>
#include <string>

#include "core/nn.h"
#include "core/ops.h"
#include "io/hf_config.h"
#include "models/kv_cache.h"

namespace ftune {

struct ForwardOptions {
  // i32|i64 [B, T]. Undefined: 0..T-1 for every row (with a cache: slot - pad[r]).
  Tensor positions;
  // Packed sequences (cu_seqlens over the flattened B*T tokens; positions must then be given).
  Tensor cu_seqlens;
  // Generation: this call's K/V are written at slots [cache->length, cache->length + T) and the
  // queries attend to the cache (padding excluded); cache->length advances by T.
  KVCache* cache = nullptr;
};

class Transformer : public nn::Module {
 public:
  explicit Transformer(const ModelConfig& cfg);
  // A HF model folder: config.json and model.safetensors or model.safetensors.index.json.
  static std::unique_ptr<Transformer> from_pretrained(const std::string& dir);
  // Writes config.json and model.safetensors (HF names and layouts; tied weights stored once, as
  // HF does; metadata {"format": "pt"}); above max_shard_bytes, shards and an index as HF does.
  void save_pretrained(const std::string& dir, uint64_t max_shard_bytes = 5'000'000'000ull) const;
  // Normal(0, std) weights, zero biases, unit norms (HF's _init_weights with initializer_range).
  void init_random(uint64_t seed, double std = 0.02);

  // ids i32|i64 [B, T] -> hidden states after the final norm [B, T, hidden].
  Tensor hidden_states(const Tensor& ids, const ForwardOptions& opt = {});
  // ids [B, T] -> logits [B, T, vocab].
  Tensor forward(const Tensor& ids, const ForwardOptions& opt = {});

  const ModelConfig& config() const { return cfg_; }
  KVCache make_cache(int64_t batch, int64_t max_len, std::vector<int64_t> pad) const;

 private:
  ModelConfig cfg_;
  struct Impl;
  std::shared_ptr<Impl> impl_;
};

// A scalar head for reward and value models: score [B] read at the last non-pad token of each
// row (HF AutoModelForSequenceClassification with num_labels=1: "score.weight" [1, hidden]).
class ScalarHead : public nn::Module {
 public:
  explicit ScalarHead(int64_t hidden, bool bias = false);
  // hidden [B, T, H], lengths i64 [B] (number of real tokens, right padding) -> [B]
  Tensor forward(const Tensor& hidden, const Tensor& lengths);
  // Normal(0, std) weight, zero bias (HF's _init_weights). The constructor zero-initialises.
  void init_random(uint64_t seed, double std = 0.02);
  Tensor weight, bias;
};

}  // namespace ftune
