// Fused LoRA linear on the GPU: y = x W^T + b + scale * (drop(x) A^T) B^T and its backward.
// The low-rank update (k = r) is written first and the compute-bound base GEMM adds it in its
// epilogue (beta = 1), so y (and in the backward dx = g W + drop'(du A)) is written once more
// rather than read and written again by a memory-bound GEMM; no full-size temporary exists
// without dropout. (With a bias, the base GEMM goes first: gemm's 16-bit bias path seeds y with
// the bias.) With dropout the mask is Philox-drawn per element exactly as the CPU kernel draws it
// (kernels/lora.h), in one vectorized pass that writes drop(x) (or masks a tensor in place).
#include <cmath>

#include "core/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/lora.h"
#include "kernels/matmul.h"

namespace ftune::kernels::cuda {

namespace {

// The device storage type of a host float type.
template <class T>
struct Dev {
  using type = T;
};
template <>
struct Dev<bf16> {
  using type = __nv_bfloat16;
};
template <>
struct Dev<f16> {
  using type = __half;
};

// Same rule as the CPU: dropped iff (bits >> 8) < ceil(p * 2^24).
uint32_t drop_threshold(double p) { return uint32_t(std::ceil(p * 16777216.0)); }

constexpr int kGroup = 8;  // elements per thread: two Philox blocks, 16 or 32 bytes

// kAcc false: out = keep ? x * inv : 0 (x and out may alias).
// kAcc true:  out += keep ? x * inv : 0 (x is the tensor t of lora_dropout_accumulate).
// Element i's mask is word i & 3 of Philox block i >> 2 under (seed, kLoraDropoutStream). The
// products and sums are rounded separately (no FMA contraction): drop(x) in f32 matches the CPU
// bit for bit, the accumulate to one rounding (the CPU build may contract acc + t * inv).
template <class T, bool kAcc>
__global__ void dropout_kernel(const T* x, T* out, int64_t n, uint32_t thr, float inv,
                               uint64_t seed, bool vec) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  for (int64_t gi = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; gi < groups;
       gi += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = gi * kGroup;
    uint32_t r[kGroup];
    philox4x32(seed, uint64_t(e0 >> 2), kLoraDropoutStream, r);
    philox4x32(seed, uint64_t(e0 >> 2) + 1, kLoraDropoutStream, r + 4);
    bool keep[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) keep[j] = (r[j] >> 8) >= thr;
    if (vec && e0 + kGroup <= n) {
#pragma unroll
      for (int c = 0; c < kGroup; c += kVec<T>) {
        float xv[kVec<T>], ov[kVec<T>];
        load_vec(x + e0 + c, xv);
        if (kAcc) load_vec(out + e0 + c, ov);
#pragma unroll
        for (int i = 0; i < kVec<T>; ++i) {
          const float d = keep[c + i] ? __fmul_rn(xv[i], inv) : 0.f;
          ov[i] = kAcc ? __fadd_rn(ov[i], d) : d;
        }
        store_vec(out + e0 + c, ov);
      }
    } else {
      for (int j = 0; j < kGroup && e0 + j < n; ++j) {
        const float d = keep[j] ? __fmul_rn(to_f(x[e0 + j]), inv) : 0.f;
        out[e0 + j] = from_f<T>(kAcc ? __fadd_rn(to_f(out[e0 + j]), d) : d);
      }
    }
  }
}

// The same over a column slice of the full input (LoraMaskCols, not whole): element [row, j]
// draws index g = row * full + offset + j. One thread per Philox block of a row's run of width
// elements (at most width / 4 + 2 blocks: the run need not start on a block boundary).
template <class T, bool kAcc>
__global__ void dropout_cols_kernel(const T* x, T* out, int64_t rows, int64_t width,
                                    int64_t offset, int64_t full, int64_t row_blocks, uint32_t thr,
                                    float inv, uint64_t seed) {
  const int64_t tasks = rows * row_blocks;
  for (int64_t ti = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; ti < tasks;
       ti += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = ti / row_blocks, gs = row * full + offset;
    const int64_t bl = (gs >> 2) + ti % row_blocks;
    if (bl * 4 >= gs + width) continue;
    uint32_t r[4];
    philox4x32(seed, uint64_t(bl), kLoraDropoutStream, r);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t g = bl * 4 + j;
      if (g < gs || g >= gs + width) continue;
      const int64_t e = row * width + (g - gs);
      const float d = (r[j] >> 8) >= thr ? __fmul_rn(to_f(x[e]), inv) : 0.f;
      out[e] = from_f<T>(kAcc ? __fadd_rn(to_f(out[e]), d) : d);
    }
  }
}

