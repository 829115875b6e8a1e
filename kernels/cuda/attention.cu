// Fused attention on the GPU (FlashAttention-2): the CUDA twin of kernels/cpu/attention.cpp.
//
// Paths (chosen per call by the launchers at the bottom):
//   - fast: bf16/f16, head_dim 64 or 128, 16-byte aligned buffers (and, forward, scale > 0).
//     Tensor cores through mma.sync.m16n8k16 (sm_80+), operands fetched from shared memory with
//     ldmatrix, K/V tiles staged with cp.async; see fa_fwd_kernel and the backward below it.
//   - general: any float dtype, any head_dim <= 256. A plain tiled kernel in f32 on CUDA cores,
//     written to be obviously right (it is also the reference the fast path is tested beside).
//   - decode: every sequence has at most one query (generation over a KV cache): keys split
//     across CTAs (flash-decoding), the partial softmax states merged by a second kernel.
// All accumulate in f32; the logsumexp is saved in f32 ([H, Nq]; +inf for a row that sees no
// key, whose output is 0). The backward recomputes P from it after a preprocess pass
// Delta = rowsum(dO * O), computes dK/dV with one CTA per key tile (looping over the query
// tiles and the query heads of its kv head: grouped-query needs no atomics), and dQ in a
// separate pass with one CTA per query tile: deterministic, no float atomics. Performance
// variants of the tensor-core backward (set_attention_bwd_variant; kernels/attention.h) sit beside
// the default kernels, which they leave untouched.
#include "kernels/attention.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/mma.cuh"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>

namespace ftune::kernels::cuda {

namespace {

// ---- sequences and tiles --------------------------------------------------------------------------

struct SeqDesc {
  int q_start, len_q, k_start, len_k;
};

// Which sequence and which first row (or key) a CTA owns. A uniform batch (every batch row one
// sequence of tq queries and tk keys) needs no table: the batch row is blockIdx.z and the tile
// index * block the first row. Packed sequences read a (seq, first) table built on the host.
struct TileMap {
  const SeqDesc* seqs = nullptr;  // null: uniform batch
  const int2* tiles = nullptr;    // (seq, first row or key) per tile index
  int tq = 0, tk = 0;             // uniform: queries and keys per batch row
  int block = 0;                  // uniform: rows (or keys) per tile
  bool reverse = false;           // uniform: last (causal: heaviest) tiles first
};

__device__ __forceinline__ void tile_of(const TileMap& m, int idx, int nidx, int batch_row,
                                        SeqDesc& s, int& first) {
  if (m.seqs) {
    const int2 t = m.tiles[idx];
    s = m.seqs[t.x];
    first = t.y;
  } else {
    s.q_start = batch_row * m.tq;
    s.len_q = m.tq;
    s.k_start = batch_row * m.tk;
    s.len_k = m.tk;
    first = (m.reverse ? nidx - 1 - idx : idx) * m.block;
  }
}

struct Args {
  const void* q;
  const void* k;
  const void* v;
  const void* o;
  const void* dout;
  float* lse;          // forward: written; backward: read
  const float* delta;  // backward: rowsum(dO * O) [H, Nq]
  float* dq_accum;     // backward without determinism: f32 [Nq, H, D] summed by atomics
  // dK/dV split over the query heads (fa_bwd_dkdv_body with kAtomic 3): the CTAs' grid.y is the
  // query head, and each writes its head's unscaled dK / dV share as f32 [group][Nk, Hkv, D] here
  // (null: that gradient is not wanted); dkv_reduce_kernel sums the group in order.
  float* dk_part;
  float* dv_part;
  void* out;           // forward output
  void* dq;
  void* dk;
  void* dv;
  int H, Hkv, D, nq;
  int64_t nk;  // key tokens
  float scale;
  bool causal;
  TileMap map;
};

// Keys the last row of a query tile [r0, r0 + rows) may see: [0, col_end).
__device__ __forceinline__ int visible_end(const SeqDesc& s, int r0, int rows, bool causal) {
  if (!causal) return s.len_k;
  return max(0, min(s.len_k, r0 + rows + s.len_k - s.len_q));
}

// ---- general path ---------------------------------------------------------------------------------
// CTA = 8 warps, 32 query rows (4 per warp), key tiles of 32 (one per lane). Q/dO tiles and K/V
// tiles live in shared memory as f32. The score of row r and key lane is computed by the warp
// that owns r, so the softmax is a warp reduction; for O += P V each lane owns the head-dim
// elements d = lane + 32 i (i < NPL) and receives P[r][j] by a shuffle from lane j.
constexpr int kGenWarps = 8, kGenRowsPerWarp = 4;
constexpr int kGenBM = kGenWarps * kGenRowsPerWarp;  // 32 rows (or keys) per CTA
constexpr int kGenBN = 32;                           // keys (or rows) per inner tile = lanes
constexpr int kGenThreads = kGenWarps * 32;

// Odd row stride (in floats) for tiles read with lane = row: conflict-free banks.
__host__ __device__ __forceinline__ int odd_stride(int d) { return (d & 1) ? d + 2 : d + 1; }

// Copies rows [0, nrows) of a [*, ld] tile (head offset already applied) into shared f32 with row
// stride lds; rows >= valid are zero.
template <class T>
__device__ __forceinline__ void gen_load(float* sm, int lds, const T* g, int64_t ld, int nrows,
                                         int valid, int D, float mul) {
  for (int i = threadIdx.x; i < nrows * D; i += blockDim.x) {
    const int r = i / D, d = i - r * D;
    sm[r * lds + d] = r < valid ? to_f(g[int64_t(r) * ld + d]) * mul : 0.f;
  }
}

template <class T, int NPL>
__global__ void __launch_bounds__(kGenThreads) gen_fwd_kernel(Args a) {
  extern __shared__ float smem[];
  const int D = a.D, lds = odd_stride(D);
  float* sq = smem;                // [32][D]   (read as broadcasts)
  float* sk = sq + kGenBM * D;     // [32][lds] (lane = key)
  float* sv = sk + kGenBN * lds;   // [32][lds] (lane = d)
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = min(kGenBM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* q = static_cast<const T*>(a.q) + int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  gen_load(sq, D, q, ldq, kGenBM, rows, D, a.scale);
  const int col_end = visible_end(s, r0, rows, a.causal);

  float m[kGenRowsPerWarp], l[kGenRowsPerWarp], acc[kGenRowsPerWarp][NPL];
#pragma unroll
  for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.f;
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[rr][i] = 0.f;
  }
  for (int c0 = 0; c0 < col_end; c0 += kGenBN) {
    __syncthreads();  // the previous tile's K/V are no longer read
    const int valid = min(kGenBN, s.len_k - c0);
    gen_load(sk, lds, k + int64_t(c0) * ldk, ldk, kGenBN, valid, D, 1.f);
    gen_load(sv, lds, v + int64_t(c0) * ldk, ldk, kGenBN, valid, D, 1.f);
    __syncthreads();
    float sc[kGenRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kGenRowsPerWarp; ++rr) sc[rr] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kv = sk[lane * lds + d];
#pragma unroll
      for (int rr = 0; rr < kGenRowsPerWarp; ++rr)
        sc[rr] += sq[(warp * kGenRowsPerWarp + rr) * D + d] * kv;
    }
    const int c = c0 + lane;
    float pr[kGenRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
      const int r = r0 + warp * kGenRowsPerWarp + rr;
      const bool ok = c < s.len_k && (!a.causal || c <= r + off);
      const float x = ok ? sc[rr] : -INFINITY;
      const float mn = fmaxf(m[rr], warp_max(x));
      const float mu = mn == -INFINITY ? 0.f : mn;  // a row with no key yet: keep p = alpha = 0
      const float p = expf(x - mu);
      const float alpha = expf(m[rr] - mu);
      l[rr] = l[rr] * alpha + warp_sum(p);
      m[rr] = mn;
#pragma unroll
      for (int i = 0; i < NPL; ++i) acc[rr][i] *= alpha;
      pr[rr] = p;
    }
    for (int j = 0; j < kGenBN; ++j) {
      float pj[kGenRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kGenRowsPerWarp; ++rr) pj[rr] = __shfl_sync(0xffffffffu, pr[rr], j);
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          const float vv = sv[j * lds + d];
#pragma unroll
          for (int rr = 0; rr < kGenRowsPerWarp; ++rr) acc[rr][i] += pj[rr] * vv;
        }
      }
    }
  }
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
    const int r = warp * kGenRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t tok = s.q_start + r0 + r;
    const float inv = l[rr] > 0.f ? 1.f / l[rr] : 0.f;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) out[tok * ldq + int64_t(h) * D + d] = from_f<T>(acc[rr][i] * inv);
    }
    if (lane == 0) a.lse[int64_t(h) * a.nq + tok] = l[rr] > 0.f ? m[rr] + logf(l[rr]) : INFINITY;
  }
}

// Delta [H, Nq] = rowsum(dO * O) in f32, one warp per (token, head).
template <class T>
__global__ void bwd_delta_kernel(const T* __restrict__ o, const T* __restrict__ dout,
                                 float* __restrict__ delta, int nq, int H, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t nwarps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t w = blockIdx.x * int64_t(blockDim.x >> 5) + (threadIdx.x >> 5); w < int64_t(nq) * H;
       w += nwarps) {
    const int64_t tok = w / H, h = w - tok * H;
    const T* op = o + w * D;  // [Nq, H, D]: row (tok, h) starts at (tok * H + h) * D = w * D
    const T* gp = dout + w * D;
    float acc = 0.f;
    for (int d = lane; d < D; d += 32) acc += to_f(op[d]) * to_f(gp[d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[h * nq + tok] = acc;
  }
}

// Delta as bwd_delta_kernel with 16-byte loads (backward variants 1-5, tensor-core path: 16-bit
// T, 16-byte aligned O / dO): CH = D / kVec<T> lanes per (token, head) row (8 or 16), summed by
// shuffles within the row's aligned group of CH lanes. Whole warps step together (the shuffles);
// a group is wholly in or out of range since the chunk count is a multiple of CH.
template <class T, int CH>
__global__ void bwd_delta_vec_kernel(const T* __restrict__ o, const T* __restrict__ dout,
                                     float* __restrict__ delta, int nq, int H) {
  constexpr int V = kVec<T>;
  static_assert(CH >= 1 && CH <= 32 && (CH & (CH - 1)) == 0, "CH: a power of two <= 32");
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(nq) * H * CH;  // 16-byte chunks; chunk i is row i / CH
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x + (threadIdx.x & ~31); base < n;
       base += stride) {
    const int64_t i = base + lane;
    float acc = 0.f;
    if (i < n) {
      float x[V], y[V];
      load_vec(o + i * V, x);
      load_vec(dout + i * V, y);
#pragma unroll
      for (int e = 0; e < V; ++e) acc += x[e] * y[e];
    }
#pragma unroll
    for (int m = CH / 2; m >= 1; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
    if (i < n && (lane & (CH - 1)) == 0) {
      const int64_t w = i / CH, tok = w / H, h = w - tok * H;
      delta[h * nq + tok] = acc;
    }
  }
}

// dQ for one query tile: the forward's structure (warp owns 4 rows, lane = key) recomputing
// P = exp(scale q.k - lse) and dS = P * (dO.v - Delta); dQ = scale * dS K.
template <class T, int NPL>
__global__ void __launch_bounds__(kGenThreads) gen_dq_kernel(Args a) {
  extern __shared__ float smem[];
  const int D = a.D, lds = odd_stride(D);
  float* sq = smem;                // [32][D]
  float* sdo = sq + kGenBM * D;    // [32][D]
  float* sk = sdo + kGenBM * D;    // [32][lds]
  float* sv = sk + kGenBN * lds;   // [32][lds]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int rows = min(kGenBM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  gen_load(sq, D, static_cast<const T*>(a.q) + qoff, ldq, kGenBM, rows, D, 1.f);
  gen_load(sdo, D, static_cast<const T*>(a.dout) + qoff, ldq, kGenBM, rows, D, 1.f);
  const int col_end = visible_end(s, r0, rows, a.causal);

  float lse[kGenRowsPerWarp], dl[kGenRowsPerWarp], acc[kGenRowsPerWarp][NPL];
#pragma unroll
  for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
    const int r = warp * kGenRowsPerWarp + rr;
    const int64_t idx = int64_t(h) * a.nq + s.q_start + r0 + r;
    lse[rr] = r < rows ? a.lse[idx] : INFINITY;
    dl[rr] = r < rows ? a.delta[idx] : 0.f;
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[rr][i] = 0.f;
  }
  for (int c0 = 0; c0 < col_end; c0 += kGenBN) {
    __syncthreads();
    const int valid = min(kGenBN, s.len_k - c0);
    gen_load(sk, lds, k + int64_t(c0) * ldk, ldk, kGenBN, valid, D, 1.f);
    gen_load(sv, lds, v + int64_t(c0) * ldk, ldk, kGenBN, valid, D, 1.f);
    __syncthreads();
    float sc[kGenRowsPerWarp], dp[kGenRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kGenRowsPerWarp; ++rr) sc[rr] = dp[rr] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kv = sk[lane * lds + d], vv = sv[lane * lds + d];
#pragma unroll
      for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
        const int r = warp * kGenRowsPerWarp + rr;
        sc[rr] += sq[r * D + d] * kv;
        dp[rr] += sdo[r * D + d] * vv;
      }
    }
    const int c = c0 + lane;
    float ds[kGenRowsPerWarp];
#pragma unroll
    for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
      const int r = r0 + warp * kGenRowsPerWarp + rr;
      const bool ok = c < s.len_k && (!a.causal || c <= r + off);
      const float p = ok ? expf(sc[rr] * a.scale - lse[rr]) : 0.f;  // lse = +inf: p = 0
      ds[rr] = p * (dp[rr] - dl[rr]);
    }
    for (int j = 0; j < kGenBN; ++j) {
      float dj[kGenRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kGenRowsPerWarp; ++rr) dj[rr] = __shfl_sync(0xffffffffu, ds[rr], j);
#pragma unroll
      for (int i = 0; i < NPL; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          const float kv = sk[j * lds + d];
#pragma unroll
          for (int rr = 0; rr < kGenRowsPerWarp; ++rr) acc[rr][i] += dj[rr] * kv;
        }
      }
    }
  }
  T* dq = static_cast<T*>(a.dq);
#pragma unroll
  for (int rr = 0; rr < kGenRowsPerWarp; ++rr) {
    const int r = warp * kGenRowsPerWarp + rr;
    if (r >= rows) continue;
    const int64_t base = int64_t(s.q_start + r0 + r) * ldq + int64_t(h) * D;
#pragma unroll
    for (int i = 0; i < NPL; ++i) {
      const int d = lane + 32 * i;
      if (d < D) dq[base + d] = from_f<T>(acc[rr][i] * a.scale);
    }
  }
}

// dK, dV for one key tile of 32 keys (warp owns 4 keys, lane = query row of the inner tile),
// looping over every query head of its kv head and every query tile that sees the keys.
// dV = P^T dO, dK = scale * dS^T Q; each lane owns d = lane + 32 i and receives P / dS of
// query row i by a shuffle.
template <class T, int NPL>
__global__ void __launch_bounds__(kGenThreads) gen_dkv_kernel(Args a) {
  extern __shared__ float smem[];
  const int D = a.D, lds = odd_stride(D);
  float* sk = smem;                // [32][D] keys (broadcast)
  float* sv = sk + kGenBM * D;     // [32][D]
  float* sq = sv + kGenBM * D;     // [32][lds] (lane = row for the dots, lane = d for the sums)
  float* sdo = sq + kGenBN * lds;  // [32][lds]
  float* slse = sdo + kGenBN * lds;  // [32]
  float* sdl = slse + kGenBN;        // [32]
  SeqDesc s;
  int c0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, c0);
  const int hk = blockIdx.y, group = a.H / a.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int keys = min(kGenBM, s.len_k - c0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const int64_t koff = int64_t(s.k_start + c0) * ldk + int64_t(hk) * D;
  gen_load(sk, D, static_cast<const T*>(a.k) + koff, ldk, kGenBM, keys, D, 1.f);
  gen_load(sv, D, static_cast<const T*>(a.v) + koff, ldk, kGenBM, keys, D, 1.f);
  // Query row r sees key c iff r + off >= c: rows before c0 - off see none of these keys.
  const int first_row = a.causal ? max(0, c0 - off) : 0;

  float dk[kGenRowsPerWarp][NPL], dv[kGenRowsPerWarp][NPL];
#pragma unroll
  for (int kk = 0; kk < kGenRowsPerWarp; ++kk)
#pragma unroll
    for (int i = 0; i < NPL; ++i) dk[kk][i] = dv[kk][i] = 0.f;

  for (int h = hk * group; h < (hk + 1) * group; ++h) {
    for (int r0 = first_row; r0 < s.len_q; r0 += kGenBN) {
      const int rows = min(kGenBN, s.len_q - r0);
      const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
      __syncthreads();  // the previous tile is no longer read
      gen_load(sq, lds, static_cast<const T*>(a.q) + qoff, ldq, kGenBN, rows, D, 1.f);
      gen_load(sdo, lds, static_cast<const T*>(a.dout) + qoff, ldq, kGenBN, rows, D, 1.f);
      if (threadIdx.x < kGenBN) {
        const int r = threadIdx.x;
        const int64_t idx = int64_t(h) * a.nq + s.q_start + r0 + r;
        slse[r] = r < rows ? a.lse[idx] : INFINITY;
        sdl[r] = r < rows ? a.delta[idx] : 0.f;
      }
      __syncthreads();
      float sc[kGenRowsPerWarp], dp[kGenRowsPerWarp];
#pragma unroll
      for (int kk = 0; kk < kGenRowsPerWarp; ++kk) sc[kk] = dp[kk] = 0.f;
      for (int d = 0; d < D; ++d) {
        const float qv = sq[lane * lds + d], gv = sdo[lane * lds + d];
#pragma unroll
        for (int kk = 0; kk < kGenRowsPerWarp; ++kk) {
          const int j = warp * kGenRowsPerWarp + kk;
          sc[kk] += qv * sk[j * D + d];
          dp[kk] += gv * sv[j * D + d];
        }
      }
      const int r = r0 + lane;
      const float lse = slse[lane], dl = sdl[lane];
      float p[kGenRowsPerWarp], ds[kGenRowsPerWarp];
#pragma unroll
      for (int kk = 0; kk < kGenRowsPerWarp; ++kk) {
        const int c = c0 + warp * kGenRowsPerWarp + kk;
        const bool ok = r < s.len_q && c < s.len_k && (!a.causal || c <= r + off);
        p[kk] = ok ? expf(sc[kk] * a.scale - lse) : 0.f;
        ds[kk] = p[kk] * (dp[kk] - dl);
      }
      for (int i = 0; i < kGenBN; ++i) {
        float pi[kGenRowsPerWarp], di[kGenRowsPerWarp];
#pragma unroll
        for (int kk = 0; kk < kGenRowsPerWarp; ++kk) {
          pi[kk] = __shfl_sync(0xffffffffu, p[kk], i);
          di[kk] = __shfl_sync(0xffffffffu, ds[kk], i);
        }
#pragma unroll
        for (int e = 0; e < NPL; ++e) {
          const int d = lane + 32 * e;
          if (d < D) {
            const float qv = sq[i * lds + d], gv = sdo[i * lds + d];
#pragma unroll
            for (int kk = 0; kk < kGenRowsPerWarp; ++kk) {
              dv[kk][e] += pi[kk] * gv;
              dk[kk][e] += di[kk] * qv;
            }
          }
        }
      }
    }
  }
  T* gk = static_cast<T*>(a.dk);
  T* gvv = static_cast<T*>(a.dv);
#pragma unroll
  for (int kk = 0; kk < kGenRowsPerWarp; ++kk) {
    const int j = warp * kGenRowsPerWarp + kk;
    if (j >= keys) continue;
    const int64_t base = int64_t(s.k_start + c0 + j) * ldk + int64_t(hk) * D;
#pragma unroll
    for (int e = 0; e < NPL; ++e) {
      const int d = lane + 32 * e;
      if (d >= D) continue;
      if (gk) gk[base + d] = from_f<T>(dk[kk][e] * a.scale);
      if (gvv) gvv[base + d] = from_f<T>(dv[kk][e]);
    }
  }
}

