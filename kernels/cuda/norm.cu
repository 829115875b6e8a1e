// LayerNorm and RMSNorm forward/backward on the GPU (twins of kernels/cpu/norm.cpp), and the fused
// residual add + norm forward.
//
// A row is handled by one warp when it is short and by one block otherwise. Its elements are taken
// kVec<T> at a time ("chunks", one 16-byte access each when the layout allows) and held in
// registers between the statistics pass and the output pass, so x is read from memory once; rows
// longer than the register cache re-read the rest (from L2). Statistics are f32.
//
// dweight/dbias are deterministic without atomics: each row group (warp or block) keeps its column
// sums over the rows it handles in registers; each block writes its sums (its warps' added in
// order) to its own row of a [blocks, D] f32 buffer; a second kernel sums that buffer over blocks
// in a fixed order.
#include <climits>
#include <cstdlib>
#include <type_traits>

#include "kernels/cuda/common.cuh"
#include "kernels/norm.h"

namespace ftune::kernels::cuda {

namespace {

// Chunks per thread held in registers: 32 elements in the forward, 16 in the backward (which also
// holds dy and the dweight/dbias sums).
template <class T> constexpr int kFwdChunks = 32 / kVec<T>;
template <class T> constexpr int kBwdChunks = 16 / kVec<T>;
constexpr int kWarpRowsPerBlock = 8;  // warp-per-row kernels run 256 threads
// Block-per-row kernels run at most 512 threads, so that a thread may use 128 registers (the
// register cache fits without spilling; 1024 threads would cap it at 64).
constexpr int kMaxThreads = 512;
// The longest row of the warp-per-row backward: 32 lanes x 16 elements.
constexpr int kWarpMaxD = 32 * 16;

// Chunk c of a row is its elements [c*V, c*V + V). kVecOK (D % V == 0 and every pointer 16-byte
// aligned): one 16-byte access. Otherwise element by element: past D reads give 0, writes are
// dropped.
template <class T, bool kVecOK>
__device__ __forceinline__ void load_chunk(const T* row, int c, int D, float (&o)[kVec<T>]) {
  constexpr int V = kVec<T>;
  if constexpr (kVecOK) {
    load_vec(row + c * V, o);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int j = c * V + i;
      o[i] = j < D ? to_f(row[j]) : 0.f;
    }
  }
}
// v = chunk c of row + v rounded to T (the sum so far of a gradient, which the store then
// overwrites): the engine's sum of the two gradients bit for bit (v rounded, then one rounded
// add, never contracted into a multiply-add), so a checkpointed block gets the same bits.
template <class T, bool kVecOK>
__device__ __forceinline__ void add_chunk(const T* row, int c, int D, float (&v)[kVec<T>]) {
  float t[kVec<T>];
  load_chunk<T, kVecOK>(row, c, D, t);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) v[i] = __fadd_rn(t[i], to_f(from_f<T>(v[i])));
}
template <class T, bool kVecOK>
__device__ __forceinline__ void store_chunk(T* row, int c, int D, const float (&v)[kVec<T>]) {
  constexpr int V = kVec<T>;
  if constexpr (kVecOK) {
    store_vec(row + c * V, v);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int j = c * V + i;
      if (j < D) row[j] = from_f<T>(v[i]);
    }
  }
}

// Which rows this thread works on: a row group is a warp (kWarp) or the whole block.
struct Geo {
  int lane, size;   // position in the row group, and its size in threads
  int64_t group;    // global index of the row group (its row in the partial-sum buffers)
  int64_t stride;   // number of row groups: rows group, group + stride, ...
};
template <bool kWarp>
__device__ __forceinline__ Geo geo() {
  Geo g;
  if constexpr (kWarp) {
    const int wpb = blockDim.x >> 5;
    g.lane = threadIdx.x & 31;
    g.size = 32;
    g.group = int64_t(blockIdx.x) * wpb + (threadIdx.x >> 5);
    g.stride = int64_t(gridDim.x) * wpb;
  } else {
    g.lane = threadIdx.x;
    g.size = blockDim.x;
    g.group = blockIdx.x;
    g.stride = gridDim.x;
  }
  return g;
}

// Sum over the row group. Block mode: every thread of the block must call it (it syncs).
template <bool kWarp>
__device__ __forceinline__ float group_sum(float v, float* shm) {
  if constexpr (kWarp) return warp_sum(v);
  else return block_sum(v, shm);
}

