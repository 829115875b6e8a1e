#include "kernels/rope.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements

template <class T, class I>
void rope_t(const T* x, const I* pos, int64_t rows, int64_t npos, int64_t H, int64_t D,
            double theta, bool inverse, T* out) {
  const int64_t half = D / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = std::pow(theta, -2.0 * double(i) / double(D));

  // cos/sin tables, one row per distinct position when positions span a small range (the usual
  // 0..T-1, repeated per batch row), else one row per token. Angles in f64: exact to ~1e-12 rad at
  // position 32k, where f32 would be off by ~2e-3.
  int64_t lo = 0, hi = -1;
  if (npos > 0) {
    auto [mn, mx] = std::minmax_element(pos, pos + npos);
    lo = int64_t(*mn);
    hi = int64_t(*mx);
  }
  const bool by_value = npos > 0 && uint64_t(hi) - uint64_t(lo) < uint64_t(npos);  // no overflow
  const int64_t trows = by_value ? hi - lo + 1 : npos;
  std::vector<T> cs(size_t(trows * half)), sn(size_t(trows * half));
  const double sign = inverse ? -1.0 : 1.0;
#pragma omp parallel for schedule(static) if (trows * half > 4096)
  for (int64_t t = 0; t < trows; ++t) {
    const double p = double(by_value ? lo + t : int64_t(pos[t]));
    for (int64_t i = 0; i < half; ++i) {
      const double a = p * inv_freq[size_t(i)];
      cs[size_t(t * half + i)] = T(std::cos(a));
      sn[size_t(t * half + i)] = T(sign * std::sin(a));
    }
  }

#pragma omp parallel for schedule(static) if (rows * H * D > kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    // rows = B*T tokens; positions [T] repeat for each batch row.
    const int64_t pr = r % npos;
    const int64_t t = by_value ? int64_t(pos[pr]) - lo : pr;
    const T* c = cs.data() + t * half;
    const T* s = sn.data() + t * half;
    for (int64_t h = 0; h < H; ++h) {
      const T* xr = x + (r * H + h) * D;
      T* o = out + (r * H + h) * D;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const T x1 = xr[i], x2 = xr[i + half];
        o[i] = x1 * c[i] - x2 * s[i];
        o[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
}

}  // namespace

void rope(const Tensor& x, const Tensor& positions, double theta, bool inverse, Tensor& out) {
  const int64_t H = x.size(2), D = x.size(3), rows = x.size(0) * x.size(1);
  const int64_t npos = positions.numel();
  dispatch_float(x.dtype(), "rope", [&]<class T>() {
    if (positions.dtype() == DType::i32)
      rope_t<T, int32_t>(x.data<T>(), positions.data<int32_t>(), rows, npos, H, D, theta, inverse,
                         out.data<T>());
    else
      rope_t<T, int64_t>(x.data<T>(), positions.data<int64_t>(), rows, npos, H, D, theta, inverse,
                         out.data<T>());
  });
}

}  // namespace ftune::kernels::cpu