template <class T, bool kAcc>
void launch_dropout(const T* x, T* out, int64_t n, double p, uint64_t seed,
                    const LoraMaskCols& cols, const char* op) {
  FTUNE_CHECK(p >= 0.0 && p < 1.0, "[", op, "] dropout must be in [0, 1), got ", p);
  FTUNE_CHECK(n >= 0 && (n == 0 || (x && out)), "[", op, "] null buffer for ", n, " elements");
  if (n == 0) return;
  using D = typename Dev<T>::type;
  if (!cols.whole()) {
    const int64_t w = cols.width;
    FTUNE_CHECK(w > 0 && cols.offset >= 0 && cols.offset + w <= cols.full && n % w == 0, "[", op,
                "] (kernels/cuda/lora.cu) columns [", cols.offset, ", +", w, ") of ", cols.full,
                " do not fit ", n, " elements");
    const int64_t row_blocks = w / 4 + 2, rows = n / w;
    dropout_cols_kernel<D, kAcc><<<grid_1d(rows * row_blocks, 256), 256, 0, stream()>>>(
        reinterpret_cast<const D*>(x), reinterpret_cast<D*>(out), rows, w, cols.offset,
        cols.full, row_blocks, drop_threshold(p), float(1.0 / (1.0 - p)), seed);
    FTUNE_LAUNCH_CHECK(op);
    return;
  }
  const int64_t groups = (n + kGroup - 1) / kGroup;
  const bool vec = aligned16(x) && aligned16(out);
  dropout_kernel<D, kAcc><<<grid_1d(groups, 256), 256, 0, stream()>>>(
      reinterpret_cast<const D*>(x), reinterpret_cast<D*>(out), n, drop_threshold(p),
      float(1.0 / (1.0 - p)), seed, vec);
  FTUNE_LAUNCH_CHECK(op);
}

// Row-major c[m, n] = alpha op(a) op(b) + beta c on the current stream.
template <class T>
void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda,
        const T* b, int64_t ldb, float beta, T* c, int64_t ldc, const T* bias = nullptr) {
  gemm(gemm_args<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, bias));
}

}  // namespace

template <class T>
void lora_dropout(const T* x, T* out, int64_t n, double p, uint64_t seed,
                  const LoraMaskCols& cols) {
  launch_dropout<T, false>(x, out, n, p, seed, cols, "lora_dropout");
}

template <class T>
void lora_dropout_accumulate(T* acc, const T* t, int64_t n, double p, uint64_t seed,
                             const LoraMaskCols& cols) {
  launch_dropout<T, true>(t, acc, n, p, seed, cols, "lora_dropout_accumulate");
}

