// CUDA softmax and loss kernels (kernels/loss.h). One CTA per row. A row is swept by the whole
// CTA with 16-byte vector loads (kUnroll of them in flight per thread): the scalar head up to the
// first 16-byte boundary, the vector body, the scalar tail, so any V (odd too) and any row offset
// work. The online (max, sum-exp) runs per thread in f32 against the thread's running max, and the
// per-thread states merge in a fixed tree (warp butterfly, then across warps): deterministic.
// exp is exp2f of a log2e-prescaled argument (MUFU ex2, ~2 ulp).
#include "kernels/cuda/common.cuh"
#include "kernels/loss.h"

namespace ftune::kernels::cuda {

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -INFINITY;

__device__ __forceinline__ float exp_f(float x) { return exp2f(x * kLog2e); }

// 2^x with subnormal results flushed to 0: one MUFU op, where exp2f adds a subnormal fix-up
// around it. Only for terms added to a row's running sum, which holds the max's term 1 (or is
// rescaled to it), so a subnormal term cannot change the f32 sum; NaN and -inf behave as exp2f.
__device__ __forceinline__ float ex2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- row sweeps ----------------------------------------------------------------------------------

// W elements at p into f32 (W = kVec<T>: one 16-byte load; W = 1: scalar).
template <int W, class T>
__device__ __forceinline__ void load_w(const T* p, float (&a)[W]) {
  if constexpr (W == 1) {
    a[0] = to_f(p[0]);
  } else {
    load_vec(p, a);
  }
}
template <int W, class T>
__device__ __forceinline__ void store_w(T* p, const float (&a)[W]) {
  if constexpr (W == 1) {
    p[0] = from_f<T>(a[0]);
  } else {
    store_vec(p, a);
  }
}

// Elements before the first 16-byte boundary of row pointer p (every pointer of a sweep shares
// p's offset modulo 16, which the launcher checks; W = 1 has no head).
template <int W, class T>
__device__ __forceinline__ int64_t head_of(const T* p, int64_t v) {
  if constexpr (W == 1) {
    return 0;
  } else {
    const int64_t h = int64_t((16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15) / int64_t(sizeof(T));
    return h < v ? h : v;
  }
}

// Calls f(a, b, o0, o1, j) for every element group of a row: a, b the values of in0, in1 (b
// unused when in1 is null), o0, o1 what to store to out0, out1 (each stored when non-null); the
// arrays have N = W elements (body) or 1 (head, tail), j is the column of element 0. Every thread
// of the CTA must call it (no barrier inside, but the callers' reductions follow).
// U: 16-byte loads per input in flight per thread (kUnroll; two-input sweeps that must keep
// registers low take 2).
template <int U, int W, class T, class F>
__device__ __forceinline__ void sweep_u(const T* __restrict__ in0, const T* __restrict__ in1,
                                        T* __restrict__ out0, T* __restrict__ out1, int64_t v,
                                        F&& f) {
  const int64_t head = head_of<W>(in0, v);
  const int64_t bs = blockDim.x;
  auto scalar = [&](int64_t j) {
    float a[1] = {to_f(in0[j])}, b[1] = {in1 ? to_f(in1[j]) : 0.f}, o0[1] = {0.f}, o1[1] = {0.f};
    f(a, b, o0, o1, j);
    if (out0) out0[j] = from_f<T>(o0[0]);
    if (out1) out1[j] = from_f<T>(o1[0]);
  };
  for (int64_t j = threadIdx.x; j < head; j += bs) scalar(j);
  const int64_t nvec = (v - head) / W;
  for (int64_t k0 = threadIdx.x; k0 < nvec; k0 += U * bs) {
    float a[U][W], b[U][W];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * bs;
      if (k < nvec) {
        load_w<W>(in0 + head + k * W, a[u]);
        if (in1) load_w<W>(in1 + head + k * W, b[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + u * bs;
      if (k < nvec) {
        float o0[W], o1[W];
#pragma unroll
        for (int e = 0; e < W; ++e) o0[e] = o1[e] = 0.f;
        f(a[u], b[u], o0, o1, head + k * W);
        if (out0) store_w<W>(out0 + head + k * W, o0);
        if (out1) store_w<W>(out1 + head + k * W, o1);
      }
    }
  }
  for (int64_t j = head + nvec * W + threadIdx.x; j < v; j += bs) scalar(j);
}

template <int W, class T, class F>
__device__ __forceinline__ void sweep(const T* __restrict__ in0, const T* __restrict__ in1,
                                      T* __restrict__ out0, T* __restrict__ out1, int64_t v, F&& f) {
  sweep_u<kUnroll, W, T>(in0, in1, out0, out1, v, f);
}

template <class A>
constexpr int len(const A&) {
  return int(sizeof(A) / sizeof(float));
}

// ---- online states and their block reductions ---------------------------------------------------

template <int K>
struct St {
  float f[K];
};

// Every thread gets merge() of all threads' states. shm holds K * 32 floats. Contains barriers:
// every thread of the CTA must call it.
template <int K, class M>
__device__ __forceinline__ St<K> block_reduce(St<K> v, const St<K>& identity, M merge,
                                              float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    St<K> w;
#pragma unroll
    for (int k = 0; k < K; ++k) w.f[k] = __shfl_xor_sync(0xffffffffu, v.f[k], o);
    v = merge(v, w);
  }
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < K; ++k) shm[k * 32 + warp] = v.f[k];
  __syncthreads();
  v = identity;
  if (lane < nw)
#pragma unroll
    for (int k = 0; k < K; ++k) v.f[k] = shm[k * 32 + lane];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    St<K> w;
#pragma unroll
    for (int k = 0; k < K; ++k) w.f[k] = __shfl_xor_sync(0xffffffffu, v.f[k], o);
    v = merge(v, w);
  }
  return v;
}

// (m, s): m the running max of the raw values, s = sum exp(c' (x - m)) with c = c' log2e the
// prescaled scale. NaN reaches s through exp (fmaxf skips it in m); -inf values add 0; a state
// that saw only -inf keeps m = -inf, s = 0.
struct Lse {
  float m = kNegInf, s = 0.f;
  template <int N>
  __device__ __forceinline__ void add(const float (&a)[N], float c) {
    float bm = a[0];
#pragma unroll
    for (int e = 1; e < N; ++e) bm = fmaxf(bm, a[e]);
    if (bm > m) {
      s *= exp2f((m - bm) * c);  // m = -inf: 0 * 0
      m = bm;
    }
    const float mm = m == kNegInf ? 0.f : m;  // -inf - -inf would be NaN
    float cs = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) cs += ex2_ftz((a[e] - mm) * c);
    s += cs;
  }
};

