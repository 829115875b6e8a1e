// Fused LoRA linear on the GPU: y = x W^T + b + scale * (drop(x) A^T) B^T and its backward.
// The low-rank update (k = r) is written first and the compute-bound base GEMM adds it in its
// epilogue (beta = 1), so y (and in the backward dx = g W + drop'(du A)) is written once more
// rather than read and written again by a memory-bound GEMM; no full-size temporary exists.
// (With a bias, the base GEMM goes first: gemm's 16-bit bias path seeds y with the bias.)
// The dropout mask is Philox-drawn per element exactly as the CPU kernel draws it
// (kernels/lora.h). With dropout (bf16/f16, r <= 64) the low-rank GEMMs are this file's
// tensor-core kernels, which draw the mask as they load x: u = drop(x) A^T in the forward, and
// dA = du^T drop(x) with dx's share drop'(du A) in one pass over x in the backward. Elsewhere (and
// under FTUNE_LORA_FUSED=0) they are cuBLASLt GEMMs, with drop(x) written by one vectorized
// pass beforehand and dx's share masked in place after.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>

#include "core/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"
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

// ---- the low-rank GEMMs with the dropout mask fused (tensor cores) ------------------------------
//
// u = drop(x) A^T (lora_down_kernel) and, in the backward, dA = du^T drop(x) with
// dx = drop'(du A) (lora_up_kernel) in one pass over x, the mask drawn once per element in
// shared memory: drop(x) is never written to global memory. mma.sync.m16n8k16 with f32
// accumulators (fragment layouts: kernels/cuda/mma.cuh); the rank is padded with zeros to
// RP = 16 * R16 (r <= 64). Tiles of 64 rows (4 warps x 16) by 64 columns of x.
// Masked values are those of dropout_kernel: keep ? round_T(x * inv) : 0, so u is a GEMM of the
// same drop(x) the unfused path writes; dx's adapter share is round_T(round_T(du A) * inv), as
// the unfused GEMM + in-place mask rounds it.

constexpr int kLoBM = 64, kLoBK = 64, kLoThreads = 128;
constexpr int kLoLds = kLoBK + 8;  // shared row stride (elements) of x / A / dx tiles
constexpr int kDownStages = 4;
constexpr int kMaxFusedRank = 64;

struct LoArgs {
  const void* x;   // [m, in]
  const void* a;   // [r, in]
  const void* du;  // backward: [m, r], row stride ldu
  void* u;         // forward: [m, r], row stride ldu
  float* u_part;   // forward split over columns: [splits, m, r] f32 (null: one split, into u)
  void* dx;        // backward: [m, in] (null: not needed)
  float* da_part;  // backward: [splits, r, in] f32 (null: dA not needed)
  int64_t m, in, ldu;
  int r;
  int64_t rows_per_split;  // backward: a multiple of kLoBM
  int ktiles_per_split;    // forward: column tiles per split
  int64_t mfull, moff;     // element [row, col] draws mask index row * mfull + moff + col
  uint32_t thr;
  float inv;
  uint64_t seed;
  bool drop, dx_acc;
  int du_load;  // 16: 16-byte cp.async (r, ldu multiples of 8, aligned), 4: 4-byte, 0: by element
};

// The keep bits of 8 consecutive elements whose first mask index g0 is a multiple of 4 (two
// Philox blocks; bit j: element j kept).
__device__ __forceinline__ uint32_t keep8(uint64_t seed, int64_t g0, uint32_t thr) {
  uint32_t r[8];
  philox4x32(seed, uint64_t(g0 >> 2), kLoraDropoutStream, r);
  philox4x32(seed, uint64_t(g0 >> 2) + 1, kLoraDropoutStream, r + 4);
  uint32_t k = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) k |= uint32_t((r[j] >> 8) >= thr) << j;
  return k;
}

// 8 elements of T in shared memory (16 bytes) masked in place: keep ? round_T(x * inv) : 0.
template <class T>
__device__ __forceinline__ void mask8(T* p, uint32_t keep, float inv) {
  Vec<T> v = *reinterpret_cast<Vec<T>*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i)
    v.v[i] = from_f<T>((keep >> i) & 1u ? __fmul_rn(to_f(v.v[i]), inv) : 0.f);
  *reinterpret_cast<Vec<T>*>(p) = v;
}

