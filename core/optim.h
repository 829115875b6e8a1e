// Optimizers and learning-rate schedules: AdamW (torch.optim.AdamW semantics), warmup + constant
// / linear / cosine schedules (HF transformers semantics), and global gradient-norm clipping.
// The optimizer never records autograd history.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace ftune::optim {

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;

// A set of parameters sharing hyper-parameters. Names key the exported state (use the model's
// dotted parameter names) and must be unique across groups.
struct ParamGroup {
  NamedTensors params;
  double lr_scale = 1.0;               // the group's lr is the optimizer's lr times this
  std::optional<double> weight_decay;  // unset: AdamWOptions::weight_decay
};

// Splits parameters into the usual two groups: weight decay on matrices (dim >= 2), none on
// vectors (biases, norm weights). Empty groups are left out.
std::vector<ParamGroup> decay_groups(const NamedTensors& params, double weight_decay);

struct AdamWOptions {  // torch.optim.AdamW defaults
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
};

// Optimizer state for checkpoints: the number of steps taken and named f32 tensors
// ("<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step" (i64 scalar), and "<param>.master"
// for 16-bit params).
struct OptimizerState {
  int64_t step = 0;
  NamedTensors tensors;
};

// AdamW with decoupled weight decay, exactly as torch.optim.AdamW (amsgrad off, maximize off):
//   p -= lr * wd * p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
// with lr and wd those of the parameter's group and t the parameter's own step count (a param
// whose grad is undefined is skipped and its t does not advance, as in torch). State m, v is
// f32. Params are f32, bf16 or f16; a 16-bit param gets an f32 master copy, taken from the param
// at its first update, updated in f32 and written back rounded: from then on the master is the
// truth and changes made to the 16-bit param outside the optimizer are overwritten.
class AdamW {
 public:
  explicit AdamW(std::vector<ParamGroup> groups, AdamWOptions opt = AdamWOptions());

  // One update of every param that has a gradient, each gradient first multiplied by grad_scale
  // inside the update (the clipping coefficient of clip_coefficient: no separate pass over the
  // gradients, which stay as they are).
  void step(double grad_scale = 1.0);
  void zero_grad();  // drops the gradients (torch's set_to_none)
  double lr() const { return lr_; }
  void set_lr(double lr) { lr_ = lr; }  // the schedule sets it before each step
  int64_t step_count() const { return step_; }
  const AdamWOptions& options() const { return opt_; }
  const std::vector<ParamGroup>& groups() const { return groups_; }

  OptimizerState export_state() const;  // copies
  // Checks names, shapes and completeness (throws naming the tensor, and changes nothing then).
  // A 16-bit param is set from its imported master; ".master" may be absent (the state of an f32
  // run): the master is then taken from the param at its next update.
  void import_state(const OptimizerState& state);

 private:
  struct Slot {
    std::string name;
    Tensor param;
    Tensor master;  // f32 copy of a 16-bit param, made at its first update
    Tensor m, v;    // f32, like param
    int64_t step = 0;
    size_t group = 0;
  };
  std::vector<ParamGroup> groups_;
  std::vector<Slot> slots_;
  AdamWOptions opt_;
  double lr_;
  int64_t step_ = 0;
};

// One contiguous piece of a parameter with its AdamW state, for an optimizer that updates parts
// of parameters (parallel::ShardedAdamW, ZeRO-1: each rank updates its shard). Every tensor is
// contiguous, on the param's device, with the param piece's numel.
struct AdamWPiece {
  Tensor param;   // f32, bf16 or f16; updated in place
  Tensor master;  // 16-bit param: its f32 master, updated, then written rounded into param;
                  // undefined for an f32 param (the param is its own master)
  Tensor grad;    // the param's dtype or f32
  Tensor m, v;    // f32
  double lr = 0, weight_decay = 0;  // of the parameter's group
  int64_t step = 1;                 // the parameter's step count t, this update included
};
// The update AdamW::step applies, on pieces: the same kernels (CPU pieces one by one, GPU pieces
// in one multi-tensor launch per device) with the same per-step constants, so a sharded update
// equals the whole one element for element.
void adamw_update_pieces(const std::vector<AdamWPiece>& pieces, const AdamWOptions& opt,
                         double grad_scale = 1.0);

// ---------------------------------------------------------------- schedules
enum class ScheduleKind { constant, linear, cosine };
ScheduleKind schedule_kind_from_name(const std::string& name);  // "constant", "linear", "cosine"

// lr_at(step) = base_lr * multiplier(step), step = optimizer steps already taken (0 for the first
// update), as with HF's LambdaLR schedules:
//   warmup (step < warmup_steps): step / warmup_steps, from 0;
//   constant: 1;
//   linear:   from 1 at warmup_steps down to min_lr_ratio at total_steps;
//   cosine:   0.5 * (1 + cos(pi * progress)) from 1 to min_lr_ratio, progress = (step - warmup) /
//             (total - warmup) (get_cosine_schedule_with_warmup, min ratio as in
//             get_cosine_with_min_lr_schedule_with_warmup).
// After total_steps both stay at min_lr_ratio (HF's cosine would rise again).
class LRSchedule {
 public:
  LRSchedule(ScheduleKind kind, double base_lr, int64_t warmup_steps, int64_t total_steps,
             double min_lr_ratio = 0.0);
  double multiplier(int64_t step) const;
  double lr_at(int64_t step) const { return base_lr_ * multiplier(step); }

 private:
  ScheduleKind kind_;
  double base_lr_;
  int64_t warmup_, total_;
  double min_ratio_;
};

// ---------------------------------------------------------------- gradient norm
// Sum of squares of every defined gradient, in f64 (data parallel sums it across ranks).
double grad_sum_squares(const std::vector<Tensor>& params);
void scale_grads(const std::vector<Tensor>& params, double s);
// The same on tensors themselves (ZeRO-1's gradient shards): contiguous f32/f64/bf16/f16 tensors,
// the GPU ones all on one device (one launch); empty tensors are allowed.
double sum_squares(const std::vector<Tensor>& xs);
void scale_(const std::vector<Tensor>& xs, double s);
// Global L2 norm of the gradients before clipping (torch.nn.utils.clip_grad_norm_): when it is
// finite, grads are scaled in place by min(1, max_norm / (norm + 1e-6)); a non-finite norm is
// returned as is, with the grads untouched (the trainer decides what to do with the step).
double clip_grad_norm(const std::vector<Tensor>& params, double max_norm);
// torch's clip_grad_norm_ coefficient for a gradient norm: min(1, max_norm / (norm + 1e-6)); 1
// when max_norm <= 0 (no clipping) or the norm is not finite. AdamW::step(coef) then clips inside
// its update, as clip_grad_norm + step would, without the pass that scales the gradients.
double clip_coefficient(double norm, double max_norm);

}  // namespace ftune::optim