// Merge of two (m, s) states; a state whose m is not the max is rescaled (a NaN s survives).
__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2, float c) {
  const float mx = fmaxf(m, m2);
  const float f1 = m == mx ? 1.f : exp2f((m - mx) * c);
  const float f2 = m2 == mx ? 1.f : exp2f((m2 - mx) * c);
  s = s * f1 + s2 * f2;
  m = mx;
}

// The (m, log s) of a row under the scale c (prescaled by log2e), on every thread.
__device__ __forceinline__ float2 reduce_lse(Lse st, float c, float* shm) {
  St<2> v{{st.m, st.s}};
  v = block_reduce<2>(v, St<2>{{kNegInf, 0.f}},
                      [c](St<2> a, const St<2>& b) {
                        lse_merge(a.f[0], a.f[1], b.f[0], b.f[1], c);
                        return a;
                      },
                      shm);
  return make_float2(v.f[0], logf(v.f[1]));
}

__device__ __forceinline__ float block_sum2(float v, float* shm) {
  St<1> s{{v}};
  s = block_reduce<1>(s, St<1>{{0.f}},
                      [](St<1> a, const St<1>& b) {
                        a.f[0] += b.f[0];
                        return a;
                      },
                      shm);
  return s.f[0];
}

// ---- kernels -------------------------------------------------------------------------------------

template <int W, class T>
__global__ void __launch_bounds__(kThreads) row_stats_kernel(const T* __restrict__ x, int64_t v,
                                                             float* __restrict__ stat) {
  __shared__ float shm[2 * 32];
  const T* xr = x + int64_t(blockIdx.x) * v;
  Lse st;
  sweep<W, T>(xr, nullptr, nullptr, nullptr, v, [&](const auto& a, const auto&, auto&, auto&, int64_t) {
    st.add(a, kLog2e);
  });
  const float2 r = reduce_lse(st, kLog2e, shm);
  if (threadIdx.x == 0) {
    stat[2 * blockIdx.x] = r.x;
    stat[2 * blockIdx.x + 1] = r.y;
  }
}