// Chunk i (16 bytes) of a tile of kLoBM rows x kLoBK columns: row i / 8, column (i % 8) * 8.
// Each thread masks exactly the chunks it copied (visible to it after its cp.async wait).

// u [m, r] = drop(x) A^T. CTA (bx, by) takes rows [64 bx, 64 bx + 64) and column tiles
// [by * ktiles_per_split, ...), walked in a kDownStages-deep cp.async pipeline of x and A tiles.
// With several column splits each writes an f32 partial, summed by lora_u_reduce_kernel.
template <class T, int R16>
__global__ void __launch_bounds__(kLoThreads) lora_down_kernel(LoArgs p) {
  constexpr int RP = 16 * R16;
  extern __shared__ __align__(16) unsigned char lo_smem[];
  T* xs = reinterpret_cast<T*>(lo_smem);          // [stages][kLoBM][kLoLds]
  T* as = xs + kDownStages * kLoBM * kLoLds;       // [stages][RP][kLoLds]
  const T* x = static_cast<const T*>(p.x);
  const T* aw = static_cast<const T*>(p.a);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t row0 = int64_t(blockIdx.x) * kLoBM;
  const int kt_all = int((p.in + kLoBK - 1) / kLoBK);
  const int kt_begin = int(blockIdx.y) * p.ktiles_per_split;
  const int ktiles = max(0, min(kt_all, kt_begin + p.ktiles_per_split) - kt_begin);

  auto issue = [&](int kt) {  // kt: the split's kt-th column tile
    T* xt = xs + (kt % kDownStages) * kLoBM * kLoLds;
    T* at = as + (kt % kDownStages) * RP * kLoLds;
    const int64_t c0 = int64_t(kt_begin + kt) * kLoBK;
    for (int i = tid; i < kLoBM * (kLoBK / 8); i += kLoThreads) {
      const int rr = i >> 3, cc = (i & 7) * 8;
      const bool ok = row0 + rr < p.m && c0 + cc < p.in;
      cp_async16(xt + rr * kLoLds + cc, ok ? x + (row0 + rr) * p.in + c0 + cc : x, ok ? 16 : 0);
    }
    for (int i = tid; i < RP * (kLoBK / 8); i += kLoThreads) {
      const int rr = i >> 3, cc = (i & 7) * 8;
      const bool ok = rr < p.r && c0 + cc < p.in;
      cp_async16(at + rr * kLoLds + cc, ok ? aw + rr * p.in + c0 + cc : aw, ok ? 16 : 0);
    }
  };

#pragma unroll
  for (int s = 0; s < kDownStages - 1; ++s) {
    if (s < ktiles) issue(s);
    cp_async_commit();
  }
  float acc[2 * R16][4];
#pragma unroll
  for (int j = 0; j < 2 * R16; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kDownStages - 2>();  // this thread's copies of tile kt have landed
    T* xt = xs + (kt % kDownStages) * kLoBM * kLoLds;
    const T* at = as + (kt % kDownStages) * RP * kLoLds;
    if (p.drop) {
      const int64_t c0 = int64_t(kt_begin + kt) * kLoBK;
      for (int i = tid; i < kLoBM * (kLoBK / 8); i += kLoThreads) {
        const int rr = i >> 3, cc = (i & 7) * 8;
        const int64_t row = row0 + rr, col = c0 + cc;
        if (row < p.m && col < p.in)
          mask8(xt + rr * kLoLds + cc, keep8(p.seed, row * p.mfull + p.moff + col, p.thr), p.inv);
      }
    }
    // Tile kt (masked) is visible to every warp, and every warp is done with tile kt - 1,
    // whose buffer the next issue refills.
    __syncthreads();
    if (kt + kDownStages - 1 < ktiles) issue(kt + kDownStages - 1);
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < kLoBK / 16; ++kk) {
      uint32_t af[4];
      ldsm_x4(af, xt + (warp * 16 + (lane & 15)) * kLoLds + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < R16; ++nb) {
        uint32_t bf[4];  // B = A^T: rows of A are the columns of B
        ldsm_x4(bf, at + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * kLoLds + kk * 16 +
                        ((lane >> 3) & 1) * 8);
        mma16816<T>(acc[2 * nb], af, bf[0], bf[1]);
        mma16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
      }
    }
  }
  cp_async_wait<0>();  // no copy may be in flight when the CTA exits

  T* u = static_cast<T*>(p.u);
  float* part = p.u_part ? p.u_part + int64_t(blockIdx.y) * p.m * p.r : nullptr;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 2 * R16; ++j)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + warp * 16 + g + h * 8;
      const int col = 8 * j + 2 * t;
      if (row >= p.m) continue;
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        if (col + e >= p.r) continue;
        if (part) part[row * p.r + col + e] = acc[j][2 * h + e];
        else u[row * p.ldu + col + e] = from_f<T>(acc[j][2 * h + e]);
      }
    }
}

