// One decoder-only transformer for GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM and
// Qwen2ForCausalLM (see io/hf_config.h for what each family switches): learned or rotary
// positions, LayerNorm or RMSNorm, GELU MLP or SwiGLU, grouped-query attention, biases where the
// family has them, tied or untied embeddings. Parameter names are the HF names, so weights
// round-trip through safetensors.
#pragma once
#include <map>
#include <memory>
#include <string>

#include "core/nn.h"
#include "core/ops.h"
#include "io/hf_config.h"
#include "models/kv_cache.h"
#include "parallel/tp_ops.h"

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
  // from_pretrained then shard_for_tp(tp_group), bit for bit, but each rank reads only its slices
  // from the safetensors files (the model is built without allocating the full parameters), so
  // a rank's host memory is its shards plus the replicated tensors, not the whole model. Checks
  // the same names, shapes and dtypes as from_pretrained. A null or size-1 group: from_pretrained.
  static std::unique_ptr<Transformer> from_pretrained_sharded(
      const std::string& dir, std::shared_ptr<parallel::Communicator> tp_group,
      const HfConfigOptions& opt = {});
  // Writes config.json and model.safetensors (HF names and layouts; tied weights stored once, as
  // HF does; metadata {"format": "pt"}); above max_shard_bytes, shards and an index as HF does.
  void save_pretrained(const std::string& dir, uint64_t max_shard_bytes = 5'000'000'000ull) const;
  // Normal(0, std) weights, zero biases, unit norms (HF's _init_weights with initializer_range;
  // GPT-2's c_proj weights get std / sqrt(2 * n_layer) as in GPT2PreTrainedModel). Seeded.
  void init_random(uint64_t seed, double std = 0.02);

  // Activation checkpointing per block: in training, each block's activations are recomputed in
  // the backward instead of kept (recipe: enable_activation_checkpointing). Off by default.
  void set_activation_checkpointing(bool on);
  bool activation_checkpointing() const;

  // Batched attention input projections (docs/lora.md, "Batched q/k/v"): with on, each layer's
  // q/k/v weights (and biases) become row blocks of one buffer (the parameters are views of it:
  // names, checkpoints, export and tp shards unchanged) and, while the three are frozen, run as
  // one lora_linear_multi (one base GEMM; one A GEMM for the adapters without dropout). Off: three
  // projections, as before (the buffer stays). apply_lora turns it on unless FTUNE_FUSED_QKV=0.
  // No effect on GPT-2 (c_attn is one projection already) or with a trainable base.
  void set_fused_qkv(bool on);
  // True when every layer's attention currently runs the batched path.
  bool fused_qkv() const;

  // ids i32|i64 [B, T] -> hidden states after the final norm [B, T, hidden].
  Tensor hidden_states(const Tensor& ids, const ForwardOptions& opt = {});
  // ids [B, T] -> logits [B, T, vocab]. Under tensor parallelism the vocab shards are gathered
  // (every rank gets the full logits; for generation and evaluation: training wants
  // forward_logits_shard and parallel::vocab_parallel_cross_entropy).
  Tensor forward(const Tensor& ids, const ForwardOptions& opt = {});
  // The LM head's weight [vocab (this rank's shard under TP), hidden]: the embedding when tied.
  // forward is ops::linear(hidden_states, lm_head_weight()) (no bias), so training can take its
  // loss with ops::linear_cross_entropy(hidden_states(...), lm_head_weight(), ...).
  const Tensor& lm_head_weight() const;

  // ---- Tensor parallel (Megatron; docs/distributed.md "Tensor parallel").
  // Keeps this rank's slices of every split parameter, the full model having been built (loaded
  // or initialised) identically on every rank of tp_group: q/k/v (GPT-2's c_attn by q, k and v
  // heads), gate/up, c_fc column-parallel; o/down/c_proj row-parallel; embedding and lm_head
  // vocab-parallel (a tied head shares the embedding shard); norms, wpe and row-parallel biases
  // replicated. Needs tp | num_attention_heads, tp | num_key_value_heads (tp > kv heads is
  // refused: no kv-head replication), tp | intermediate_size, tp <= vocab_size. Once only,
  // before LoRA (apply_lora then shards the adapters to match). Names stay the HF names; every
  // tp rank must run the same calls (forward, backward) in the same order.
  void shard_for_tp(std::shared_ptr<parallel::Communicator> tp_group);
  // The tp group (nullptr before shard_for_tp) and its size (1 when unsharded).
  const std::shared_ptr<parallel::Communicator>& tp_group() const;
  int tp_size() const;
  // Where each split parameter (by its named_parameters name, adapters included) sits in the
  // full-shape tensor; parameters not listed are replicated.
  std::map<std::string, parallel::ShardInfo> shard_infos() const;
  // named_parameters() at full shape, gathered over tp (a collective: every tp rank calls it; all
  // get the full tensors). Unsharded: the parameters themselves (detached).
  nn::NamedTensors gather_full_parameters() const;
  // ids [B, T] -> this rank's vocab shard of the logits [B, T, V_r] (the full logits when
  // unsharded).
  Tensor forward_logits_shard(const Tensor& ids, const ForwardOptions& opt = {});

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