template <int W, class T>
__global__ void __launch_bounds__(kThreads) softmax_fwd_kernel(const T* __restrict__ x, int64_t v,
                                                               bool log, T* __restrict__ out) {
  __shared__ float shm[2 * 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * v;
  Lse st;
  sweep<W, T>(xr, nullptr, nullptr, nullptr, v, [&](const auto& a, const auto&, auto&, auto&, int64_t) {
    st.add(a, kLog2e);
  });
  const float2 r = reduce_lse(st, kLog2e, shm);
  const float m = r.x, ls = r.y;
  sweep<W, T>(xr, nullptr, out + row * v, nullptr, v, [&](const auto& a, const auto&, auto& o, auto&, int64_t) {
#pragma unroll
    for (int e = 0; e < len(a); ++e) {
      const float y = (a[e] - m) - ls;
      o[e] = log ? y : exp_f(y);
    }
  });
}

template <int W, class T>
__global__ void __launch_bounds__(kThreads, 2) softmax_bwd_kernel(const T* __restrict__ y,
                                                               const T* __restrict__ dy, int64_t v,
                                                               bool log, T* __restrict__ dx) {
  __shared__ float shm[32];
  const int64_t row = blockIdx.x;
  const T* yr = y + row * v;
  const T* gr = dy + row * v;
  // log: sum(dy); softmax: sum(dy * y). in0 = dy, in1 = y.
  float acc = 0.f;
  sweep_u<2, W, T>(gr, yr, nullptr, nullptr, v, [&](const auto& g, const auto& yy, auto&, auto&, int64_t) {
#pragma unroll
    for (int e = 0; e < len(g); ++e) acc += log ? g[e] : g[e] * yy[e];
  });
  const float sum = block_sum2(acc, shm);
  sweep_u<2, W, T>(gr, yr, dx + row * v, nullptr, v, [&](const auto& g, const auto& yy, auto& o, auto&, int64_t) {
#pragma unroll
    for (int e = 0; e < len(g); ++e) o[e] = log ? g[e] - exp_f(yy[e]) * sum : yy[e] * (g[e] - sum);
  });
}

template <int W, class T, class O>
__global__ void __launch_bounds__(kThreads) nll_fwd_kernel(const T* __restrict__ x,
                                                           const int64_t* __restrict__ tgt,
                                                           int64_t v, int64_t ignore,
                                                           float* __restrict__ stat,
                                                           O* __restrict__ out, float sign) {
  __shared__ float shm[2 * 32];
  const int64_t row = blockIdx.x;
  const int64_t t = tgt[row];
  if (t == ignore) {  // the whole CTA leaves: nothing below is reached
    if (threadIdx.x == 0) {
      stat[2 * row] = stat[2 * row + 1] = 0.f;
      out[row] = from_f<O>(0.f);
    }
    return;
  }
  const T* xr = x + row * v;
  Lse st;
  sweep<W, T>(xr, nullptr, nullptr, nullptr, v, [&](const auto& a, const auto&, auto&, auto&, int64_t) {
    st.add(a, kLog2e);
  });
  const float2 r = reduce_lse(st, kLog2e, shm);
  if (threadIdx.x == 0) {
    stat[2 * row] = r.x;
    stat[2 * row + 1] = r.y;
    // lse - x_t, near-max exact; 0 when the target is in another vocabulary shard
    out[row] = from_f<O>(t >= 0 && t < v ? sign * ((r.x - to_f(xr[t])) + r.y) : 0.f);
  }
}

// Zeros into a row of dx (an ignored target), without reading anything.
template <int W, class T>
__device__ __forceinline__ void zero_row(T* dr, int64_t v) {
  const int64_t head = head_of<W>(dr, v), nvec = (v - head) / W;
  float z[W];
#pragma unroll
  for (int e = 0; e < W; ++e) z[e] = 0.f;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) dr[j] = from_f<T>(0.f);
  for (int64_t k = threadIdx.x; k < nvec; k += blockDim.x) store_w<W>(dr + head + k * W, z);
  for (int64_t j = head + nvec * W + threadIdx.x; j < v; j += blockDim.x) dr[j] = from_f<T>(0.f);
}

// d(gi * nll)/dx of one row: softmax(x) * gi, minus gi at the target; m, ls the row's max and
// log-sum-exp. The arithmetic of nll_bwd_kernel (which calls it).
template <int W, class T>
__device__ __forceinline__ void nll_grad_row(const T* __restrict__ xr, T* __restrict__ dr,
                                             int64_t v, int64_t t, float m, float ls, float gi) {
  sweep<W, T>(xr, nullptr, dr, nullptr, v, [&](const auto& a, const auto&, auto& o, auto&, int64_t j) {
#pragma unroll
    for (int e = 0; e < len(a); ++e) o[e] = exp_f((a[e] - m) - ls) * gi;
    const int64_t d = t - j;  // the target in this group: one test per group, not per element
    if (d >= 0 && d < len(a)) {
#pragma unroll
      for (int e = 0; e < len(a); ++e)
        if (e == d) o[e] -= gi;
    }
  });
}

