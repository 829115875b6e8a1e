#include "kernels/amp.h"

#include <bit>
#include <cmath>
#include <type_traits>

namespace ftune::kernels::cpu {

namespace {

inline float widen(float x) { return x; }
inline float widen(bf16 x) { return std::bit_cast<float>(uint32_t(x.bits) << 16); }
inline float widen(f16 x) { return float(x); }

// Non-finite from the bits (exponent all ones), so -ffast-math style flags cannot fold it away.
inline bool non_finite(float x) {
  return (std::bit_cast<uint32_t>(x) & 0x7f800000u) == 0x7f800000u;
}

}  // namespace

template <class In, class Out>
bool unscale_check(const In* x, Out* y, int64_t n, float inv_scale) {
  // The flag is an OR over the elements: the same whatever the thread count.
  int found = 0;
#pragma omp parallel for schedule(static) reduction(| : found) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) {
    const float v = widen(x[i]);
    found |= non_finite(v) ? 1 : 0;
    y[i] = Out(v * inv_scale);
  }
  return found != 0;
}

template bool unscale_check<float, float>(const float*, float*, int64_t, float);
template bool unscale_check<bf16, bf16>(const bf16*, bf16*, int64_t, float);
template bool unscale_check<f16, f16>(const f16*, f16*, int64_t, float);
template bool unscale_check<bf16, float>(const bf16*, float*, int64_t, float);
template bool unscale_check<f16, float>(const f16*, float*, int64_t, float);

}  // namespace ftune::kernels::cpu