// kCenter: LayerNorm (mean, bias) else RMSNorm. kRes: the input is h = x + res, rounded to T,
// written to h before it is normalized (h may be res or x: each element is read before it is
// written, by the same thread). b may be null.
template <class T, int kMax, bool kVecOK, bool kWarp, bool kCenter, bool kRes>
__global__ void __launch_bounds__(kMaxThreads)
norm_fwd_kernel(const T* x, const T* res, const T* __restrict__ w, const T* __restrict__ b,
                T* __restrict__ y, T* h, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                int64_t N, int D, float eps) {
  constexpr int V = kVec<T>;
  __shared__ float shm[32];
  const Geo g = geo<kWarp>();
  const int C = (D + V - 1) / V;
  const float inv_d = 1.f / float(D);
  for (int64_t r = g.group; r < N; r += g.stride) {
    const T* xr = x + r * D;
    const T* rr = kRes ? res + r * D : nullptr;
    T* hr = kRes ? h + r * D : nullptr;
    const T* src = kRes ? hr : xr;  // where the overflow chunks are re-read from
    // Loads chunk c of the row's input (and writes h).
    auto load_in = [&](int c, float(&v)[V]) {
      load_chunk<T, kVecOK>(xr, c, D, v);
      if constexpr (kRes) {
        float t[V];
        load_chunk<T, kVecOK>(rr, c, D, t);
#pragma unroll
        for (int i = 0; i < V; ++i) v[i] = to_f(from_f<T>(v[i] + t[i]));
        store_chunk<T, kVecOK>(hr, c, D, v);
      }
    };
    float cache[kMax][V];
    float s = 0.f;  // LayerNorm: sum of x; RMSNorm: sum of x^2
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = g.lane + k * g.size;
      if (c < C) {
        load_in(c, cache[k]);
#pragma unroll
        for (int i = 0; i < V; ++i) s += kCenter ? cache[k][i] : cache[k][i] * cache[k][i];
      }
    }
    for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
      float v[V];
      load_in(c, v);
#pragma unroll
      for (int i = 0; i < V; ++i) s += kCenter ? v[i] : v[i] * v[i];
    }
    float mu = 0.f, ss = s;
    if constexpr (kCenter) {
      // Second pass over the registers: sum of squared deviations, no cancellation.
      mu = group_sum<kWarp>(s, shm) * inv_d;
      ss = 0.f;
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        const int c = g.lane + k * g.size;
        if (c < C) {
#pragma unroll
          for (int i = 0; i < V; ++i)
            if (kVecOK || c * V + i < D) ss += (cache[k][i] - mu) * (cache[k][i] - mu);
        }
      }
      for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
        float v[V];
        load_chunk<T, kVecOK>(src, c, D, v);
#pragma unroll
        for (int i = 0; i < V; ++i)
          if (kVecOK || c * V + i < D) ss += (v[i] - mu) * (v[i] - mu);
      }
    }
    const float rs = 1.f / sqrtf(group_sum<kWarp>(ss, shm) * inv_d + eps);
    if (g.lane == 0) {
      rstd_out[r] = rs;
      if constexpr (kCenter) mean_out[r] = mu;
    }
    T* yr = y + r * D;
    auto write_out = [&](int c, const float(&v)[V]) {
      float wv[V], o[V];
      load_chunk<T, kVecOK>(w, c, D, wv);
      if constexpr (kCenter) {
        float bv[V] = {};
        if (b) load_chunk<T, kVecOK>(b, c, D, bv);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = (v[i] - mu) * rs * wv[i] + bv[i];
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = wv[i] * (v[i] * rs);  // HF order: weight * (x * rstd)
      }
      store_chunk<T, kVecOK>(yr, c, D, o);
    };
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = g.lane + k * g.size;
      if (c < C) write_out(c, cache[k]);
    }
    for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
      float v[V];
      load_chunk<T, kVecOK>(src, c, D, v);
      write_out(c, v);
    }
  }
}