// nll_fwd_kernel and nll_bwd_kernel in one CTA per row (ops::linear_cross_entropy forms the loss
// and its gradient together): the row's (max, log-sum-exp) from one sweep, nll to out (f32), then
// dx = scale * d nll / dx from a second sweep, which finds the row (at most 300 KB at a 152k bf16
// vocabulary) in L2: one read of the logits from memory instead of two.
// W: the statistics sweep's width (nll_forward's: x alone decides); W2: the gradient sweep's (x
// and dx together, nll_backward's), so each sweep sums in the order of its two-kernel twin.
template <int W, int W2, class T>
__global__ void __launch_bounds__(kThreads) nll_fused_kernel(const T* __restrict__ x,
                                                             const int64_t* __restrict__ tgt,
                                                             int64_t v, int64_t ignore,
                                                             float scale, float* __restrict__ out,
                                                             T* __restrict__ dx) {
  __shared__ float shm[2 * 32];
  const int64_t row = blockIdx.x;
  const int64_t t = tgt[row];
  const T* xr = x + row * v;
  T* dr = dx + row * v;
  if (t == ignore) {
    if (threadIdx.x == 0) out[row] = 0.f;
    zero_row<W2>(dr, v);
    return;
  }
  Lse st;
  sweep<W, T>(xr, nullptr, nullptr, nullptr, v, [&](const auto& a, const auto&, auto&, auto&, int64_t) {
    st.add(a, kLog2e);
  });
  const float2 r = reduce_lse(st, kLog2e, shm);  // on every thread
  if (threadIdx.x == 0) out[row] = (r.x - to_f(xr[t])) + r.y;
  nll_grad_row<W2, T>(xr, dr, v, t, r.x, r.y, scale);
}

template <int W, class T>
__global__ void __launch_bounds__(kThreads) nll_bwd_kernel(const T* __restrict__ x,
                                                           const int64_t* __restrict__ tgt,
                                                           const float* __restrict__ stat,
                                                           const float* __restrict__ g,
                                                           int64_t g_stride, float scale, int64_t v,
                                                           int64_t ignore, T* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const int64_t t = tgt[row];
  const T* xr = x + row * v;
  T* dr = dx + row * v;
  if (t == ignore) {  // zeros, without reading the row (prompt tokens can be half of a batch)
    zero_row<W>(dr, v);
    return;
  }
  const float gi = g[row * g_stride] * scale, m = stat[2 * row], ls = stat[2 * row + 1];
  nll_grad_row<W, T>(xr, dr, v, t, m, ls, gi);
}

// Entropy state: (m, s, w), s = sum e^z, w = sum e^z z, z = x - m.
struct Ent {
  float m = kNegInf, s = 0.f, w = 0.f;
  template <int N>
  __device__ __forceinline__ void add(const float (&a)[N]) {
    float bm = a[0];
#pragma unroll
    for (int e = 1; e < N; ++e) bm = fmaxf(bm, a[e]);
    if (bm > m) {
      if (s > 0.f) {  // the max moves by d < 0: w' = e^d (w + d s), s' = e^d s
        const float d = m - bm, f = exp_f(d);
        w = f * (w + d * s);
        s *= f;
      }
      m = bm;
    }
    const float mm = m == kNegInf ? 0.f : m;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const float z = a[e] - mm, ez = ex2_ftz(z * kLog2e);
      s += ez;
      w += ez > 0.f ? ez * z : 0.f;  // -inf entries: 0, not 0 * -inf
    }
  }
};

__device__ __forceinline__ St<3> ent_merge(St<3> a, const St<3>& b) {
  const float mx = fmaxf(a.f[0], b.f[0]);
  float s = 0.f, w = 0.f;
  auto part = [&](float km, float ks, float kw) {
    if (km == mx) {
      s += ks;
      w += kw;
    } else if (ks > 0.f) {
      const float d = km - mx, f = exp_f(d);
      s += f * ks;
      w += f * (kw + d * ks);
    } else {
      s += ks;  // 0, or a NaN that must survive
    }
  };
  part(a.f[0], a.f[1], a.f[2]);
  part(b.f[0], b.f[1], b.f[2]);
  return St<3>{{mx, s, w}};
}

