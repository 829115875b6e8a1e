// Fused AdamW update and the gradient-norm helpers of the optimizer (core/optim.h).
#pragma once
#include <cstdint>

namespace ftune::kernels {

// Per-step constants of one AdamW update, computed in double by the caller.
struct AdamWConsts {
  float decay = 1.0f;  // 1 - lr * weight_decay
  float beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  float step_size = 0.0f;  // lr / (1 - beta1^t)
  float bc2_sqrt = 1.0f;   // sqrt(1 - beta2^t)
};

namespace cpu {

// One AdamW step over n elements (torch.optim.AdamW order):
//   p *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
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
}  // namespace ftune::kernels