// u [m, r] (row stride ldu) = the column splits' partials summed in order, rounded to T once.
template <class T>
__global__ void lora_u_reduce_kernel(const float* part, T* u, int splits, int64_t m, int r,
                                     int64_t ldu) {
  const int64_t n = m * r;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += part[int64_t(k) * n + i];
    u[i / r * ldu + i % r] = from_f<T>(s);
  }
}

// The backward's pass over x: CTA (bx, by) owns columns [64 bx, 64 bx + 64) and rows
// [by * rows_per_split, ...), walked by tiles of 64 rows (x and du double-buffered by cp.async).
// Per tile: the mask (drawn once: it masks x in shared memory and is kept as 8 bits per chunk
// for dx), dA += du^T drop(x) (each warp 16 of the 64 columns, every rank; f32 partials per
// split, summed in a fixed order by lora_da_reduce_kernel), dx = drop'(du A) (each warp 16 rows,
// staged through shared memory for 16-byte stores; with dx_acc added to dx's values in place).
template <class T, int R16>
__global__ void __launch_bounds__(kLoThreads) lora_up_kernel(LoArgs p) {
  constexpr int RP = 16 * R16;
  constexpr int kDuLds = RP + 8;  // an odd number of 16-byte units: conflict-free ldmatrix
  extern __shared__ __align__(16) unsigned char lo_smem[];
  T* as = reinterpret_cast<T*>(lo_smem);  // [RP][kLoLds]: A's 64 columns of this CTA
  T* xs = as + RP * kLoLds;               // [2][kLoBM][kLoLds]
  T* dus = xs + 2 * kLoBM * kLoLds;       // [2][kLoBM][kDuLds]
  T* os = dus + 2 * kLoBM * kDuLds;       // [kLoBM][kLoLds]: dx staging
  uint8_t* keeps = reinterpret_cast<uint8_t*>(os + kLoBM * kLoLds);  // [2][kLoBM][8]
  const T* x = static_cast<const T*>(p.x);
  const T* du = static_cast<const T*>(p.du);
  T* dx = static_cast<T*>(p.dx);
  const bool need_dx = dx != nullptr, need_da = p.da_part != nullptr;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t c0 = int64_t(blockIdx.x) * kLoBK;
  const int64_t r_begin = int64_t(blockIdx.y) * p.rows_per_split;
  const int64_t r_end = p.m < r_begin + p.rows_per_split ? p.m : r_begin + p.rows_per_split;
  const int ntiles = r_end > r_begin ? int((r_end - r_begin + kLoBM - 1) / kLoBM) : 0;

  if (need_dx) {  // A's tile, rows >= r zero (in the first cp.async group)
    const T* aw = static_cast<const T*>(p.a);
    for (int i = tid; i < RP * (kLoBK / 8); i += kLoThreads) {
      const int rr = i >> 3, cc = (i & 7) * 8;
      const bool ok = rr < p.r && c0 + cc < p.in;
      cp_async16(as + rr * kLoLds + cc, ok ? aw + rr * p.in + c0 + cc : aw, ok ? 16 : 0);
    }
  }
  auto issue = [&](int it) {
    const int st = it & 1;
    const int64_t row0 = r_begin + int64_t(it) * kLoBM;
    if (need_da) {
      T* xt = xs + st * kLoBM * kLoLds;
      for (int i = tid; i < kLoBM * (kLoBK / 8); i += kLoThreads) {
        const int rr = i >> 3, cc = (i & 7) * 8;
        const bool ok = row0 + rr < r_end && c0 + cc < p.in;
        cp_async16(xt + rr * kLoLds + cc, ok ? x + (row0 + rr) * p.in + c0 + cc : x, ok ? 16 : 0);
      }
    }
    T* dt = dus + st * kLoBM * kDuLds;
    if (p.du_load == 16) {  // r and ldu multiples of 8, du 16-byte aligned
      for (int i = tid; i < kLoBM * (RP / 8); i += kLoThreads) {
        const int rr = i / (RP / 8), cc = (i % (RP / 8)) * 8;
        const bool ok = row0 + rr < r_end && cc < p.r;
        cp_async16(dt + rr * kDuLds + cc, ok ? du + (row0 + rr) * p.ldu + cc : du, ok ? 16 : 0);
      }
    } else if (p.du_load == 4) {  // r and ldu even, du 4-byte aligned (e.g. an adapter of a
                                  // batched q/k/v at column offset 8 of ldu 40)
      for (int i = tid; i < kLoBM * (RP / 2); i += kLoThreads) {
        const int rr = i / (RP / 2), cc = (i % (RP / 2)) * 2;
        const bool ok = row0 + rr < r_end && cc < p.r;
        cp_async4(dt + rr * kDuLds + cc, ok ? du + (row0 + rr) * p.ldu + cc : du, ok ? 4 : 0);
      }
    } else {  // element by element (synchronous loads; an odd rank)
      for (int i = tid; i < kLoBM * RP; i += kLoThreads) {
        const int rr = i / RP, cc = i % RP;
        dt[rr * kDuLds + cc] =
            row0 + rr < r_end && cc < p.r ? du[(row0 + rr) * p.ldu + cc] : from_f<T>(0.f);
      }
    }
  };

  if (ntiles > 0) issue(0);
  cp_async_commit();
  float acc_a[R16][2][4];  // dA partial: ranks 16 mt.., columns 16 warp + 8 nt..
#pragma unroll
  for (int mt = 0; mt < R16; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) acc_a[mt][nt][0] = acc_a[mt][nt][1] = acc_a[mt][nt][2] =
                                        acc_a[mt][nt][3] = 0.f;

  for (int it = 0; it < ntiles; ++it) {
    const int st = it & 1;
    const int64_t row0 = r_begin + int64_t(it) * kLoBM;
    cp_async_wait<0>();  // this thread's copies of tile it (and A's tile) have landed
    T* xt = xs + st * kLoBM * kLoLds;
    const T* dt = dus + st * kLoBM * kDuLds;
    uint8_t* kt = keeps + st * kLoBM * 8;
    if (p.drop) {  // the mask of the tile's chunks: x masked in place, the bits kept for dx
      for (int i = tid; i < kLoBM * (kLoBK / 8); i += kLoThreads) {
        const int rr = i >> 3, cc = (i & 7) * 8;
        const int64_t row = row0 + rr, col = c0 + cc;
        uint32_t k = 0;
        if (row < r_end && col < p.in) {
          k = keep8(p.seed, row * p.mfull + p.moff + col, p.thr);
          if (need_da) mask8(xt + rr * kLoLds + cc, k, p.inv);
        }
        kt[rr * 8 + (i & 7)] = uint8_t(k);
      }
    }
    // Tile it is visible to every warp, and every warp is done with tile it - 1, whose buffers
    // the next issue refills.
    __syncthreads();
    if (it + 1 < ntiles) issue(it + 1);
    cp_async_commit();

    if (need_da) {  // dA[rank, col] += sum over the tile's rows of du[row, rank] drop(x)[row, col]
#pragma unroll
      for (int kk = 0; kk < kLoBM / 16; ++kk) {
        uint32_t bf[4];  // B = drop(x) tile, k = row: columns 16 warp..16 warp + 15
        ldsm_x4_t(bf, xt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLoLds + warp * 16 +
                          (lane >> 4) * 8);
#pragma unroll
        for (int mt = 0; mt < R16; ++mt) {
          uint32_t af[4];  // A = du^T: du[row][rank] transposed
          ldsm_x4_t(af, dt + (kk * 16 + (lane & 7) + (lane >> 4) * 8) * kDuLds + mt * 16 +
                            ((lane >> 3) & 1) * 8);
          mma16816<T>(acc_a[mt][0], af, bf[0], bf[1]);
          mma16816<T>(acc_a[mt][1], af, bf[2], bf[3]);
        }
      }
    }
    if (need_dx) {  // dx rows 16 warp.. = du A over the 64 columns
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < R16; ++kk) {
        uint32_t af[4];
        ldsm_x4(af, dt + (warp * 16 + (lane & 15)) * kDuLds + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nb = 0; nb < kLoBK / 16; ++nb) {
          uint32_t bf[4];  // B = A[rank][col], k = rank
          ldsm_x4_t(bf, as + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kLoLds + nb * 16 +
                            (lane >> 4) * 8);
          mma16816<T>(acc[2 * nb], af, bf[0], bf[1]);
          mma16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
        }
      }
      // The unfused path's roundings: dx = drop'(du A) is the GEMM's output rounded to T, then
      // the mask's product rounded again (staged: the warp's 16 rows, then written 16 bytes at
      // a time). dx += drop'(du A) adds the f32 product of the rounded GEMM output (the
      // unfused accumulate's), or without dropout the f32 sum itself (a GEMM with beta = 1),
      // into dx, rounded once, straight from the fragments.
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int rr = warp * 16 + g + 8 * h, cc = 8 * j + 2 * t;
          float v0 = acc[j][2 * h], v1 = acc[j][2 * h + 1];
          if (p.drop || !p.dx_acc) {
            v0 = to_f(from_f<T>(v0));
            v1 = to_f(from_f<T>(v1));
          }
          if (p.drop) {
            const uint32_t k = kt[rr * 8 + j] >> (2 * t);
            v0 = k & 1u ? __fmul_rn(v0, p.inv) : 0.f;
            v1 = k & 2u ? __fmul_rn(v1, p.inv) : 0.f;
          }
          if (!p.dx_acc) {
            *reinterpret_cast<uint32_t*>(os + rr * kLoLds + cc) = pack2<T>(v0, v1);
          } else if (row0 + rr < r_end && c0 + cc < p.in) {
            uint32_t* dst = reinterpret_cast<uint32_t*>(dx + (row0 + rr) * p.in + c0 + cc);
            const uint32_t old = *dst;
            const T* o = reinterpret_cast<const T*>(&old);
            *dst = pack2<T>(__fadd_rn(to_f(o[0]), v0), __fadd_rn(to_f(o[1]), v1));
          }
        }
      if (!p.dx_acc) {
        __syncwarp();
#pragma unroll
        for (int i = lane; i < 16 * (kLoBK / 8); i += 32) {
          const int rr = warp * 16 + (i >> 3), cc = (i & 7) * 8;
          const int64_t row = row0 + rr, col = c0 + cc;
          if (row >= r_end || col >= p.in) continue;
          *reinterpret_cast<Vec<T>*>(dx + row * p.in + col) =
              *reinterpret_cast<const Vec<T>*>(os + rr * kLoLds + cc);
        }
      }
      __syncwarp();  // the staging rows are rewritten by the next tile
    }
  }
  cp_async_wait<0>();

  if (need_da) {  // this split's partial dA: ranks < r, columns < in
#pragma unroll
    for (int mt = 0; mt < R16; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int rank = mt * 16 + g + 8 * h;
          const int64_t col = c0 + warp * 16 + nt * 8 + 2 * t;
          if (rank >= p.r || col >= p.in) continue;
          *reinterpret_cast<float2*>(p.da_part + (int64_t(blockIdx.y) * p.r + rank) * p.in + col) =
              make_float2(acc_a[mt][nt][2 * h], acc_a[mt][nt][2 * h + 1]);
        }
  }
}