// ---- decode path ----------------------------------------------------------------------------------
// One query per sequence. CTA (head, split, entry) of 4 warps reads keys [split * chunk, ...):
// warp w takes the blocks of 4 keys 4w, 4w + 16, ...; lane owns the NPL consecutive elements
// d = lane * NPL + i, so with kRows (D a multiple of NPL, aligned rows) a key or value row is one
// load of NPL elements per lane (8 bytes per lane at bf16 d128) instead of NPL 2-byte loads. The head is
// the fastest grid index: the query heads of one kv head run side by side and read its K / V
// through L2 once, not once per head. The 4 warp states merge in shared memory; with one split
// that is the answer, else the partial (max, sum, unnormalized output) goes to `part` and
// decode_combine_kernel merges the splits.
constexpr int kDecWarps = 4, kDecUnroll = 4;

// NPL consecutive elements at p (aligned to NPL * sizeof(T) bytes) into f32 registers.
template <class T, int NPL>
__device__ __forceinline__ void load_run(const T* p, float (&out)[NPL]) {
  constexpr int kBytes = NPL * int(sizeof(T));
  if constexpr (kBytes >= 16) {
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      float f[kVec<T>];
      load_vec(p + c * kVec<T>, f);
#pragma unroll
      for (int i = 0; i < kVec<T>; ++i) out[c * kVec<T> + i] = f[i];
    }
  } else {
    struct alignas(kBytes) Run {
      T v[NPL];
    };
    const Run r = *reinterpret_cast<const Run*>(p);
#pragma unroll
    for (int i = 0; i < NPL; ++i) out[i] = to_f(r.v[i]);
  }
}

template <class T, int NPL, bool kRows>
__global__ void __launch_bounds__(kDecWarps * 32) decode_kernel(Args a, int chunk, float* part) {
  extern __shared__ float smem[];
  const int D = a.D;
  float* s_acc = smem;                    // [4][D]
  float* s_m = s_acc + kDecWarps * D;     // [4]
  float* s_l = s_m + kDecWarps;           // [4]
  SeqDesc s;
  int unused;
  tile_of(a.map, blockIdx.z, gridDim.z, blockIdx.z, s, unused);
  const int h = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const int64_t tok = s.q_start;
  const T* q = static_cast<const T*>(a.q) + tok * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  float qv[NPL], acc[NPL];
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = lane * NPL + i;
    qv[i] = d < D ? to_f(q[d]) * a.scale : 0.f;
    acc[i] = 0.f;
  }
  // One query sees every key of its sequence, causal or not (bottom-right alignment). Warp w
  // takes blocks of kDecUnroll consecutive keys, every block's loads issued before any use (more
  // bytes in flight per warp).
  const int kb = split * chunk, ke = min(s.len_k, kb + chunk);
  float m = -INFINITY, l = 0.f;
  for (int j0 = kb + warp * kDecUnroll; j0 < ke; j0 += kDecWarps * kDecUnroll) {
    float kv[kDecUnroll][NPL], vv[kDecUnroll][NPL];
#pragma unroll
    for (int u = 0; u < kDecUnroll; ++u) {
      const bool key_in = j0 + u < ke;
      const T* kr = k + int64_t(j0 + u) * ldk + lane * NPL;
      const T* vr = v + int64_t(j0 + u) * ldk + lane * NPL;
      if constexpr (kRows) {
        if (key_in && lane * NPL < D) {  // D % NPL == 0: a lane's run is whole or absent
          load_run<T, NPL>(kr, kv[u]);
          load_run<T, NPL>(vr, vv[u]);
        } else {
#pragma unroll
          for (int i = 0; i < NPL; ++i) kv[u][i] = vv[u][i] = 0.f;
        }
      } else {
#pragma unroll
        for (int i = 0; i < NPL; ++i) {
          const bool in = key_in && lane * NPL + i < D;
          kv[u][i] = in ? to_f(kr[i]) : 0.f;
          vv[u][i] = in ? to_f(vr[i]) : 0.f;
        }
      }
    }
    float x[kDecUnroll], mx = -INFINITY;
#pragma unroll
    for (int u = 0; u < kDecUnroll; ++u) {
      float part_dot = 0.f;
#pragma unroll
      for (int i = 0; i < NPL; ++i) part_dot += qv[i] * kv[u][i];
      x[u] = j0 + u < ke ? warp_sum(part_dot) : -INFINITY;
      mx = fmaxf(mx, x[u]);
    }
    const float mn = fmaxf(m, mx);     // finite: key j0 is in range
    const float alpha = expf(m - mn);  // m = -inf on the first block: 0
    l *= alpha;
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] *= alpha;
#pragma unroll
    for (int u = 0; u < kDecUnroll; ++u) {
      const float p = expf(x[u] - mn);  // a key past the end: exp(-inf) = 0
      l += p;
#pragma unroll
      for (int i = 0; i < NPL; ++i) acc[i] += p * vv[u][i];
    }
    m = mn;
  }
#pragma unroll
  for (int i = 0; i < NPL; ++i) {
    const int d = lane * NPL + i;
    if (d < D) s_acc[warp * D + d] = acc[i];
  }
  if (lane == 0) {
    s_m[warp] = m;
    s_l[warp] = l;
  }
  __syncthreads();
  float M = -INFINITY;
  for (int w = 0; w < kDecWarps; ++w) M = fmaxf(M, s_m[w]);
  float wt[kDecWarps], L = 0.f;
  for (int w = 0; w < kDecWarps; ++w) {
    wt[w] = s_m[w] == -INFINITY ? 0.f : expf(s_m[w] - M);
    L += s_l[w] * wt[w];
  }
  const int64_t entry = blockIdx.z;
  float* pp = part + ((entry * a.H + h) * splits + split) * int64_t(D + 2);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int w = 0; w < kDecWarps; ++w) o += s_acc[w * D + d] * wt[w];
    if (splits == 1)
      static_cast<T*>(a.out)[tok * ldq + int64_t(h) * D + d] = from_f<T>(L > 0.f ? o / L : 0.f);
    else
      pp[d] = o;
  }
  if (threadIdx.x == 0) {
    if (splits == 1)
      a.lse[int64_t(h) * a.nq + tok] = L > 0.f ? M + logf(L) : INFINITY;
    else {
      pp[D] = M;
      pp[D + 1] = L;
    }
  }
}

template <class T>
__global__ void decode_combine_kernel(Args a, int splits, const float* part) {
  SeqDesc s;
  int unused;
  tile_of(a.map, blockIdx.y, gridDim.y, blockIdx.y, s, unused);
  const int h = blockIdx.x, D = a.D;
  const int64_t tok = s.q_start, entry = blockIdx.y;
  const float* pp = part + (entry * a.H + h) * splits * int64_t(D + 2);
  float M = -INFINITY;
  for (int i = 0; i < splits; ++i) M = fmaxf(M, pp[i * (D + 2) + D]);
  float L = 0.f;
  for (int i = 0; i < splits; ++i) {
    const float mi = pp[i * (D + 2) + D];
    if (mi != -INFINITY) L += pp[i * (D + 2) + D + 1] * expf(mi - M);
  }
  const float inv = L > 0.f ? 1.f / L : 0.f;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int i = 0; i < splits; ++i) {
      const float mi = pp[i * (D + 2) + D];
      if (mi != -INFINITY) o += pp[i * (D + 2) + d] * expf(mi - M);
    }
    static_cast<T*>(a.out)[tok * int64_t(a.H) * D + int64_t(h) * D + d] = from_f<T>(o * inv);
  }
  if (threadIdx.x == 0) a.lse[int64_t(h) * a.nq + tok] = L > 0.f ? M + logf(L) : INFINITY;
}

// ---- fast path: tensor cores ----------------------------------------------------------------------
//
// 2^x on the MUFU unit, results below 2^-126 flushed to 0 (and -inf -> 0). Outside
// --use_fast_math, exp2f wraps the same ex2.approx in a three-instruction fix-up for subnormal
// results, which a softmax never needs; the tensor-core kernels take one per score.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

constexpr int kFaBM = 64, kFaBN = 64, kFaThreads = 128;  // 4 warps x 16 query rows
template <int D> constexpr int kFaLds = D + 8;            // shared row stride (elements)

// Rows [0, ROWS) of a tile into shared memory (row stride D + 8); rows >= valid (which may be
// negative) are zero. Thread i copies 16-byte chunk i % (D / 8) of rows i / (D / 8) + j * (128 /
// (D / 8)): a fixed trip count, one pointer step per chunk, no division in the loop (the tile
// loads run once per key tile inside the main loops).
template <class T, int ROWS, int D>
__device__ __forceinline__ void fa_load_rows(T* sm, const T* g, int64_t ld, int valid,
                                             const T* any) {
  constexpr int kChunks = D / 8;                     // 16-byte chunks per row
  constexpr int kStep = kFaThreads / kChunks;        // rows per pass of the CTA
  static_assert(kFaThreads % kChunks == 0 && ROWS % kStep == 0, "tile rows per pass");
  const int r = threadIdx.x / kChunks, c = (threadIdx.x % kChunks) * 8;
  const T* src = g + int64_t(r) * ld + c;
  T* dst = sm + r * kFaLds<D> + c;
  const int64_t step = int64_t(kStep) * ld;
#pragma unroll
  for (int j = 0; j < ROWS / kStep; ++j) {
    const bool ok = r + j * kStep < valid;
    cp_async16(dst + j * kStep * kFaLds<D>, ok ? src : any, ok ? 16 : 0);
    src += step;
  }
}
template <class T, int D>
__device__ __forceinline__ void fa_load(T* sm, const T* g, int64_t ld, int valid, const T* any) {
  fa_load_rows<T, 64, D>(sm, g, ld, valid, any);
}

// Forward, one CTA per (64 MA query rows, head, sequence). Warp w owns the MA row blocks
// 64 a + 16 w .. +15 (a < MA): each K / V fragment read from shared memory feeds MA products.
// K tiles of 64 keys; V of tile j loads while S = Q K_j^T is computed, K of tile j+1 while
// O += P V_j. Q's fragments stay in registers when they fit (kQRegs), else are re-read per tile.
template <class T, int D, int MA>
__global__ void __launch_bounds__(kFaThreads) fa_fwd_kernel(Args a) {
  constexpr int LDS = kFaLds<D>;
  constexpr int BM = 64 * MA;
  constexpr bool kQRegs = MA * D <= 128;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sQ = reinterpret_cast<T*>(fa_smem);  // [BM][LDS]
  T* sK = sQ + BM * LDS;                  // [64][LDS]
  T* sV = sK + kFaBN * LDS;               // [64][LDS]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rows = min(BM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const T* q = qbase + int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + kFaBN - 1) / kFaBN;

#pragma unroll
  for (int am = 0; am < MA; ++am)
    fa_load<T, D>(sQ + am * 64 * LDS, q + int64_t(am) * 64 * ldq, ldq, rows - am * 64, qbase);
  if (ntiles > 0) fa_load<T, D>(sK, k, ldk, min(kFaBN, col_end), qbase);
  cp_async_commit();

  const float sl2 = a.scale * 1.4426950408889634f;  // scores in log2 units: exp2 in the softmax
  float o[MA][D / 8][4];
  float m[MA][2], l[MA][2];  // rows g and g + 8 of each of the warp's row blocks
#pragma unroll
  for (int am = 0; am < MA; ++am) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[am][i][0] = o[am][i][1] = o[am][i][2] = o[am][i][3] = 0.f;
    m[am][0] = m[am][1] = -INFINITY;
    l[am][0] = l[am][1] = 0.f;
  }
  uint32_t qf[kQRegs ? MA : 1][kQRegs ? D / 16 : 1][4];
  // The shared-memory row of the A fragment of row block am, and the row (within the sequence)
  // of this thread's accumulator rows g (i = 0) and g + 8 (i = 1).
  auto q_at = [&](int am, int kk) {
    return sQ + (am * 64 + warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8;
  };
  auto row_of = [&](int am, int i) { return r0 + am * 64 + warp * 16 + g + 8 * i; };

  // One key tile. kMask: the tile has keys past the end or right of the causal diagonal of some
  // row, so scores are masked; the other tiles skip the per-element index tests altogether.
  auto step = [&](int jt, auto mask_tag) {
    constexpr bool kMask = decltype(mask_tag)::value;
    const int c0 = jt * kFaBN;
    cp_async_wait_all();
    __syncthreads();  // K_j (and Q) landed for every thread; V_{j-1} no longer read
    if constexpr (kQRegs) {
      if (jt == 0) {
#pragma unroll
        for (int am = 0; am < MA; ++am)
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) ldsm_x4(qf[am][kk], q_at(am, kk));
      }
    }
    fa_load<T, D>(sV, v + int64_t(c0) * ldk, ldk, min(kFaBN, col_end - c0), qbase);
    cp_async_commit();

    float sc[MA][kFaBN / 8][4];
#pragma unroll
    for (int am = 0; am < MA; ++am)
#pragma unroll
      for (int i = 0; i < kFaBN / 8; ++i) sc[am][i][0] = sc[am][i][1] = sc[am][i][2] = sc[am][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[MA][4];
#pragma unroll
      for (int am = 0; am < MA; ++am) {
        if constexpr (kQRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) qa[am][e] = qf[am][kk][e];
        } else {
          ldsm_x4(qa[am], q_at(am, kk));
        }
      }
#pragma unroll
      for (int nb = 0; nb < kFaBN / 16; ++nb) {
        uint32_t b[4];
        ldsm_x4(b, sK + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int am = 0; am < MA; ++am) {
          mma16816<T>(sc[am][2 * nb], qa[am], b[0], b[1]);
          mma16816<T>(sc[am][2 * nb + 1], qa[am], b[2], b[3]);
        }
      }
    }
    // Mask (ragged end of the keys; causal diagonal) the raw scores. The softmax works in log2
    // units: m is the running max of scale * log2(e) * S (sl2 > 0, so max(S) * sl2 is the max
    // of the scaled scores) and p = 2^(S * sl2 - m), one FFMA and one MUFU.EX2 per score.
#pragma unroll
    for (int am = 0; am < MA; ++am) {
      if constexpr (kMask) {
#pragma unroll
        for (int nb = 0; nb < kFaBN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = c0 + nb * 8 + 2 * t + (e & 1);
            const int row = row_of(am, e >> 1);
            if (col >= s.len_k || (a.causal && col > row + off)) sc[am][nb][e] = -INFINITY;
          }
      }
      float mu[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = -INFINITY;
#pragma unroll
        for (int nb = 0; nb < kFaBN / 8; ++nb)
          mx = fmaxf(mx, fmaxf(sc[am][nb][2 * i], sc[am][nb][2 * i + 1]));
        // The 4 threads of a quad (same g) hold the row's 64 columns between them.
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[am][i], mx * sl2);  // -inf * sl2 = -inf
        mu[i] = mn == -INFINITY ? 0.f : mn;  // no key seen yet: p = alpha = 0, no NaN
        const float alpha = ex2_ftz(m[am][i] - mu[i]);
        m[am][i] = mn;
        l[am][i] *= alpha;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
          o[am][nd][2 * i] *= alpha;
          o[am][nd][2 * i + 1] *= alpha;
        }
      }
#pragma unroll
      for (int nb = 0; nb < kFaBN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = ex2_ftz(fmaf(sc[am][nb][e], sl2, -mu[e >> 1]));  // masked: 0
          sc[am][nb][e] = p;
          l[am][e >> 1] += p;  // this thread's share of the row sum; the quad sums it at the end
        }
    }

    cp_async_wait_all();
    __syncthreads();  // V_j landed; every warp is done with K_j
    if (jt + 1 < ntiles)
      fa_load<T, D>(sK, k + int64_t(c0 + kFaBN) * ldk, ldk, min(kFaBN, col_end - c0 - kFaBN),
                    qbase);
    cp_async_commit();
#pragma unroll
    for (int kk = 0; kk < kFaBN / 16; ++kk) {
      uint32_t pa[MA][4];
#pragma unroll
      for (int am = 0; am < MA; ++am) {
        pa[am][0] = pack2<T>(sc[am][2 * kk][0], sc[am][2 * kk][1]);
        pa[am][1] = pack2<T>(sc[am][2 * kk][2], sc[am][2 * kk][3]);
        pa[am][2] = pack2<T>(sc[am][2 * kk + 1][0], sc[am][2 * kk + 1][1]);
        pa[am][3] = pack2<T>(sc[am][2 * kk + 1][2], sc[am][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, sV + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
#pragma unroll
        for (int am = 0; am < MA; ++am) {
          mma16816<T>(o[am][2 * nd], pa[am], b[0], b[1]);
          mma16816<T>(o[am][2 * nd + 1], pa[am], b[2], b[3]);
        }
      }
    }
  };
  // Tiles [0, n_plain) need no mask: all their keys exist and, causal, lie at or left of the
  // diagonal of the CTA's first row (c0 + 63 <= r0 + off). Once a tile needs it, every later
  // one does, so the masked tiles are the last few of the loop (those crossing the diagonal of
  // the CTA's rows, and the ragged end).
  int n_plain = min(ntiles, s.len_k / kFaBN);
  if (a.causal) n_plain = min(n_plain, r0 + off + 1 > 0 ? (r0 + off + 1) / kFaBN : 0);
  for (int jt = 0; jt < n_plain; ++jt) step(jt, std::false_type{});
  for (int jt = n_plain; jt < ntiles; ++jt) step(jt, std::true_type{});
  cp_async_wait_all();  // no copy may be in flight when the CTA exits

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int am = 0; am < MA; ++am)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float li = l[am][i];
      li += __shfl_xor_sync(0xffffffffu, li, 1);
      li += __shfl_xor_sync(0xffffffffu, li, 2);
      const int r = am * 64 + warp * 16 + g + 8 * i;
      if (r >= rows) continue;
      const int64_t tok = s.q_start + r0 + r;
      const float inv = li > 0.f ? 1.f / li : 0.f;
      T* orow = out + tok * ldq + int64_t(h) * D;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        *reinterpret_cast<uint32_t*>(orow + nd * 8 + 2 * t) =
            pack2<T>(o[am][nd][2 * i] * inv, o[am][nd][2 * i + 1] * inv);
      if (t == 0)
        a.lse[int64_t(h) * a.nq + tok] =
            li > 0.f ? m[am][i] * 0.6931471805599453f + logf(li) : INFINITY;
    }
}

// ---- fast path forward on Hopper: warpgroup MMAs (wgmma, sm_90a) ------------------------------
//
// fa_fwd_wgmma_kernel: fa_fwd_kernel's algorithm with its two products as warpgroup MMAs. WG
// warpgroups of 4 warps, each owning 64 query rows (warp w of a group: rows 16 w .. 16 w + 15,
// as in fa_fwd_kernel). Per 64-key tile:
//   S = Q K^T   wgmma m64n64k16 x D/16: A = Q's fragments in registers (ldmatrix once, as the
//               mma.sync kernel), B = the K tile, read by the tensor cores from shared memory
//   O += P V    wgmma m64nDk16 x 4: A = P in registers (the S accumulators rounded to T, packed
//               as fa_fwd_kernel packs them), B = the V tile from shared memory, N-major (.trans)
// No ldmatrix of K or V and no per-fragment MMA issue: one instruction per 16-deep step of the
// whole warpgroup. The accumulators of wgmma m64nNk16 are the m16n8 C fragments of each warp
// (d[4 j + e]: column 8 j + 2 t + (e & 1), row g + 8 (e >> 1)), so the masking, the online
// softmax and the epilogue are fa_fwd_kernel's.
//
// K and V tiles sit in shared memory as 8 x 8 core matrices without swizzle (the layout wgmma's
// descriptors describe: 8 rows of 16 bytes, 128 contiguous bytes): 16-byte chunk c of key row r at
// byte (r / 8) * 16 D + c * 128 + (r % 8) * 16. Numbered q = ((r / 8) * (D / 8) + c) * 8 + r % 8,
// chunk q is at byte 16 q: consecutive threads copy the 8 rows of one core matrix, conflict-free.
// K as B of S = Q K^T is K-major: LBO (next core matrix along the reduction, D) 128 bytes, SBO
// (next 8 keys) 16 D. V as B of O = P V is N-major (transposed): LBO (next 8 keys, the reduction)
// 16 D, SBO (next 8 columns of D) 128 bytes. Q stays in fa_fwd_kernel's padded row layout.
//
// Loads and barriers are fa_fwd_kernel's (V_j while S is formed, K_{j+1} while O accumulates),
// with fence.proxy.async after each thread's cp.async lands: wgmma reads shared memory through
// the async proxy. Compiled only for sm_90a (-DFTUNE_CUDA_ARCHS=90a, the default); elsewhere the
// body is empty and the host never launches it (attention_wgmma_available).
constexpr int kWgBN = 64;  // keys per tile

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FA_WG_ACC32(d)                                                                            \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
      "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]),    \
      "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),  \
      "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]),  \
      "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FA_WG_ACC64(d)                                                                           \
  FA_WG_ACC32(d), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]),  \
      "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), \
      "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), \
      "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), \
      "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FA_WG_REGS32                                                       \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define FA_WG_REGS64                                                                   \
  FA_WG_REGS32                                                                         \
  ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
