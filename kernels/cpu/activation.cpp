#include "kernels/activation.h"
#include "kernels/cpu/vec_math.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 15;      // elements
constexpr double kGeluA = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluB = 0.044715;

// s = sigmoid(z) and sc = 1 - s, both from e = exp(-|z|) and 1 / (1 + e): for z >= 0,
// s = 1 / (1 + e) and sc = e / (1 + e); for z < 0 the two swap. Neither overflows nor cancels, so
// the tails keep full relative precision (1 - s computed as such would lose it when s -> 1).
// Beyond |z| = 87, e (< 1.7e-38) is flushed to 0 so that s saturates to exactly 0 or 1. The clamp
// and the selects work on the bits, as integers: float compare-selects keep GCC from vectorizing
// under -ftrapping-math. A NaN input gives a finite s; every caller multiplies by its input, so
// NaN still propagates.
inline void sigmoid2_f32(float z, float& s, float& sc) {
  constexpr uint32_t kLim = std::bit_cast<uint32_t>(87.0f);
  const uint32_t zb = std::bit_cast<uint32_t>(z);
  const uint32_t mag = zb & 0x7fffffffu;
  const float e0 = exp_nonpos(-std::bit_cast<float>(std::min(mag, kLim)));
  const float e = std::bit_cast<float>(std::bit_cast<uint32_t>(e0) & (0u - uint32_t(mag < kLim)));
  const float inv = 1.0f / (1.0f + e);
  const uint32_t a = std::bit_cast<uint32_t>(inv), b = std::bit_cast<uint32_t>(e * inv);
  const uint32_t neg = 0u - (zb >> 31);  // all ones when z < 0
  s = std::bit_cast<float>((b & neg) | (a & ~neg));
  sc = std::bit_cast<float>((a & neg) | (b & ~neg));
}

// x with |x| limited to lim (sign kept, NaN passed through), by bits for the same reason.
inline float clamp_mag_f32(float x, float lim) {
  const uint32_t b = std::bit_cast<uint32_t>(x), mag = b & 0x7fffffffu;
  const uint32_t over = 0u - uint32_t((mag > std::bit_cast<uint32_t>(lim)) & (mag <= 0x7f800000u));
  return std::bit_cast<float>((b & ~over) |
                              (((b & 0x80000000u) | std::bit_cast<uint32_t>(lim)) & over));
}

template <class T>
inline T clamp_mag(T x, T lim) {
  if constexpr (std::is_same_v<T, float>)
    return clamp_mag_f32(x, lim);
  else
    return std::clamp(x, -lim, lim);
}

template <class T>
inline void sigmoid2(T z, T& s, T& sc) {
  if constexpr (std::is_same_v<T, float>) {
    sigmoid2_f32(z, s, sc);
  } else {  // f64 is the gradient-check path: exactness over speed
    const T e = std::exp(-std::fabs(z)), inv = T(1) / (T(1) + e);
    s = z < 0 ? e * inv : inv;
    sc = z < 0 ? inv : e * inv;
  }
}

template <class T>
inline T sigmoid_t(T z) {
  T s, sc;
  sigmoid2<T>(z, s, sc);
  return s;
}

// gelu_tanh(x) = x * sigmoid(2u), u = a (x + b x^3), since 0.5 (1 + tanh(u)) = sigmoid(2u).
template <class T>
inline T gelu_arg(T x) {
  return T(2 * kGeluA) * (x + T(kGeluB) * x * x * x);
}

template <class T, class F>
void map_n(int64_t n, const F& f) {
#pragma omp parallel if (n > kParallelMin)
  {
    // A private copy: the pointers it holds become loop invariants (a shared closure is reloaded
    // every iteration, which defeats the vectorizer).
    const F body = f;
#pragma omp for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace

void gelu_forward(const Tensor& x, Tensor& y) {
  dispatch_float(x.dtype(), "gelu", [&]<class T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
    map_n<T>(x.numel(), [=](int64_t i) {
      const T v = px[i];
      py[i] = v * sigmoid_t<T>(gelu_arg<T>(v));
    });
  });
}

void gelu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  dispatch_float(x.dtype(), "gelu_backward", [&]<class T>() {
    const T* px = x.data<T>();
    const T* pg = dy.data<T>();
    T* pd = dx.data<T>();
    map_n<T>(x.numel(), [=](int64_t i) {
      // Past |x| = 10 the sigmoid is saturated (|2u| > 87) and the derivative is 0 or 1; the clamp
      // only keeps x^2 from overflowing into inf * 0.
      const T v = clamp_mag<T>(px[i], T(10));
      T s, sc;
      sigmoid2<T>(gelu_arg<T>(v), s, sc);
      // d/dx [x s(2u)] = s + x s (1 - s) 2 a (1 + 3 b x^2)
      const T du2 = T(2 * kGeluA) * (T(1) + T(3 * kGeluB) * v * v);
      pd[i] = pg[i] * (s + v * s * sc * du2);
    });
  });
}

void silu_forward(const Tensor& x, Tensor& y) {
  dispatch_float(x.dtype(), "silu", [&]<class T>() {
    const T* px = x.data<T>();
    T* py = y.data<T>();
    map_n<T>(x.numel(), [=](int64_t i) { py[i] = px[i] * sigmoid_t<T>(px[i]); });
  });
}

void silu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) {
  dispatch_float(x.dtype(), "silu_backward", [&]<class T>() {
    const T* px = x.data<T>();
    const T* pg = dy.data<T>();
    T* pd = dx.data<T>();
    map_n<T>(x.numel(), [=](int64_t i) {
      const T v = px[i];
      T s, sc;
      sigmoid2<T>(v, s, sc);
      pd[i] = pg[i] * s * (T(1) + v * sc);
    });
  });
}

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y) {
  dispatch_float(gate.dtype(), "swiglu", [&]<class T>() {
    const T* pg = gate.data<T>();
    const T* pu = up.data<T>();
    T* py = y.data<T>();
    map_n<T>(gate.numel(), [=](int64_t i) {
      const T g = pg[i];
      py[i] = g * sigmoid_t<T>(g) * pu[i];
    });
  });
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dy, Tensor& dgate,
                     Tensor& dup) {
  dispatch_float(gate.dtype(), "swiglu_backward", [&]<class T>() {
    const T* pg = gate.data<T>();
    const T* pu = up.data<T>();
    const T* pdy = dy.data<T>();
    const int64_t n = gate.numel();
    T* dg = dgate.defined() ? dgate.data<T>() : nullptr;
    T* du = dup.defined() ? dup.data<T>() : nullptr;
    // Separate loops per case keep each one branch-free (vectorizable).
    if (dg && du) {
      map_n<T>(n, [=](int64_t i) {
        const T g = pg[i];
        T s, sc;
        sigmoid2<T>(g, s, sc);
        du[i] = pdy[i] * g * s;
        dg[i] = pdy[i] * pu[i] * s * (T(1) + g * sc);
      });
    } else if (dg) {
      map_n<T>(n, [=](int64_t i) {
        const T g = pg[i];
        T s, sc;
        sigmoid2<T>(g, s, sc);
        dg[i] = pdy[i] * pu[i] * s * (T(1) + g * sc);
      });
    } else if (du) {
      map_n<T>(n, [=](int64_t i) { du[i] = pdy[i] * pg[i] * sigmoid_t<T>(pg[i]); });
    }
  });
}

}  // namespace ftune::kernels::cpu