// dA [n = r * in] = the splits' partials summed in order, rounded to T once.
template <class T>
__global__ void lora_da_reduce_kernel(const float* part, T* da, int splits, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int k = 0; k < splits; ++k) s += part[int64_t(k) * n + i];
    da[i] = from_f<T>(s);
  }
}

// Calls f(std::integral_constant<int, R16>) with R16 = ceil(r / 16), r <= kMaxFusedRank.
template <class F>
void rank_dispatch(int64_t r, F&& f) {
  if (r <= 16) f(std::integral_constant<int, 1>{});
  else if (r <= 32) f(std::integral_constant<int, 2>{});
  else if (r <= 48) f(std::integral_constant<int, 3>{});
  else f(std::integral_constant<int, 4>{});
}

// FTUNE_LORA_FUSED: 0 = never (cuBLASLt GEMMs + separate dropout passes), 1 = the fused kernels
// wherever they apply, unset (auto) = the fused kernels with dropout, cuBLASLt without (to be
// settled by bench_gpu's A/B rows). Read per call, so a benchmark can compare both in one process.
int fused_mode() {
  const char* e = std::getenv("FTUNE_LORA_FUSED");
  if (e && e[0] == '0') return 0;
  if (e && e[0] == '1') return 1;
  return -1;
}

