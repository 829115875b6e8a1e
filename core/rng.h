// Counter-based RNG (Philox-4x32-10): value i of a draw depends only on (seed, offset + i), so the
// same numbers come out on every device, every rank and every thread count.
#pragma once
#include <array>
#include <cstdint>

#include "core/tensor.h"

namespace ftune {

#if defined(__CUDACC__)
#define FTUNE_HD __host__ __device__ inline
#else
#define FTUNE_HD inline
#endif

// One Philox block: 4 x 32 random bits for counter (ctr_lo, ctr_hi) under key seed.
FTUNE_HD void philox4x32(uint64_t seed, uint64_t ctr_lo, uint64_t ctr_hi, uint32_t out[4]) {
  uint32_t c0 = uint32_t(ctr_lo), c1 = uint32_t(ctr_lo >> 32), c2 = uint32_t(ctr_hi), c3 = uint32_t(ctr_hi >> 32);
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = uint64_t(0xD2511F53u) * c0;
    uint64_t p1 = uint64_t(0xCD9E8D57u) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0;
    uint32_t n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Uniform in [0, 1) with 24 random bits, for element idx of stream `stream`.
FTUNE_HD float philox_uniform(uint64_t seed, uint64_t stream, uint64_t idx) {
  uint32_t r[4];
  philox4x32(seed, idx >> 2, stream, r);
  return float(r[idx & 3] >> 8) * (1.0f / 16777216.0f);
}

// A seeded stream of draws. Each draw takes a fresh range of counters.
class Generator {
 public:
  explicit Generator(uint64_t seed = 0) : seed_(seed) {}
  uint64_t seed() const { return seed_; }
  uint64_t offset() const { return offset_; }
  void set_state(uint64_t seed, uint64_t offset) {
    seed_ = seed;
    offset_ = offset;
  }
  // Reserves n counters (rounded to whole Philox blocks) and returns the first.
  uint64_t take(uint64_t n) {
    uint64_t o = offset_;
    offset_ += (n + 3) & ~uint64_t(3);
    return o;
  }

 private:
  uint64_t seed_ = 0;
  uint64_t offset_ = 0;
};

// Uniform [lo, hi) and normal(mean, std) tensors. Values are computed in f64 then stored in dtype.
Tensor rand(const Shape& shape, Generator& gen, double lo = 0.0, double hi = 1.0, DType dtype = DType::f32,
            Device dev = Device::cpu());
Tensor randn(const Shape& shape, Generator& gen, double mean = 0.0, double std = 1.0, DType dtype = DType::f32,
             Device dev = Device::cpu());
// Integers uniform in [lo, hi).
Tensor randint(const Shape& shape, Generator& gen, int64_t lo, int64_t hi, DType dtype = DType::i64,
               Device dev = Device::cpu());

}  // namespace ftune
