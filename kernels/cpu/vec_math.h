// Float math written so that GCC vectorizes it: glibc's expf stays a scalar call without
// -ffast-math, and a float compare may trap, which keeps GCC from if-converting a loop.
#pragma once
#include <bit>
#include <cmath>
#include <cstdint>

namespace ftune::kernels::cpu {

// exp(x) for x in [-87.3, 88] (callers clamp): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, the ln2
// split makes n * hi exact), exp(x) = 2^n p(r) with p the degree-7 Taylor polynomial (truncation
// < 1e-8 relative); 2^n goes straight into the exponent bits. Max relative error 7.8e-8
// (tests/core/test_loss.cpp).
inline float exp_core(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kShift) - kShift;
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((int32_t(n) + 127) << 23);
}

// exp(x) over all floats: 0 below ln(FLT_MIN) (no denormals), +inf above 88, NaN for NaN.
inline float fast_exp(float x) {
  constexpr float kLo = -87.33654f, kHi = 88.0f;
  float xc = x < kLo ? kLo : x;
  xc = xc > kHi ? kHi : xc;
  float y = exp_core(xc);
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? INFINITY : y;
  return y;
}

// exp(x) for x <= 0 (softmax after subtracting the max), clamped at -87 through the bits: as
// unsigned integers negative floats order by magnitude, so the clamp needs no float compare.
// Below -87 it returns ~1.6e-38 instead of 0; -inf included.
inline float exp_nonpos(float x) {
  uint32_t u = std::bit_cast<uint32_t>(x);
  u = u > 0xC2AE0000u ? 0xC2AE0000u : u;  // max(x, -87.0f) for x <= 0
  return exp_core(std::bit_cast<float>(u));
}

}  // namespace ftune::kernels::cpu
