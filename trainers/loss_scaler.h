// Loss scaling for f16 training, as torch.amp.GradScaler does it.
//
// f16 has 5 exponent bits: gradients below 6e-8 flush to zero in an f16 backward, and most of a
// language model's gradients sit near there. The trainer multiplies the loss by `scale` before the
// backward (every gradient is then `scale` times larger), divides the gradients by it again before
// the gradient clip and the optimizer (unscale_grads), and skips the step when a gradient came out
// inf or NaN (the scale was too large). Dynamic scaling (torch's defaults) starts at 2^16, halves
// the scale after each overflowing step and doubles it after growth_interval steps in a row
// without one, so it hovers near the largest scale that does not overflow.
//
// The trainer's use (trainers/sft.cpp, docs/gpu.md "f16 and loss scaling"): scale the loss, run
// the backward and the data-parallel gradient reduction (on the scaled gradients), unscale_grads
// (every rank agrees on found_inf by an all-reduce max), update(found_inf); an overflowing step
// updates nothing and does not advance the learning-rate schedule (HF Trainer's rule).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/tensor.h"

namespace ftune {

struct LossScalerOptions {      // torch.amp.GradScaler's defaults
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
  bool dynamic = true;  // false: the scale stays init_scale (a fixed loss scale)
};

class LossScaler {
 public:
  // Below this scale every gradient would be zero in f16 (2^-24 is its smallest subnormal): a
  // dynamic scale that falls under it means the gradients are non-finite whatever the scale.
  static constexpr double kMinScale = 1.0 / 16777216.0;

  // Throws ftune::Error ("[loss_scale] ...") on a scale that is not a positive finite f32, a
  // growth_factor <= 1, a backoff_factor outside (0, 1) or a growth_interval < 1.
  explicit LossScaler(LossScalerOptions opt = {});

  double scale() const { return scale_; }
  // Steps without an overflow since the last overflow or growth (torch's _growth_tracker).
  int64_t growth_tracker() const { return growth_tracker_; }
  const LossScalerOptions& options() const { return opt_; }

  // After a step's unscale, with the all-ranks found_inf (torch's GradScaler.update): an overflow
  // multiplies the scale by backoff_factor and restarts the count; growth_interval clean steps in a
  // row multiply it by growth_factor (kept when the product overflows f32, as torch keeps its f32
  // scale) and restart the count. A fixed scaler changes nothing.
  void update(bool found_inf);

  // {"scale", "growth_tracker", "dynamic"} for the checkpoint's trainer_state. load_state takes
  // what state() wrote (exactly: the scale is a JSON double) and throws ftune::Error naming a bad
  // field; a fixed scaler, or a dynamic one given a fixed scaler's state, keeps its own scale.
  nlohmann::json state() const;
  void load_state(const nlohmann::json& j);

 private:
  LossScalerOptions opt_;
  double scale_;
  int64_t growth_tracker_ = 0;
};

// Multiplies every defined gradient of `params` by 1 / scale and returns whether any of them held
// an inf or NaN before (torch's unscale_: the values are written all the same; skip the step
// then). One multi-tensor launch for the GPU gradients (kernels/amp.h; all on one GPU), the CPU
// twin for the others. f32 and bf16 gradients are unscaled in place; an f16 gradient is replaced
// by an f32 one (AdamW takes f32 gradients of f16 parameters), since in f16 the unscaled small
// values would flush to zero again.
bool unscale_grads(const std::vector<Tensor>& params, double scale);
// The same over gradient buffers themselves (ZeRO-1's reduced shards), always in place.
bool unscale_buffers(const std::vector<Tensor>& grads, double scale);

}  // namespace ftune