// Whether the fused kernels take this call: 16-bit T, 1 <= r <= 64, rows of x in whole 16-byte
// chunks (in % 8 == 0) and 16-byte aligned buffers, and a mask whose chunks start on a Philox
// block (a column slice needs full and offset multiples of 4).
template <class T>
bool fused_ok(const LoraDims& d, double p, std::initializer_list<const void*> ptrs) {
  if constexpr (std::is_same_v<T, float>) {
    return false;
  } else {
    const int mode = fused_mode();
    if (mode == 0 || (mode == -1 && p == 0)) return false;
    if (d.m <= 0 || d.in <= 0 || d.in % 8 != 0 || d.r < 1 || d.r > kMaxFusedRank) return false;
    const LoraMaskCols c = d.mask_cols();
    if (p > 0 && !c.whole() && (c.full % 4 != 0 || c.offset % 4 != 0)) return false;
    for (const void* q : ptrs)
      if (q && !aligned16(q)) return false;
    return true;
  }
}

LoArgs lo_args(const LoraDims& d, double p, uint64_t seed) {
  LoArgs a{};
  a.m = d.m;
  a.in = d.in;
  a.r = int(d.r);
  const LoraMaskCols c = d.mask_cols();
  a.mfull = c.whole() ? d.in : c.full;
  a.moff = c.whole() ? 0 : c.offset;
  a.drop = p > 0;
  a.thr = drop_threshold(p);
  a.inv = float(1.0 / (1.0 - p));
  a.seed = seed;
  return a;
}

