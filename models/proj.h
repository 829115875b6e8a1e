// The projection layer of models/transformer.cpp, exposed for the adapters of models/lora.cpp.
// Internal to models/: users go through Transformer and the functions of models/lora.h.
#pragma once
#include <cstdint>
#include <memory>

#include "core/nn.h"

namespace ftune {

// Holds one adapter matrix, so that its name is "<proj>.lora_A.weight" as in PEFT.
class LoraWeight : public nn::Module {
 public:
  LoraWeight() { register_parameter("weight", &weight); }
  Tensor weight;
};

// A projection in the checkpoint's layout: nn.Linear weight [out, in], or GPT-2's Conv1D weight
// [in, out], with an optional LoRA adapter: y = proj(x) + scale * (dropout(x) A^T) B^T,
// A [r, in], B [out, r] (the same shapes for both layouts, as PEFT stores them).
class Proj : public nn::Module {
 public:
  Proj(int64_t in, int64_t out, bool has_bias, bool conv1d);
  Tensor forward(const Tensor& x) const;
  bool conv1d() const { return conv1d_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  bool has_lora() const { return lora_A_ && lora_A_->weight.defined(); }
  // Registers the children "lora_A" / "lora_B" (kept, emptied, by remove_lora: nn::Module has no
  // unregistering, and an undefined tensor is not listed by named_parameters).
  void add_lora(Tensor a, Tensor b, double scale, double dropout);
  void remove_lora();
  const Tensor& lora_A() const { return lora_A_->weight; }
  const Tensor& lora_B() const { return lora_B_->weight; }
  Tensor& lora_A() { return lora_A_->weight; }
  Tensor& lora_B() { return lora_B_->weight; }
  double lora_scale() const { return lora_scale_; }
  double lora_dropout() const { return lora_dropout_; }
  void set_lora_seed(uint64_t seed) { lora_seed_ = seed; }
  uint64_t lora_seed() const { return lora_seed_; }

  Tensor weight, bias;

 private:
  int64_t in_, out_;
  bool conv1d_;
  std::shared_ptr<LoraWeight> lora_A_, lora_B_;
  double lora_scale_ = 0.0, lora_dropout_ = 0.0;
  uint64_t lora_seed_ = 0;
};

}  // namespace ftune
