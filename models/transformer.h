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
  // i32|i64 [B, T] or [T]. Undefined: 0..T-1 for every row (with a cache: slot - pad[r], and 0 on
  // pad slots, whose outputs are meaningless).
  Tensor positions;
  // Packed sequences: i32|i64 [n + 1] boundaries over the flattened B*T tokens (a row may hold
  // several sequences, a sequence never spans rows); tokens attend only within their sequence.
  // positions must then be given (usually restarting at 0 per sequence).
  Tensor cu_seqlens;
  // Generation: this call's K/V (after RoPE) are written at slots [cache->length,
  // cache->length + T) and the queries attend to the filled slots of their row, padding excluded;
  // cache->length advances by T. A cached forward records no autograd graph (its output does not
  // require grad): it is for generation, not training. Not combinable with cu_seqlens.
  KVCache* cache = nullptr;
};

class Transformer : public nn::Module {
 public:
  // Throws for configs it cannot compute exactly (e.g. GPT-2's exact-erf "gelu"; see
  // docs/models.md). Parameters are f32: zeros (norm weights 1) until loaded or init_random.
  explicit Transformer(const ModelConfig& cfg);
  // A HF model folder: config.json and model.safetensors or model.safetensors.index.json.
  // Weights are converted to f32; missing, unexpected, mis-shaped or non-float tensors are
  // refused with an Error naming the folder, the file and the tensors. HF's non-parameter
  // buffers (GPT-2 attn.bias / attn.masked_bias, rotary inv_freq), base-model names without the
  // "transformer." / "model." prefix, and a tied lm_head.weight stored anyway (if equal to the
  // embedding) are accepted. `opt.max_seq_len` admits a sliding-window config (Mistral v0.1's
  // 4096) for sequences no longer than the window (see io/hf_config.h); longer ones then throw.
  static std::unique_ptr<Transformer> from_pretrained(const std::string& dir,
                                                      const HfConfigOptions& opt = {});
  // Writes config.json and model.safetensors (HF names and layouts; tied weights stored once, as
  // HF does; metadata {"format": "pt"}); above max_shard_bytes, shards and an index as HF does.
  void save_pretrained(const std::string& dir, uint64_t max_shard_bytes = 5'000'000'000ull) const;
  // Normal(0, std) weights, zero biases, unit norms (HF's _init_weights with initializer_range;
  // GPT-2's c_proj weights get std / sqrt(2 * n_layer) as in GPT2PreTrainedModel). Seeded.
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
  // hidden [B, T, H], lengths i32|i64 [B] (number of real tokens, right padding; 1..T) -> [B].
  // Differentiable in hidden, weight and bias. Register it as "score" to get HF's names.
  Tensor forward(const Tensor& hidden, const Tensor& lengths);
  // Normal(0, std) weight, zero bias (HF's _init_weights). The constructor zero-initialises.
  void init_random(uint64_t seed, double std = 0.02);
  Tensor weight, bias;
};

}  // namespace ftune