// A scratch buffer of n elements of T on the current GPU (the caching allocator's, stream-ordered:
// it may be released as soon as the kernels using it are queued).
template <class T>
Tensor scratch(int64_t n) {
  return Tensor::empty({n}, dtype_of<T>::value, Device::cuda(ftune::cuda::current_device()));
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
bool lora_down_fused(const LoraDims& d, const T* x, const T* a, double p, uint64_t seed, T* u,
                     int64_t ldu) {
  if constexpr (std::is_same_v<T, float>) {  // the kernels are 16-bit only
    (void)d, (void)p, (void)seed;
    return false;
  } else {
    FTUNE_CHECK(p >= 0.0 && p < 1.0, "[lora_down_fused] dropout must be in [0, 1), got ", p);
    if (!fused_ok<T>(d, p, {x, a})) return false;
    using D = typename Dev<T>::type;
    LoArgs args = lo_args(d, p, seed);
    args.x = x;
    args.a = a;
    args.u = u;
    args.ldu = ldu;
    const int64_t blocks = (d.m + kLoBM - 1) / kLoBM, ktiles = (d.in + kLoBK - 1) / kLoBK;
    FTUNE_CHECK(blocks < (int64_t(1) << 31), "[lora_down_fused] ", d.m, " rows");
    // Few row blocks (short batches) would leave most SMs idle: the columns are then split too,
    // for about 2 CTAs per SM, each split at least 4 column tiles deep.
    const int64_t want = 2 * int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device()));
    int64_t splits = std::clamp<int64_t>((want + blocks - 1) / blocks, 1,
                                         std::max<int64_t>(1, ktiles / 4));
    const int64_t per_split = (ktiles + splits - 1) / splits;
    splits = (ktiles + per_split - 1) / per_split;
    args.ktiles_per_split = int(per_split);
    Tensor part;
    if (splits > 1) {
      part = Tensor::empty({splits * d.m * d.r}, DType::f32,
                           Device::cuda(ftune::cuda::current_device()));
      args.u_part = part.data<float>();
    }
    rank_dispatch(d.r, [&](auto r16) {
      constexpr int R16 = decltype(r16)::value;
      const size_t smem = size_t(kDownStages) * (kLoBM + 16 * R16) * kLoLds * sizeof(D);
      auto kernel = lora_down_kernel<D, R16>;
      set_smem(kernel, smem);
      kernel<<<dim3(unsigned(blocks), unsigned(splits)), kLoThreads, smem, stream()>>>(args);
    });
    FTUNE_LAUNCH_CHECK("lora_down_fused");
    if (splits > 1) {
      lora_u_reduce_kernel<D><<<grid_1d(d.m * d.r, 256), 256, 0, stream()>>>(
          part.data<float>(), reinterpret_cast<D*>(u), int(splits), d.m, int(d.r), ldu);
      FTUNE_LAUNCH_CHECK("lora_down_fused (u reduce)");
    }
    return true;
  }
}