// With xhat = (x - mean) * rstd and gw = dy * w:
//   dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))   (RMSNorm: no mean(gw) term)
// and this row group's column sums of dy * xhat (pw) and dy (pb) over its rows go to row `group`
// of the [blocks, D] buffers. dx, pw, pb may each be null.
template <class T, int kMax, bool kVecOK, bool kWarp, bool kCenter>
__global__ void __launch_bounds__(kMaxThreads)
norm_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
                float* __restrict__ pw, float* __restrict__ pb, int64_t N, int D, bool acc) {
  constexpr int V = kVec<T>;
  static_assert(!kWarp || 32 * kMax * V <= kWarpMaxD, "warp rows must fit the shared buffer");
  __shared__ float shm[32];
  const Geo g = geo<kWarp>();
  const int C = (D + V - 1) / V;
  const float inv_d = 1.f / float(D);
  // The partial-sum row: the block's (warps combine theirs in shared memory at the end).
  float* pwr = pw ? pw + int64_t(blockIdx.x) * D : nullptr;
  float* pbr = pb ? pb + int64_t(blockIdx.x) * D : nullptr;
  // Columns past the register cache are summed in place in this group's own buffer row (only this
  // thread touches them): start them at 0.
  for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int j = c * V + i;
      if (j < D) {
        if (pwr) pwr[j] = 0.f;
        if (pbr) pbr[j] = 0.f;
      }
    }
  }
  float aw[kMax][V], ab[kMax][V];
#pragma unroll
  for (int k = 0; k < kMax; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) aw[k][i] = ab[k][i] = 0.f;

  for (int64_t r = g.group; r < N; r += g.stride) {
    const T* xr = x + r * D;
    const T* gr = dy + r * D;
    const float mu = kCenter ? mean[r] : 0.f, rs = rstd[r];
    float xc[kMax][V], gc[kMax][V];  // x, then dy * w
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = g.lane + k * g.size;
      if (c < C) {
        float wv[V];
        load_chunk<T, kVecOK>(xr, c, D, xc[k]);
        load_chunk<T, kVecOK>(gr, c, D, gc[k]);
        load_chunk<T, kVecOK>(w, c, D, wv);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float xh = (xc[k][i] - mu) * rs;
          aw[k][i] += gc[k][i] * xh;  // past D, dy reads as 0: nothing is added
          if constexpr (kCenter) ab[k][i] += gc[k][i];  // RMSNorm has no bias
          gc[k][i] *= wv[i];
          sg += gc[k][i];
          sgx += gc[k][i] * xh;
        }
      }
    }
    for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
      float xv[V], gv[V], wv[V];
      load_chunk<T, kVecOK>(xr, c, D, xv);
      load_chunk<T, kVecOK>(gr, c, D, gv);
      load_chunk<T, kVecOK>(w, c, D, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int j = c * V + i;
        const float xh = (xv[i] - mu) * rs;
        if (j < D) {
          if (pwr) pwr[j] += gv[i] * xh;
          if (pbr) pbr[j] += gv[i];
        }
        sg += gv[i] * wv[i];
        sgx += gv[i] * wv[i] * xh;
      }
    }
    if (!dx) continue;  // uniform over the kernel
    const float a = kCenter ? group_sum<kWarp>(sg, shm) * inv_d : 0.f;
    const float cc = group_sum<kWarp>(sgx, shm) * inv_d;
    T* dxr = dx + r * D;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = g.lane + k * g.size;
      if (c < C) {
        float o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] = rs * (gc[k][i] - a - (xc[k][i] - mu) * rs * cc);
        if (acc) add_chunk<T, kVecOK>(dxr, c, D, o);
        store_chunk<T, kVecOK>(dxr, c, D, o);
      }
    }
    for (int c = g.lane + kMax * g.size; c < C; c += g.size) {
      float xv[V], gv[V], wv[V], o[V];
      load_chunk<T, kVecOK>(xr, c, D, xv);
      load_chunk<T, kVecOK>(gr, c, D, gv);
      load_chunk<T, kVecOK>(w, c, D, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = rs * (gv[i] * wv[i] - a - (xv[i] - mu) * rs * cc);
      if (acc) add_chunk<T, kVecOK>(dxr, c, D, o);
      store_chunk<T, kVecOK>(dxr, c, D, o);
    }
  }
  if constexpr (kWarp) {
    // Sum the warps' columns in warp order through shared memory (D <= kWarpMaxD here).
    __shared__ float red[kWarpRowsPerBlock][kWarpMaxD];
    const int wid = threadIdx.x >> 5;
    for (int which = 0; which < (kCenter ? 2 : 1); ++which) {
      float* out = which == 0 ? pwr : pbr;
      if (!out) continue;  // uniform
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        const int c = g.lane + k * g.size;
        if (c < C) {
#pragma unroll
          for (int i = 0; i < V; ++i)
            if (c * V + i < D) red[wid][c * V + i] = which == 0 ? aw[k][i] : ab[k][i];
        }
      }
      __syncthreads();
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        float t = 0.f;
#pragma unroll
        for (int q = 0; q < kWarpRowsPerBlock; ++q) t += red[q][j];
        out[j] = t;
      }
      __syncthreads();  // red is rewritten for dbias
    }
  } else {
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = g.lane + k * g.size;
      if (c < C) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const int j = c * V + i;
          if (j < D) {
            if (pwr) pwr[j] = aw[k][i];
            if (kCenter && pbr) pbr[j] = ab[k][i];
          }
        }
      }
    }
  }
}

