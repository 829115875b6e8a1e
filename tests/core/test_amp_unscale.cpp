// The CPU unscale + non-finite check of loss scaling (kernels/cpu/amp.cpp) against a plain loop:
// every dtype pair, sizes around the OpenMP threshold, inf/-inf/NaN at the first, a middle and the
// last element, in place and into f32.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/amp.h"

namespace ftune {
namespace {

template <class T>
T from_double(double v) {
  return T(float(v));
}

// The reference: Out(float(x) * inv), and whether some x is not finite.
template <class In, class Out>
bool reference(const std::vector<In>& x, std::vector<Out>& y, float inv) {
  bool found = false;
  y.resize(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const float v = float(x[i]);
    if (std::isnan(v) || std::isinf(v)) found = true;
    y[i] = Out(v * inv);
  }
  return found;
}

template <class T>
uint32_t bits_of(T v) {
  if constexpr (std::is_same_v<T, float>)
    return std::bit_cast<uint32_t>(v);
  else
    return v.bits;
}

template <class In, class Out>
void check_pair(const char* what) {
  std::mt19937 rng(5);
  std::normal_distribution<double> nd(0.0, 1.0);
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t n : {int64_t(0), int64_t(1), int64_t(7), int64_t(4099), int64_t((1 << 16) + 3),
                    int64_t(200001)}) {
    for (int poison = 0; poison < 4; ++poison) {  // none, inf at 0, -inf in the middle, NaN last
      if (n == 0 && poison > 0) continue;
      SCOPED_TRACE(std::string(what) + " n=" + std::to_string(n) + " case " +
                   std::to_string(poison));
      std::vector<In> x(static_cast<size_t>(n));
      // Gradients of a scaled loss: large values (up to f16's range) and tiny ones.
      const double big = std::is_same_v<In, f16> ? 4096.0 : 65536.0;
      for (auto& v : x) v = from_double<In>(nd(rng) * (rng() % 2 ? big : 1e-3));
      if (poison == 1) x[0] = In(inf);
      if (poison == 2) x[size_t(n / 2)] = In(-inf);
      if (poison == 3) x[size_t(n - 1)] = In(nan);
      const float inv = 1.0f / 65536.0f;
      std::vector<Out> want;
      const bool want_found = reference(x, want, inv);
      ASSERT_EQ(want_found, poison > 0);
      std::vector<Out> got(static_cast<size_t>(n));
      bool found = false;
      if constexpr (std::is_same_v<In, Out>) {  // in place
        got.assign(x.begin(), x.end());
        found = kernels::cpu::unscale_check<In, Out>(got.data(), got.data(), n, inv);
      } else {
        found = kernels::cpu::unscale_check<In, Out>(x.data(), got.data(), n, inv);
      }
      EXPECT_EQ(found, want_found);
      for (size_t i = 0; i < size_t(n); ++i)
        ASSERT_EQ(bits_of(got[i]), bits_of(want[i])) << "element " << i << " of " << n;
    }
  }
}

TEST(AmpUnscale, F32InPlace) { check_pair<float, float>("f32"); }
TEST(AmpUnscale, Bf16InPlace) { check_pair<bf16, bf16>("bf16"); }
TEST(AmpUnscale, F16InPlace) { check_pair<f16, f16>("f16"); }
TEST(AmpUnscale, Bf16IntoF32) { check_pair<bf16, float>("bf16->f32"); }
TEST(AmpUnscale, F16IntoF32) { check_pair<f16, float>("f16->f32"); }

TEST(AmpUnscale, F16IntoF32KeepsWhatF16WouldFlush) {
  // 2^-20 scaled by 2^16 is 2^-4 in f16; unscaled into f32 it is 2^-20 again, into f16 it is a
  // subnormal that loses bits (2^-20 + 2^-25 -> 2^-20 exactly, 3 * 2^-26 rounds).
  std::vector<f16> x = {f16(0.0625f), f16(0.0625f * 1.5f)};
  std::vector<float> y(2);
  EXPECT_FALSE((kernels::cpu::unscale_check<f16, float>(x.data(), y.data(), 2, 1.0f / 65536.0f)));
  EXPECT_EQ(y[0], std::ldexp(1.0f, -20));
  EXPECT_EQ(y[1], 1.5f * std::ldexp(1.0f, -20));
}

}  // namespace
}  // namespace ftune
