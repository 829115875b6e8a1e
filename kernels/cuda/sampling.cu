// CUDA next-token selection (kernels/sampling.h): one CTA of 1024 threads per row, the CPU twin's
// semantics step by step, with the weights in f64 as on the CPU:
//   1. one sweep: max, NaN / +inf flags, and the argmax (first maximum) for greedy;
//   2. top_k: the k-th largest logit by a radix select on order-preserving 32-bit keys (4 sweeps
//      of 8 bits, shared-memory histograms of counts);
//   3. the weights w = exp((x - max) / T) of the tokens >= that threshold, and their sum;
//   4. top_p: the same radix select with histograms of MASS from the top down, which finds the
//      logit x* where the cumulative mass crosses top_p * total; tokens tied at x* are kept in id
//      order until the mass is reached (one more sweep finds the last kept id);
//   5. the inverse-CDF draw in id order over the kept tokens: tiles of 8 consecutive ids per
//      thread, a block scan of the per-thread sums, each thread walking its ids sequentially.
// The histogram masses are added by shared-memory f64 atomics (order not fixed): the top_p set can
// differ from the CPU's only when the cumulative mass is within f64 rounding of top_p * total.
// Written for generation (a few rows per call), not for throughput.
#include <climits>

#include "core/rng.h"
#include "kernels/cuda/common.cuh"
#include "kernels/sampling.h"