template <int W, class T>
__global__ void __launch_bounds__(kThreads) entropy_fwd_kernel(const T* __restrict__ x, int64_t v,
                                                               float* __restrict__ stat,
                                                               float* __restrict__ h) {
  __shared__ float shm[3 * 32];
  const int64_t row = blockIdx.x;
  Ent st;
  sweep<W, T>(x + row * v, nullptr, nullptr, nullptr, v,
              [&](const auto& a, const auto&, auto&, auto&, int64_t) { st.add(a); });
  St<3> r = block_reduce<3>(St<3>{{st.m, st.s, st.w}}, St<3>{{kNegInf, 0.f, 0.f}}, ent_merge, shm);
  if (threadIdx.x == 0) {
    const float ls = logf(r.f[1]);
    stat[2 * row] = r.f[0];
    stat[2 * row + 1] = ls;
    h[row] = ls - r.f[2] / r.f[1];
  }
}

template <int W, class T>
__global__ void __launch_bounds__(kThreads) entropy_bwd_kernel(const T* __restrict__ x,
                                                               const float* __restrict__ stat,
                                                               const float* __restrict__ h,
                                                               const float* __restrict__ g,
                                                               int64_t v, T* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const float m = stat[2 * row], ls = stat[2 * row + 1], hi = h[row], gi = g[row];
  sweep<W, T>(x + row * v, nullptr, dx + row * v, nullptr, v,
              [&](const auto& a, const auto&, auto& o, auto&, int64_t) {
#pragma unroll
                for (int e = 0; e < len(a); ++e) {
                  const float lp = (a[e] - m) - ls, p = exp_f(lp);
                  o[e] = p > 0.f ? -gi * p * (lp + hi) : 0.f;
                }
              });
}

// log M = log(beta P + (1-beta) Q) from the log-probs (log-add-exp of the weighted terms).
__device__ __forceinline__ float log_mix(float lp, float lq, float log_b, float log_1b) {
  const float u = lp + log_b, w = lq + log_1b;
  const float hi = fmaxf(u, w), lo = fminf(u, w);
  return hi + log1pf(exp_f(lo - hi));  // both -inf: NaN, but then P = Q = 0 and it is unused
}

struct KlParams {
  float scale, log_b, log_1b, beta;
};

template <Divergence K, int W, class T>
__global__ void __launch_bounds__(kThreads, 2) kl_fwd_kernel(const T* __restrict__ s,
                                                          const T* __restrict__ t, int64_t v,
                                                          KlParams pr, float* __restrict__ out,
                                                          float* __restrict__ stats) {
  __shared__ float shm[4 * 32];
  const int64_t row = blockIdx.x;
  const T* sr = s + row * v;
  const T* tr = t + row * v;
  const float c = pr.scale * kLog2e, scale = pr.scale;
  Lse a_s, a_t;
  sweep_u<2, W, T>(sr, tr, nullptr, nullptr, v, [&](const auto& a, const auto& b, auto&, auto&, int64_t) {
    a_s.add(a, c);
    a_t.add(b, c);
  });
  St<4> r = block_reduce<4>(St<4>{{a_s.m, a_s.s, a_t.m, a_t.s}},
                            St<4>{{kNegInf, 0.f, kNegInf, 0.f}},
                            [c](St<4> x, const St<4>& y) {
                              lse_merge(x.f[0], x.f[1], y.f[0], y.f[1], c);
                              lse_merge(x.f[2], x.f[3], y.f[2], y.f[3], c);
                              return x;
                            },
                            shm);
  const float ms = r.f[0], lss = logf(r.f[1]), mt = r.f[2], lst = logf(r.f[3]);
  float ap = 0.f, aq = 0.f;
  sweep_u<2, W, T>(sr, tr, nullptr, nullptr, v, [&](const auto& a, const auto& b, auto&, auto&, int64_t) {
#pragma unroll
    for (int e = 0; e < len(a); ++e) {
      const float lq = (a[e] - ms) * scale - lss, lp = (b[e] - mt) * scale - lst;
      if constexpr (K == Divergence::forward) {
        const float p = exp_f(lp);
        ap += p > 0.f ? p * (lp - lq) : 0.f;
      } else if constexpr (K == Divergence::reverse) {
        const float q = exp_f(lq);
        aq += q > 0.f ? q * (lq - lp) : 0.f;
      } else {
        const float lm = log_mix(lp, lq, pr.log_b, pr.log_1b);
        const float p = exp_f(lp), q = exp_f(lq);
        ap += p > 0.f ? p * (lp - lm) : 0.f;
        aq += q > 0.f ? q * (lq - lm) : 0.f;
      }
    }
  });
  St<2> k = block_reduce<2>(St<2>{{ap, aq}}, St<2>{{0.f, 0.f}},
                            [](St<2> x, const St<2>& y) {
                              x.f[0] += y.f[0];
                              x.f[1] += y.f[1];
                              return x;
                            },
                            shm);
  if (threadIdx.x == 0) {
    float* st = stats + 6 * row;
    st[0] = ms;
    st[1] = lss;
    st[2] = mt;
    st[3] = lst;
    st[4] = k.f[0];
    st[5] = k.f[1];
    if constexpr (K == Divergence::forward)
      out[row] = k.f[0];
    else if constexpr (K == Divergence::reverse)
      out[row] = k.f[1];
    else
      out[row] = pr.beta * k.f[0] + (1.f - pr.beta) * k.f[1];
  }
}

