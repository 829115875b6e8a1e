#include "kernels/lora.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/rng.h"
#include "kernels/matmul.h"

namespace ftune::kernels::cpu {

namespace {

// Philox blocks per task; one block gives the mask of 4 consecutive elements.
constexpr int64_t kBlocks = 256;

// Drop threshold on the 24 random bits behind philox_uniform: (bits >> 8) / 2^24 < p exactly when
// (bits >> 8) < ceil(p * 2^24) (p * 2^24 is exact in double).
inline uint32_t drop_threshold(double p) { return uint32_t(std::ceil(p * 16777216.0)); }

// Runs f(e0, e1, keep) over tasks of consecutive elements, keep[i - e0] being 1 (kept) or 0
// (dropped) for element i. Element i's mask is word g & 3 of Philox block g >> 2, g being its
// index in the full input (i itself when cols is whole), exactly as philox_uniform draws it.
template <class F>
void for_each_mask(int64_t n, double p, uint64_t seed, const LoraMaskCols& cols, F&& f) {
  const uint32_t thr = drop_threshold(p);
  if (cols.whole()) {
    const int64_t nblocks = (n + 3) / 4;
    const int64_t ntasks = (nblocks + kBlocks - 1) / kBlocks;
#pragma omp parallel for schedule(static) if (n > (1 << 14))
    for (int64_t t = 0; t < ntasks; ++t) {
      const int64_t b0 = t * kBlocks, b1 = std::min(nblocks, b0 + kBlocks);
      uint8_t keep[kBlocks * 4];
      // Separate loops: the Philox rounds vectorize over blocks, f's loop over elements.
      for (int64_t bl = b0; bl < b1; ++bl) {
        uint32_t r[4];
        philox4x32(seed, uint64_t(bl), kLoraDropoutStream, r);
        for (int j = 0; j < 4; ++j) keep[(bl - b0) * 4 + j] = (r[j] >> 8) >= thr;
      }
      f(b0 * 4, std::min(n, b1 * 4), keep);
    }
    return;
  }
  // A column slice: each row's run of width elements starts at row * full + offset, not on a
  // block boundary in general; tasks are pieces of one row.
  const int64_t w = cols.width;
  FTUNE_CHECK(w > 0 && cols.offset >= 0 && cols.offset + w <= cols.full && n % w == 0,
              "[lora_dropout] (kernels/cpu/lora.cpp) columns [", cols.offset, ", +", w, ") of ",
              cols.full, " do not fit ", n, " elements");
  constexpr int64_t kPiece = kBlocks * 4;
  const int64_t pieces = (w + kPiece - 1) / kPiece;
  const int64_t ntasks = n / w * pieces;
#pragma omp parallel for schedule(static) if (n > (1 << 14))
  for (int64_t t = 0; t < ntasks; ++t) {
    const int64_t row = t / pieces, c0 = t % pieces * kPiece, c1 = std::min(w, c0 + kPiece);
    const int64_t g0 = row * cols.full + cols.offset + c0, g1 = g0 + (c1 - c0);
    const int64_t b0 = g0 >> 2, b1 = (g1 + 3) >> 2;
    uint8_t keep[(kBlocks + 1) * 4];  // g0 & 3 leading words of the first block are skipped
    for (int64_t bl = b0; bl < b1; ++bl) {
      uint32_t r[4];
      philox4x32(seed, uint64_t(bl), kLoraDropoutStream, r);
      for (int j = 0; j < 4; ++j) keep[(bl - b0) * 4 + j] = (r[j] >> 8) >= thr;
    }
    f(row * w + c0, row * w + c1, keep + (g0 & 3));
  }
}

template <class T>
void apply_keep(const T* x, T* out, const uint8_t* keep, int64_t n, T inv) {
  for (int64_t i = 0; i < n; ++i) out[i] = keep[i] ? x[i] * inv : T(0);
}

template <class T>
void accumulate_keep(T* acc, const T* t, const uint8_t* keep, int64_t n, T inv) {
  for (int64_t i = 0; i < n; ++i) acc[i] += keep[i] ? t[i] * inv : T(0);
}

}  // namespace

template <class T>
void lora_dropout(const T* x, T* out, int64_t n, double p, uint64_t seed,
                  const LoraMaskCols& cols) {
  const T inv = T(1.0 / (1.0 - p));
  for_each_mask(n, p, seed, cols, [&](int64_t e0, int64_t e1, const uint8_t* keep) {
    apply_keep<T>(x + e0, out + e0, keep, e1 - e0, inv);
  });
}

template <class T>
void lora_dropout_accumulate(T* acc, const T* t, int64_t n, double p, uint64_t seed,
                             const LoraMaskCols& cols) {
  const T inv = T(1.0 / (1.0 - p));
  for_each_mask(n, p, seed, cols, [&](int64_t e0, int64_t e1, const uint8_t* keep) {
    accumulate_keep<T>(acc + e0, t + e0, keep, e1 - e0, inv);
  });
}

void lora_dropout_keep(uint8_t* keep, int64_t n, double p, uint64_t seed,
                       const LoraMaskCols& cols) {
  for_each_mask(n, p, seed, cols, [&](int64_t e0, int64_t e1, const uint8_t* k) {
    std::copy(k, k + (e1 - e0), keep + e0);
  });
}

template <class T>
void lora_forward(const LoraDims& d, const T* x, const T* w, const T* bias, const T* a, const T* b,
                  T scale, double p, uint64_t seed, T* xd, T* u, T* y) {
  const int64_t M = d.m, in = d.in, out = d.out, r = d.r;
  if (bias) {  // seed y with the bias, then accumulate the base GEMM onto it (beta = 1)
#pragma omp parallel for schedule(static) if (M * out > (1 << 16))
    for (int64_t i = 0; i < M; ++i) std::copy(bias, bias + out, y + i * out);
  }
  gemm<T>(false, true, M, out, in, T(1), x, in, w, in, bias ? T(1) : T(0), y, out);
  const T* xs = x;
  if (p > 0) {
    lora_dropout<T>(x, xd, M * in, p, seed, d.mask_cols());
    xs = xd;
  }
  gemm<T>(false, true, M, r, in, T(1), xs, in, a, in, T(0), u, r);   // u = drop(x) A^T
  gemm<T>(false, true, M, out, r, scale, u, r, b, r, T(1), y, out);  // y += scale u B^T
}

template <class T>
void lora_backward(const LoraDims& d, const T* g, const T* x, const T* w, const T* a, const T* b,
                   const T* u, T scale, double p, uint64_t seed, T* du, T* xd, uint8_t* keep, T* dx,
                   T* da, T* db) {
  const int64_t M = d.m, in = d.in, out = d.out, r = d.r;
  if (M == 0) {  // nothing to sum over: BLAS is not asked about k = 0
    if (da) std::fill(da, da + r * in, T(0));
    if (db) std::fill(db, db + out * r, T(0));
    return;
  }
  if (db) gemm<T>(true, false, out, r, M, scale, g, out, u, r, T(0), db, r);  // dB = scale g^T u
  if (!dx && !da) return;
  gemm<T>(false, false, M, r, out, scale, g, out, b, r, T(0), du, r);            // du = scale g B
  if (dx) gemm<T>(false, false, M, in, out, T(1), g, out, w, in, T(0), dx, in);  // dx = g W
  if (p == 0) {
    if (da) gemm<T>(true, false, r, in, M, T(1), du, r, x, in, T(0), da, in);   // dA = du^T x
    if (dx) gemm<T>(false, false, M, in, r, T(1), du, r, a, in, T(1), dx, in);  // dx += du A
    return;
  }
  // With dropout the mask is regenerated from the seed (Philox is the costly part: when both
  // dA and dx need it, it is drawn once into keep bytes). xd serves both uses in turn.
  const int64_t n = M * in;
  const T inv = T(1.0 / (1.0 - p));
  const bool both = da && dx;
  if (both) {
    lora_dropout_keep(keep, n, p, seed, d.mask_cols());
  }
  if (da) {
    if (both) {
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; i += kBlocks * 4)
        apply_keep<T>(x + i, xd + i, keep + i, std::min<int64_t>(kBlocks * 4, n - i), inv);
    } else {
      lora_dropout<T>(x, xd, n, p, seed, d.mask_cols());
    }
    gemm<T>(true, false, r, in, M, T(1), du, r, xd, in, T(0), da, in);  // dA = du^T drop(x)
  }
  if (dx) {
    gemm<T>(false, false, M, in, r, T(1), du, r, a, in, T(0), xd, in);  // du A
    if (both) {                                                         // dx += drop'(du A)
#pragma omp parallel for schedule(static) if (n > (1 << 16))
      for (int64_t i = 0; i < n; i += kBlocks * 4)
        accumulate_keep<T>(dx + i, xd + i, keep + i, std::min<int64_t>(kBlocks * 4, n - i), inv);
    } else {
      lora_dropout_accumulate<T>(dx, xd, n, p, seed, d.mask_cols());
    }
  }
}

#define FTUNE_LORA_INSTANTIATE(T)                                                                  \
  template void lora_dropout<T>(const T*, T*, int64_t, double, uint64_t, const LoraMaskCols&);     \
  template void lora_dropout_accumulate<T>(T*, const T*, int64_t, double, uint64_t,                \
                                           const LoraMaskCols&);                                   \
  template void lora_forward<T>(const LoraDims&, const T*, const T*, const T*, const T*, const T*, \
                                T, double, uint64_t, T*, T*, T*);                                  \
  template void lora_backward<T>(const LoraDims&, const T*, const T*, const T*, const T*,          \
                                 const T*, const T*, T, double, uint64_t, T*, T*, uint8_t*, T*,    \
                                 T*, T*);
FTUNE_LORA_INSTANTIATE(float)
FTUNE_LORA_INSTANTIATE(double)
#undef FTUNE_LORA_INSTANTIATE

}  // namespace ftune::kernels::cpu