// ---- pipelined block-per-row kernels (the fast path) ----------------------------------------------
// For rows that fit the register cache exactly in 16-byte chunks (D % kVec == 0, aligned, one
// block per row group, no overflow chunks). The grid is what fits on the GPU at once and each
// block loops over rows; while it reduces and writes row r it already has the loads of its next
// row in flight (held raw, in the storage type), so the memory system never waits for a block's
// reduction. The formulas are those of the generic kernels above (f32 sums split over threads
// differently, so the last bits of a statistic may differ).

// Fewer elements per thread than the generic kernels (the prefetched row costs registers too), so
// that more threads are resident: the forward holds 32 bytes of x per thread (RMSNorm: 3 blocks
// of 512 threads per SM, at most 42 registers; LayerNorm 2), the backward 16 bytes each of x and
// dy (up to 1024 threads, at most 64 registers) next to its f32 column sums.
template <class T> constexpr int kPipeFwdChunks = 2;
template <class T> constexpr int kPipeBwdChunks = 1;
constexpr int kPipeFwdThreads = 512, kPipeFwdMinBlocks = 3, kPipeBwdThreads = 1024;

template <class T, int kMax>
__device__ __forceinline__ void fetch_row(const T* row, int lane, int size, int C,
                                          Vec<T> (&o)[kMax]) {
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    const int c = lane + k * size;
    if (c < C) o[k] = *reinterpret_cast<const Vec<T>*>(row + int64_t(c) * kVec<T>);
  }
}

template <class T, int kMax, bool kCenter>
__global__ void __launch_bounds__(kPipeFwdThreads, kCenter ? 2 : kPipeFwdMinBlocks)
norm_fwd_pipe_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                     T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out,
                     int64_t N, int D, float eps) {
  constexpr int V = kVec<T>;
  __shared__ float shm[32];
  const int lane = threadIdx.x, size = blockDim.x;
  const int C = D / V;
  const float inv_d = 1.f / float(D);
  Vec<T> nxt[kMax];
  int64_t r = blockIdx.x;
  if (r < N) fetch_row<T, kMax>(x + r * D, lane, size, C, nxt);
  for (; r < N; r += gridDim.x) {
    // The row stays raw (half the registers of f32 for 16-bit T), widened where used.
    Vec<T> cur[kMax];
#pragma unroll
    for (int k = 0; k < kMax; ++k) cur[k] = nxt[k];  // unused past C
    const int64_t rn = r + gridDim.x;
    if (rn < N) fetch_row<T, kMax>(x + rn * D, lane, size, C, nxt);
    float s = 0.f;  // LayerNorm: sum of x; RMSNorm: sum of x^2
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (lane + k * size < C) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float v = to_f(cur[k].v[i]);
          s += kCenter ? v : v * v;
        }
      }
    }
    float mu = 0.f, ss = s;
    if constexpr (kCenter) {
      mu = block_sum(s, shm) * inv_d;
      ss = 0.f;
#pragma unroll
      for (int k = 0; k < kMax; ++k) {
        if (lane + k * size < C) {
#pragma unroll
          for (int i = 0; i < V; ++i) {
            const float d = to_f(cur[k].v[i]) - mu;
            ss += d * d;
          }
        }
      }
    }
    const float rs = 1.f / sqrtf(block_sum(ss, shm) * inv_d + eps);
    if (lane == 0) {
      rstd_out[r] = rs;
      if constexpr (kCenter) mean_out[r] = mu;
    }
    T* yr = y + r * D;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = lane + k * size;
      if (c < C) {
        float wv[V], o[V];
        load_vec(w + c * V, wv);
        if constexpr (kCenter) {
          float bv[V] = {};
          if (b) load_vec(b + c * V, bv);
#pragma unroll
          for (int i = 0; i < V; ++i) o[i] = (to_f(cur[k].v[i]) - mu) * rs * wv[i] + bv[i];
        } else {
#pragma unroll
          for (int i = 0; i < V; ++i) o[i] = wv[i] * (to_f(cur[k].v[i]) * rs);
        }
        store_vec(yr + c * V, o);
      }
    }
  }
}