template <class T>
bool lora_up_fused(const LoraDims& d, const T* x, const T* du, int64_t ldu, const T* a, double p,
                   uint64_t seed, T* da, T* dx, bool dx_accumulate) {
  if constexpr (std::is_same_v<T, float>) {  // the kernels are 16-bit only
    (void)d, (void)p, (void)seed;
    return false;
  } else {
    FTUNE_CHECK(p >= 0.0 && p < 1.0, "[lora_up_fused] dropout must be in [0, 1), got ", p);
    if (!da && !dx) return false;
    if (!fused_ok<T>(d, p, {da ? x : nullptr, dx ? a : nullptr, dx})) return false;
    using D = typename Dev<T>::type;
    LoArgs args = lo_args(d, p, seed);
    args.x = da ? x : nullptr;
    args.du = du;
    args.ldu = ldu;
    args.a = dx ? a : nullptr;
    args.dx = dx;
    args.dx_acc = dx_accumulate;
    const bool even = d.r % 2 == 0 && ldu % 2 == 0 && (reinterpret_cast<uintptr_t>(du) & 3) == 0;
    args.du_load = d.r % 8 == 0 && ldu % 8 == 0 && aligned16(du) ? 16 : even ? 4 : 0;
    // Column blocks x row splits: about 4 CTAs per SM, each split a whole number of row tiles.
    const int64_t ncol = (d.in + kLoBK - 1) / kLoBK, tiles = (d.m + kLoBM - 1) / kLoBM;
    const int64_t want = 4 * int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device()));
    int64_t splits = std::clamp<int64_t>((want + ncol - 1) / ncol, 1, tiles);
    const int64_t per_split = (tiles + splits - 1) / splits;
    splits = (tiles + per_split - 1) / per_split;
    FTUNE_CHECK(ncol < (int64_t(1) << 31) && splits <= 65535, "[lora_up_fused] grid ", ncol, " x ",
                splits);
    args.rows_per_split = per_split * kLoBM;
    Tensor part;
    if (da) {
      part = Tensor::empty({splits * d.r * d.in}, DType::f32,
                           Device::cuda(ftune::cuda::current_device()));
      args.da_part = part.data<float>();
    }
    rank_dispatch(d.r, [&](auto r16) {
      constexpr int R16 = decltype(r16)::value, RP = 16 * R16;
      const size_t smem = (size_t(RP) * kLoLds + 3 * kLoBM * kLoLds + 2 * kLoBM * (RP + 8)) *
                              sizeof(D) + 2 * kLoBM * 8;
      auto kernel = lora_up_kernel<D, R16>;
      set_smem(kernel, smem);
      kernel<<<dim3(unsigned(ncol), unsigned(splits)), kLoThreads, smem, stream()>>>(args);
    });
    FTUNE_LAUNCH_CHECK("lora_up_fused");
    if (da) {
      const int64_t n = d.r * d.in;
      lora_da_reduce_kernel<D><<<grid_1d(n, 256), 256, 0, stream()>>>(
          part.data<float>(), reinterpret_cast<D*>(da), int(splits), n);
      FTUNE_LAUNCH_CHECK("lora_up_fused (dA reduce)");
    }
    return true;
  }
}

