#include "kernels/adamw.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <type_traits>
#include <vector>

#include "core/dtype.h"

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kChunk = 2048;  // elements per task; 16-bit values are widened per chunk

// The update on f32 arrays: the loop the compiler vectorizes.
inline void adamw_f32(float* p, const float* g, float* m, float* v, int64_t n,
                      const AdamWConsts& c) {
  const float decay = c.decay, b1 = c.beta1, b2 = c.beta2, eps = c.eps;
  const float one_b1 = 1.0f - b1, one_b2 = 1.0f - b2, step = c.step_size, bc2 = c.bc2_sqrt;
  const float gs = c.grad_scale;  // 1: exact (x * 1 = x)
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gs;
    const float mi = b1 * m[i] + one_b1 * gi;
    const float vi = b2 * v[i] + one_b2 * gi * gi;
    m[i] = mi;
    v[i] = vi;
    const float denom = std::sqrt(vi) / bc2 + eps;
    p[i] = p[i] * decay - step * (mi / denom);
  }
}

inline float widen(float x) { return x; }
inline double widen(double x) { return x; }
inline float widen(bf16 x) { return std::bit_cast<float>(uint32_t(x.bits) << 16); }
inline float widen(f16 x) { return float(x); }

// Branch-free twin of bf16::from_float (round to nearest even, NaN kept quiet), so it vectorizes.
inline void narrow(float x, bf16& out) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  out.bits = uint16_t((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : rounded);
}
inline void narrow(float x, f16& out) { out = f16(x); }

}  // namespace

template <class G, class P>
void adamw_update(float* master, P* param, const G* g, float* m, float* v, int64_t n,
                  const AdamWConsts& c) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t ch = 0; ch < nchunks; ++ch) {
    const int64_t i0 = ch * kChunk, len = std::min(kChunk, n - i0);
    if constexpr (std::is_same_v<G, float>) {
      adamw_f32(master + i0, g + i0, m + i0, v + i0, len, c);
    } else {
      float gf[kChunk];
      for (int64_t i = 0; i < len; ++i) gf[i] = widen(g[i0 + i]);
      adamw_f32(master + i0, gf, m + i0, v + i0, len, c);
    }
    if constexpr (!std::is_same_v<P, float>)
      for (int64_t i = 0; i < len; ++i) narrow(master[i0 + i], param[i0 + i]);
  }
}

// Fixed-size chunks whose partial sums are added in chunk order: the result does not depend on
// the thread count or on which thread finishes first (a resumed run clips exactly as before).
constexpr int64_t kSumChunk = int64_t(1) << 14;

template <class T>
double sum_squares(const T* x, int64_t n) {
  const int64_t nchunks = (n + kSumChunk - 1) / kSumChunk;
  std::vector<double> part(size_t(std::max<int64_t>(nchunks, 1)), 0.0);
#pragma omp parallel for schedule(static) if (n > (1 << 15))
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t b = c * kSumChunk, e = std::min(n, b + kSumChunk);
    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) {
      const double xi = double(widen(x[i]));
      acc += xi * xi;
    }
    part[size_t(c)] = acc;
  }
  double total = 0.0;
  for (double v : part) total += v;
  return total;
}

template <class T>
void scale_inplace(T* x, int64_t n, double s) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const C sc = C(s);
#pragma omp parallel for simd schedule(static) if (n > (1 << 15))
  for (int64_t i = 0; i < n; ++i) x[i] = T(C(x[i]) * sc);
}

template void adamw_update<float, float>(float*, float*, const float*, float*, float*, int64_t,
                                         const AdamWConsts&);
template void adamw_update<bf16, bf16>(float*, bf16*, const bf16*, float*, float*, int64_t,
                                       const AdamWConsts&);
template void adamw_update<float, bf16>(float*, bf16*, const float*, float*, float*, int64_t,
                                        const AdamWConsts&);
template void adamw_update<f16, f16>(float*, f16*, const f16*, float*, float*, int64_t,
                                     const AdamWConsts&);
template void adamw_update<float, f16>(float*, f16*, const float*, float*, float*, int64_t,
                                       const AdamWConsts&);
template double sum_squares<float>(const float*, int64_t);
template double sum_squares<double>(const double*, int64_t);
template double sum_squares<bf16>(const bf16*, int64_t);
template double sum_squares<f16>(const f16*, int64_t);
template void scale_inplace<float>(float*, int64_t, double);
template void scale_inplace<double>(double*, int64_t, double);
template void scale_inplace<bf16>(bf16*, int64_t, double);
template void scale_inplace<f16>(f16*, int64_t, double);

}  // namespace ftune::kernels::cpu