// Per kind (each times g * scale; P = 0 or Q = 0 terms are 0):
//   forward: ds = Q - P,                            dt = P (log P - log Q - k_p)
//   reverse: ds = Q (log Q - log P - k_q),          dt = P - Q
//   jsd:     ds = (1-beta) Q (log Q - log M - k_q), dt = beta P (log P - log M - k_p)
template <Divergence K, int W, class T>
__global__ void __launch_bounds__(kThreads, 2) kl_bwd_kernel(const T* __restrict__ s,
                                                          const T* __restrict__ t,
                                                          const float* __restrict__ stats,
                                                          const float* __restrict__ g, int64_t v,
                                                          KlParams pr, T* __restrict__ ds,
                                                          T* __restrict__ dt) {
  const int64_t row = blockIdx.x;
  const float* st = stats + 6 * row;
  const float ms = st[0], lss = st[1], mt = st[2], lst = st[3], kp = st[4], kq = st[5];
  const float scale = pr.scale, gs = g[row] * scale;
  const float gsq = gs * (1.f - pr.beta), gsp = gs * pr.beta;
  sweep_u<2, W, T>(s + row * v, t + row * v, ds ? ds + row * v : nullptr, dt ? dt + row * v : nullptr, v,
              [&](const auto& a, const auto& b, auto& o0, auto& o1, int64_t) {
#pragma unroll
                for (int e = 0; e < len(a); ++e) {
                  const float lq = (a[e] - ms) * scale - lss, lp = (b[e] - mt) * scale - lst;
                  const float p = exp_f(lp), q = exp_f(lq);
                  if constexpr (K == Divergence::forward) {
                    o0[e] = gs * q - gs * p;
                    o1[e] = p > 0.f ? gs * p * (lp - lq - kp) : 0.f;
                  } else if constexpr (K == Divergence::reverse) {
                    o0[e] = q > 0.f ? gs * q * (lq - lp - kq) : 0.f;
                    o1[e] = gs * (p - q);
                  } else {
                    const float lm = log_mix(lp, lq, pr.log_b, pr.log_1b);
                    o0[e] = q > 0.f ? gsq * q * (lq - lm - kq) : 0.f;
                    o1[e] = p > 0.f ? gsp * p * (lp - lm - kp) : 0.f;
                  }
                }
              });
}

