// Hugging Face config.json <-> ModelConfig, for the families ftune implements: GPT2LMHeadModel,
// LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. Field names and defaults follow
// transformers' configuration_{gpt2,llama,mistral,qwen2}.py (a key that is absent takes the
// transformers default of that family). Anything the models could not reproduce exactly is
// refused with a message naming the file: other architectures, rope scaling, sliding-window
// attention that would actually mask something (see HfConfigOptions), unsupported activations.
// The rules are written down in docs/io.md.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace ftune {

enum class ModelFamily { gpt2, llama, mistral, qwen2 };
const char* family_name(ModelFamily f);  // "gpt2", "llama", "mistral", "qwen2" (the model_type)

struct ModelConfig {
  ModelFamily family = ModelFamily::llama;
  std::string architecture;  // "LlamaForCausalLM"
  std::string model_type;    // "llama"

  // GPT-2's n_embd / n_layer / n_head / n_positions / n_inner map onto the Llama names.
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;  // GPT-2: n_inner, or 4 * n_embd when null
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // == heads for GPT-2
  int64_t head_dim = 0;             // hidden_size / heads unless the config says otherwise
  int64_t max_position_embeddings = 0;
  double norm_eps = 1e-5;  // GPT-2 layer_norm_epsilon (LayerNorm), else rms_norm_eps (RMSNorm)
  std::string
      hidden_act;  // GPT-2 activation_function: gelu_new | gelu_pytorch_tanh | gelu; else silu
  double rope_theta = 10000.0;  // unused by GPT-2 (learned positions)
  bool tie_word_embeddings = false;

  // Which linear layers carry a bias (derived from the family and its flags).
  bool attention_bias = false;      // q, k, v projections: GPT-2, Qwen2, Llama attention_bias
  bool attention_out_bias = false;  // output projection: GPT-2, Llama attention_bias
  bool mlp_bias = false;            // GPT-2, Llama mlp_bias

  // Sliding window as transformers reads it (Mistral: sliding_window; Qwen2: sliding_window only
  // when use_sliding_window, applied to layers >= max_window_layers). An accepted config never
  // has a window that masks anything at the allowed sequence length.
  std::optional<int64_t> sliding_window;
  int64_t max_window_layers = 0;  // Qwen2 only

  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> pad_token_id;
  std::vector<int64_t> eos_token_ids;  // eos_token_id may be one id or a list
  bool eos_token_is_list = false;
  std::string torch_dtype;  // "bfloat16", "float32", ... ("" when absent)

  // Keys this struct does not model (dropouts, initializer_range, transformers_version, ...),
  // written back unchanged by to_json so a round trip loses nothing.
  nlohmann::json extra = nlohmann::json::object();

  bool uses_layer_norm() const { return family == ModelFamily::gpt2; }        // else RMSNorm
  bool has_learned_positions() const { return family == ModelFamily::gpt2; }  // else RoPE
  // The longest sequence the model may see with plain causal attention.
  int64_t max_seq_len() const;

  // config.json content that transformers loads back to the same model.
  nlohmann::json to_json() const;
};

struct HfConfigOptions {
  // The longest sequence the caller will run (0: max_position_embeddings). Sliding-window
  // attention is not implemented; a window W is accepted when W >= this length, because then
  // the window never masks anything and full causal attention is exact.
  int64_t max_seq_len = 0;
};

// `what` names the source in errors (the file path). Throws ftune::Error.
ModelConfig parse_hf_config(const nlohmann::json& j, const std::string& what,
                            const HfConfigOptions& opt = {});
ModelConfig load_hf_config(const std::string& path, const HfConfigOptions& opt = {});
// The text of a config.json (nesting deeper than 128 levels is refused).
ModelConfig parse_hf_config_text(const std::string& text, const std::string& what,
                                 const HfConfigOptions& opt = {});
// Writes to_json() (2-space indent, sorted keys) atomically.
void save_hf_config(const ModelConfig& c, const std::string& path);

}  // namespace ftune