template <class T>
void lora_forward(const LoraDims& d, const T* x, const T* w, const T* bias, const T* a, const T* b,
                  float scale, double p, uint64_t seed, T* xd, T* u, T* y) {
  const int64_t M = d.m, in = d.in, out = d.out, r = d.r;
  FTUNE_CHECK(M >= 0 && in >= 0 && out >= 0 && r >= 1, "[lora_forward] bad dims m=", M, " in=", in,
              " out=", out, " r=", r);
  FTUNE_CHECK(p >= 0.0 && p < 1.0, "[lora_forward] dropout must be in [0, 1), got ", p);
  if (!lora_down_fused<T>(d, x, a, p, seed, u, r)) {  // u = drop(x) A^T
    const T* xs = x;
    Tensor own;
    if (p > 0) {  // drop(x) written out, into xd or a scratch of its own
      if (!xd) {
        own = scratch<T>(M * in);
        xd = own.data<T>();
      }
      lora_dropout<T>(x, xd, M * in, p, seed, d.mask_cols());
      xs = xd;
    }
    mm<T>(false, true, M, r, in, 1.f, xs, in, a, in, 0.f, u, r);
  }
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
  FTUNE_CHECK(p >= 0.0 && p < 1.0, "[lora_backward] dropout must be in [0, 1), got ", p);
  // dB = scale g^T u; with M == 0 the GEMMs' k == 0 path writes zeros into dA and dB.
  if (db) mm<T>(true, false, out, r, M, scale, g, out, u, r, 0.f, db, r);
  if (!dx && !da) return;
  mm<T>(false, false, M, r, out, scale, g, out, b, r, 0.f, du, r);  // du = scale g B
  // The fused pass: dA = du^T drop(x) and dx = drop'(du A) in one walk over x, then the base
  // GEMM adds g W into dx (beta = 1).
  if (lora_up_fused<T>(d, x, du, r, a, p, seed, da, dx, false)) {
    if (dx) mm<T>(false, false, M, in, out, 1.f, g, out, w, in, 1.f, dx, in);  // dx += g W
    return;
  }
  const int64_t n = M * in;
  if (da) {
    const T* xs = x;
    Tensor own;
    if (p > 0) {
      if (!xd) {
        own = scratch<T>(n);
        xd = own.data<T>();
      }
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
                                 T*, T*, T*);                                                      \
  template bool lora_down_fused<T>(const LoraDims&, const T*, const T*, double, uint64_t, T*,      \
                                   int64_t);                                                       \
  template bool lora_up_fused<T>(const LoraDims&, const T*, const T*, int64_t, const T*, double,   \
                                 uint64_t, T*, T*, bool);
FTUNE_LORA_CUDA_INSTANTIATE(float)
FTUNE_LORA_CUDA_INSTANTIATE(bf16)
FTUNE_LORA_CUDA_INSTANTIATE(f16)
#undef FTUNE_LORA_CUDA_INSTANTIATE

}  // namespace ftune::kernels::cuda
