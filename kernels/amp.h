// Mixed-precision support of dynamic loss scaling (trainers/loss_scaler.h): unscale the gradients
// and find whether any of them is inf or NaN, in one pass over every gradient, like torch's
// _amp_foreach_non_finite_check_and_unscale_.
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace ftune::kernels {

namespace cpu {

// y[i] = Out(float(x[i]) * inv_scale) for i < n; returns true when some x[i] is inf or NaN (the
// products are written all the same, as torch does: the caller skips the step then). The check is
// on the input: a finite x whose product overflows Out is not flagged (torch's rule; the trainer's
// gradient-norm guard sees it). y may be x (In == Out: in place). In: float, bf16, f16; Out: In or
// float (an f16 gradient unscaled into f32 keeps the small values that f16 would flush to zero).
template <class In, class Out>
bool unscale_check(const In* x, Out* y, int64_t n, float inv_scale);

}  // namespace cpu

namespace cuda {

// One array of a multi-tensor unscale: `in` (in_dtype: f32, bf16 or f16) times inv_scale into
// `out` (out_dtype: in_dtype, or f32); out == in (same dtype) is in place. Device pointers of the
// current device.
struct UnscaleArray {
  const void* in = nullptr;
  DType in_dtype = DType::f32;
  void* out = nullptr;
  DType out_dtype = DType::f32;
  int64_t n = 0;
};

// One launch over all arrays (the multi-tensor layout of kernels/cuda/adamw.cu), with the
// arithmetic of cpu::unscale_check element for element: out = Out(float(in) * inv_scale). Stores 1
// into *found_inf (a device int32 the caller zeroed) when some input value is inf or NaN, and
// leaves it alone otherwise. Runs on the current stream; does not wait.
void unscale_check_multi(const std::vector<UnscaleArray>& arrays, float inv_scale,
                         int32_t* found_inf);

}  // namespace cuda
}  // namespace ftune::kernels
