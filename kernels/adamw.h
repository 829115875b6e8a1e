// Fused AdamW update and the gradient-norm helpers of the optimizer (core/optim.h).
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace ftune::kernels {

// Per-step constants of one AdamW update, computed in double by the caller.
struct AdamWConsts {
  float decay = 1.0f;  // 1 - lr * weight_decay
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float step_size = 0.0f;  // lr / (1 - beta1^t)
  float bc2_sqrt = 1.0f;   // sqrt(1 - beta2^t)
  float grad_scale = 1.0f; // g is multiplied by it first (the gradient clipping coefficient)
};

namespace cpu {

// One AdamW step over n elements (torch.optim.AdamW order), g first scaled by grad_scale:
//   g *= grad_scale; p *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
//   p -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// master, m, v are f32 [n]; g [n] is G (f32, bf16 or f16). P = float updates master in place
// (param is unused); P = bf16/f16 also writes the rounded master into param [n].
template <class G, class P>
void adamw_update(float* master, P* param, const G* g, float* m, float* v, int64_t n,
                  const AdamWConsts& c);

// sum(x^2) accumulated in f64; T in float, double, bf16, f16.
template <class T>
double sum_squares(const T* x, int64_t n);
// x *= s in place.
template <class T>
void scale_inplace(T* x, int64_t n, double s);

}  // namespace cpu

// The GPU versions (kernels/cuda/adamw.cu) work on many tensors in one launch (multi-tensor
// apply): a small table of per-tensor pointers and sizes goes to the device, and the blocks walk
// fixed-size chunks of all tensors. All pointers are device pointers of the current device; the
// kernels run on the current stream.
namespace cuda {

// One parameter of a multi-tensor AdamW step. param_dtype f32: master is the param (param is
// unused). bf16/f16: master is its f32 copy, updated, then written rounded into param. grad is
// grad_dtype (f32, or the param's 16-bit dtype). Per-tensor constants: each param has its own
// step count and group (lr, weight decay).
struct AdamWTensor {
  float* master = nullptr;
  void* param = nullptr;
  DType param_dtype = DType::f32;
  const void* grad = nullptr;
  DType grad_dtype = DType::f32;
  float* m = nullptr;
  float* v = nullptr;
  int64_t n = 0;
  AdamWConsts c;
};
// One launch for all tensors, with the arithmetic (and its order) of cpu::adamw_update.
void adamw_update_multi(const std::vector<AdamWTensor>& ts);

// A device array (f32, f64, bf16 or f16) for the gradient-norm helpers.
struct DeviceArray {
  void* data = nullptr;
  DType dtype = DType::f32;
  int64_t n = 0;
};
// sum over all arrays of sum(x^2), f32 within a chunk, f64 across chunks and blocks; the order of
// the sums is fixed for a device, so the result is reproducible. Waits for the result (host value).
double sum_squares_multi(const std::vector<DeviceArray>& xs);
// x *= s in place for every array (one launch).
void scale_inplace_multi(const std::vector<DeviceArray>& xs, double s);

}  // namespace cuda
}  // namespace ftune::kernels