template <class T>
void lora_forward(const LoraDims& d, const T* x, const T* w, const T* bias, const T* a, const T* b,
                  float scale, double p, uint64_t seed, T* xd, T* u, T* y) {
  const int64_t M = d.m, in = d.in, out = d.out, r = d.r;
  FTUNE_CHECK(M >= 0 && in >= 0 && out >= 0 && r >= 1, "[lora_forward] bad dims m=", M, " in=", in,
              " out=", out, " r=", r);
  FTUNE_CHECK(p == 0 || xd, "[lora_forward] dropout ", p, " needs the xd scratch");
  const T* xs = x;
  if (p > 0) {
    lora_dropout<T>(x, xd, M * in, p, seed, d.mask_cols());
    xs = xd;
  }
  mm<T>(false, true, M, r, in, 1.f, xs, in, a, in, 0.f, u, r);  // u = drop(x) A^T
  if (!bias) {
    // The low-rank term first, then the base GEMM adds it in its epilogue (beta = 1): the
    // base GEMM is compute-bound, so reading y there is nearly free, where a low-rank GEMM
    // with beta = 1 after it would read and write all of y again.
    mm<T>(false, true, M, out, r, scale, u, r, b, r, 0.f, y, out);  // y = scale u B^T
    mm<T>(false, true, M, out, in, 1.f, x, in, w, in, 1.f, y, out);  // y += x W^T
    return;
  }
  // With a bias (gemm's 16-bit bias path seeds y with it before the base GEMM): the other order.
  mm<T>(false, true, M, out, in, 1.f, x, in, w, in, 0.f, y, out, bias);  // y = x W^T + b
  mm<T>(false, true, M, out, r, scale, u, r, b, r, 1.f, y, out);        // y += scale u B^T
}

template <class T>
void lora_backward(const LoraDims& d, const T* g, const T* x, const T* w, const T* a, const T* b,
                   const T* u, float scale, double p, uint64_t seed, T* du, T* xd, uint8_t* keep,
                   T* dx, T* da, T* db) {
  (void)keep;
  const int64_t M = d.m, in = d.in, out = d.out, r = d.r;
  FTUNE_CHECK(M >= 0 && in >= 0 && out >= 0 && r >= 1, "[lora_backward] bad dims m=", M, " in=", in,
              " out=", out, " r=", r);
  FTUNE_CHECK(!(dx || da) || du, "[lora_backward] dx or dA needs the du scratch");
  FTUNE_CHECK(p == 0 || !da || xd, "[lora_backward] dropout ", p, " with dA needs the xd scratch");
  // dB = scale g^T u; with M == 0 the GEMMs' k == 0 path writes zeros into dA and dB.
  if (db) mm<T>(true, false, out, r, M, scale, g, out, u, r, 0.f, db, r);
  if (!dx && !da) return;
  mm<T>(false, false, M, r, out, scale, g, out, b, r, 0.f, du, r);  // du = scale g B
  const int64_t n = M * in;
  if (da) {
    const T* xs = x;
    if (p > 0) {
      lora_dropout<T>(x, xd, n, p, seed, d.mask_cols());
      xs = xd;
    }
    mm<T>(true, false, r, in, M, 1.f, du, r, xs, in, 0.f, da, in);  // dA = du^T drop(x)
  }
  if (dx) {
    // The adapter's share first, then the base GEMM adds it in its epilogue (beta = 1, nearly
    // free in a compute-bound GEMM): dx = g W + drop'(du A) with no extra pass over dx.
    mm<T>(false, false, M, in, r, 1.f, du, r, a, in, 0.f, dx, in);             // dx = du A
    if (p > 0) lora_dropout<T>(dx, dx, n, p, seed, d.mask_cols());             // drop'(du A)
    mm<T>(false, false, M, in, out, 1.f, g, out, w, in, 1.f, dx, in);          // dx += g W
  }
}

#define FTUNE_LORA_CUDA_INSTANTIATE(T)                                                             \
  template void lora_dropout<T>(const T*, T*, int64_t, double, uint64_t, const LoraMaskCols&);     \
  template void lora_dropout_accumulate<T>(T*, const T*, int64_t, double, uint64_t,                \
                                           const LoraMaskCols&);                                   \
  template void lora_forward<T>(const LoraDims&, const T*, const T*, const T*, const T*, const T*, \
                                float, double, uint64_t, T*, T*, T*);                              \
  template void lora_backward<T>(const LoraDims&, const T*, const T*, const T*, const T*,          \
                                 const T*, const T*, float, double, uint64_t, T*, T*, uint8_t*,    \
                                 T*, T*, T*);
FTUNE_LORA_CUDA_INSTANTIATE(float)
FTUNE_LORA_CUDA_INSTANTIATE(bf16)
FTUNE_LORA_CUDA_INSTANTIATE(f16)
#undef FTUNE_LORA_CUDA_INSTANTIATE

}  // namespace ftune::kernels::cuda
