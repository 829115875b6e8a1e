// The projection layer of models/transformer.cpp, exposed for the adapters of models/lora.cpp.
// Internal to models/: users go through Transformer and the functions of models/lora.h.
#pragma once
#include <cstdint>
#include <memory>

#include "core/nn.h"
#include "parallel/tp_ops.h"

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
//
// Tensor parallel (Megatron; Transformer::shard_for_tp): a column-parallel projection keeps the
// rows of `out` of its rank (in `blocks` equal blocks, each split alike: GPT-2's fused c_attn is
// [q | k | v]), its input entering through copy_to_tp; a row-parallel one keeps the columns of
// `in` of its rank, its partial output summed by reduce_from_tp before the bias is added once.
// LoRA follows the base split: column-parallel B is split along out and A replicated, row-parallel
// A is split along in and B replicated; the replicated matrix enters through copy_to_tp, whose
// backward sums its partial gradients over the tp ranks.
enum class TpSplit { none, column, row };

class Proj : public nn::Module {
 public:
  Proj(int64_t in, int64_t out, bool has_bias, bool conv1d);
  Tensor forward(const Tensor& x) const;
  bool conv1d() const { return conv1d_; }
  // Local sizes (this rank's shard under tensor parallelism).
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  // Sizes of the unsharded layer.
  int64_t full_in_features() const { return full_in_; }
  int64_t full_out_features() const { return full_out_; }

  // Keeps this rank's slices of weight and bias (new leaves; requires_grad kept). Once only,
  // before adapters are added.
  void shard_for_tp(TpSplit split, std::shared_ptr<parallel::Communicator> tp, int blocks = 1);
  TpSplit tp_split() const { return split_; }
  const std::shared_ptr<parallel::Communicator>& tp_group() const { return tp_; }
  // Where weight, bias, lora_A, lora_B sit in their full-shape tensors (replicated: dim -1).
  parallel::ShardInfo weight_shard() const;
  parallel::ShardInfo bias_shard() const;
  parallel::ShardInfo lora_A_shard() const;
  parallel::ShardInfo lora_B_shard() const;
  // add_lora from the full-shape A [r, full_in] and B [full_out, r]: this rank's slices.
  void add_lora_full(const Tensor& a, const Tensor& b, double scale, double dropout);

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
  parallel::ShardInfo split_info(int64_t full, int dim) const;

  int64_t in_, out_, full_in_, full_out_;
  bool conv1d_;
  TpSplit split_ = TpSplit::none;
  std::shared_ptr<parallel::Communicator> tp_;
  int blocks_ = 1;
  std::shared_ptr<LoraWeight> lora_A_, lora_B_;
  double lora_scale_ = 0.0, lora_dropout_ = 0.0;
  uint64_t lora_seed_ = 0;
};

}  // namespace ftune
