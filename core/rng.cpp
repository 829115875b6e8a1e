#include "core/rng.h"

#include <cmath>

namespace ftune {

namespace {
constexpr uint64_t kStreamUniform = 0x5eed0001, kStreamNormal = 0x5eed0002, kStreamInt = 0x5eed0003;

inline double u01_53(uint32_t a, uint32_t b) {  // (0, 1] with 53 bits, never 0 (log-safe)
  uint64_t x = (uint64_t(a) << 21) ^ uint64_t(b >> 11);
  return (double(x & ((uint64_t(1) << 53) - 1)) + 1.0) * (1.0 / 9007199254740992.0);
}

template <class Fill>
Tensor make(const Shape& shape, DType dtype, Device dev, Fill&& fill) {
  Tensor d = Tensor::empty(shape, DType::f64, Device::cpu());
  double* p = d.data<double>();
  int64_t n = d.numel();
  fill(p, n);
  Tensor out = Tensor::empty(shape, dtype, Device::cpu());
  out.copy_(d);
  return dev.is_cpu() ? out : out.to(dev);
}
}  // namespace

Tensor rand(const Shape& shape, Generator& gen, double lo, double hi, DType dtype, Device dev) {
  uint64_t base = gen.take(uint64_t(shape_numel(shape)) * 2);
  uint64_t seed = gen.seed();
  return make(shape, dtype, dev, [&](double* p, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      uint64_t c = base + uint64_t(i) * 2;  // 2 words per value: 53-bit uniforms
      uint32_t r[4];
      philox4x32(seed, c >> 2, kStreamUniform, r);
      double u = u01_53(r[c & 3], r[(c & 3) + 1]) - (1.0 / 9007199254740992.0);
      p[i] = lo + (hi - lo) * u;
    }
  });
}

Tensor randn(const Shape& shape, Generator& gen, double mean, double std, DType dtype, Device dev) {
  uint64_t base = gen.take(uint64_t(shape_numel(shape)) * 4);
  uint64_t seed = gen.seed();
  return make(shape, dtype, dev, [&](double* p, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) {  // one Philox block per value: Box-Muller on two 53-bit uniforms
      uint64_t c = base + uint64_t(i) * 4;
      uint32_t r[4];
      philox4x32(seed, c >> 2, kStreamNormal, r);
      double u1 = u01_53(r[0], r[1]), u2 = u01_53(r[2], r[3]);
      p[i] = mean + std * std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
  });
}

Tensor randint(const Shape& shape, Generator& gen, int64_t lo, int64_t hi, DType dtype, Device dev) {
  FTUNE_CHECK(hi > lo, "[randint] empty range [", lo, ", ", hi, ")");
  uint64_t base = gen.take(uint64_t(shape_numel(shape)) * 2);
  uint64_t seed = gen.seed();
  uint64_t span = uint64_t(hi - lo);
  return make(shape, dtype, dev, [&](double* p, int64_t n) {
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) {
      uint64_t c = base + uint64_t(i) * 2;
      uint32_t r[4];
      philox4x32(seed, c >> 2, kStreamInt, r);
      uint64_t x = (uint64_t(r[c & 3]) << 32) | r[(c & 3) + 1];
      p[i] = double(lo + int64_t(x % span));
    }
  });
}

}  // namespace ftune