// The backward on the same plan: x and dy of the next row (and its mean/rstd) are fetched while
// the current row is finished; dy * w is recomputed from the raw chunks rather than kept in f32,
// and w is read once per block (its chunks are this thread's for every row). Partial column sums
// as in norm_bwd_kernel: row blockIdx.x of pw/pb.
template <class T, int kMax, bool kCenter>
__global__ void __launch_bounds__(kPipeBwdThreads, 1)
norm_bwd_pipe_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                     const float* __restrict__ mean, const float* __restrict__ rstd,
                     T* __restrict__ dx, float* __restrict__ pw, float* __restrict__ pb, int64_t N,
                     int D, bool acc) {
  constexpr int V = kVec<T>;
  __shared__ float shm[32];
  const int lane = threadIdx.x, size = blockDim.x;
  const int C = D / V;
  const float inv_d = 1.f / float(D);
  Vec<T> wr[kMax];
  fetch_row<T, kMax>(w, lane, size, C, wr);
  float aw[kMax][V], ab[kCenter ? kMax : 1][V];
#pragma unroll
  for (int k = 0; k < kMax; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) {
      aw[k][i] = 0.f;
      if constexpr (kCenter) ab[k][i] = 0.f;
    }
  Vec<T> xn[kMax], gn[kMax];
  float mun = 0.f, rsn = 0.f;
  int64_t r = blockIdx.x;
  if (r < N) {
    fetch_row<T, kMax>(x + r * D, lane, size, C, xn);
    fetch_row<T, kMax>(dy + r * D, lane, size, C, gn);
    if constexpr (kCenter) mun = mean[r];
    rsn = rstd[r];
  }
  for (; r < N; r += gridDim.x) {
    Vec<T> xc[kMax], gc[kMax];
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      xc[k] = xn[k];
      gc[k] = gn[k];
    }
    const float mu = mun, rs = rsn;
    const int64_t rn = r + gridDim.x;
    if (rn < N) {
      fetch_row<T, kMax>(x + rn * D, lane, size, C, xn);
      fetch_row<T, kMax>(dy + rn * D, lane, size, C, gn);
      if constexpr (kCenter) mun = mean[rn];
      rsn = rstd[rn];
    }
    float sg = 0.f, sgx = 0.f;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      if (lane + k * size < C) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float g = to_f(gc[k].v[i]);
          const float xh = (to_f(xc[k].v[i]) - mu) * rs;
          aw[k][i] += g * xh;
          if constexpr (kCenter) ab[k][i] += g;
          const float gw = g * to_f(wr[k].v[i]);
          sg += gw;
          sgx += gw * xh;
        }
      }
    }
    if (!dx) continue;  // uniform over the kernel
    const float a = kCenter ? block_sum(sg, shm) * inv_d : 0.f;
    const float cc = block_sum(sgx, shm) * inv_d;
    T* dxr = dx + r * D;
#pragma unroll
    for (int k = 0; k < kMax; ++k) {
      const int c = lane + k * size;
      if (c < C) {
        float o[V];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const float gw = to_f(gc[k].v[i]) * to_f(wr[k].v[i]);
          o[i] = rs * (gw - a - (to_f(xc[k].v[i]) - mu) * rs * cc);
        }
        if (acc) add_chunk<T, true>(dxr, c, D, o);
        store_vec(dxr + c * V, o);
      }
    }
  }
  float* pwr = pw ? pw + int64_t(blockIdx.x) * D : nullptr;
  float* pbr = pb ? pb + int64_t(blockIdx.x) * D : nullptr;
#pragma unroll
  for (int k = 0; k < kMax; ++k) {
    const int c = lane + k * size;
    if (c < C) {
      if (pwr) {
        *reinterpret_cast<float4*>(pwr + c * V) =
            make_float4(aw[k][0], aw[k][1], aw[k][2], aw[k][3]);
        if constexpr (V == 8)
          *reinterpret_cast<float4*>(pwr + c * V + 4) =
              make_float4(aw[k][4], aw[k][5], aw[k][6], aw[k][7]);
      }
      if constexpr (kCenter) {
        if (pbr) {
          *reinterpret_cast<float4*>(pbr + c * V) =
              make_float4(ab[k][0], ab[k][1], ab[k][2], ab[k][3]);
          if constexpr (V == 8)
            *reinterpret_cast<float4*>(pbr + c * V + 4) =
                make_float4(ab[k][4], ab[k][5], ab[k][6], ab[k][7]);
        }
      }
    }
  }
}

