// LoRA adapters on the projections of a Transformer (PEFT's LoraConfig semantics), merging, and
// the PEFT adapter folder format (adapter_config.json + adapter_model.safetensors). See
// docs/lora.md and docs/export.md.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/nn.h"
#include "models/transformer.h"

namespace ftune {

struct LoraOptions {
  int64_t r = 8;
  double alpha = 16;
  double dropout = 0;
  bool use_rslora = false;
  // HF module names, matched as PEFT matches a list: a projection is adapted when its dotted name
  // equals an entry or ends with "." + entry ("q_proj", "self_attn.q_proj", or a full name). Or
  // the single entry "all-linear": every projection of the blocks, never lm_head.
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
  // PEFT's string form, when not empty: the full module name must match this regex entirely
  // (ECMAScript std::regex; Python's re.fullmatch for the usual patterns). Replaces
  // target_modules (which is then ignored).
  std::string target_regex;
  uint64_t seed = 0;     // init of lora_A
  double scale() const;  // alpha / r, or alpha / sqrt(r) with rslora
};

// Adds an adapter to every targeted projection: lora_A [r, in] ~ U(+-1/sqrt(in)) (PEFT's
// kaiming_uniform(a=sqrt(5)); drawn in module order from Generator(opt.seed)), lora_B [out, r]
// zeros; both f32 and trainable. Every base parameter is frozen (requires_grad false).
// Parameters are named "<module>.lora_A.weight" / "<module>.lora_B.weight". Returns the adapted
// module names in model order. Throws if a target matches no projection, if a target names a
// module that is not a projection (lm_head, embeddings, norms), or if adapters are present.
std::vector<std::string> apply_lora(Transformer& model, const LoraOptions& opt);
bool has_lora(const Transformer& model);
// The adapter tensors only, with the model's names, in model order (A then B per module).
nn::NamedTensors lora_parameters(const Transformer& model);
// The names of the adapted modules, in model order.
std::vector<std::string> lora_modules(const Transformer& model);
// Dropout masks derive from this seed: adapted module i (model order) uses a seed mixed from
// (seed, i), so every module and every forward call after a new seed draws a fresh mask, and two
// forwards under the same seed draw the same masks. Only in training mode (model.train()).
void set_lora_dropout_seed(Transformer& model, uint64_t seed);
// W += scale * B A (Conv1D: W += (scale * B A)^T), accumulated in f64 and rounded once; then the
// adapters are removed and every parameter requires grad again, as in a freshly loaded model.
void merge_lora(Transformer& model);

// Writes dir/adapter_config.json and dir/adapter_model.safetensors as PEFT's save_pretrained
// does: tensors "base_model.model.<module>.lora_{A,B}.weight" (f32, metadata {"format": "pt"}),
// config with peft_type LORA, task_type CAUSAL_LM, fan_in_fan_out true for GPT-2's Conv1D.
// "all-linear" is written as the list of adapted module names (as PEFT writes it). Throws if the
// model has no adapters or opt does not describe them (r, scale).
void save_peft_adapter(const std::string& dir, const Transformer& model, const LoraOptions& opt,
                       const std::string& base_model_name_or_path);
// Reads a PEFT LoRA adapter folder (ours or peft's), applies LoRA with its config and loads the
// weights. Refuses, naming the file, what ftune does not implement: DoRA, bias != "none",
// lora_bias, modules_to_save, layers_to_transform, rank_pattern / alpha_pattern,
// exclude_modules, targets that are not projections, adapter_model.bin (pickle). On error the
// model is left as it was.
LoraOptions load_peft_adapter(const std::string& dir, Transformer& model);

}  // namespace ftune