// The operands after N/2 accumulators: A's 4 registers, B's descriptor, the accumulate flag (a
// predicate: 0 writes A B, 1 adds it) and B's transpose immediate.
#define FA_WG_TAIL32 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
#define FA_WG_TAIL64 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
#define FA_WG_IN : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc), "n"(kTransB)

// d = A B + (acc ? d : 0), wgmma m64nNk16 with f32 accumulators, A from registers (each warp's
// m16n8k16 A fragment of its 16 rows), B from shared memory through desc. N = 64 or 128.
template <class T, int N, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc,
                                         int acc) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  if constexpr (N == 64 && kBf16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" FA_WG_REGS32 FA_WG_TAIL32
        : FA_WG_ACC32(d) FA_WG_IN);
  } else if constexpr (N == 64) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" FA_WG_REGS32 FA_WG_TAIL32
        : FA_WG_ACC32(d) FA_WG_IN);
  } else if constexpr (kBf16) {
    static_assert(N == 128, "wgmma_rs: N 64 or 128");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {" FA_WG_REGS64 FA_WG_TAIL64
        : FA_WG_ACC64(d) FA_WG_IN);
  } else {
    static_assert(N == 128, "wgmma_rs: N 64 or 128");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {" FA_WG_REGS64 FA_WG_TAIL64
        : FA_WG_ACC64(d) FA_WG_IN);
  }
}
// d = A B + (acc ? d : 0), wgmma m64n64k16 with A and B from shared memory, both K-major (the
// backward's S^T = K Q^T, dP^T = V dO^T, S = Q K^T, dP = dO V^T).
template <class T>
__device__ __forceinline__ void wgmma_ss64(float (&d)[32], uint64_t da, uint64_t db, int acc) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {" FA_WG_REGS32
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : FA_WG_ACC32(d)
        : "l"(da), "l"(db), "r"(acc));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {" FA_WG_REGS32
        "}, %32, %33, p, 1, 1, 0, 0;\n}\n"
        : FA_WG_ACC32(d)
        : "l"(da), "l"(db), "r"(acc));
  }
}
#undef FA_WG_ACC32
#undef FA_WG_ACC64
#undef FA_WG_REGS32
#undef FA_WG_REGS64
#undef FA_WG_TAIL32
#undef FA_WG_TAIL64
#undef FA_WG_IN