// out[j] = sum over g of part[g, j], g in a fixed order (thread row ty sums g = ty, ty + 32, ...;
// then the 32 sums are added in order): deterministic. Block (32, 32), a tile of 32 columns.
constexpr int kSumRows = 32;
template <class T>
__global__ void column_sum_kernel(const float* __restrict__ part, int64_t groups, int D,
                                  T* __restrict__ out) {
  __shared__ float tile[kSumRows][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int j = blockIdx.x * 32 + tx;
  float s = 0.f;
  if (j < D)
    for (int64_t q = ty; q < groups; q += kSumRows) s += part[q * D + j];
  tile[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && j < D) {
    float t = 0.f;
#pragma unroll
    for (int q = 0; q < kSumRows; ++q) t += tile[q][tx];
    out[j] = from_f<T>(t);
  }
}

template <class F>
void bool_dispatch(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// The pipelined kernels are the default where they apply; FTUNE_NORM_PIPE=0 selects the generic
// kernels everywhere (read per call, so a test or benchmark can compare both in one process).
bool pipe_enabled() {
  const char* e = std::getenv("FTUNE_NORM_PIPE");
  return !(e && e[0] == '0');
}

// Blocks of `kernel` that fit on x's GPU at once (at least 1 per SM).
template <class K>
int64_t resident_blocks(K kernel, int threads, const Device& dev) {
  int per_sm = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return int64_t(std::max(per_sm, 1)) * ftune::cuda::device_sm_count(dev.index);
}

int round_up32(int64_t n) { return int((n + 31) / 32 * 32); }

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.raw_data() : nullptr; }

// Checks shared by the launchers: x is [..., D] on the GPU, contiguous, f32/bf16/f16, and each
// other tensor matches (same dtype, [D] or x's shape); stats are f32 [N].
struct NormShape {
  int64_t N = 0;
  int D = 0;
};
NormShape check_norm(const char* op, const Tensor& x, std::initializer_list<const Tensor*> like_x,
                     std::initializer_list<const Tensor*> vecs,
                     std::initializer_list<const Tensor*> stats) {
  check_cuda(op, x, "x");
  FTUNE_CHECK(x.dim() >= 1, "[", op, "] x must have at least 1 dim, got ", x.desc());
  const int64_t D = x.size(-1);
  FTUNE_CHECK(D < INT_MAX / 2, "[", op, "] rows of ", D, " elements are too long");
  NormShape s;
  s.D = int(D);
  s.N = D ? x.numel() / D : 0;
  for (const Tensor* t : like_x) {
    if (!t->defined()) continue;
    check_cuda(op, *t, "a row tensor");
    FTUNE_CHECK(t->shape() == x.shape() && t->dtype() == x.dtype(), "[", op, "] ", t->desc(),
                " does not match x ", x.desc());
  }
  for (const Tensor* t : vecs) {
    if (!t->defined()) continue;
    check_cuda(op, *t, "weight/bias");
    FTUNE_CHECK(t->shape() == Shape{D} && t->dtype() == x.dtype(), "[", op, "] weight/bias ",
                t->desc(), " must be [", D, "] of x's dtype (x ", x.desc(), ")");
  }
  for (const Tensor* t : stats) {
    if (!t->defined()) continue;
    check_cuda(op, *t, "mean/rstd");
    FTUNE_CHECK(t->dtype() == DType::f32 && t->numel() == s.N, "[", op, "] mean/rstd ", t->desc(),
                " must be f32 with ", s.N, " elements (one per row)");
  }
  return s;
}

bool all_aligned(std::initializer_list<const void*> ps) {
  for (const void* p : ps)
    if (p && !aligned16(p)) return false;
  return true;
}

void forward_impl(const char* op, bool center, const Tensor& x, const Tensor& res,
                  const Tensor& weight, const Tensor& bias, double eps, Tensor& y, Tensor& h,
                  Tensor* mean, Tensor& rstd) {
  FTUNE_CHECK(weight.defined(), "[", op, "] weight is undefined");
  FTUNE_CHECK(!res.defined() || h.defined(), "[", op, "] h_out is undefined");
  check_cuda(op, y, "y");
  const Tensor no_mean;
  const Tensor& mt = mean ? *mean : no_mean;
  if (center) FTUNE_CHECK(mt.defined(), "[", op, "] mean is undefined");
  FTUNE_CHECK(rstd.defined(), "[", op, "] rstd is undefined");
  const NormShape s = check_norm(op, x, {&res, &y, &h}, {&weight, &bias}, {&mt, &rstd});
  if (s.N == 0 || s.D == 0) return;
  kernels::cuda::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>, kMax = kFwdChunks<T>;
    const int64_t C = (s.D + V - 1) / V;
    const bool warp = C <= 32 * kMax;
    const bool vec = s.D % V == 0 &&
                     all_aligned({x.raw_data(), ptr_or_null(res), weight.raw_data(),
                                  ptr_or_null(bias), y.raw_data(), ptr_or_null(h)});
    const int threads =
        warp ? 32 * kWarpRowsPerBlock
             : std::clamp(round_up32((C + kMax - 1) / kMax), 64, kMaxThreads);
    const int64_t rows_per_block = warp ? kWarpRowsPerBlock : 1;
    const unsigned grid = unsigned(std::min<int64_t>((s.N + rows_per_block - 1) / rows_per_block,
                                                     INT_MAX));
    auto* xp = static_cast<const T*>(x.raw_data());
    auto* rp = static_cast<const T*>(ptr_or_null(res));
    auto* wp = static_cast<const T*>(weight.raw_data());
    auto* bp = static_cast<const T*>(ptr_or_null(bias));
    auto* yp = static_cast<T*>(y.raw_data());
    auto* hp = res.defined() ? static_cast<T*>(h.raw_data()) : nullptr;
    float* mp = center ? static_cast<float*>(mt.raw_data()) : nullptr;
    auto* sp = static_cast<float*>(rstd.raw_data());
    // Whole rows in the register cache of one block: the pipelined kernel.
    constexpr int kP = kPipeFwdChunks<T>;
    const int64_t pthreads = round_up32((C + kP - 1) / kP);
    // LayerNorm's forward stays on the generic kernel: on an H200 the pipelined one was slower
    // there (61% vs 66% of copy bandwidth at 16384x8192 bf16; RMSNorm: 80% vs 66%).
    if (vec && !warp && !res.defined() && !center && pthreads <= kPipeFwdThreads &&
        pipe_enabled()) {
      bool_dispatch(center, [&](auto center_t) {
        auto kernel = norm_fwd_pipe_kernel<T, kP, decltype(center_t)::value>;
        const int nt = std::max(int(pthreads), 64);
        const int64_t grid = std::min(s.N, resident_blocks(kernel, nt, x.device()));
        kernel<<<unsigned(grid), nt, 0, stream()>>>(xp, wp, bp, yp, mp, sp, s.N, s.D, float(eps));
      });
      FTUNE_LAUNCH_CHECK(op);
      return;
    }
    bool_dispatch(vec, [&](auto vec_t) {
      bool_dispatch(warp, [&](auto warp_t) {
        bool_dispatch(center, [&](auto center_t) {
          bool_dispatch(res.defined(), [&](auto res_t) {
            norm_fwd_kernel<T, kMax, decltype(vec_t)::value, decltype(warp_t)::value,
                            decltype(center_t)::value, decltype(res_t)::value>
                <<<grid, threads, 0, stream()>>>(xp, rp, wp, bp, yp, hp, mp, sp, s.N, s.D,
                                                 float(eps));
          });
        });
      });
    });
  });
  FTUNE_LAUNCH_CHECK(op);
}