__global__ void __launch_bounds__(1024) sum_scaled_kernel(const float* __restrict__ x, int64_t n,
                                                          double scale, void* out, DType out_dt) {
  __shared__ double shm[32];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += double(x[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  if (lane == 0) shm[warp] = acc;
  __syncthreads();
  if (warp != 0) return;
  acc = lane < nw ? shm[lane] : 0.0;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane != 0) return;
  const float r = float(acc * scale);
  switch (out_dt) {
    case DType::f32: *static_cast<float*>(out) = r; break;
    case DType::bf16: *static_cast<__nv_bfloat16*>(out) = __float2bfloat16_rn(r); break;
    case DType::f16: *static_cast<__half*>(out) = __float2half_rn(r); break;
    default: break;  // the launcher rejects the rest
  }
}

// ---- launch helpers ------------------------------------------------------------------------------

void check_rows(const char* op, int64_t n, int64_t v) {
  FTUNE_CHECK(n >= 0 && v > 0, "[", op, "] needs rows n >= 0 and a vocabulary v > 0, got n = ", n,
              ", v = ", v);
  FTUNE_CHECK(n <= int64_t(0x7fffffff), "[", op, "] too many rows for one launch: ", n);
}

// The 16-byte path needs every [N, V] pointer at the same offset modulo 16 (then each row's head is
// the same for all of them); otherwise the kernel runs with scalar accesses.
bool same_phase(std::initializer_list<const void*> ps) {
  const void* first = nullptr;
  for (const void* p : ps) {
    if (!p) continue;
    if (!first) first = p;
    if ((reinterpret_cast<uintptr_t>(p) & 15) != (reinterpret_cast<uintptr_t>(first) & 15))
      return false;
  }
  return true;
}

// Calls f(Tag<T>{}, std::integral_constant<int, W>{}) for the dtype and the access width.
template <class F>
void dispatch_w(DType dt, const char* op, bool vec, F&& f) {
  kernels::cuda::dispatch_float(dt, op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (vec)
      f(tag, std::integral_constant<int, kVec<T>>{});
    else
      f(tag, std::integral_constant<int, 1>{});
  });
}

KlParams kl_params(const char* op, Divergence kind, double beta, double inv_temp) {
  FTUNE_CHECK(std::isfinite(inv_temp) && inv_temp > 0.0, "[", op,
              "] inverse temperature must be finite and > 0, got ", inv_temp);
  if (kind == Divergence::jsd)
    FTUNE_CHECK(beta > 0.0 && beta < 1.0, "[", op, "] jsd beta must be in (0, 1), got ", beta);
  KlParams p;
  p.scale = float(inv_temp);
  p.beta = float(beta);
  p.log_b = kind == Divergence::jsd ? float(std::log(beta)) : 0.f;
  p.log_1b = kind == Divergence::jsd ? float(std::log1p(-beta)) : 0.f;
  return p;
}

template <class F>
void dispatch_kind(Divergence kind, F&& f) {
  switch (kind) {
    case Divergence::forward: f(std::integral_constant<Divergence, Divergence::forward>{}); return;
    case Divergence::reverse: f(std::integral_constant<Divergence, Divergence::reverse>{}); return;
    case Divergence::jsd: f(std::integral_constant<Divergence, Divergence::jsd>{}); return;
  }
}

}  // namespace

void row_stats(const void* x, DType dt, int64_t n, int64_t v, float* stat) {
  const char* op = "row_stats";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, true, [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    row_stats_kernel<decltype(w)::value, T>
        <<<unsigned(n), kThreads, 0, stream()>>>(static_cast<const T*>(x), v, stat);
  });
  FTUNE_LAUNCH_CHECK(op);
}

void softmax_forward(const void* x, DType dt, int64_t n, int64_t v, bool log, void* out) {
  const char* op = log ? "log_softmax" : "softmax";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, same_phase({x, out}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    softmax_fwd_kernel<decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
        static_cast<const T*>(x), v, log, static_cast<T*>(out));
  });
  FTUNE_LAUNCH_CHECK(op);
}

void softmax_backward(const void* y, const void* dy, DType dt, int64_t n, int64_t v, bool log,
                      void* dx) {
  const char* op = log ? "log_softmax_backward" : "softmax_backward";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, same_phase({y, dy, dx}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    softmax_bwd_kernel<decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
        static_cast<const T*>(y), static_cast<const T*>(dy), v, log, static_cast<T*>(dx));
  });
  FTUNE_LAUNCH_CHECK(op);
}

void nll_forward(const void* x, DType dt, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore,
                 float* stat, void* out, DType out_dt, float sign) {
  const char* op = "nll_forward";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, true, [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    kernels::cuda::dispatch_float(out_dt, op, [&](auto otag) {
      using O = typename decltype(otag)::type;
      nll_fwd_kernel<decltype(w)::value, T, O><<<unsigned(n), kThreads, 0, stream()>>>(
          static_cast<const T*>(x), tgt, v, ignore, stat, static_cast<O*>(out), sign);
    });
  });
  FTUNE_LAUNCH_CHECK(op);
}