// A shared-memory matrix descriptor without swizzle: start address, LBO and SBO in bytes (each
// stored >> 4). A descriptor advances by adding (bytes >> 4): the address is its low 14 bits.
__device__ __forceinline__ uint64_t wgmma_desc(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return uint64_t((addr & 0x3FFFF) >> 4) | (uint64_t((lbo & 0x3FFFF) >> 4) << 16) |
         (uint64_t((sbo & 0x3FFFF) >> 4) << 32);
}
// Orders this warpgroup's register writes before the wgmma that read them (A fragments,
// accumulators).
__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_wait_all() {
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
// Waits until at most N of this warpgroup's committed groups are pending: groups complete in
// order, so every group but the newest N has landed.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// This thread's writes to shared memory (landed cp.async) made visible to the async proxy.
__device__ __forceinline__ void fence_proxy_async_smem() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// The compiler sees the accumulators written here: no read of them moves above a wait_group,
// no write below a wgmma issue.
template <int N>
__device__ __forceinline__ void reg_fence(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// A 64-key tile into the core-matrix layout above: NT threads, chunk q at byte 16 q; rows >= valid
// zero.
// NT is a multiple of 8 C (the chunks of 8 rows), so thread i keeps its chunk column c and steps
// NT / C rows per pass: one pointer step per chunk, as fa_load_rows.
template <class T, int D, int NT>
__device__ __forceinline__ void fa_wg_load_tile(T* sm, const T* g, int64_t ld, int valid,
                                                const T* any) {
  constexpr int C = D / 8;
  constexpr int kRowStep = NT / C;  // rows between a thread's chunks: (NT / (8 C)) groups of 8
  static_assert(NT % (8 * C) == 0 && (kWgBN * C) % NT == 0, "tile chunks per thread");
  const int q = int(threadIdx.x);
  const int r = (q & 7) + (q / (8 * C)) * 8, c = (q >> 3) % C;
  const T* src = g + int64_t(r) * ld + c * 8;
  const int64_t step = int64_t(kRowStep) * ld;
#pragma unroll
  for (int j = 0; j < kWgBN * C / NT; ++j) {
    const bool ok = r + j * kRowStep < valid;
    cp_async16(sm + (q + j * NT) * 8, ok ? src : any, ok ? 16 : 0);
    src += step;
  }
}
// ROWS rows of Q into the padded row layout (stride D + 8) of fa_fwd_kernel, NT threads.
template <class T, int D, int NT, int ROWS>
__device__ __forceinline__ void fa_wg_load_rows(T* sm, const T* g, int64_t ld, int valid,
                                                const T* any) {
  constexpr int C = D / 8;
  static_assert((ROWS * C) % NT == 0, "rows' chunks per thread");
#pragma unroll
  for (int j = 0; j < ROWS * C / NT; ++j) {
    const int q = int(threadIdx.x) + j * NT, r = q / C, c = q % C;
    const bool ok = r < valid;
    cp_async16(sm + r * kFaLds<D> + c * 8, ok ? g + int64_t(r) * ld + c * 8 : any, ok ? 16 : 0);
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The online softmax of one 64-key tile of S (the wgmma accumulators sc of this thread's rows g
// and g + 8, raw scores) for both wgmma forwards: keys past the end or right of the causal
// diagonal masked (kMask), the running max m (log2 units) and sum l updated, sc replaced by P.
// alpha: the factor the output accumulated so far still needs (2^(m_old - m_new)).
template <bool kMask>
__device__ __forceinline__ void fa_wg_softmax(float (&sc)[kWgBN / 2], float (&m)[2], float (&l)[2],
                                              float (&alpha)[2], float sl2, int c0, int t,
                                              const int (&row)[2], int len_k, bool causal,
                                              int off) {
  if constexpr (kMask) {
#pragma unroll
    for (int i = 0; i < kWgBN / 2; ++i) {
      const int col = c0 + (i >> 2) * 8 + 2 * t + (i & 1);
      if (col >= len_k || (causal && col > row[(i >> 1) & 1] + off)) sc[i] = -INFINITY;
    }
  }
  float mu[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float mx = -INFINITY;
#pragma unroll
    for (int nb = 0; nb < kWgBN / 8; ++nb)
      mx = fmaxf(mx, fmaxf(sc[4 * nb + 2 * i], sc[4 * nb + 2 * i + 1]));
    // The 4 threads of a quad (same g) hold the row's 64 columns between them.
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn = fmaxf(m[i], mx * sl2);  // -inf * sl2 = -inf
    mu[i] = mn == -INFINITY ? 0.f : mn;      // no key seen yet: p = alpha = 0, no NaN
    alpha[i] = ex2_ftz(m[i] - mu[i]);
    m[i] = mn;
    l[i] *= alpha[i];
  }
#pragma unroll
  for (int i = 0; i < kWgBN / 2; ++i) {
    const float p = ex2_ftz(fmaf(sc[i], sl2, -mu[(i >> 1) & 1]));  // masked: 0
    sc[i] = p;
    l[(i >> 1) & 1] += p;  // this thread's share of the row sum; the quad sums it at the end
  }
}

// Both wgmma forwards' epilogue: O / l and the logsumexp of this thread's rows wrow + g (+ 8) of
// the CTA's block (r0 within the sequence), rows >= rows skipped; lse +inf for a row that saw no
// key (its output 0).
template <class T, int D>
__device__ __forceinline__ void fa_wg_store(const Args& a, const SeqDesc& s, int r0, int h,
                                            int rows, int wrow, int g, int t,
                                            const float (&o)[D / 2], const float (&m)[2],
                                            const float (&l)[2]) {
  T* out = static_cast<T*>(a.out);
  const int64_t ldq = int64_t(a.H) * D;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    float li = l[i];
    li += __shfl_xor_sync(0xffffffffu, li, 1);
    li += __shfl_xor_sync(0xffffffffu, li, 2);
    const int r = wrow + g + 8 * i;
    if (r >= rows) continue;
    const int64_t tok = s.q_start + r0 + r;
    const float inv = li > 0.f ? 1.f / li : 0.f;
    T* orow = out + tok * ldq + int64_t(h) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(orow + nd * 8 + 2 * t) =
          pack2<T>(o[4 * nd + 2 * i] * inv, o[4 * nd + 2 * i + 1] * inv);
    if (t == 0)
      a.lse[int64_t(h) * a.nq + tok] = li > 0.f ? m[i] * 0.6931471805599453f + logf(li) : INFINITY;
  }
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// The forward on Hopper's warpgroup MMAs, two variants sharing setup and epilogue:
// kPipe false: per tile, S = Q K_j^T, the softmax, then O += P V_j, each product awaited (two
// barriers per tile: V_j loads while S is formed, K_{j+1} while O accumulates).
// kPipe true (fa_fwd_wgmma_pipe): the products of neighbouring key tiles overlapped inside each
// warpgroup (FlashAttention-3's intra-warpgroup pipelining): at tile j the warpgroup issues S_j =
// Q K_j^T and O += P_{j-1} V_{j-1} together, forms P_j (the softmax of S_j) while the second
// product runs, and rescales O once it has landed. K and V are double-buffered: one barrier per
// tile (K_{j+1} and V_j load while tile j is computed). P_{j-1} is packed out of the S registers
// before S_j is issued into them. Same results up to the order of float operations.
// Launch bounds: at head_dim 64, 128 registers (2 CTAs of two warpgroups, 4 of one, per SM).
template <class T, int D, int WG, bool kPipe>
__global__ void __launch_bounds__(128 * WG, D == 64 ? (WG == 2 ? 2 : 4) : 1)
    fa_fwd_wgmma_kernel(Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = 128 * WG, LDS = kFaLds<D>, BM = 64 * WG, kT = kWgBN * D;
  constexpr int kBufs = kPipe ? 2 : 1;
  extern __shared__ __align__(16) unsigned char fa_smem[];  // no swizzle: 16-byte alignment
  T* sK = reinterpret_cast<T*>(fa_smem);                    // [kBufs][64 keys x D], core matrices
  T* sV = sK + kBufs * kT;                                  // [kBufs][64 keys x D], core matrices
  T* sQ = sV + kBufs * kT;                                  // [BM][LDS]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int wrow = (threadIdx.x >> 5) * 16;  // this warp's first row in the CTA's block
  const int rows = min(BM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const T* q = qbase + int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + kWgBN - 1) / kWgBN;

  fa_wg_load_rows<T, D, NT, BM>(sQ, q, ldq, rows, qbase);
  if (ntiles > 0) fa_wg_load_tile<T, D, NT>(sK, k, ldk, min(kWgBN, col_end), qbase);
  cp_async_commit();

  constexpr uint32_t kGroupBytes = D * 16;  // 8 key rows of a tile
  const uint64_t k_desc = wgmma_desc(sK, 128, kGroupBytes);
  const uint64_t v_desc = wgmma_desc(sV, kGroupBytes, 128);
  const float sl2 = a.scale * 1.4426950408889634f;
  float o[D / 2];  // o[4 nd + e]: column 8 nd + 2 t + (e & 1) of row g + 8 (e >> 1)
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  uint32_t qf[D / 16][4];
  const int row[2] = {r0 + wrow + g, r0 + wrow + g + 8};  // this thread's rows in the sequence
  // Tiles [0, n_plain) need no mask: all their keys exist and, causal, lie at or left of the
  // diagonal of the CTA's first row; every later tile needs it.
  int n_plain = min(ntiles, s.len_k / kWgBN);
  if (a.causal) n_plain = min(n_plain, r0 + off + 1 > 0 ? (r0 + off + 1) / kWgBN : 0);

  if constexpr (!kPipe) {
    auto step = [&](int jt, auto mask_tag) {
      constexpr bool kMask = decltype(mask_tag)::value;
      const int c0 = jt * kWgBN;
      cp_async_wait_all();
      fence_proxy_async_smem();
      __syncthreads();  // K_j (and Q) landed for every thread; V_{j-1} no longer read
      if (jt == 0) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
          ldsm_x4(qf[kk], sQ + (wrow + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
      }
      fa_wg_load_tile<T, D, NT>(sV, v + int64_t(c0) * ldk, ldk, min(kWgBN, col_end - c0), qbase);
      cp_async_commit();

      float sc[kWgBN / 2];  // S: sc[4 nb + e], column 8 nb + 2 t + (e & 1), row g + 8 (e >> 1)
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) wgmma_rs<T, kWgBN, 0>(sc, qf[kk], k_desc + 16 * kk, kk);
      wgmma_commit();
      wgmma_wait_all();
      reg_fence(sc);

      float alpha[2];
      fa_wg_softmax<kMask>(sc, m, l, alpha, sl2, c0, t, row, s.len_k, a.causal, off);
#pragma unroll
      for (int i = 0; i < D / 2; ++i) o[i] *= alpha[(i >> 1) & 1];

      cp_async_wait_all();
      fence_proxy_async_smem();
      __syncthreads();  // V_j landed; every warpgroup is done with K_j (its S wait returned)
      if (jt + 1 < ntiles)
        fa_wg_load_tile<T, D, NT>(sK, k + int64_t(c0 + kWgBN) * ldk, ldk,
                                  min(kWgBN, col_end - c0 - kWgBN), qbase);
      cp_async_commit();
      uint32_t pa[kWgBN / 16][4];
#pragma unroll
      for (int kk = 0; kk < kWgBN / 16; ++kk) {
        pa[kk][0] = pack2<T>(sc[8 * kk], sc[8 * kk + 1]);
        pa[kk][1] = pack2<T>(sc[8 * kk + 2], sc[8 * kk + 3]);
        pa[kk][2] = pack2<T>(sc[8 * kk + 4], sc[8 * kk + 5]);
        pa[kk][3] = pack2<T>(sc[8 * kk + 6], sc[8 * kk + 7]);
      }
      reg_fence(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kWgBN / 16; ++kk)
        wgmma_rs<T, D, 1>(o, pa[kk], v_desc + uint64_t(kk) * (2 * kGroupBytes >> 4), 1);
      wgmma_commit();
      wgmma_wait_all();
      reg_fence(o);
    };
    for (int jt = 0; jt < n_plain; ++jt) step(jt, std::false_type{});
    for (int jt = n_plain; jt < ntiles; ++jt) step(jt, std::true_type{});
  } else {
    // Tile j's loads: K_j into sK[j & 1], V_j into sV[j & 1].
    auto load_k = [&](int j) {
      fa_wg_load_tile<T, D, NT>(sK + (j & 1) * kT, k + int64_t(j) * kWgBN * ldk, ldk,
                                min(kWgBN, col_end - j * kWgBN), qbase);
    };
    auto load_v = [&](int j) {
      fa_wg_load_tile<T, D, NT>(sV + (j & 1) * kT, v + int64_t(j) * kWgBN * ldk, ldk,
                                min(kWgBN, col_end - j * kWgBN), qbase);
    };
    constexpr uint64_t kBufStep =
        (uint64_t(kT) * sizeof(T)) >> 4;  // descriptor step between buffers
    float alpha[2] = {1.f, 1.f};
    float sc[kWgBN / 2];         // S_j, then P_j: column 8 nb + 2 t + (e & 1), row g + 8 (e >> 1)
    uint32_t pa[kWgBN / 16][4];  // P_{j-1} as A fragments, read by its O product until it lands

    // The online softmax of S_j in sc: P_j in sc, m and l updated, alpha the factor O still needs.
    auto softmax = [&](int jt, auto mask_tag) {
      fa_wg_softmax<decltype(mask_tag)::value>(sc, m, l, alpha, sl2, jt * kWgBN, t, row, s.len_k,
                                               a.causal, off);
    };
    auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < kWgBN / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r)
          pa[kk][r] = pack2<T>(sc[8 * kk + 2 * r], sc[8 * kk + 2 * r + 1]);
    };
    auto rescale_o = [&] {
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[4 * nd + e] *= alpha[e >> 1];
    };
    auto issue_s = [&](int jt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        wgmma_rs<T, kWgBN, 0>(sc, qf[kk], k_desc + (jt & 1) * kBufStep + 16 * kk, kk);
      wgmma_commit();
    };
    auto issue_pv = [&](int jt) {
#pragma unroll
      for (int kk = 0; kk < kWgBN / 16; ++kk)
        wgmma_rs<T, D, 1>(o, pa[kk],
                          v_desc + (jt & 1) * kBufStep + uint64_t(kk) * (2 * kGroupBytes >> 4), 1);
      wgmma_commit();
    };

    if (ntiles > 0) {
      // Tile 0: S_0 alone (O is still zero).
      cp_async_wait_all();
      fence_proxy_async_smem();
      __syncthreads();  // Q and K_0 landed
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldsm_x4(qf[kk], sQ + (wrow + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
      load_v(0);
      if (ntiles > 1) load_k(1);
      cp_async_commit();
      wgmma_fence();
      issue_s(0);
      wgmma_wait_all();
      reg_fence(sc);
      if (n_plain > 0)
        softmax(0, std::false_type{});
      else
        softmax(0, std::true_type{});
      for (int jt = 1; jt < ntiles; ++jt) {
        cp_async_wait_all();
        fence_proxy_async_smem();
        __syncthreads();  // K_j and V_{j-1} landed; every warpgroup is done with S_{j-1}, PV_{j-2}
        load_v(jt);
        if (jt + 1 < ntiles) load_k(jt + 1);
        cp_async_commit();
        pack_p();  // P_{j-1} out of sc, which S_j overwrites
        reg_fence(o);
        wgmma_fence();
        issue_s(jt);       // group: S_j
        issue_pv(jt - 1);  // group: O += P_{j-1} V_{j-1}
        wgmma_wait<1>();   // S_j landed; the O product may still run
        reg_fence(sc);
        if (jt < n_plain)
          softmax(jt, std::false_type{});
        else
          softmax(jt, std::true_type{});
        wgmma_wait_all();  // O landed: pa free, O rescaled to the new max
        reg_fence(o);
        rescale_o();
      }
      // The last tile's O product.
      cp_async_wait_all();
      fence_proxy_async_smem();
      __syncthreads();  // V_{n-1} landed
      pack_p();
      reg_fence(o);
      wgmma_fence();
      issue_pv(ntiles - 1);
      wgmma_wait_all();
      reg_fence(o);
    }
  }
  cp_async_wait_all();
  fa_wg_store<T, D>(a, s, r0, h, rows, wrow, g, t, o, m, l);
#elif defined(__CUDA_ARCH__)
  __trap();  // device code without sm_90a's wgmma: the host never launches this; fail loudly
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- fast path backward ---------------------------------------------------------------------------
// Two kernels, no atomics. Both use the fragment layouts documented above fa_fwd_kernel.
//
// fa_bwd_dkdv_kernel: one CTA per (64 keys, kv head, sequence); warp w owns keys 16w..16w+15 and
// keeps dK, dV [16 x D] in registers. It walks every (query head of the group, 64-row query tile)
// that sees its keys, with the next Q / dO tile (and its lse, Delta) loading while the current one
// is used (two buffers). Per tile, with the keys as the M dimension:
//   S^T = K Q^T          A = K rows (ldmatrix),       B = Q^T  (ldmatrix of Q rows)
//   P^T = exp(scale S^T - lse[col])  (masked: 0)
//   dV += P^T dO         A = P^T (the S^T accumulators packed), B = dO (ldmatrix.trans)
//   dP^T = V dO^T        A = V rows,                  B = dO^T (ldmatrix of dO rows)
//   dS^T = P^T (dP^T - Delta[col])
//   dK += dS^T Q         A = dS^T packed,             B = Q (ldmatrix.trans)
// P and dS are rounded to the input type for the products (as FlashAttention does).
// kAtomicDq (only when ftune::cuda::deterministic() is off): the CTA also forms dQ's share of its
// keys, dQ_tile += dS K, through dS staged in shared memory ([64 rows][64 keys], warp w then
// owns rows 16w..16w+15), and adds it to the f32 dq_accum with atomics; no separate dQ pass.
// The backward's per-row statistics of head h, query rows first .. first + BM - 1 (tokens), into
// shared memory by NT threads: the logsumexp in log2 units and Delta; rows >= rows get +inf and 0
// (probability 0).
template <int BM, int NT>
__device__ __forceinline__ void fa_stage_stats(float* sL, float* sDl, const Args& a, int h,
                                               int64_t first, int rows) {
  for (int r = threadIdx.x; r < BM; r += NT) {
    const int64_t idx = int64_t(h) * a.nq + first + r;
    sL[r] = r < rows ? a.lse[idx] * 1.4426950408889634f : INFINITY;
    sDl[r] = r < rows ? a.delta[idx] : 0.f;
  }
}
// The same for one thread's rows rel and rel + 8 of a block starting at token first, in registers.
__device__ __forceinline__ void fa_row_stats(float (&lse2)[2], float (&dl)[2], const Args& a,
                                             int h, int64_t first, int rel, int rows) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = rel + 8 * i;
    const int64_t idx = int64_t(h) * a.nq + first + r;
    lse2[i] = r < rows ? a.lse[idx] * 1.4426950408889634f : INFINITY;
    dl[i] = r < rows ? a.delta[idx] : 0.f;
  }
}
constexpr int kBwdBM = 64;  // query rows per inner tile
constexpr int kDsLds = 64 + 8;  // row stride of the staged dS (elements)

// The body is shared by two entry points that differ only in their launch bounds (below).
// kAtomic: 0 no dQ (deterministic), 3 as 0 split over the query heads (Args::dk_part), 1 the
// atomic dQ described above, 2 (backward variant 2) the
// same sums with dS staged before the dK product and dQ formed after it (dS^T's registers are free
// by then), each warp's 4 dS fragments read from shared memory once (not once per 16 columns of D),
// and float2 atomics (sm_90: half the atomic instructions).
template <class T, int D, int kAtomic>
__device__ __forceinline__ void fa_bwd_dkdv_body(const Args& a) {
  constexpr bool kAtomicDq = kAtomic == 1;
  constexpr int LDS = kFaLds<D>;
  constexpr int kTile = 64 * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sK = reinterpret_cast<T*>(fa_smem);  // [64][LDS]
  T* sV = sK + kTile;                     // [64][LDS]
  T* sQ = sV + kTile;                     // [2][64][LDS]
  T* sG = sQ + 2 * kTile;                 // [2][64][LDS] dO
  float* sL = reinterpret_cast<float*>(sG + 2 * kTile);  // [2][64] lse in log2 units
  float* sDl = sL + 2 * kBwdBM;                          // [2][64] Delta
  T* sDs = reinterpret_cast<T*>(sDl + 2 * kBwdBM);       // [64][kDsLds] dS (kAtomic only)
  SeqDesc s;
  int c0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, c0);
  const int group = a.H / a.Hkv;
  // kAtomic 3, split over query heads: this CTA walks query head blockIdx.y alone (a template
  // case of its own, so the other kernels' code is untouched by it).
  constexpr bool split = kAtomic == 3;
  const int hk = split ? int(blockIdx.y) / group : int(blockIdx.y);
  const int h_first = split ? int(blockIdx.y) : hk * group, n_heads = split ? 1 : group;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int keys = min(64, s.len_k - c0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const T* gbase = static_cast<const T*>(a.dout);
  const int64_t koff = int64_t(s.k_start + c0) * ldk + int64_t(hk) * D;
  fa_load<T, D>(sK, static_cast<const T*>(a.k) + koff, ldk, keys, qbase);
  fa_load<T, D>(sV, static_cast<const T*>(a.v) + koff, ldk, keys, qbase);

  // Query row r sees key c iff r + off >= c: rows before c0 - off see none of these keys.
  const int first_row = a.causal ? max(0, c0 - off) : 0;
  const int nrt = s.len_q > first_row ? (s.len_q - first_row + kBwdBM - 1) / kBwdBM : 0;
  const int n_it = n_heads * nrt;
  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;

  // Issues the loads of iteration it into buffer `buf`.
  auto load_it = [&](int it, int buf) {
    const int h = h_first + it / nrt, r0 = first_row + (it % nrt) * kBwdBM;
    const int rows = min(kBwdBM, s.len_q - r0);
    const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
    fa_load<T, D>(sQ + buf * kTile, qbase + qoff, ldq, rows, qbase);
    fa_load<T, D>(sG + buf * kTile, gbase + qoff, ldq, rows, qbase);
    fa_stage_stats<kBwdBM, kFaThreads>(sL + buf * kBwdBM, sDl + buf * kBwdBM, a, h,
                                  s.q_start + r0, rows);
  };
  if (n_it > 0) load_it(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  // This thread's two keys (accumulator rows g and g + 8 of the warp), within the sequence.
  const int key_a = c0 + warp * 16 + g, key_b = key_a + 8;

  for (int it = 0; it < n_it; ++it) {
    const int buf = it & 1;
    const int r0 = first_row + (it % nrt) * kBwdBM;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; buffer buf ^ 1 (tile it - 1) is no longer read
    if (it + 1 < n_it) load_it(it + 1, buf ^ 1);
    cp_async_commit();
    const T* q = sQ + buf * kTile;
    const T* go = sG + buf * kTile;
    const float* lse2 = sL + buf * kBwdBM;
    const float* dl = sDl + buf * kBwdBM;

    float st[kBwdBM / 8][4];  // S^T, then P^T, then dS^T: [16 keys][64 rows] per warp
#pragma unroll
    for (int i = 0; i < kBwdBM / 8; ++i) st[i][0] = st[i][1] = st[i][2] = st[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[4];
      ldsm_x4(ka, sK + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < kBwdBM / 16; ++nb) {
        uint32_t b[4];
        ldsm_x4(b, q + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8);
        mma16816<T>(st[2 * nb], ka, b[0], b[1]);
        mma16816<T>(st[2 * nb + 1], ka, b[2], b[3]);
      }
    }
    const bool need_mask = r0 + kBwdBM > s.len_q || c0 + 64 > s.len_k ||
                           (a.causal && c0 + 63 > r0 + off);
    // P^T; the per-element index tests only on the tiles that need them (a uniform branch).
    auto probs = [&](auto mask_tag) {
#pragma unroll
      for (int nb = 0; nb < kBwdBM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = nb * 8 + 2 * t + (e & 1);  // query row within the tile
          float p = ex2_ftz(fmaf(st[nb][e], sl2, -lse2[col]));
          if constexpr (decltype(mask_tag)::value) {
            const int r = r0 + col, c = e < 2 ? key_a : key_b;
            if (r >= s.len_q || c >= s.len_k || (a.causal && c > r + off)) p = 0.f;
          }
          st[nb][e] = p;
        }
    };
    if (need_mask) probs(std::true_type{});
    else probs(std::false_type{});
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < kBwdBM / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      pa[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      pa[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, go + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
        mma16816<T>(dv[2 * nd], pa, b[0], b[1]);
        mma16816<T>(dv[2 * nd + 1], pa, b[2], b[3]);
      }
    }
    // dP^T = V dO^T, then dS^T = P^T (dP^T - Delta) in place of P^T
    {
      float dpt[kBwdBM / 8][4];
#pragma unroll
      for (int i = 0; i < kBwdBM / 8; ++i) dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t va[4];
        ldsm_x4(va, sV + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nb = 0; nb < kBwdBM / 16; ++nb) {
          uint32_t b[4];
          ldsm_x4(b, go + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                          ((lane >> 3) & 1) * 8);
          mma16816<T>(dpt[2 * nb], va, b[0], b[1]);
          mma16816<T>(dpt[2 * nb + 1], va, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nb = 0; nb < kBwdBM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nb][e] *= dpt[nb][e] - dl[nb * 8 + 2 * t + (e & 1)];
    }
    if constexpr (kAtomicDq) {
      // dS[row][key] into shared memory; every warp then multiplies 16 rows of it by K.
#pragma unroll
      for (int nb = 0; nb < kBwdBM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sDs[(nb * 8 + 2 * t + (e & 1)) * kDsLds + warp * 16 + g + 8 * (e >> 1)] =
              from_f<T>(st[nb][e]);
      __syncthreads();  // the previous tile's readers passed the loop-top barrier already
      const int h = h_first + it / nrt;
      float* dqa = a.dq_accum + (int64_t(s.q_start + r0) * a.H + h) * D;  // rows: stride H * D
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk) {
          uint32_t af[4], b[4];
          ldsm_x4(af, sDs + (warp * 16 + (lane & 15)) * kDsLds + kk * 16 + (lane >> 4) * 8);
          ldsm_x4_t(b, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                           (lane >> 4) * 8);
          mma16816<T>(acc[0], af, b[0], b[1]);
          mma16816<T>(acc[1], af, b[2], b[3]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = warp * 16 + g + 8 * i;
          if (r0 + r >= s.len_q) continue;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            float* dst = dqa + int64_t(r) * a.H * D + nd * 16 + j * 8 + 2 * t;
            atomicAdd(dst, acc[j][2 * i]);
            atomicAdd(dst + 1, acc[j][2 * i + 1]);
          }
        }
      }
    }
    if constexpr (kAtomic == 2) {
      // dS[row][key] into shared memory for the dQ product after dK's.
#pragma unroll
      for (int nb = 0; nb < kBwdBM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          sDs[(nb * 8 + 2 * t + (e & 1)) * kDsLds + warp * 16 + g + 8 * (e >> 1)] =
              from_f<T>(st[nb][e]);
    }
    // dK += dS^T Q  (scaled at the end)
#pragma unroll
    for (int kk = 0; kk < kBwdBM / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
      pa[1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
      pa[2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
      pa[3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, q + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                        (lane >> 4) * 8);
        mma16816<T>(dk[2 * nd], pa, b[0], b[1]);
        mma16816<T>(dk[2 * nd + 1], pa, b[2], b[3]);
      }
    }
    if constexpr (kAtomic == 2) {
      __syncthreads();  // dS complete; the previous tile's readers passed the loop-top barrier
      // Warp w: dQ rows 16w..16w+15 of this tile += dS[rows][64 keys] K[64 keys][D].
      uint32_t af[64 / 16][4];
#pragma unroll
      for (int kk = 0; kk < 64 / 16; ++kk)
        ldsm_x4(af[kk], sDs + (warp * 16 + (lane & 15)) * kDsLds + kk * 16 + (lane >> 4) * 8);
      const int h = h_first + it / nrt;
      float* dqa = a.dq_accum + (int64_t(s.q_start + r0) * a.H + h) * D;  // rows: stride H * D
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
        for (int kk = 0; kk < 64 / 16; ++kk) {
          uint32_t b[4];
          ldsm_x4_t(b, sK + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                           (lane >> 4) * 8);
          mma16816<T>(acc[0], af[kk], b[0], b[1]);
          mma16816<T>(acc[1], af[kk], b[2], b[3]);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = warp * 16 + g + 8 * i;
          if (r0 + r >= s.len_q) continue;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            // 8-byte aligned: D, nd * 16 + j * 8 and 2t are even.
            float* dst = dqa + int64_t(r) * a.H * D + nd * 16 + j * 8 + 2 * t;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
            atomicAdd(reinterpret_cast<float2*>(dst), make_float2(acc[j][2 * i], acc[j][2 * i + 1]));
#else
            atomicAdd(dst, acc[j][2 * i]);
            atomicAdd(dst + 1, acc[j][2 * i + 1]);
#endif
          }
        }
      }
    }
  }
  cp_async_wait_all();

  T* gk = static_cast<T*>(a.dk);
  T* gv = static_cast<T*>(a.dv);
  // Split over query heads: this head's share, unscaled f32, at [h % group][key token][hk][:].
  const int64_t part_off = split ? int64_t(h_first % group) * a.nk * ldk : 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int j = warp * 16 + g + 8 * i;
    if (j >= keys) continue;
    const int64_t base = int64_t(s.k_start + c0 + j) * ldk + int64_t(hk) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      if (split) {
        if (a.dk_part)
          *reinterpret_cast<float2*>(a.dk_part + part_off + base + nd * 8 + 2 * t) =
              make_float2(dk[nd][2 * i], dk[nd][2 * i + 1]);
        if (a.dv_part)
          *reinterpret_cast<float2*>(a.dv_part + part_off + base + nd * 8 + 2 * t) =
              make_float2(dv[nd][2 * i], dv[nd][2 * i + 1]);
        continue;
      }
      if (gk)
        *reinterpret_cast<uint32_t*>(gk + base + nd * 8 + 2 * t) =
            pack2<T>(dk[nd][2 * i] * a.scale, dk[nd][2 * i + 1] * a.scale);
      if (gv)
        *reinterpret_cast<uint32_t*>(gv + base + nd * 8 + 2 * t) =
            pack2<T>(dv[nd][2 * i], dv[nd][2 * i + 1]);
    }
  }
}

// dK / dV from the per-query-head shares of the split dK/dV kernels: element i (of Nk * Hkv * D)
// sums its `group` shares in head order (deterministic), dK times the softmax scale. Every key
// row is written: the split relies on cu_seqlens_k covering every key token (the op's contract;
// the unsplit kernels would leave a key outside every sequence untouched, this writes its
// never-written share).
template <class T>
__global__ void dkv_reduce_kernel(const float* __restrict__ dk_part,
                                  const float* __restrict__ dv_part, T* dk, T* dv, int64_t n,
                                  int group, float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    if (dk) {
      float acc = 0.f;
      for (int g = 0; g < group; ++g) acc += dk_part[g * n + i];
      dk[i] = from_f<T>(acc * scale);
    }
    if (dv) {
      float acc = 0.f;
      for (int g = 0; g < group; ++g) acc += dv_part[g * n + i];
      dv[i] = from_f<T>(acc);
    }
  }
}

template <class T, int D, int kAtomic>
__global__ void __launch_bounds__(kFaThreads) fa_bwd_dkdv_kernel(Args a) {
  fa_bwd_dkdv_body<T, D, kAtomic>(a);
}
// Backward variant 1 at D = 64: 3 resident CTAs per SM asked of ptxas caps the registers at 168
// (the default uses 174), so 3 CTAs (12 warps) fit per SM instead of 2; shared memory allows 4.
template <class T, int D, int kAtomic = 0>
__global__ void __launch_bounds__(kFaThreads, 3) fa_bwd_dkdv_kernel_occ3(Args a) {
  fa_bwd_dkdv_body<T, D, kAtomic>(a);
}

// fa_bwd_dkdv_mk2_kernel (backward variant 3, D = 64): fa_bwd_dkdv_kernel with 128 keys per CTA,
// warp w owning keys 32w..32w+31 as two 16-key m-blocks, and query tiles of 32 rows. Every Q / dO
// fragment read from shared memory then feeds two products (one per m-block) instead of one: a
// third fewer ldmatrix per MMA (48 instead of 72 per 128 MMAs per warp and tile), and each Q / dO
// tile is loaded once per 128 keys. dK, dV: 2 x [32 keys x 64] per warp = 128 registers.
constexpr int kBwd2BN = 128;  // keys per CTA
constexpr int kBwd2BM = 32;   // query rows per inner tile

template <class T, int D>
__global__ void __launch_bounds__(kFaThreads) fa_bwd_dkdv_mk2_kernel(Args a) {
  constexpr int LDS = kFaLds<D>;
  constexpr int BN = kBwd2BN, BM = kBwd2BM;
  constexpr int kKTile = BN * LDS, kQTile = BM * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sK = reinterpret_cast<T*>(fa_smem);  // [128][LDS]
  T* sV = sK + kKTile;                    // [128][LDS]
  T* sQ = sV + kKTile;                    // [2][32][LDS]
  T* sG = sQ + 2 * kQTile;                // [2][32][LDS] dO
  float* sL = reinterpret_cast<float*>(sG + 2 * kQTile);  // [2][32] lse in log2 units
  float* sDl = sL + 2 * BM;                               // [2][32] Delta
  SeqDesc s;
  int c0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, c0);
  const int hk = blockIdx.y, group = a.H / a.Hkv;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int keys = min(BN, s.len_k - c0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const T* gbase = static_cast<const T*>(a.dout);
  const int64_t koff = int64_t(s.k_start + c0) * ldk + int64_t(hk) * D;
  fa_load_rows<T, BN, D>(sK, static_cast<const T*>(a.k) + koff, ldk, keys, qbase);
  fa_load_rows<T, BN, D>(sV, static_cast<const T*>(a.v) + koff, ldk, keys, qbase);

  // Query row r sees key c iff r + off >= c: rows before c0 - off see none of these keys.
  const int first_row = a.causal ? max(0, c0 - off) : 0;
  const int nrt = s.len_q > first_row ? (s.len_q - first_row + BM - 1) / BM : 0;
  const int n_it = group * nrt;
  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;

  // Issues the loads of iteration it into buffer `buf`.
  auto load_it = [&](int it, int buf) {
    const int h = hk * group + it / nrt, r0 = first_row + (it % nrt) * BM;
    const int rows = min(BM, s.len_q - r0);
    const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
    fa_load_rows<T, BM, D>(sQ + buf * kQTile, qbase + qoff, ldq, rows, qbase);
    fa_load_rows<T, BM, D>(sG + buf * kQTile, gbase + qoff, ldq, rows, qbase);
    fa_stage_stats<BM, kFaThreads>(sL + buf * BM, sDl + buf * BM, a, h,
                                  s.q_start + r0, rows);
  };
  if (n_it > 0) load_it(0, 0);
  cp_async_commit();

  float dk[2][D / 8][4], dv[2][D / 8][4];
#pragma unroll
  for (int mk = 0; mk < 2; ++mk)
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk[mk][i][e] = dv[mk][i][e] = 0.f;
  // This thread's keys (accumulator rows g and g + 8 of m-block mk), within the sequence.
  auto key_of = [&](int mk, int i) { return c0 + warp * 32 + mk * 16 + g + 8 * i; };

  for (int it = 0; it < n_it; ++it) {
    const int buf = it & 1;
    const int r0 = first_row + (it % nrt) * BM;
    cp_async_wait_all();
    __syncthreads();  // tile `it` landed; buffer buf ^ 1 (tile it - 1) is no longer read
    if (it + 1 < n_it) load_it(it + 1, buf ^ 1);
    cp_async_commit();
    const T* q = sQ + buf * kQTile;
    const T* go = sG + buf * kQTile;
    const float* lse2 = sL + buf * BM;
    const float* dl = sDl + buf * BM;

    float st[2][BM / 8][4];  // S^T, then P^T, then dS^T: [2 x 16 keys][32 rows] per warp
#pragma unroll
    for (int mk = 0; mk < 2; ++mk)
#pragma unroll
      for (int i = 0; i < BM / 8; ++i)
        st[mk][i][0] = st[mk][i][1] = st[mk][i][2] = st[mk][i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t ka[2][4];
#pragma unroll
      for (int mk = 0; mk < 2; ++mk)
        ldsm_x4(ka[mk], sK + (warp * 32 + mk * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < BM / 16; ++nb) {
        uint32_t b[4];
        ldsm_x4(b, q + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8);
#pragma unroll
        for (int mk = 0; mk < 2; ++mk) {
          mma16816<T>(st[mk][2 * nb], ka[mk], b[0], b[1]);
          mma16816<T>(st[mk][2 * nb + 1], ka[mk], b[2], b[3]);
        }
      }
    }
    const bool need_mask = r0 + BM > s.len_q || c0 + BN > s.len_k ||
                           (a.causal && c0 + BN - 1 > r0 + off);
    auto probs = [&](auto mask_tag) {
#pragma unroll
      for (int mk = 0; mk < 2; ++mk)
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nb * 8 + 2 * t + (e & 1);  // query row within the tile
            float p = ex2_ftz(fmaf(st[mk][nb][e], sl2, -lse2[col]));
            if constexpr (decltype(mask_tag)::value) {
              const int r = r0 + col, c = key_of(mk, e >> 1);
              if (r >= s.len_q || c >= s.len_k || (a.causal && c > r + off)) p = 0.f;
            }
            st[mk][nb][e] = p;
          }
    };
    if (need_mask) probs(std::true_type{});
    else probs(std::false_type{});
    // dV += P^T dO
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[2][4];
#pragma unroll
      for (int mk = 0; mk < 2; ++mk) {
        pa[mk][0] = pack2<T>(st[mk][2 * kk][0], st[mk][2 * kk][1]);
        pa[mk][1] = pack2<T>(st[mk][2 * kk][2], st[mk][2 * kk][3]);
        pa[mk][2] = pack2<T>(st[mk][2 * kk + 1][0], st[mk][2 * kk + 1][1]);
        pa[mk][3] = pack2<T>(st[mk][2 * kk + 1][2], st[mk][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, go + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
#pragma unroll
        for (int mk = 0; mk < 2; ++mk) {
          mma16816<T>(dv[mk][2 * nd], pa[mk], b[0], b[1]);
          mma16816<T>(dv[mk][2 * nd + 1], pa[mk], b[2], b[3]);
        }
      }
    }
    // dP^T = V dO^T, then dS^T = P^T (dP^T - Delta) in place of P^T
    {
      float dpt[2][BM / 8][4];
#pragma unroll
      for (int mk = 0; mk < 2; ++mk)
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
          dpt[mk][i][0] = dpt[mk][i][1] = dpt[mk][i][2] = dpt[mk][i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t va[2][4];
#pragma unroll
        for (int mk = 0; mk < 2; ++mk)
          ldsm_x4(va[mk],
                  sV + (warp * 32 + mk * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
        for (int nb = 0; nb < BM / 16; ++nb) {
          uint32_t b[4];
          ldsm_x4(b, go + (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                          ((lane >> 3) & 1) * 8);
#pragma unroll
          for (int mk = 0; mk < 2; ++mk) {
            mma16816<T>(dpt[mk][2 * nb], va[mk], b[0], b[1]);
            mma16816<T>(dpt[mk][2 * nb + 1], va[mk], b[2], b[3]);
          }
        }
      }
#pragma unroll
      for (int mk = 0; mk < 2; ++mk)
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            st[mk][nb][e] *= dpt[mk][nb][e] - dl[nb * 8 + 2 * t + (e & 1)];
    }
    // dK += dS^T Q  (scaled at the end)
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t pa[2][4];
#pragma unroll
      for (int mk = 0; mk < 2; ++mk) {
        pa[mk][0] = pack2<T>(st[mk][2 * kk][0], st[mk][2 * kk][1]);
        pa[mk][1] = pack2<T>(st[mk][2 * kk][2], st[mk][2 * kk][3]);
        pa[mk][2] = pack2<T>(st[mk][2 * kk + 1][0], st[mk][2 * kk + 1][1]);
        pa[mk][3] = pack2<T>(st[mk][2 * kk + 1][2], st[mk][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, q + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                        (lane >> 4) * 8);
#pragma unroll
        for (int mk = 0; mk < 2; ++mk) {
          mma16816<T>(dk[mk][2 * nd], pa[mk], b[0], b[1]);
          mma16816<T>(dk[mk][2 * nd + 1], pa[mk], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait_all();

  T* gk = static_cast<T*>(a.dk);
  T* gv = static_cast<T*>(a.dv);
#pragma unroll
  for (int mk = 0; mk < 2; ++mk)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = warp * 32 + mk * 16 + g + 8 * i;
      if (j >= keys) continue;
      const int64_t base = int64_t(s.k_start + c0 + j) * ldk + int64_t(hk) * D;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        if (gk)
          *reinterpret_cast<uint32_t*>(gk + base + nd * 8 + 2 * t) =
              pack2<T>(dk[mk][nd][2 * i] * a.scale, dk[mk][nd][2 * i + 1] * a.scale);
        if (gv)
          *reinterpret_cast<uint32_t*>(gv + base + nd * 8 + 2 * t) =
              pack2<T>(dv[mk][nd][2 * i], dv[mk][nd][2 * i + 1]);
      }
    }
}

// dq = scale * dq_accum, in the input type.
template <class T>
__global__ void dq_convert_kernel(const float* __restrict__ acc, T* __restrict__ dq, int64_t n,
                                  float scale) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    dq[i] = from_f<T>(acc[i] * scale);
}

// fa_bwd_dq_kernel: one CTA per (64 query rows, head, sequence), warp w owns rows 16w..16w+15
// and keeps dQ [16 x D] in registers; K/V tiles of 64 keys double-buffered. Per tile:
//   S = Q K^T, dP = dO V^T (A from Q / dO rows, B from K / V rows), P = exp(scale S - lse),
//   dS = P (dP - Delta), dQ += dS K (A = dS packed, B = K via ldmatrix.trans).
// dS = P (dP - Delta) of one 64-key tile, in place of S (the dQ kernels of 64 rows): P = 2^(S
// sl2 - lse) for this thread's rows row_a, row_b; kMask zeroes keys past the sequence's end and
// right of the causal diagonal (only the tiles that need it pay for the index tests).
template <bool kMask>
__device__ __forceinline__ void dq_dscores(float (&sc)[kFaBN / 8][4],
                                           const float (&dp)[kFaBN / 8][4], const float (&lse2)[2],
                                           const float (&dl)[2], float sl2, int c0, int t,
                                           int row_a, int row_b, int len_k, bool causal, int off) {
#pragma unroll
  for (int nb = 0; nb < kFaBN / 8; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float p = ex2_ftz(fmaf(sc[nb][e], sl2, -lse2[e >> 1]));
      if constexpr (kMask) {
        const int col = c0 + nb * 8 + 2 * t + (e & 1);
        const int row = e < 2 ? row_a : row_b;
        if (col >= len_k || (causal && col > row + off)) p = 0.f;
      }
      sc[nb][e] = p * (dp[nb][e] - dl[e >> 1]);
    }
}

// The body is shared by two entry points that differ only in their launch bounds (below).
template <class T, int D>
__device__ __forceinline__ void fa_bwd_dq_body(const Args& a) {
  constexpr int LDS = kFaLds<D>;
  constexpr int kTile = 64 * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sQ = reinterpret_cast<T*>(fa_smem);  // [64][LDS]
  T* sG = sQ + kTile;                     // [64][LDS] dO
  T* sK = sG + kTile;                     // [2][64][LDS]
  T* sV = sK + 2 * kTile;                 // [2][64][LDS]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rows = min(kFaBM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + kFaBN - 1) / kFaBN;
  fa_load<T, D>(sQ, qbase + qoff, ldq, rows, qbase);
  fa_load<T, D>(sG, static_cast<const T*>(a.dout) + qoff, ldq, rows, qbase);
  if (ntiles > 0) {
    fa_load<T, D>(sK, k, ldk, min(kFaBN, col_end), qbase);
    fa_load<T, D>(sV, v, ldk, min(kFaBN, col_end), qbase);
  }
  cp_async_commit();

  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;
  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;  // within the sequence
  float lse2[2], dl[2];
  fa_row_stats(lse2, dl, a, h, s.q_start + r0, warp * 16 + g, rows);
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int jt = 0; jt < ntiles; ++jt) {
    const int c0 = jt * kFaBN, buf = jt & 1;
    cp_async_wait_all();
    __syncthreads();  // tile jt landed; buffer buf ^ 1 (tile jt - 1) is no longer read
    if (jt + 1 < ntiles) {
      const int valid = min(kFaBN, col_end - c0 - kFaBN);
      fa_load<T, D>(sK + (buf ^ 1) * kTile, k + int64_t(c0 + kFaBN) * ldk, ldk, valid, qbase);
      fa_load<T, D>(sV + (buf ^ 1) * kTile, v + int64_t(c0 + kFaBN) * ldk, ldk, valid, qbase);
    }
    cp_async_commit();
    const T* kt = sK + buf * kTile;
    const T* vt = sV + buf * kTile;

    float sc[kFaBN / 8][4], dp[kFaBN / 8][4];
#pragma unroll
    for (int i = 0; i < kFaBN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], ga[4];
      ldsm_x4(qa, sQ + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(ga, sG + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < kFaBN / 16; ++nb) {
        const int at = (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8;
        uint32_t b[4];
        ldsm_x4(b, kt + at);
        mma16816<T>(sc[2 * nb], qa, b[0], b[1]);
        mma16816<T>(sc[2 * nb + 1], qa, b[2], b[3]);
        ldsm_x4(b, vt + at);
        mma16816<T>(dp[2 * nb], ga, b[0], b[1]);
        mma16816<T>(dp[2 * nb + 1], ga, b[2], b[3]);
      }
    }
    const bool need_mask = c0 + kFaBN > s.len_k || (a.causal && c0 + kFaBN - 1 > r0 + off);
    // dS = P (dP - Delta); the per-element index tests only on the tiles that need them.
    if (need_mask)
      dq_dscores<true>(sc, dp, lse2, dl, sl2, c0, t, row_a, row_b, s.len_k, a.causal, off);
    else
      dq_dscores<false>(sc, dp, lse2, dl, sl2, c0, t, row_a, row_b, s.len_k, a.causal, off);
#pragma unroll
    for (int kk = 0; kk < kFaBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, kt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
        mma16816<T>(dq[2 * nd], pa, b[0], b[1]);
        mma16816<T>(dq[2 * nd + 1], pa, b[2], b[3]);
      }
    }
  }
  cp_async_wait_all();

  T* gq = static_cast<T*>(a.dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    if (r >= rows) continue;
    T* row = gq + int64_t(s.q_start + r0 + r) * ldq + int64_t(h) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(row + nd * 8 + 2 * t) =
          pack2<T>(dq[nd][2 * i] * a.scale, dq[nd][2 * i + 1] * a.scale);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kFaThreads) fa_bwd_dq_kernel(Args a) {
  fa_bwd_dq_body<T, D>(a);
}
// At D = 64: 4 resident CTAs per SM (its 55 KB of shared memory allow 4) asked of ptxas caps the
// registers at 128, which it fits without spilling (the leaner softmax had raised it to 164).
template <class T, int D>
__global__ void __launch_bounds__(kFaThreads, 4) fa_bwd_dq_kernel_occ4(Args a) {
  fa_bwd_dq_body<T, D>(a);
}

// fa_bwd_dq_kernel_1buf (backward variant 1 at D = 128): fa_bwd_dq_kernel with one K and one V
// buffer: 4 tiles, 70 KB of shared memory instead of 104 KB, so 3 CTAs fit per SM instead of 2
// (the 168 registers allow 3). V_{j+1} loads once every warp has formed dP_j, K_{j+1} once every
// warp is done with dQ += dS K_j; the loop top waits for both.
template <class T, int D>
__global__ void __launch_bounds__(kFaThreads, 3) fa_bwd_dq_kernel_1buf(Args a) {
  constexpr int LDS = kFaLds<D>;
  constexpr int kTile = 64 * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sQ = reinterpret_cast<T*>(fa_smem);  // [64][LDS]
  T* sG = sQ + kTile;                     // [64][LDS] dO
  T* sK = sG + kTile;                     // [64][LDS]
  T* sV = sK + kTile;                     // [64][LDS]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rows = min(kFaBM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + kFaBN - 1) / kFaBN;
  fa_load<T, D>(sQ, qbase + qoff, ldq, rows, qbase);
  fa_load<T, D>(sG, static_cast<const T*>(a.dout) + qoff, ldq, rows, qbase);
  if (ntiles > 0) {
    fa_load<T, D>(sK, k, ldk, min(kFaBN, col_end), qbase);
    fa_load<T, D>(sV, v, ldk, min(kFaBN, col_end), qbase);
  }
  cp_async_commit();

  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;
  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;  // within the sequence
  float lse2[2], dl[2];
  fa_row_stats(lse2, dl, a, h, s.q_start + r0, warp * 16 + g, rows);
  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int jt = 0; jt < ntiles; ++jt) {
    const int c0 = jt * kFaBN;
    cp_async_wait_all();
    __syncthreads();  // K_j and V_j landed for every thread
    const T* kt = sK;
    const T* vt = sV;

    float sc[kFaBN / 8][4], dp[kFaBN / 8][4];
#pragma unroll
    for (int i = 0; i < kFaBN / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[4], ga[4];
      ldsm_x4(qa, sQ + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
      ldsm_x4(ga, sG + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);
#pragma unroll
      for (int nb = 0; nb < kFaBN / 16; ++nb) {
        const int at = (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8;
        uint32_t b[4];
        ldsm_x4(b, kt + at);
        mma16816<T>(sc[2 * nb], qa, b[0], b[1]);
        mma16816<T>(sc[2 * nb + 1], qa, b[2], b[3]);
        ldsm_x4(b, vt + at);
        mma16816<T>(dp[2 * nb], ga, b[0], b[1]);
        mma16816<T>(dp[2 * nb + 1], ga, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp has read V_j
    if (jt + 1 < ntiles)
      fa_load<T, D>(sV, v + int64_t(c0 + kFaBN) * ldk, ldk, min(kFaBN, col_end - c0 - kFaBN),
                    qbase);
    cp_async_commit();
    const bool need_mask = c0 + kFaBN > s.len_k || (a.causal && c0 + kFaBN - 1 > r0 + off);
    // dS = P (dP - Delta); the per-element index tests only on the tiles that need them.
    if (need_mask)
      dq_dscores<true>(sc, dp, lse2, dl, sl2, c0, t, row_a, row_b, s.len_k, a.causal, off);
    else
      dq_dscores<false>(sc, dp, lse2, dl, sl2, c0, t, row_a, row_b, s.len_k, a.causal, off);
#pragma unroll
    for (int kk = 0; kk < kFaBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(sc[2 * kk][0], sc[2 * kk][1]);
      pa[1] = pack2<T>(sc[2 * kk][2], sc[2 * kk][3]);
      pa[2] = pack2<T>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[3] = pack2<T>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, kt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
        mma16816<T>(dq[2 * nd], pa, b[0], b[1]);
        mma16816<T>(dq[2 * nd + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp has read K_j
    if (jt + 1 < ntiles)
      fa_load<T, D>(sK, k + int64_t(c0 + kFaBN) * ldk, ldk, min(kFaBN, col_end - c0 - kFaBN),
                    qbase);
    cp_async_commit();
  }
  cp_async_wait_all();

  T* gq = static_cast<T*>(a.dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + g + 8 * i;
    if (r >= rows) continue;
    T* row = gq + int64_t(s.q_start + r0 + r) * ldq + int64_t(h) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(row + nd * 8 + 2 * t) =
          pack2<T>(dq[nd][2 * i] * a.scale, dq[nd][2 * i + 1] * a.scale);
  }
}

// fa_bwd_dq_ma2_kernel (backward variant 4): fa_bwd_dq_kernel with 128 query rows per CTA, warp w
// owning rows 32w..32w+31 as two 16-row m-blocks, and key tiles of 32 (double-buffered): every
// K / V fragment read from shared memory feeds two products instead of one, and dQ's K^T
// fragments too (0.42 ldmatrix.x4 per MMA instead of 0.58). dQ: 2 x [16 rows x D] per warp.
constexpr int kDq2BM = 128;  // query rows per CTA
constexpr int kDq2BN = 32;   // keys per tile

template <class T, int D>
__device__ __forceinline__ void fa_bwd_dq_ma2_body(const Args& a) {
  constexpr int LDS = kFaLds<D>;
  constexpr int BM = kDq2BM, BN = kDq2BN;
  constexpr int kQTile = BM * LDS, kKTile = BN * LDS;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sQ = reinterpret_cast<T*>(fa_smem);  // [128][LDS]
  T* sG = sQ + kQTile;                    // [128][LDS] dO
  T* sK = sG + kQTile;                    // [2][32][LDS]
  T* sV = sK + 2 * kKTile;                // [2][32][LDS]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int rows = min(BM, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + BN - 1) / BN;
  fa_load_rows<T, BM, D>(sQ, qbase + qoff, ldq, rows, qbase);
  fa_load_rows<T, BM, D>(sG, static_cast<const T*>(a.dout) + qoff, ldq, rows, qbase);
  if (ntiles > 0) {
    fa_load_rows<T, BN, D>(sK, k, ldk, min(BN, col_end), qbase);
    fa_load_rows<T, BN, D>(sV, v, ldk, min(BN, col_end), qbase);
  }
  cp_async_commit();

  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;
  // This thread's accumulator rows (within the CTA): m-block am, i = 0 (row g) or 1 (row g + 8).
  auto row_in = [&](int am, int i) { return warp * 32 + am * 16 + g + 8 * i; };
  float lse2[2][2], dl[2][2];
#pragma unroll
  for (int am = 0; am < 2; ++am)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row_in(am, i);
      const int64_t idx = int64_t(h) * a.nq + s.q_start + r0 + r;
      lse2[am][i] = r < rows ? a.lse[idx] * log2e : INFINITY;
      dl[am][i] = r < rows ? a.delta[idx] : 0.f;
    }
  float dq[2][D / 8][4];
#pragma unroll
  for (int am = 0; am < 2; ++am)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) dq[am][i][0] = dq[am][i][1] = dq[am][i][2] = dq[am][i][3] = 0.f;

  for (int jt = 0; jt < ntiles; ++jt) {
    const int c0 = jt * BN, buf = jt & 1;
    cp_async_wait_all();
    __syncthreads();  // tile jt landed; buffer buf ^ 1 (tile jt - 1) is no longer read
    if (jt + 1 < ntiles) {
      const int valid = min(BN, col_end - c0 - BN);
      fa_load_rows<T, BN, D>(sK + (buf ^ 1) * kKTile, k + int64_t(c0 + BN) * ldk, ldk, valid,
                             qbase);
      fa_load_rows<T, BN, D>(sV + (buf ^ 1) * kKTile, v + int64_t(c0 + BN) * ldk, ldk, valid,
                             qbase);
    }
    cp_async_commit();
    const T* kt = sK + buf * kKTile;
    const T* vt = sV + buf * kKTile;

    float sc[2][BN / 8][4], dp[2][BN / 8][4];
#pragma unroll
    for (int am = 0; am < 2; ++am)
#pragma unroll
      for (int i = 0; i < BN / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[am][i][e] = dp[am][i][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[2][4], ga[2][4];
#pragma unroll
      for (int am = 0; am < 2; ++am) {
        const int at = (warp * 32 + am * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8;
        ldsm_x4(qa[am], sQ + at);
        ldsm_x4(ga[am], sG + at);
      }
#pragma unroll
      for (int nb = 0; nb < BN / 16; ++nb) {
        const int at = (nb * 16 + (lane & 7) + (lane >> 4) * 8) * LDS + kk * 16 +
                       ((lane >> 3) & 1) * 8;
        uint32_t b[4];
        ldsm_x4(b, kt + at);
#pragma unroll
        for (int am = 0; am < 2; ++am) {
          mma16816<T>(sc[am][2 * nb], qa[am], b[0], b[1]);
          mma16816<T>(sc[am][2 * nb + 1], qa[am], b[2], b[3]);
        }
        ldsm_x4(b, vt + at);
#pragma unroll
        for (int am = 0; am < 2; ++am) {
          mma16816<T>(dp[am][2 * nb], ga[am], b[0], b[1]);
          mma16816<T>(dp[am][2 * nb + 1], ga[am], b[2], b[3]);
        }
      }
    }
    const bool need_mask = c0 + BN > s.len_k || (a.causal && c0 + BN - 1 > r0 + off);
    auto dscores = [&](auto mask_tag) {
#pragma unroll
      for (int am = 0; am < 2; ++am)
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            float p = ex2_ftz(fmaf(sc[am][nb][e], sl2, -lse2[am][e >> 1]));
            if constexpr (decltype(mask_tag)::value) {
              const int col = c0 + nb * 8 + 2 * t + (e & 1);
              const int row = r0 + row_in(am, e >> 1);
              if (col >= s.len_k || (a.causal && col > row + off)) p = 0.f;
            }
            sc[am][nb][e] = p * (dp[am][nb][e] - dl[am][e >> 1]);
          }
    };
    if (need_mask) dscores(std::true_type{});
    else dscores(std::false_type{});
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t pa[2][4];
#pragma unroll
      for (int am = 0; am < 2; ++am) {
        pa[am][0] = pack2<T>(sc[am][2 * kk][0], sc[am][2 * kk][1]);
        pa[am][1] = pack2<T>(sc[am][2 * kk][2], sc[am][2 * kk][3]);
        pa[am][2] = pack2<T>(sc[am][2 * kk + 1][0], sc[am][2 * kk + 1][1]);
        pa[am][3] = pack2<T>(sc[am][2 * kk + 1][2], sc[am][2 * kk + 1][3]);
      }
#pragma unroll
      for (int nd = 0; nd < D / 16; ++nd) {
        uint32_t b[4];
        ldsm_x4_t(b, kt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LDS + nd * 16 +
                         (lane >> 4) * 8);
#pragma unroll
        for (int am = 0; am < 2; ++am) {
          mma16816<T>(dq[am][2 * nd], pa[am], b[0], b[1]);
          mma16816<T>(dq[am][2 * nd + 1], pa[am], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait_all();

  T* gq = static_cast<T*>(a.dq);
#pragma unroll
  for (int am = 0; am < 2; ++am)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = row_in(am, i);
      if (r >= rows) continue;
      T* row = gq + int64_t(s.q_start + r0 + r) * ldq + int64_t(h) * D;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd)
        *reinterpret_cast<uint32_t*>(row + nd * 8 + 2 * t) =
            pack2<T>(dq[am][nd][2 * i] * a.scale, dq[am][nd][2 * i + 1] * a.scale);
    }
}

template <class T, int D>
__global__ void __launch_bounds__(kFaThreads) fa_bwd_dq_ma2_kernel(Args a) {
  fa_bwd_dq_ma2_body<T, D>(a);
}
// Backward variant 5 at D = 64: the same with 3 resident CTAs per SM asked of ptxas (at most 168
// registers; the plain kernel uses 214, so 2 CTAs per SM), shared memory (55 KB) allows 4.
template <class T, int D>
__global__ void __launch_bounds__(kFaThreads, 3) fa_bwd_dq_ma2_occ3_kernel(Args a) {
  fa_bwd_dq_ma2_body<T, D>(a);
}

// One warpgroup MMA of each kind the wgmma kernels use, for wgmma_probe (a test hook): a and b are
// [64][64] row-major, loaded as the kernels load tiles (b always, a for which 2, into the
// core-matrix layout); k-step kk (reduction columns or rows 16 kk .. 16 kk + 15).
//   which 0: D[m][n] = sum_k A[m][16 kk + k] B[n][16 kk + k], A fragments in registers, B K-major
//            (the forward's S = Q K^T)
//   which 1: D[m][n] = sum_k A[m][16 kk + k] B[16 kk + k][n], B transposed (O += P V)
//   which 2: as 0 with A from shared memory, K-major (the backward's S^T = K Q^T)
// D is written through the accumulator layout the kernels assume.
template <class T>
__global__ void __launch_bounds__(128)
    wgmma_probe_kernel(int which, int kk, const T* a, const T* b, float* d) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ __align__(16) T sA[64 * 64];
  __shared__ __align__(16) T sB[64 * 64];
  fa_wg_load_tile<T, 64, 128>(sB, b, 64, 64, b);
  fa_wg_load_tile<T, 64, 128>(sA, a, 64, 64, a);
  cp_async_commit();
  cp_async_wait_all();
  fence_proxy_async_smem();
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  // The m16n8k16 A fragment of rows 16 w .. 16 w + 15, columns 16 kk .. 16 kk + 15.
  auto at = [&](int r, int c) { return a + (warp * 16 + r) * 64 + kk * 16 + c; };
  uint32_t af[4];
  af[0] = pack2<T>(to_f(at(g, 2 * t)[0]), to_f(at(g, 2 * t)[1]));
  af[1] = pack2<T>(to_f(at(g + 8, 2 * t)[0]), to_f(at(g + 8, 2 * t)[1]));
  af[2] = pack2<T>(to_f(at(g, 2 * t + 8)[0]), to_f(at(g, 2 * t + 8)[1]));
  af[3] = pack2<T>(to_f(at(g + 8, 2 * t + 8)[0]), to_f(at(g + 8, 2 * t + 8)[1]));
  constexpr uint32_t kGroupBytes = 64 * 16;
  float acc[32];
  wgmma_fence();
  if (which == 0)
    wgmma_rs<T, 64, 0>(acc, af, wgmma_desc(sB, 128, kGroupBytes) + 16 * kk, 0);
  else if (which == 1)
    wgmma_rs<T, 64, 1>(acc, af,
                       wgmma_desc(sB, kGroupBytes, 128) + uint64_t(kk) * (2 * kGroupBytes >> 4), 0);
  else
    wgmma_ss64<T>(acc, wgmma_desc(sA, 128, kGroupBytes) + 16 * kk,
                  wgmma_desc(sB, 128, kGroupBytes) + 16 * kk, 0);
  wgmma_commit();
  wgmma_wait_all();
  reg_fence(acc);
#pragma unroll
  for (int i = 0; i < 32; ++i)
    d[(warp * 16 + g + 8 * ((i >> 1) & 1)) * 64 + (i >> 2) * 8 + 2 * t + (i & 1)] = acc[i];
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// ---- fast path backward on Hopper: warpgroup MMAs (wgmma, sm_90a) -----------------------------
//
// The deterministic backward (fa_bwd_dkdv_body with kAtomic 0 / 3, fa_bwd_dq_body) with its
// products as warpgroup MMAs; WG warpgroups (128 threads each) per CTA, warpgroup w owning 64 keys
// (dK/dV) or query rows (dQ) of the CTA's 64 WG, its warp v rows 16 v .. 16 v + 15 of them, as
// there; the streamed tiles (Q/dO, or K/V) are shared by the warpgroups. Every tile (K, V, Q, dO)
// sits in shared memory in the forward's core-matrix layout (fa_wg_load_tile), which serves both as
// a K-major operand (descriptor LBO 128, SBO 16 D: the reduction runs along D) and as an N-major
// one (.trans, LBO 16 D, SBO 128: the reduction runs along the tile's rows), so no tile is stored
// twice:
//   dK/dV (M = 64 keys):  S^T = K Q^T and dP^T = V dO^T   (A, B from shared memory, K-major)
//                         dV += P^T dO, dK += dS^T Q      (A = P^T / dS^T in registers, B .trans)
//   dQ (M = 64 rows):     S = Q K^T and dP = dO V^T       (shared memory, K-major)
//                         dQ += dS K                      (A = dS in registers, B .trans)
// S^T and dP^T (S and dP) are issued together and awaited together; each accumulate is awaited
// before its A registers are rewritten. Masking, probabilities, Delta, the epilogues and the
// split over query heads (kSplit, with dkv_reduce_kernel) are the mma.sync kernels'.
template <class T, int D, bool kSplit, int WG>
__global__ void __launch_bounds__(128 * WG) fa_bwd_dkdv_wgmma_kernel(Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = 128 * WG, kKeys = 64 * WG;  // threads; keys per CTA (64 per warpgroup)
  constexpr int kT = kWgBN * D;                  // elements of a 64-row tile
  constexpr uint32_t kGroupBytes = D * 16;       // 8 rows of a tile
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sK = reinterpret_cast<T*>(fa_smem);              // [WG][64 keys x D]
  T* sV = sK + WG * kT;                               // [WG][64 keys x D]
  T* sQ = sV + WG * kT;                               // [2][64 rows x D], shared by the warpgroups
  T* sG = sQ + 2 * kT;                                // [2][64 rows x D] dO
  float* sL = reinterpret_cast<float*>(sG + 2 * kT);  // [2][64] lse in log2 units
  float* sDl = sL + 2 * kBwdBM;                       // [2][64] Delta
  SeqDesc s;
  int c0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, c0);
  const int group = a.H / a.Hkv;
  const int hk = kSplit ? int(blockIdx.y) / group : int(blockIdx.y);
  const int h_first = kSplit ? int(blockIdx.y) : hk * group, n_heads = kSplit ? 1 : group;
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int keys = min(kKeys, s.len_k - c0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const T* gbase = static_cast<const T*>(a.dout);
  const int64_t koff = int64_t(s.k_start + c0) * ldk + int64_t(hk) * D;
#pragma unroll
  for (int w = 0; w < WG; ++w) {
    const int64_t wo = koff + int64_t(w) * 64 * ldk;
    fa_wg_load_tile<T, D, NT>(sK + w * kT, static_cast<const T*>(a.k) + wo, ldk, keys - w * 64,
                              qbase);
    fa_wg_load_tile<T, D, NT>(sV + w * kT, static_cast<const T*>(a.v) + wo, ldk, keys - w * 64,
                              qbase);
  }

  const int first_row = a.causal ? max(0, c0 - off) : 0;
  const int nrt = s.len_q > first_row ? (s.len_q - first_row + kBwdBM - 1) / kBwdBM : 0;
  const int n_it = n_heads * nrt;
  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;
  auto load_it = [&](int it, int buf) {
    const int h = h_first + it / nrt, r0 = first_row + (it % nrt) * kBwdBM;
    const int rows = min(kBwdBM, s.len_q - r0);
    const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
    fa_wg_load_tile<T, D, NT>(sQ + buf * kT, qbase + qoff, ldq, rows, qbase);
    fa_wg_load_tile<T, D, NT>(sG + buf * kT, gbase + qoff, ldq, rows, qbase);
    fa_stage_stats<kBwdBM, NT>(sL + buf * kBwdBM, sDl + buf * kBwdBM, a, h,
                                  s.q_start + r0, rows);
  };
  if (n_it > 0) load_it(0, 0);
  cp_async_commit();

  float dk[D / 2], dv[D / 2];  // [4 nd + e]: column 8 nd + 2 t + (e & 1), key row g + 8 (e >> 1)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  const int key_a = c0 + wg * 64 + warp * 16 + g, key_b = key_a + 8;
  const uint64_t k_desc = wgmma_desc(sK + wg * kT, 128, kGroupBytes);
  const uint64_t v_desc = wgmma_desc(sV + wg * kT, 128, kGroupBytes);

  for (int it = 0; it < n_it; ++it) {
    const int buf = it & 1;
    const int r0 = first_row + (it % nrt) * kBwdBM;
    cp_async_wait_all();
    fence_proxy_async_smem();
    __syncthreads();  // tile `it` landed; buffer buf ^ 1 (tile it - 1) is no longer read
    if (it + 1 < n_it) load_it(it + 1, buf ^ 1);
    cp_async_commit();
    const T* q = sQ + buf * kT;
    const T* go = sG + buf * kT;
    const float* lse2 = sL + buf * kBwdBM;
    const float* dl = sDl + buf * kBwdBM;
    const uint64_t q_desc = wgmma_desc(q, 128, kGroupBytes),
                   q_desc_t = wgmma_desc(q, kGroupBytes, 128);
    const uint64_t g_desc = wgmma_desc(go, 128, kGroupBytes),
                   g_desc_t = wgmma_desc(go, kGroupBytes, 128);

    // st[4 nb + e]: S^T, then P^T, then dS^T at key row g + 8 (e >> 1), query column 8 nb + 2 t +
    // (e & 1) of the tile; dpt the same for dP^T.
    // Three groups in flight at most, each awaited only where its result is needed: P^T is
    // formed while dP^T is computed, dS^T while dV accumulates.
    float st[kBwdBM / 2], dpt[kBwdBM / 2];
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss64<T>(st, k_desc + 16 * kk, q_desc + 16 * kk, kk);
    wgmma_commit();  // group: S^T
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss64<T>(dpt, v_desc + 16 * kk, g_desc + 16 * kk, kk);
    wgmma_commit();   // group: dP^T
    wgmma_wait<1>();  // S^T landed
    reg_fence(st);

    const bool need_mask =
        r0 + kBwdBM > s.len_q || c0 + kKeys > s.len_k || (a.causal && c0 + kKeys - 1 > r0 + off);
    auto probs = [&](auto mask_tag) {
#pragma unroll
      for (int i = 0; i < kBwdBM / 2; ++i) {
        const int col = (i >> 2) * 8 + 2 * t + (i & 1);  // query row within the tile
        float p = ex2_ftz(fmaf(st[i], sl2, -lse2[col]));
        if constexpr (decltype(mask_tag)::value) {
          const int r = r0 + col, c = (i >> 1) & 1 ? key_b : key_a;
          if (r >= s.len_q || c >= s.len_k || (a.causal && c > r + off)) p = 0.f;
        }
        st[i] = p;
      }
    };
    if (need_mask)
      probs(std::true_type{});
    else
      probs(std::false_type{});

    // A fragments: P^T for dV (read by its wgmma until it lands), dS^T for dK.
    uint32_t pa[kBwdBM / 16][4], pb[kBwdBM / 16][4];
    auto pack = [&](uint32_t(&f)[kBwdBM / 16][4]) {
#pragma unroll
      for (int kk = 0; kk < kBwdBM / 16; ++kk)
#pragma unroll
        for (int r = 0; r < 4; ++r) f[kk][r] = pack2<T>(st[8 * kk + 2 * r], st[8 * kk + 2 * r + 1]);
    };
    // dV += P^T dO
    pack(pa);
    reg_fence(dv);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBwdBM / 16; ++kk)
      wgmma_rs<T, D, 1>(dv, pa[kk], g_desc_t + uint64_t(kk) * (2 * kGroupBytes >> 4), 1);
    wgmma_commit();   // group: dV
    wgmma_wait<1>();  // dP^T landed; dV may still run
    reg_fence(dpt);
    // dS^T = P^T (dP^T - Delta), then dK += dS^T Q (scaled at the end)
#pragma unroll
    for (int i = 0; i < kBwdBM / 2; ++i) st[i] *= dpt[i] - dl[(i >> 2) * 8 + 2 * t + (i & 1)];
    pack(pb);
    reg_fence(dk);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBwdBM / 16; ++kk)
      wgmma_rs<T, D, 1>(dk, pb[kk], q_desc_t + uint64_t(kk) * (2 * kGroupBytes >> 4), 1);
    wgmma_commit();    // group: dK, queued behind dV (neither touches the other's registers)
    wgmma_wait_all();  // dV and dK landed, before the next tile's barrier: its loads overwrite buf
    reg_fence(dv);
    reg_fence(dk);
  }
  cp_async_wait_all();

  T* gk = static_cast<T*>(a.dk);
  T* gv = static_cast<T*>(a.dv);
  const int64_t part_off = kSplit ? int64_t(h_first % group) * a.nk * ldk : 0;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int j = wg * 64 + warp * 16 + g + 8 * i;
    if (j >= keys) continue;
    const int64_t base = int64_t(s.k_start + c0 + j) * ldk + int64_t(hk) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd) {
      const float k0 = dk[4 * nd + 2 * i], k1 = dk[4 * nd + 2 * i + 1];
      const float v0 = dv[4 * nd + 2 * i], v1 = dv[4 * nd + 2 * i + 1];
      if constexpr (kSplit) {
        if (a.dk_part)
          *reinterpret_cast<float2*>(a.dk_part + part_off + base + nd * 8 + 2 * t) =
              make_float2(k0, k1);
        if (a.dv_part)
          *reinterpret_cast<float2*>(a.dv_part + part_off + base + nd * 8 + 2 * t) =
              make_float2(v0, v1);
      } else {
        if (gk)
          *reinterpret_cast<uint32_t*>(gk + base + nd * 8 + 2 * t) =
              pack2<T>(k0 * a.scale, k1 * a.scale);
        if (gv) *reinterpret_cast<uint32_t*>(gv + base + nd * 8 + 2 * t) = pack2<T>(v0, v1);
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // device code without sm_90a's wgmma: the host never launches this; fail loudly
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <class T, int D, int WG>
__global__ void __launch_bounds__(128 * WG) fa_bwd_dq_wgmma_kernel(Args a) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NT = 128 * WG, kRows = 64 * WG;  // threads; query rows per CTA
  constexpr int kT = kWgBN * D;
  constexpr uint32_t kGroupBytes = D * 16;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  T* sQ = reinterpret_cast<T*>(fa_smem);  // [WG][64 rows x D]
  T* sG = sQ + WG * kT;                   // [WG][64 rows x D] dO
  T* sK = sG + WG * kT;                   // [2][64 keys x D], shared by the warpgroups
  T* sV = sK + 2 * kT;                    // [2][64 keys x D]
  SeqDesc s;
  int r0;
  tile_of(a.map, blockIdx.x, gridDim.x, blockIdx.z, s, r0);
  const int h = blockIdx.y, hk = h / (a.H / a.Hkv);
  const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rows = min(kRows, s.len_q - r0), off = s.len_k - s.len_q;
  const int64_t ldq = int64_t(a.H) * D, ldk = int64_t(a.Hkv) * D;
  const T* qbase = static_cast<const T*>(a.q);
  const int64_t qoff = int64_t(s.q_start + r0) * ldq + int64_t(h) * D;
  const T* k = static_cast<const T*>(a.k) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const T* v = static_cast<const T*>(a.v) + int64_t(s.k_start) * ldk + int64_t(hk) * D;
  const int col_end = visible_end(s, r0, rows, a.causal);
  const int ntiles = (col_end + kWgBN - 1) / kWgBN;
#pragma unroll
  for (int w = 0; w < WG; ++w) {
    const int64_t wo = qoff + int64_t(w) * 64 * ldq;
    fa_wg_load_tile<T, D, NT>(sQ + w * kT, qbase + wo, ldq, rows - w * 64, qbase);
    fa_wg_load_tile<T, D, NT>(sG + w * kT, static_cast<const T*>(a.dout) + wo, ldq, rows - w * 64,
                              qbase);
  }
  if (ntiles > 0) {
    fa_wg_load_tile<T, D, NT>(sK, k, ldk, min(kWgBN, col_end), qbase);
    fa_wg_load_tile<T, D, NT>(sV, v, ldk, min(kWgBN, col_end), qbase);
  }
  cp_async_commit();

  const float log2e = 1.4426950408889634f, sl2 = a.scale * log2e;
  const int wrow = wg * 64 + warp * 16;                // this warp's first row in the CTA's block
  const int row_a = r0 + wrow + g, row_b = row_a + 8;  // within the sequence
  float lse2[2], dl[2];
  fa_row_stats(lse2, dl, a, h, s.q_start + r0, wrow + g, rows);
  float dq[D / 2];  // [4 nd + e]: column 8 nd + 2 t + (e & 1), row g + 8 (e >> 1)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dq[i] = 0.f;
  const uint64_t q_desc = wgmma_desc(sQ + wg * kT, 128, kGroupBytes);
  const uint64_t g_desc = wgmma_desc(sG + wg * kT, 128, kGroupBytes);

  for (int jt = 0; jt < ntiles; ++jt) {
    const int c0 = jt * kWgBN, buf = jt & 1;
    cp_async_wait_all();
    fence_proxy_async_smem();
    __syncthreads();  // tile jt landed; buffer buf ^ 1 (tile jt - 1) is no longer read
    if (jt + 1 < ntiles) {
      const int valid = min(kWgBN, col_end - c0 - kWgBN);
      fa_wg_load_tile<T, D, NT>(sK + (buf ^ 1) * kT, k + int64_t(c0 + kWgBN) * ldk, ldk, valid,
                                qbase);
      fa_wg_load_tile<T, D, NT>(sV + (buf ^ 1) * kT, v + int64_t(c0 + kWgBN) * ldk, ldk, valid,
                                qbase);
    }
    cp_async_commit();
    const T* kt = sK + buf * kT;
    const uint64_t k_desc = wgmma_desc(kt, 128, kGroupBytes),
                   k_desc_t = wgmma_desc(kt, kGroupBytes, 128);
    const uint64_t v_desc = wgmma_desc(sV + buf * kT, 128, kGroupBytes);

    float sc[kWgBN / 2],
        dp[kWgBN / 2];  // [4 nb + e]: key column 8 nb + 2 t + (e & 1), row g + 8 (e >> 1)
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss64<T>(sc, q_desc + 16 * kk, k_desc + 16 * kk, kk);
    wgmma_commit();  // group: S
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss64<T>(dp, g_desc + 16 * kk, v_desc + 16 * kk, kk);
    wgmma_commit();   // group: dP
    wgmma_wait<1>();  // S landed; P is formed while dP is computed
    reg_fence(sc);

    const bool need_mask = c0 + kWgBN > s.len_k || (a.causal && c0 + kWgBN - 1 > r0 + off);
    auto probs = [&](auto mask_tag) {
#pragma unroll
      for (int i = 0; i < kWgBN / 2; ++i) {
        const int e2 = (i >> 1) & 1;
        float p = ex2_ftz(fmaf(sc[i], sl2, -lse2[e2]));
        if constexpr (decltype(mask_tag)::value) {
          const int col = c0 + (i >> 2) * 8 + 2 * t + (i & 1);
          const int row = e2 ? row_b : row_a;
          if (col >= s.len_k || (a.causal && col > row + off)) p = 0.f;
        }
        sc[i] = p;
      }
    };
    if (need_mask)
      probs(std::true_type{});
    else
      probs(std::false_type{});
    wgmma_wait_all();  // dP landed
    reg_fence(dp);
    // dS = P (dP - Delta)
#pragma unroll
    for (int i = 0; i < kWgBN / 2; ++i) sc[i] *= dp[i] - dl[(i >> 1) & 1];
    uint32_t pa[kWgBN / 16][4];
#pragma unroll
    for (int kk = 0; kk < kWgBN / 16; ++kk)
#pragma unroll
      for (int r = 0; r < 4; ++r) pa[kk][r] = pack2<T>(sc[8 * kk + 2 * r], sc[8 * kk + 2 * r + 1]);
    reg_fence(dq);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kWgBN / 16; ++kk)
      wgmma_rs<T, D, 1>(dq, pa[kk], k_desc_t + uint64_t(kk) * (2 * kGroupBytes >> 4), 1);
    wgmma_commit();
    wgmma_wait_all();
    reg_fence(dq);
  }
  cp_async_wait_all();

  T* gq = static_cast<T*>(a.dq);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = wrow + g + 8 * i;
    if (r >= rows) continue;
    T* row = gq + int64_t(s.q_start + r0 + r) * ldq + int64_t(h) * D;
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
      *reinterpret_cast<uint32_t*>(row + nd * 8 + 2 * t) =
          pack2<T>(dq[4 * nd + 2 * i] * a.scale, dq[4 * nd + 2 * i + 1] * a.scale);
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // device code without sm_90a's wgmma: the host never launches this; fail loudly
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// ---- host side ------------------------------------------------------------------------------------

// Whether fa_fwd_wgmma_kernel was built (sm_90a) and runs on device dev (compute capability 9.0:
// sm_90a code runs there only).
bool wgmma_built_for(int dev) {
#if defined(FTUNE_CUDA_SM90A)
  // Asked per attention call while the switch is on: the answer is cached per device.
  static std::atomic<int> known[64];  // 0 not asked yet, 1 no, 2 yes
  if (dev >= 0 && dev < 64 && known[dev].load(std::memory_order_relaxed) != 0)
    return known[dev].load(std::memory_order_relaxed) == 2;
  int major = 0, minor = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  const bool yes = major == 9 && minor == 0;
  if (dev >= 0 && dev < 64) known[dev].store(yes ? 2 : 1, std::memory_order_relaxed);
  return yes;
#else
  (void)dev;
  return false;
#endif
}

// 64-row blocks per CTA of the tensor-core forward; 0: the default (1; the benchmark compares 2);
// -1: auto (2 for head_dim 128, and for head_dim 64 when the longest sequence has >= 1024 queries).
// The default is auto: measured faster on an H200 than 64-row CTAs everywhere but short causal
// head_dim-64 sequences (bench/results/gpu_h200.md).
int g_fwd_row_blocks = -1;
// Tensor-core backward variant (set_attention_bwd_variant): 0 the default, 1 more CTAs per SM,
// 2 the leaner atomic dQ (only without determinism), 3 as 1 but dK/dV at D = 64 with 32 keys per
// warp (fa_bwd_dkdv_mk2_kernel), 4 as 3 but dQ by 128-row CTAs over 32-key tiles
// (fa_bwd_dq_ma2_kernel), 5 as 4 but that dQ kernel at D = 64 capped at 168 registers.
// -1 (the default): auto, variant 1 at head_dim 64 and 4 at head_dim 128, the fastest on an H200
// (4-13% over variant 0; bench/results/gpu_h200.md).
int g_bwd_variant = -1;
int g_bwd_split_heads = -1;  // set_attention_bwd_split_heads
int bwd_variant(int64_t head_dim) {
  if (g_bwd_variant >= 0) return g_bwd_variant;
  return head_dim == 64 ? 1 : 4;
}

// The wgmma kernels (set_attention_fwd_wgmma / set_attention_bwd_wgmma): -1 (the default) reads
// FTUNE_ATTN_WGMMA per call ("1" or "all": both passes, "fwd": the forward, "bwd": the
// backward, "2": both passes as mode 2; unset: neither), 0 off, 1 on, 2 on (the forward:
// pipelined, fa_fwd_wgmma_kernel with kPipe; the backward: two warpgroups per CTA);
// taken only where they exist (a build with sm_90a, a compute capability 9.0 device). pass: 1
// the forward, 2 the backward.
int g_fwd_wgmma = -1, g_bwd_wgmma = -1;
// The mode that applies to this call: 0 (mma.sync), 1 or 2.
int wgmma_mode(int dev, int pass) {
  int mode = pass == 1 ? g_fwd_wgmma : g_bwd_wgmma;
  if (mode == -1) {
    const std::string e = std::getenv("FTUNE_ATTN_WGMMA") ? std::getenv("FTUNE_ATTN_WGMMA") : "";
    mode = e == "2"
               ? 2
               : e == "1" || e == "all" || (pass == 1 && e == "fwd") || (pass == 2 && e == "bwd");
  }
  return mode >= 1 && wgmma_built_for(dev) ? mode : 0;
}

// The forward's 64-row blocks per CTA under the current setting.
int fwd_row_blocks(const std::vector<AttnSeq>& seqs, int D) {
  if (g_fwd_row_blocks > 0) return g_fwd_row_blocks;
  if (g_fwd_row_blocks == 0) return 1;
  if (D == 128) return 2;
  int64_t max_q = 0;
  for (const AttnSeq& s : seqs) max_q = std::max(max_q, s.len_q);
  return max_q >= 1024 ? 2 : 1;
}

// Keeps the device copies of the sequence table and the tile list alive until the launch is
// queued (the caching allocator is stream-ordered, so freeing them afterwards is safe).
struct Tables {
  Tensor seqs, tiles;
  TileMap map;
  unsigned nx = 0, nz = 1;  // grid.x (tiles) and grid.z (batch rows)
};

bool uniform_batch(const std::vector<AttnSeq>& seqs) {
  if (seqs.empty()) return false;
  const int64_t tq = seqs[0].len_q, tk = seqs[0].len_k;
  for (size_t i = 0; i < seqs.size(); ++i)
    if (seqs[i].len_q != tq || seqs[i].len_k != tk || seqs[i].q_start != int64_t(i) * tq ||
        seqs[i].k_start != int64_t(i) * tk)
      return false;
  return true;
}

Tensor upload_i32(const std::vector<int32_t>& v, int dev) {
  return Tensor::from_vector(v, {int64_t(v.size())}, Device::cuda(dev));
}

// Tiles of `block` rows (over_keys: keys) of every sequence. Uniform batches launch a
// (tiles, heads, batch) grid without a table; packed sequences upload (seq, first) pairs,
// costliest first (causal tiles late in a sequence see more keys).
Tables make_tiles(const std::vector<AttnSeq>& seqs, int block, bool over_keys, bool causal,
                  int dev) {
  Tables t;
  if (uniform_batch(seqs)) {
    const int64_t n = over_keys ? seqs[0].len_k : seqs[0].len_q;
    t.map.tq = int(seqs[0].len_q);
    t.map.tk = int(seqs[0].len_k);
    t.map.block = block;
    t.map.reverse = causal && !over_keys;
    t.nx = unsigned((n + block - 1) / block);
    t.nz = unsigned(seqs.size());
    return t;
  }
  std::vector<int32_t> sv;
  struct Tile {
    int32_t seq, first;
    int64_t cost;
  };
  std::vector<Tile> tiles;
  for (size_t i = 0; i < seqs.size(); ++i) {
    const AttnSeq& s = seqs[i];
    sv.insert(sv.end(), {int32_t(s.q_start), int32_t(s.len_q), int32_t(s.k_start),
                         int32_t(s.len_k)});
    const int64_t n = over_keys ? s.len_k : s.len_q;
    for (int64_t f = 0; f < n; f += block) {
      const int64_t e = std::min(f + block, n);
      int64_t cost;
      if (over_keys)  // query rows that see keys [f, e)
        cost = causal ? s.len_q - std::clamp<int64_t>(f - (s.len_k - s.len_q), 0, s.len_q)
                      : s.len_q;
      else
        cost = causal ? std::clamp<int64_t>(e + s.len_k - s.len_q, 0, s.len_k) : s.len_k;
      tiles.push_back({int32_t(i), int32_t(f), cost});
    }
  }
  std::stable_sort(tiles.begin(), tiles.end(),
                   [](const Tile& x, const Tile& y) { return x.cost > y.cost; });
  std::vector<int32_t> tv;
  for (const Tile& x : tiles) tv.insert(tv.end(), {x.seq, x.first});
  t.nx = unsigned(tiles.size());
  if (t.nx == 0) return t;
  t.seqs = upload_i32(sv, dev);
  t.tiles = upload_i32(tv, dev);
  t.map.seqs = reinterpret_cast<const SeqDesc*>(t.seqs.raw_data());
  t.map.tiles = reinterpret_cast<const int2*>(t.tiles.raw_data());
  return t;
}

void check_params(const char* op, const AttnParams& p, const std::vector<AttnSeq>& seqs) {
  FTUNE_CHECK(p.head_dim > 0 && p.head_dim <= 256 && p.num_kv_heads > 0 && p.num_heads > 0 &&
                  p.num_heads % p.num_kv_heads == 0,
              "[", op, "] the CUDA kernel takes head_dim 1..256 and query heads a multiple of kv ",
              "heads, got head_dim ", p.head_dim, ", heads ", p.num_heads, "/", p.num_kv_heads);
  FTUNE_CHECK(p.nq * p.num_heads * p.head_dim < (int64_t(1) << 40) && p.nq < INT32_MAX &&
                  p.nk < INT32_MAX && p.num_heads < 65536,
              "[", op, "] too many tokens or heads: nq ", p.nq, ", nk ", p.nk);
  for (const AttnSeq& s : seqs)
    FTUNE_CHECK(s.len_q >= 0 && s.len_k >= 0 && s.q_start >= 0 && s.k_start >= 0 &&
                    s.q_start + s.len_q <= p.nq && s.k_start + s.len_k <= p.nk,
                "[", op, "] sequence outside the tokens: q ", s.q_start, "+", s.len_q, " of ",
                p.nq, ", k ", s.k_start, "+", s.len_k, " of ", p.nk);
}

Args make_args(const AttnParams& p) {
  Args a{};
  a.H = int(p.num_heads);
  a.Hkv = int(p.num_kv_heads);
  a.D = int(p.head_dim);
  a.nq = int(p.nq);
  a.nk = p.nk;
  a.scale = float(p.scale);
  a.causal = p.causal;
  return a;
}

// Per-lane head-dim elements of the general kernels: D <= 32 * NPL.
template <class F>
void dispatch_npl(int D, F&& f) {
  if (D <= 32) f(std::integral_constant<int, 1>{});
  else if (D <= 64) f(std::integral_constant<int, 2>{});
  else if (D <= 128) f(std::integral_constant<int, 4>{});
  else f(std::integral_constant<int, 8>{});
}

bool fast_ok(DType dt, int D, std::initializer_list<const void*> ptrs) {
  if (dt == DType::f32 || (D != 64 && D != 128)) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

void decode_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt, Args a,
                    int dev) {
  // Entries: the sequences with a query. Uniform batches (one query per row) need no table.
  Tables t;
  int64_t max_k = 0;
  if (uniform_batch(seqs)) {
    if (seqs[0].len_q == 0) return;  // no sequence has a query: nothing to write
    t.nz = unsigned(seqs.size());
    t.map.tq = 1;
    t.map.tk = int(seqs[0].len_k);
    t.map.block = 1;
    max_k = seqs[0].len_k;
  } else {
    std::vector<int32_t> sv, tv;
    for (size_t i = 0; i < seqs.size(); ++i) {
      const AttnSeq& s = seqs[i];
      sv.insert(sv.end(), {int32_t(s.q_start), int32_t(s.len_q), int32_t(s.k_start),
                           int32_t(s.len_k)});
      if (s.len_q == 1) {
        tv.insert(tv.end(), {int32_t(i), 0});
        max_k = std::max(max_k, s.len_k);
      }
    }
    t.nz = unsigned(tv.size() / 2);
    if (t.nz == 0) return;
    t.seqs = upload_i32(sv, dev);
    t.tiles = upload_i32(tv, dev);
    t.map.seqs = reinterpret_cast<const SeqDesc*>(t.seqs.raw_data());
    t.map.tiles = reinterpret_cast<const int2*>(t.tiles.raw_data());
  }
  a.map = t.map;
  FTUNE_CHECK(t.nz <= 65535, "[attention] decode over ", t.nz, " sequences (at most 65535)");
  // Enough CTAs for 8 per SM (each only 4 warps, and a decode step is memory-bound: bytes in
  // flight matter), each split at least 256 keys.
  const int64_t ctas = int64_t(t.nz) * p.num_heads;
  const int64_t want = 8 * int64_t(ftune::cuda::device_sm_count(dev));
  int64_t splits = std::clamp<int64_t>((want + ctas - 1) / ctas, 1,
                                       std::clamp<int64_t>((max_k + 255) / 256, 1, 65535));
  const int chunk = int(std::max<int64_t>(1, (max_k + splits - 1) / splits));
  splits = std::max<int64_t>(1, (max_k + chunk - 1) / chunk);
  Tensor part;
  if (splits > 1)
    part = Tensor::empty({ctas * splits * (p.head_dim + 2)}, DType::f32, Device::cuda(dev));
  float* pp = splits > 1 ? part.data<float>() : nullptr;
  const int D = a.D;
  const size_t smem = (size_t(kDecWarps) * D + 2 * kDecWarps) * sizeof(float);
  ::ftune::kernels::cuda::dispatch_float(dt, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_npl(D, [&](auto npl) {
      constexpr int NPL = decltype(npl)::value;
      // A lane's NPL elements in one load: D a multiple of NPL (every row start then aligned to
      // NPL elements, so the base pointers decide; head_dim 80 and 96 too).
      const uintptr_t run = uintptr_t(NPL) * sizeof(T);
      const bool rows = D % NPL == 0 && reinterpret_cast<uintptr_t>(a.k) % run == 0 &&
                        reinterpret_cast<uintptr_t>(a.v) % run == 0;
      const dim3 grid(unsigned(p.num_heads), unsigned(splits), t.nz);
      if (rows) decode_kernel<T, NPL, true><<<grid, kDecWarps * 32, smem, stream()>>>(a, chunk, pp);
      else decode_kernel<T, NPL, false><<<grid, kDecWarps * 32, smem, stream()>>>(a, chunk, pp);
      FTUNE_LAUNCH_CHECK("attention decode");
    });
    if (splits > 1) {
      decode_combine_kernel<T><<<dim3(unsigned(p.num_heads), t.nz), 128, 0, stream()>>>(
          a, int(splits), pp);
      FTUNE_LAUNCH_CHECK("attention decode combine");
    }
  });
}

// The dK/dV split over query heads. Grouped-query attention with few kv heads gives few dK/dV
// CTAs, each walking all the query heads of its group (Qwen2.5-0.5B at 4 x 2048: 256 CTAs, the
// first key tiles 224 query tiles deep, for 3 x 132 resident slots). Then one CTA per query head
// instead, its share of dK/dV in f32 scratch (`part`, pointed to by b.dk_part / b.dv_part), summed
// per group by dkv_reduce. The f32 scratch is 2 x group x the bf16 dK + dV: auto stays under
// 512 MiB of it (a long MQA batch would take GBs; it has many key tiles anyway). t: the CTAs' key
// tiles (64 keys, or 128 for the wgmma backward with two warpgroups, which then splits sooner).
bool dkdv_split(const AttnParams& p, const Tables& t, Args& b, int dev, Tensor& part) {
  const int64_t D = p.head_dim;
  const int group = int(p.num_heads / p.num_kv_heads);
  const int64_t ctas = int64_t(t.nx) * p.num_kv_heads * t.nz;
  const int64_t scratch = ((b.dk ? 1 : 0) + (b.dv ? 1 : 0)) * group * p.nk * p.num_kv_heads * D *
                          int64_t(sizeof(float));
  const bool split = group > 1 && (g_bwd_split_heads == 1 ||
                                   (g_bwd_split_heads == -1 && scratch <= (int64_t(512) << 20) &&
                                    ctas < 4 * int64_t(ftune::cuda::device_sm_count(dev))));
  if (split) {
    const int64_t n = p.nk * p.num_kv_heads * D;
    const int64_t parts = (b.dk ? 1 : 0) + (b.dv ? 1 : 0);
    part = Tensor::empty({std::max<int64_t>(1, parts * group * n)}, DType::f32, Device::cuda(dev));
    b.dk_part = b.dk ? part.data<float>() : nullptr;
    b.dv_part = b.dv ? part.data<float>() + (b.dk ? group * n : 0) : nullptr;
  }
  return split;
}
template <class T>
void dkdv_reduce(const AttnParams& p, const Args& b) {
  const int64_t n = p.nk * p.num_kv_heads * p.head_dim;
  dkv_reduce_kernel<T><<<grid_1d(n, 256), 256, 0, stream()>>>(
      b.dk_part, b.dv_part, static_cast<T*>(b.dk), static_cast<T*>(b.dv), n,
      int(p.num_heads / p.num_kv_heads), b.scale);
  FTUNE_LAUNCH_CHECK("attention_backward dk/dv reduce over query heads");
}

// The deterministic backward on warpgroup MMAs (fa_bwd_dkdv_wgmma_kernel, fa_bwd_dq_wgmma_kernel),
// WG warpgroups per CTA: 64 WG keys (dK/dV) or query rows (dQ) sharing each streamed tile.
template <class T, int D, int WG>
void wgmma_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const Args& a, int dev) {
  constexpr size_t kTileBytes = size_t(kWgBN) * D * sizeof(T);
  if (a.dk || a.dv) {
    Tables t = make_tiles(seqs, 64 * WG, true, p.causal, dev);
    if (t.nx > 0) {
      FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
      Args b = a;
      b.map = t.map;
      Tensor part;
      const bool split = dkdv_split(p, t, b, dev, part);
      const size_t smem = (2 * WG + 4) * kTileBytes + 4 * kBwdBM * sizeof(float);
      auto launch = [&](auto kernel) {
        set_smem(kernel, smem);
        kernel<<<dim3(t.nx, unsigned(split ? p.num_heads : p.num_kv_heads), t.nz), 128 * WG, smem,
                 stream()>>>(b);
      };
      if (split)
        launch(fa_bwd_dkdv_wgmma_kernel<T, D, true, WG>);
      else
        launch(fa_bwd_dkdv_wgmma_kernel<T, D, false, WG>);
      FTUNE_LAUNCH_CHECK("attention_backward dk/dv (wgmma)");
      if (split) dkdv_reduce<T>(p, b);
    }
  }
  if (a.dq) {
    Tables t = make_tiles(seqs, 64 * WG, false, p.causal, dev);
    if (t.nx > 0) {
      FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
      Args b = a;
      b.map = t.map;
      const size_t smem = (2 * WG + 4) * kTileBytes;
      set_smem(fa_bwd_dq_wgmma_kernel<T, D, WG>, smem);
      fa_bwd_dq_wgmma_kernel<T, D, WG>
          <<<dim3(t.nx, unsigned(p.num_heads), t.nz), 128 * WG, smem, stream()>>>(b);
      FTUNE_LAUNCH_CHECK("attention_backward dq (wgmma)");
    }
  }
}

template <class T, int D>
void fast_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, const Args& a, int dev) {
  const int variant = bwd_variant(D);
  constexpr size_t kTileBytes = size_t(64) * kFaLds<D> * sizeof(T);
  // Without determinism dQ comes from the dK/dV kernel through f32 atomics (FlashAttention-2's
  // way: no second pass recomputing S and dP).
  const bool atomic_dq = a.dq && !ftune::cuda::deterministic();
  if (const int wg_mode = atomic_dq ? 0 : wgmma_mode(dev, 2); wg_mode > 0) {
    if (wg_mode == 2)
      wgmma_backward<T, D, 2>(p, seqs, a, dev);
    else
      wgmma_backward<T, D, 1>(p, seqs, a, dev);
    return;
  }
  Tensor accum;
  if (atomic_dq) {
    const int64_t n = p.nq * p.num_heads * p.head_dim;
    accum = Tensor::empty({std::max<int64_t>(n, 1)}, DType::f32, Device::cuda(dev));
    CUDA_CHECK(cudaMemsetAsync(accum.raw_data(), 0, size_t(n) * sizeof(float), stream()));
  }
  bool dkdv_done = false;
  if constexpr (D == 64) {
    if (variant >= 3 && !atomic_dq && (a.dk || a.dv)) {
      Tables t = make_tiles(seqs, kBwd2BN, true, p.causal, dev);
      if (t.nx > 0) {
        FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
        Args b = a;
        b.map = t.map;
        const size_t smem = size_t(2 * kBwd2BN + 4 * kBwd2BM) * kFaLds<D> * sizeof(T) +
                            4 * kBwd2BM * sizeof(float);
        set_smem(fa_bwd_dkdv_mk2_kernel<T, D>, smem);
        fa_bwd_dkdv_mk2_kernel<T, D><<<dim3(t.nx, unsigned(p.num_kv_heads), t.nz), kFaThreads,
                                       smem, stream()>>>(b);
        FTUNE_LAUNCH_CHECK("attention_backward dk/dv (tensor cores, 128 keys)");
      }
      dkdv_done = true;
    }
  }
  if (!dkdv_done && (a.dk || a.dv || atomic_dq)) {
    Tables t = make_tiles(seqs, 64, true, p.causal, dev);
    if (t.nx > 0) {
      FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
      Args b = a;
      b.map = t.map;
      Tensor part;
      const bool split = !atomic_dq && dkdv_split(p, t, b, dev, part);
      const unsigned grid_y = unsigned(split ? p.num_heads : p.num_kv_heads);
      if (atomic_dq) {
        b.dq_accum = accum.data<float>();
        const size_t smem =
            6 * kTileBytes + 4 * kBwdBM * sizeof(float) + size_t(kBwdBM) * kDsLds * sizeof(T);
        auto launch = [&](auto kernel) {
          set_smem(kernel, smem);
          kernel<<<dim3(t.nx, unsigned(p.num_kv_heads), t.nz), kFaThreads, smem, stream()>>>(b);
        };
        if (variant == 2) launch(fa_bwd_dkdv_kernel<T, D, 2>);
        else launch(fa_bwd_dkdv_kernel<T, D, 1>);
      } else {
        const size_t smem = 6 * kTileBytes + 4 * kBwdBM * sizeof(float);
        auto launch = [&](auto kernel) {
          set_smem(kernel, smem);
          kernel<<<dim3(t.nx, grid_y, t.nz), kFaThreads, smem, stream()>>>(b);
        };
        bool done = false;
        if constexpr (D == 64) {
          if (variant == 1) {
            if (split) launch(fa_bwd_dkdv_kernel_occ3<T, D, 3>);
            else launch(fa_bwd_dkdv_kernel_occ3<T, D>);
            done = true;
          }
        }
        if (!done) {
          if (split) launch(fa_bwd_dkdv_kernel<T, D, 3>);
          else launch(fa_bwd_dkdv_kernel<T, D, 0>);
        }
      }
      FTUNE_LAUNCH_CHECK("attention_backward dk/dv (tensor cores)");
      if (split) dkdv_reduce<T>(p, b);
    }
  }
  if (atomic_dq) {
    const int64_t n = p.nq * p.num_heads * p.head_dim;
    dq_convert_kernel<T><<<grid_1d(n, 256), 256, 0, stream()>>>(accum.data<float>(),
                                                               static_cast<T*>(a.dq), n, a.scale);
    FTUNE_LAUNCH_CHECK("attention_backward dq convert");
    return;
  }
  if (a.dq && (variant == 4 || variant == 5)) {
    Tables t = make_tiles(seqs, kDq2BM, false, p.causal, dev);
    if (t.nx > 0) {
      FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
      Args b = a;
      b.map = t.map;
      const size_t smem = size_t(2 * kDq2BM + 4 * kDq2BN) * kFaLds<D> * sizeof(T);
      auto launch = [&](auto kernel) {
        set_smem(kernel, smem);
        kernel<<<dim3(t.nx, unsigned(p.num_heads), t.nz), kFaThreads, smem, stream()>>>(b);
      };
      bool done = false;
      if constexpr (D == 64) {
        if (variant == 5) {
          launch(fa_bwd_dq_ma2_occ3_kernel<T, D>);
          done = true;
        }
      }
      if (!done) launch(fa_bwd_dq_ma2_kernel<T, D>);
      FTUNE_LAUNCH_CHECK("attention_backward dq (tensor cores, 128 rows)");
    }
    return;
  }
  if (a.dq) {
    Tables t = make_tiles(seqs, kFaBM, false, p.causal, dev);
    if (t.nx > 0) {
      FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
      Args b = a;
      b.map = t.map;
      auto launch = [&](auto kernel, size_t tiles) {
        const size_t smem = tiles * kTileBytes;
        set_smem(kernel, smem);
        kernel<<<dim3(t.nx, unsigned(p.num_heads), t.nz), kFaThreads, smem, stream()>>>(b);
      };
      bool done = false;
      if constexpr (D == 128) {
        if (variant == 1 || variant == 3) {
          launch(fa_bwd_dq_kernel_1buf<T, D>, 4);
          done = true;
        }
      }
      if (!done) {
        if constexpr (D == 64) launch(fa_bwd_dq_kernel_occ4<T, D>, 6);
        else launch(fa_bwd_dq_kernel<T, D>, 6);
      }
      FTUNE_LAUNCH_CHECK("attention_backward dq (tensor cores)");
    }
  }
}

}  // namespace

void set_attention_fwd_row_blocks(int n) {
  FTUNE_CHECK(n >= -1 && n <= 2,
              "[attention] forward row blocks must be 0 (default), 1, 2 or -1 (auto), got ", n);
  g_fwd_row_blocks = n;
}

void set_attention_bwd_split_heads(int v) {
  FTUNE_CHECK(v >= -1 && v <= 1,
              "[attention_backward] split over query heads must be -1 (auto), 0 or 1, got ", v);
  g_bwd_split_heads = v;
}

void set_attention_fwd_wgmma(int v) {
  FTUNE_CHECK(v >= -1 && v <= 2, "[attention] wgmma forward must be -1 (auto), 0, 1 or 2, got ", v);
  g_fwd_wgmma = v;
}

void set_attention_bwd_wgmma(int v) {
  FTUNE_CHECK(v >= -1 && v <= 2,
              "[attention_backward] wgmma backward must be -1 (auto), 0, 1 or 2, got ", v);
  g_bwd_wgmma = v;
}

std::vector<float> wgmma_probe(int which, int kk, const std::vector<float>& a,
                               const std::vector<float>& b) {
  FTUNE_CHECK(which >= 0 && which <= 2 && kk >= 0 && kk < 4, "[wgmma_probe] which 0..2, kk 0..3");
  FTUNE_CHECK(a.size() == 64 * 64 && b.size() == 64 * 64, "[wgmma_probe] a and b are 64 x 64");
  FTUNE_CHECK(attention_wgmma_available(),
              "[wgmma_probe] no wgmma here (sm_90a build, CC 9.0)");
  const int dev = ftune::cuda::current_device();
  std::vector<__nv_bfloat16> ha(a.size()), hb(b.size());
  for (size_t i = 0; i < a.size(); ++i) ha[i] = __float2bfloat16(a[i]);
  for (size_t i = 0; i < b.size(); ++i) hb[i] = __float2bfloat16(b[i]);
  Tensor da = Tensor::empty({64 * 64}, DType::bf16, Device::cuda(dev));
  Tensor db = Tensor::empty({64 * 64}, DType::bf16, Device::cuda(dev));
  Tensor dd = Tensor::empty({64 * 64}, DType::f32, Device::cuda(dev));
  CUDA_CHECK(
      cudaMemcpyAsync(da.raw_data(), ha.data(), ha.size() * 2, cudaMemcpyHostToDevice, stream()));
  CUDA_CHECK(
      cudaMemcpyAsync(db.raw_data(), hb.data(), hb.size() * 2, cudaMemcpyHostToDevice, stream()));
  wgmma_probe_kernel<__nv_bfloat16>
      <<<1, 128, 0, stream()>>>(which, kk, static_cast<const __nv_bfloat16*>(da.raw_data()),
                                static_cast<const __nv_bfloat16*>(db.raw_data()), dd.data<float>());
  FTUNE_LAUNCH_CHECK("wgmma probe");
  std::vector<float> out(64 * 64);
  CUDA_CHECK(
      cudaMemcpyAsync(out.data(), dd.raw_data(), out.size() * 4, cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  return out;
}

bool attention_wgmma_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear the sticky "no device" of the query
    return false;
  }
  return wgmma_built_for(ftune::cuda::current_device());
}

void set_attention_bwd_variant(int v) {
  FTUNE_CHECK(v >= -1 && v <= 5, "[attention_backward] variant must be -1 (auto) or 0..5, got ", v);
  g_bwd_variant = v;
}

void attention_forward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                       const void* q, const void* k, const void* v, void* out, float* lse) {
  check_params("attention", p, seqs);
  if (p.nq == 0) return;
  const int dev = ftune::cuda::current_device();
  Args a = make_args(p);
  a.q = q;
  a.k = k;
  a.v = v;
  a.out = out;
  a.lse = lse;
  const int D = a.D;

  bool decode = !seqs.empty();
  for (const AttnSeq& s : seqs) decode = decode && s.len_q <= 1;
  if (decode) {
    // Rows of sequences without a query do not exist; but a sequence may have len_q = 0 and a
    // token may belong to no query (cu_seqlens cover every token, so none is left unwritten).
    decode_forward(p, seqs, dt, a, dev);
    return;
  }

  // The tensor-core forward folds the scale into its softmax's max (needs scale > 0).
  if (fast_ok(dt, D, {q, k, v, out}) && a.scale > 0.f) {
    const int ma = fwd_row_blocks(seqs, D);
    Tables t = make_tiles(seqs, 64 * ma, false, p.causal, dev);
    if (t.nx == 0) return;
    FTUNE_CHECK(t.nz <= 65535, "[attention] batch of ", t.nz, " rows (at most 65535)");
    a.map = t.map;
    const int wg_mode = wgmma_mode(dev, 1);
    const bool wg = wg_mode > 0;
    ::ftune::kernels::cuda::dispatch_float(dt, "attention", [&](auto tag) {
      using T = typename decltype(tag)::type;
      if constexpr (!std::is_same_v<T, float>) {
        if (wg) {
          // K and V tiles (64 keys, core matrices; double-buffered when pipelined) and the CTA's
          // Q rows (padded).
          const bool pipe = wg_mode == 2;
          auto launch_wg = [&](auto kernel, int d, int blocks) {
            const size_t smem =
                (size_t((pipe ? 4 : 2) * kWgBN) * d + size_t(64 * blocks) * (d + 8)) * sizeof(T);
            set_smem(kernel, smem);
            kernel<<<dim3(t.nx, unsigned(p.num_heads), t.nz), 128 * blocks, smem, stream()>>>(a);
            FTUNE_LAUNCH_CHECK("attention forward (wgmma)");
          };
          if (pipe) {
            if (D == 64) {
              if (ma == 2)
                launch_wg(fa_fwd_wgmma_kernel<T, 64, 2, true>, 64, 2);
              else
                launch_wg(fa_fwd_wgmma_kernel<T, 64, 1, true>, 64, 1);
            } else {
              if (ma == 2)
                launch_wg(fa_fwd_wgmma_kernel<T, 128, 2, true>, 128, 2);
              else
                launch_wg(fa_fwd_wgmma_kernel<T, 128, 1, true>, 128, 1);
            }
          } else if (D == 64) {
            if (ma == 2)
              launch_wg(fa_fwd_wgmma_kernel<T, 64, 2, false>, 64, 2);
            else
              launch_wg(fa_fwd_wgmma_kernel<T, 64, 1, false>, 64, 1);
          } else {
            if (ma == 2)
              launch_wg(fa_fwd_wgmma_kernel<T, 128, 2, false>, 128, 2);
            else
              launch_wg(fa_fwd_wgmma_kernel<T, 128, 1, false>, 128, 1);
          }
          return;
        }
        auto launch = [&](auto kernel, int d, int blocks) {
          const size_t smem = size_t(64 * blocks + 2 * kFaBN) * (d + 8) * sizeof(T);
          set_smem(kernel, smem);
          kernel<<<dim3(t.nx, unsigned(p.num_heads), t.nz), kFaThreads, smem, stream()>>>(a);
          FTUNE_LAUNCH_CHECK("attention forward (tensor cores)");
        };
        if (D == 64) {
          if (ma == 2) launch(fa_fwd_kernel<T, 64, 2>, 64, 2);
          else launch(fa_fwd_kernel<T, 64, 1>, 64, 1);
        } else {
          if (ma == 2) launch(fa_fwd_kernel<T, 128, 2>, 128, 2);
          else launch(fa_fwd_kernel<T, 128, 1>, 128, 1);
        }
      }
    });
    return;
  }

  Tables t = make_tiles(seqs, kGenBM, false, p.causal, dev);
  if (t.nx == 0) return;
  FTUNE_CHECK(t.nz <= 65535, "[attention] batch of ", t.nz, " rows (at most 65535)");
  a.map = t.map;
  const size_t smem = (size_t(kGenBM) * D + 2 * size_t(kGenBN) * odd_stride(D)) * sizeof(float);
  ::ftune::kernels::cuda::dispatch_float(dt, "attention", [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_npl(D, [&](auto npl) {
      constexpr int NPL = decltype(npl)::value;
      set_smem(gen_fwd_kernel<T, NPL>, smem);
      gen_fwd_kernel<T, NPL><<<dim3(t.nx, unsigned(p.num_heads), t.nz), kGenThreads, smem,
                               stream()>>>(a);
      FTUNE_LAUNCH_CHECK("attention forward");
    });
  });
}

void attention_backward(const AttnParams& p, const std::vector<AttnSeq>& seqs, DType dt,
                        const void* q, const void* k, const void* v, const void* out,
                        const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  check_params("attention_backward", p, seqs);
  if (!dq && !dk && !dv) return;
  const int dev = ftune::cuda::current_device();
  Args a = make_args(p);
  a.q = q;
  a.k = k;
  a.v = v;
  a.o = out;
  a.dout = dout;
  a.lse = const_cast<float*>(lse);
  a.dq = dq;
  a.dk = dk;
  a.dv = dv;
  const int D = a.D;
  const int64_t H = p.num_heads;

  // cu_seqlens cover every token, so the dq tiles (over queries) and the dk/dv tiles (over
  // keys) of all sequences together write every element.
  const bool fast = fast_ok(dt, D, {q, k, v, out, dout, dq, dk, dv});
  Tensor delta = Tensor::empty({std::max<int64_t>(1, H * p.nq)}, DType::f32, Device::cuda(dev));
  a.delta = delta.data<float>();
  ::ftune::kernels::cuda::dispatch_float(dt, "attention_backward", [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool delta_done = false;
    if constexpr (!std::is_same_v<T, float>) {
      if (fast && bwd_variant(D) != 0 && p.nq > 0) {
        const int64_t chunks = p.nq * H * (D / kVec<T>);
        auto launch = [&](auto kernel) {
          kernel<<<grid_1d(chunks, 256), 256, 0, stream()>>>(
              static_cast<const T*>(out), static_cast<const T*>(dout), delta.data<float>(),
              int(p.nq), int(H));
        };
        if (D == 64) launch(bwd_delta_vec_kernel<T, 64 / kVec<T>>);
        else launch(bwd_delta_vec_kernel<T, 128 / kVec<T>>);
        FTUNE_LAUNCH_CHECK("attention_backward delta (16-byte loads)");
        delta_done = true;
      }
    }
    if (p.nq > 0 && !delta_done) {
      const int64_t warps = p.nq * H;
      bwd_delta_kernel<T><<<grid_1d(warps * 32, 256), 256, 0, stream()>>>(
          static_cast<const T*>(out), static_cast<const T*>(dout), delta.data<float>(), int(p.nq), int(H),
          D);
      FTUNE_LAUNCH_CHECK("attention_backward delta");
    }
    if constexpr (!std::is_same_v<T, float>) {
      if (fast) {
        if (D == 64) fast_backward<T, 64>(p, seqs, a, dev);
        else fast_backward<T, 128>(p, seqs, a, dev);
        return;
      }
    }
    dispatch_npl(D, [&](auto npl) {
      constexpr int NPL = decltype(npl)::value;
      if (dk || dv) {
        Tables t = make_tiles(seqs, kGenBM, true, p.causal, dev);
        if (t.nx > 0) {
          FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
          Args b = a;
          b.map = t.map;
          const size_t smem =
              (2 * size_t(kGenBM) * D + 2 * size_t(kGenBN) * odd_stride(D) + 2 * kGenBN) *
              sizeof(float);
          set_smem(gen_dkv_kernel<T, NPL>, smem);
          gen_dkv_kernel<T, NPL><<<dim3(t.nx, unsigned(p.num_kv_heads), t.nz), kGenThreads,
                                   smem, stream()>>>(b);
          FTUNE_LAUNCH_CHECK("attention_backward dk/dv");
        }
      }
      if (dq) {
        Tables t = make_tiles(seqs, kGenBM, false, p.causal, dev);
        if (t.nx > 0) {
          FTUNE_CHECK(t.nz <= 65535, "[attention_backward] batch of ", t.nz, " rows");
          Args b = a;
          b.map = t.map;
          const size_t smem =
              (2 * size_t(kGenBM) * D + 2 * size_t(kGenBN) * odd_stride(D)) * sizeof(float);
          set_smem(gen_dq_kernel<T, NPL>, smem);
          gen_dq_kernel<T, NPL><<<dim3(t.nx, unsigned(p.num_heads), t.nz), kGenThreads, smem,
                                  stream()>>>(b);
          FTUNE_LAUNCH_CHECK("attention_backward dq");
        }
      }
    });
  });
}

}  // namespace ftune::kernels::cuda