void backward_impl(const char* op, bool center, const Tensor& dy, const Tensor& x,
                   const Tensor& weight, const Tensor& mean, const Tensor& rstd, Tensor& dx,
                   Tensor& dweight, Tensor& dbias, bool accumulate_dx) {
  FTUNE_CHECK(weight.defined() && rstd.defined() && dy.defined(), "[", op,
              "] dy, weight and rstd must be defined");
  if (center) FTUNE_CHECK(mean.defined(), "[", op, "] mean is undefined");
  const NormShape s =
      check_norm(op, x, {&dy, &dx}, {&weight, &dweight, &dbias}, {&mean, &rstd});
  if (s.D == 0 || (!dx.defined() && !dweight.defined() && !dbias.defined())) return;
  kernels::cuda::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>, kMax = kBwdChunks<T>;
    const int64_t C = (s.D + V - 1) / V;
    const bool warp = C <= 32 * kMax;
    const bool vec = s.D % V == 0 && all_aligned({x.raw_data(), dy.raw_data(), weight.raw_data(),
                                                  ptr_or_null(dx)});
    int threads =
        warp ? 32 * kWarpRowsPerBlock
             : std::clamp(round_up32((C + kMax - 1) / kMax), 64, kMaxThreads);
    const int64_t rows_per_block = warp ? kWarpRowsPerBlock : 1;
    auto* dyp = static_cast<const T*>(dy.raw_data());
    auto* xp = static_cast<const T*>(x.raw_data());
    auto* wp = static_cast<const T*>(weight.raw_data());
    auto* mp = center ? static_cast<const float*>(mean.raw_data()) : nullptr;
    auto* sp = static_cast<const float*>(rstd.raw_data());
    auto* dxp = static_cast<T*>(const_cast<void*>(ptr_or_null(dx)));
    constexpr int kP = kPipeBwdChunks<T>;
    const int64_t pthreads = std::max<int64_t>(round_up32((C + kP - 1) / kP), 64);
    const bool pipe = vec && !warp && pthreads <= kPipeBwdThreads && pipe_enabled();
    if (pipe) threads = int(pthreads);
    bool_dispatch(vec, [&](auto vec_t) {
      bool_dispatch(warp, [&](auto warp_t) {
        bool_dispatch(center, [&](auto center_t) {
          auto kernel = pipe ? norm_bwd_pipe_kernel<T, kP, decltype(center_t)::value>
                             : norm_bwd_kernel<T, kMax, decltype(vec_t)::value,
                                               decltype(warp_t)::value, decltype(center_t)::value>;
          // As many blocks as fit on the GPU at once (each loops over rows): the partial buffers
          // stay small. The count depends only on the device, so the sums are reproducible.
          int per_sm = 0;
          CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
          const int64_t cap =
              int64_t(std::max(per_sm, 1)) * ftune::cuda::device_sm_count(x.device().index);
          const int64_t grid = std::max<int64_t>(
              1, std::min((s.N + rows_per_block - 1) / rows_per_block, cap));
          const int64_t groups = grid;  // one partial row per block
          Tensor pw, pb;
          if (dweight.defined()) pw = Tensor::empty({groups, s.D}, DType::f32, x.device());
          if (dbias.defined()) pb = Tensor::empty({groups, s.D}, DType::f32, x.device());
          auto* pwp = pw.defined() ? static_cast<float*>(pw.raw_data()) : nullptr;
          auto* pbp = pb.defined() ? static_cast<float*>(pb.raw_data()) : nullptr;
          kernel<<<unsigned(grid), threads, 0, stream()>>>(dyp, xp, wp, mp, sp, dxp, pwp, pbp,
                                                           s.N, s.D, accumulate_dx && dxp);
          FTUNE_LAUNCH_CHECK(op);
          const dim3 block(32, kSumRows);
          const unsigned cgrid = unsigned((s.D + 31) / 32);
          if (pwp) {
            column_sum_kernel<T><<<cgrid, block, 0, stream()>>>(
                pwp, groups, s.D, static_cast<T*>(dweight.raw_data()));
            FTUNE_LAUNCH_CHECK(op);
          }
          if (pbp) {
            column_sum_kernel<T><<<cgrid, block, 0, stream()>>>(
                pbp, groups, s.D, static_cast<T*>(dbias.raw_data()));
            FTUNE_LAUNCH_CHECK(op);
          }
        });
      });
    });
  });
}

}  // namespace

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        Tensor& y, Tensor& mean, Tensor& rstd) {
  Tensor none;
  forward_impl("layer_norm", true, x, Tensor(), weight, bias, eps, y, none, &mean, rstd);
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                         Tensor& dbias, bool accumulate_dx) {
  backward_impl("layer_norm_backward", true, dy, x, weight, mean, rstd, dx, dweight, dbias,
                accumulate_dx);
}

void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd) {
  Tensor none;
  forward_impl("rms_norm", false, x, Tensor(), weight, Tensor(), eps, y, none, nullptr, rstd);
}

void rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                       Tensor& dx, Tensor& dweight, bool accumulate_dx) {
  Tensor no_db;
  backward_impl("rms_norm_backward", false, dy, x, weight, Tensor(), rstd, dx, dweight, no_db,
                accumulate_dx);
}

void rms_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                               double eps, Tensor& y, Tensor& h_out, Tensor& rstd) {
  FTUNE_CHECK(residual.defined(), "[rms_norm_residual] residual is undefined");
  forward_impl("rms_norm_residual", false, x, residual, weight, Tensor(), eps, y, h_out, nullptr,
               rstd);
}

void layer_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                 const Tensor& bias, double eps, Tensor& y, Tensor& h_out,
                                 Tensor& mean, Tensor& rstd) {
  FTUNE_CHECK(residual.defined(), "[layer_norm_residual] residual is undefined");
  forward_impl("layer_norm_residual", true, x, residual, weight, bias, eps, y, h_out, &mean, rstd);
}

}  // namespace ftune::kernels::cuda