void nll_backward(const void* x, DType dt, const int64_t* tgt, const float* stat, const float* g,
                  int64_t g_stride, float scale, int64_t n, int64_t v, int64_t ignore, void* dx) {
  const char* op = "nll_backward";
  check_rows(op, n, v);
  FTUNE_CHECK(g_stride == 0 || g_stride == 1, "[", op, "] g_stride must be 0 or 1, got ", g_stride);
  if (n == 0) return;
  dispatch_w(dt, op, same_phase({x, dx}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    nll_bwd_kernel<decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
        static_cast<const T*>(x), tgt, stat, g, g_stride, scale, v, ignore, static_cast<T*>(dx));
  });
  FTUNE_LAUNCH_CHECK(op);
}

void nll_fused(const void* x, DType dt, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore,
               float scale, float* nll, void* dx) {
  const char* op = "nll_fused";
  check_rows(op, n, v);
  FTUNE_CHECK(x != dx, "[", op, "] dx must not alias x");
  if (n == 0) return;
  const bool phase = same_phase({x, dx});
  dispatch_w(dt, op, true, [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    constexpr int W = decltype(w)::value;
    auto launch = [&](auto kernel) {
      kernel<<<unsigned(n), kThreads, 0, stream()>>>(static_cast<const T*>(x), tgt, v, ignore,
                                                      scale, nll, static_cast<T*>(dx));
    };
    if (phase) launch(nll_fused_kernel<W, W, T>);
    else launch(nll_fused_kernel<W, 1, T>);
  });
  FTUNE_LAUNCH_CHECK(op);
}

void entropy_forward(const void* x, DType dt, int64_t n, int64_t v, float* stat, float* h) {
  const char* op = "entropy_forward";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, true, [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    entropy_fwd_kernel<decltype(w)::value, T>
        <<<unsigned(n), kThreads, 0, stream()>>>(static_cast<const T*>(x), v, stat, h);
  });
  FTUNE_LAUNCH_CHECK(op);
}

void entropy_backward(const void* x, DType dt, const float* stat, const float* h, const float* g,
                      int64_t n, int64_t v, void* dx) {
  const char* op = "entropy_backward";
  check_rows(op, n, v);
  if (n == 0) return;
  dispatch_w(dt, op, same_phase({x, dx}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    entropy_bwd_kernel<decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
        static_cast<const T*>(x), stat, h, g, v, static_cast<T*>(dx));
  });
  FTUNE_LAUNCH_CHECK(op);
}

void kl_forward(const void* s, const void* t, DType dt, int64_t n, int64_t v, Divergence kind,
                double beta, double inv_temp, float* out, float* stats) {
  const char* op = "kl_forward";
  check_rows(op, n, v);
  const KlParams pr = kl_params(op, kind, beta, inv_temp);
  if (n == 0) return;
  dispatch_w(dt, op, same_phase({s, t}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    dispatch_kind(kind, [&](auto k) {
      kl_fwd_kernel<decltype(k)::value, decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
          static_cast<const T*>(s), static_cast<const T*>(t), v, pr, out, stats);
    });
  });
  FTUNE_LAUNCH_CHECK(op);
}

void kl_backward(const void* s, const void* t, DType dt, const float* stats, const float* g,
                 int64_t n, int64_t v, Divergence kind, double beta, double inv_temp, void* ds,
                 void* dt_out) {
  const char* op = "kl_backward";
  check_rows(op, n, v);
  const KlParams pr = kl_params(op, kind, beta, inv_temp);
  if (n == 0 || (!ds && !dt_out)) return;
  dispatch_w(dt, op, same_phase({s, t, ds, dt_out}), [&](auto tag, auto w) {
    using T = typename decltype(tag)::type;
    dispatch_kind(kind, [&](auto k) {
      kl_bwd_kernel<decltype(k)::value, decltype(w)::value, T><<<unsigned(n), kThreads, 0, stream()>>>(
          static_cast<const T*>(s), static_cast<const T*>(t), stats, g, v, pr,
          static_cast<T*>(ds), static_cast<T*>(dt_out));
    });
  });
  FTUNE_LAUNCH_CHECK(op);
}

void sum_scaled(const float* x, int64_t n, double scale, void* out, DType out_dt) {
  const char* op = "sum_scaled";
  FTUNE_CHECK(n >= 0, "[", op, "] n must be >= 0, got ", n);
  FTUNE_CHECK(out_dt == DType::f32 || out_dt == DType::bf16 || out_dt == DType::f16, "[", op,
              "] output dtype must be f32, bf16 or f16, got ", dtype_name(out_dt));
  sum_scaled_kernel<<<1, 1024, 0, stream()>>>(x, n, scale, out, out_dt);
  FTUNE_LAUNCH_CHECK(op);
}

}  // namespace ftune::kernels::cuda