namespace ftune::kernels::cuda {

namespace {

constexpr int kST = 1024;  // threads per row
constexpr int kE = 8;      // consecutive ids per thread in the in-order passes

__device__ __forceinline__ uint32_t key_of(float f) {  // larger float -> larger key
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float float_of_key(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Every thread gets op over all threads' values, combined in a fixed order. shm: 32 T.
template <class T, class Op>
__device__ __forceinline__ T block_all(T v, Op op, T* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  T r = shm[0];
  for (int w = 1; w < nw; ++w) r = op(r, shm[w]);
  return r;
}

// Exclusive prefix sum over the threads in thread order; total gets the sum. shm: 32 T.
template <class T>
__device__ __forceinline__ T block_excl_scan(T v, T* shm, T& total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  T ex = __shfl_up_sync(0xffffffffu, incl, 1);
  if (lane == 0) ex = T(0);
  __syncthreads();
  if (lane == 31) shm[warp] = incl;
  __syncthreads();
  T before = T(0), tot = T(0);
  for (int w = 0; w < nw; ++w) {
    const T s = shm[w];
    if (w < warp) before += s;
    tot += s;
  }
  total = tot;
  return before + ex;
}

struct Sum {
  template <class T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Min {
  template <class T>
  __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct Max {
  template <class T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Radix select from the top over the keys of the tokens with `in(j)`, weighted by `weight(j)`
// (count: 1; mass: w). Finds the key where the cumulative weight from the largest key down first
// reaches `need`; returns it, with `above` = the weight strictly above it and `at` = the count of
// tokens with exactly that key. When rounding keeps every bin below `need`, the smallest key wins.
template <class T, class In, class Wt, class Acc>
__device__ uint32_t radix_select(const T* __restrict__ xr, int64_t v, In in, Wt weight, Acc need,
                                 Acc& above, unsigned& at, Acc* hist_w, unsigned* hist_c,
                                 uint32_t* s_sel) {
  uint32_t prefix = 0, mask = 0;
  above = Acc(0);
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) {
      hist_w[i] = Acc(0);
      hist_c[i] = 0;
    }
    __syncthreads();
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
      if (!in(j)) continue;
      const uint32_t k = key_of(to_f(xr[j]));
      if ((k & mask) != prefix) continue;
      const int d = int((k >> shift) & 255u);
      atomicAdd(&hist_w[d], weight(j));
      atomicAdd(&hist_c[d], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1, lowest = -1;
      Acc acc = above;
      for (int d = 255; d >= 0; --d) {
        if (hist_c[d] == 0) continue;
        lowest = d;
        if (acc + hist_w[d] >= need) {
          sel = d;
          break;
        }
        acc += hist_w[d];
      }
      if (sel < 0) {  // rounding: nothing reached `need`; keep every token of the prefix
        sel = lowest < 0 ? 0 : lowest;
        acc -= lowest < 0 ? Acc(0) : hist_w[sel];
      }
      s_sel[0] = uint32_t(sel);
      s_sel[1] = hist_c[sel];
      *reinterpret_cast<Acc*>(s_sel + 2) = acc;
    }
    __syncthreads();
    prefix |= s_sel[0] << shift;
    mask |= 255u << shift;
    at = s_sel[1];
    above = *reinterpret_cast<const Acc*>(s_sel + 2);
  }
  return prefix;
}

template <class T>
__global__ void __launch_bounds__(kST) sample_kernel(const T* __restrict__ x, int64_t v,
                                                     double temperature, int64_t top_k,
                                                     double top_p, uint64_t seed, uint64_t step,
                                                     const uint64_t* __restrict__ streams,
                                                     int32_t* __restrict__ out) {
  __shared__ double dsh[32];
  __shared__ float fsh[32];
  __shared__ int ish[32];
  __shared__ long long lsh[32];
  __shared__ double hist_w[256];
  __shared__ unsigned hist_c[256];
  __shared__ __align__(8) uint32_t s_sel[4];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * v;

  // 1. max, flags, argmax (first maximum; NaN skipped)
  float mx = -INFINITY, best_v = -INFINITY;
  int best_i = INT_MAX, flags = 0;  // 1: NaN, 2: +inf
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) {
    const float f = to_f(xr[j]);
    if (isnan(f)) {
      flags |= 1;
      continue;
    }
    if (f == INFINITY) flags |= 2;
    mx = fmaxf(mx, f);
    if (f > best_v || (f == best_v && int(j) < best_i)) {
      best_v = f;
      best_i = int(j);
    }
  }
  flags = block_all(flags, [](int a, int b) { return a | b; }, ish);
  mx = block_all(mx, [](float a, float b) { return fmaxf(a, b); }, fsh);
  // the first maximum: the max value, then the lowest id holding it
  const float top = block_all(best_v, [](float a, float b) { return fmaxf(a, b); }, fsh);
  const int first = block_all(best_v == top ? best_i : INT_MAX, Min(), ish);
  if (temperature == 0.0) {
    if (threadIdx.x == 0) out[row] = (flags & 1) ? kSampleNaN : first;
    return;
  }
  if (flags & 1 || flags & 2 || !(mx > -INFINITY)) {
    if (threadIdx.x == 0)
      out[row] = (flags & 1) ? kSampleNaN : (flags & 2) ? kSamplePosInf : kSampleAllNegInf;
    return;
  }

  // 2. top_k threshold (raw logits: a positive temperature keeps the order)
  float thr = -INFINITY;
  if (top_k > 0 && top_k < v) {
    unsigned long long above = 0;
    unsigned at = 0;
    const uint32_t k = radix_select(
        xr, v, [](int64_t) { return true; }, [](int64_t) { return 1ull; },
        (unsigned long long)top_k, above, at, reinterpret_cast<unsigned long long*>(hist_w), hist_c,
        s_sel);
    thr = float_of_key(k);
  }

  // 3. weights and their total
  const double inv_t = 1.0 / temperature, dmx = double(mx);
  auto weight = [&](int64_t j) -> double {
    const float f = to_f(xr[j]);
    return f >= thr ? exp((double(f) - dmx) * inv_t) : 0.0;  // -inf: exp(-inf) = 0
  };
  double tsum = 0.0;
  for (int64_t j = threadIdx.x; j < v; j += blockDim.x) tsum += weight(j);
  const double total = block_all(tsum, Sum(), dsh);

  // 4. top_p: the crossing key, and the last kept id among the tokens tied at it
  bool use_p = top_p < 1.0;
  uint32_t kstar = 0;
  int64_t cut_id = v;  // tokens with key == kstar and id <= cut_id are kept
  if (use_p) {
    const double target = top_p * total;
    double above = 0.0;
    unsigned at = 0;
    kstar = radix_select(
        xr, v, [&](int64_t j) { return weight(j) > 0.0; }, weight, target, above, at, hist_w,
        hist_c, s_sel);
    // tied tokens have equal weight p*: keep the smallest count j >= 1 reaching the target
    const double pstar = exp((double(float_of_key(kstar)) - dmx) * inv_t);
    const double rest = target - above;
    long long need = rest <= 0.0 ? 1 : (long long)ceil(rest / pstar);
    if (need < 1) need = 1;
    if (need < (long long)at) {  // find the id of the need-th tied token in id order
      long long seen = 0;
      int64_t found = -1;
      for (int64_t t0 = 0; t0 < v && found < 0; t0 += int64_t(kST) * kE) {
        const int64_t j0 = t0 + int64_t(threadIdx.x) * kE;
        long long c = 0;
        for (int e = 0; e < kE; ++e) {
          const int64_t j = j0 + e;
          if (j < v && key_of(to_f(xr[j])) == kstar) ++c;
        }
        long long tile_total = 0;
        long long before = seen + block_excl_scan(c, lsh, tile_total);
        long long cand = LLONG_MAX;
        for (int e = 0; e < kE; ++e) {
          const int64_t j = j0 + e;
          if (j < v && key_of(to_f(xr[j])) == kstar && ++before == need) {
            cand = j;
            break;
          }
        }
        cand = block_all(cand, Min(), lsh);
        if (cand != LLONG_MAX) found = cand;
        seen += tile_total;
      }
      cut_id = found;  // found: need < at tied tokens exist
    }
  }
  auto kept_w = [&](int64_t j) -> double {
    const double w = weight(j);
    if (w == 0.0 || !use_p) return w;
    const uint32_t k = key_of(to_f(xr[j]));
    return (k > kstar || (k == kstar && j <= cut_id)) ? w : 0.0;
  };

  // 5. the draw: the first kept id whose cumulative weight (in id order) exceeds u * total
  double ksum = 0.0;
  if (use_p) {
    for (int64_t j = threadIdx.x; j < v; j += blockDim.x) ksum += kept_w(j);
    ksum = block_all(ksum, Sum(), dsh);
  } else {
    ksum = total;
  }
  const uint64_t stream = streams ? streams[row] : uint64_t(row);
  const double target_u = double(philox_uniform(seed, stream, step)) * ksum;
  double cum_before = 0.0;
  long long last = 0, result = -1;
  for (int64_t t0 = 0; t0 < v; t0 += int64_t(kST) * kE) {
    const int64_t j0 = t0 + int64_t(threadIdx.x) * kE;
    double w[kE], mine = 0.0;
    for (int e = 0; e < kE; ++e) {
      const int64_t j = j0 + e;
      w[e] = j < v ? kept_w(j) : 0.0;
      mine += w[e];
      if (w[e] != 0.0) last = j;
    }
    double tile_total = 0.0;
    double cum = cum_before + block_excl_scan(mine, dsh, tile_total);
    long long cand = LLONG_MAX;
    for (int e = 0; e < kE; ++e) {
      if (w[e] == 0.0) continue;
      cum += w[e];
      if (cum > target_u) {
        cand = j0 + e;
        break;
      }
    }
    cand = block_all(cand, Min(), lsh);
    if (cand != LLONG_MAX) {
      result = cand;
      break;
    }
    cum_before += tile_total;
  }
  if (result < 0) result = block_all(last, Max(), lsh);  // u * total rounded up to the total
  if (threadIdx.x == 0) out[row] = int32_t(result);
}

}  // namespace

void sample_tokens(const void* logits, DType dt, int64_t b, int64_t v, const SampleParams& p,
                   uint64_t seed, uint64_t step, const uint64_t* streams, int32_t* out) {
  const char* op = "sample";
  FTUNE_CHECK(b >= 0 && b <= int64_t(0x7fffffff), "[", op, "] bad row count ", b);
  FTUNE_CHECK(v > 0 && v < int64_t(0x7fffffff), "[", op, "] vocabulary must be in [1, 2^31), got ",
              v);
  FTUNE_CHECK(std::isfinite(p.temperature) && p.temperature >= 0.0, "[", op,
              "] temperature must be >= 0, got ", p.temperature);
  FTUNE_CHECK(p.top_k >= 0, "[", op, "] top_k must be >= 0, got ", p.top_k);
  FTUNE_CHECK(p.top_p >= 0.0 && p.top_p <= 1.0, "[", op, "] top_p must be in [0, 1], got ", p.top_p);
  if (b == 0) return;
  kernels::cuda::dispatch_float(dt, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sample_kernel<T><<<unsigned(b), kST, 0, stream()>>>(static_cast<const T*>(logits), v,
                                                        p.temperature, p.top_k, p.top_p, seed,
                                                        step, streams, out);
  });
  FTUNE_LAUNCH_CHECK(op);
}

}  // namespace ftune::kernels::cuda
