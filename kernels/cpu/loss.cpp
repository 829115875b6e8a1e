// CPU softmax and loss kernels (kernels/loss.h). Rows go to OpenMP threads; within a row the
// vocabulary is swept in chunks by `omp simd` loops: a chunk max, then a sum of exp relative to the
// running max (float partial sums inside a chunk, double across chunks).
// clang-format off
// GCC keeps float compares (the selects in fast_exp and the 0 * log 0 guards) out of vectorized
// loops while FP exceptions may trap; this file never reads the exception flags.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "kernels/loss.h"
#include "kernels/cpu/vec_math.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <limits>

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements below which threads cost more than they give

template <class T>
inline T vexp(T x);
template <>
inline float vexp(float x) {
#ifdef FTUNE_LOSS_LIBM_EXP  // for timing the libm baseline (bench/results/cpu_loss.md)
  return std::exp(x);
#else
  return fast_exp(x);
#endif
}
template <>
inline double vexp(double x) {
  return std::exp(x);
}

// log(1 + e) for e in [0, 1] (the log-add-exp correction). float: 2 atanh(w), w = e / (2 + e) <=
// 1/3, by its odd series to w^15 (truncation < 2e-9), which vectorizes; double: libm.
template <class T>
inline T log1p_unit(T e);
template <>
inline float log1p_unit(float e) {
  float w = e / (2.0f + e);
  float w2 = w * w;
  float p = 1.0f / 15.0f;
  p = p * w2 + 1.0f / 13.0f;
  p = p * w2 + 1.0f / 11.0f;
  p = p * w2 + 1.0f / 9.0f;
  p = p * w2 + 1.0f / 7.0f;
  p = p * w2 + 1.0f / 5.0f;
  p = p * w2 + 1.0f / 3.0f;
  p = p * w2 + 1.0f;
  return 2.0f * w * p;
}
template <>
inline double log1p_unit(double e) {
  return std::log1p(e);
}

template <class T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// NaN entries are skipped by the max; they reach the sums through exp, except in a chunk with no
// finite value, which the callers then scan with has_nan (a rare path).
template <class T>
inline T chunk_max(const T* x, int64_t n) {
  T m = kNegInf<T>;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <class T>
bool has_nan(const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (std::isnan(x[j])) return true;
  return false;
}

// Online (max, sum-exp) of one row of y = scale * x, kept against the raw max m so that
// scale * (x - m) is exact near the max. NaN in x reaches s through exp; -inf entries add 0.
template <class T>
struct OnlineLse {
  T m = kNegInf<T>;
  double s = 0.0;
  void add(const T* x, int64_t n, T scale) {
    T cm = chunk_max(x, n);
    if (!(cm > kNegInf<T>)) {  // nothing but -inf (adds 0) and maybe NaN
      if (has_nan(x, n)) s = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    if (cm > m) {
      s *= std::exp(double(m - cm) * double(scale));  // first chunk: s = 0 * 0
      m = cm;
    }
    const T mm = m;
    T cs = 0;
#pragma omp simd reduction(+ : cs)
    for (int64_t j = 0; j < n; ++j) cs += vexp((x[j] - mm) * scale);
    s += cs;
  }
  T log_s() const { return T(std::log(s)); }
};

template <class T>
OnlineLse<T> row_lse(const T* x, int64_t v, int64_t chunk, T scale) {
  OnlineLse<T> o;
  for (int64_t c = 0; c < v; c += chunk) o.add(x + c, std::min(chunk, v - c), scale);
  return o;
}

// Sums f(j0, j1) (a float partial sum over columns [j0, j1)) over chunks of a row, in double.
template <class T, class F>
inline double chunked_sum(int64_t v, int64_t chunk, F&& f) {
  double acc = 0.0;
  for (int64_t c = 0; c < v; c += chunk) acc += double(f(c, std::min(c + chunk, v)));
  return acc;
}

}  // namespace

template <class T>
void row_stats(const T* x, int64_t n, int64_t v, T* stat, int64_t chunk) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    auto o = row_lse(x + i * v, v, chunk, T(1));
    stat[2 * i] = o.m;
    stat[2 * i + 1] = o.log_s();
  }
}

template <class T>
void softmax_forward(const T* x, int64_t n, int64_t v, bool log, T* out) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * v;
    T* yr = out + i * v;
    auto o = row_lse(xr, v, kLossChunk, T(1));
    const T m = o.m, ls = o.log_s();
    if (log) {
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) yr[j] = (xr[j] - m) - ls;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) yr[j] = vexp((xr[j] - m) - ls);
    }
  }
}

template <class T>
void softmax_backward(const T* y, const T* dy, int64_t n, int64_t v, bool log, T* dx) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* yr = y + i * v;
    const T* gr = dy + i * v;
    T* dr = dx + i * v;
    if (log) {
      const T gs = T(chunked_sum<T>(v, kLossChunk, [&](int64_t a, int64_t b) {
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = a; j < b; ++j) s += gr[j];
        return s;
      }));
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) dr[j] = gr[j] - vexp(yr[j]) * gs;
    } else {
      const T dot = T(chunked_sum<T>(v, kLossChunk, [&](int64_t a, int64_t b) {
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = a; j < b; ++j) s += gr[j] * yr[j];
        return s;
      }));
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) dr[j] = yr[j] * (gr[j] - dot);
    }
  }
}

template <class T>
void nll_forward(const T* x, const int64_t* tgt, int64_t n, int64_t v, int64_t ignore, T* stat,
                 T* nll, int64_t chunk) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    if (tgt[i] == ignore) {
      stat[2 * i] = stat[2 * i + 1] = nll[i] = T(0);
      continue;
    }
    const T* xr = x + i * v;
    auto o = row_lse(xr, v, chunk, T(1));
    const T ls = o.log_s();
    stat[2 * i] = o.m;
    stat[2 * i + 1] = ls;
    // lse - x_t, near-max exact; 0 when the target is in another vocabulary shard
    const int64_t t = tgt[i];
    nll[i] = t >= 0 && t < v ? T((double(o.m) - double(xr[t])) + double(ls)) : T(0);
  }
}

template <class T>
void nll_backward(const T* x, const int64_t* tgt, const T* stat, const T* g, int64_t g_stride,
                  T scale, int64_t n, int64_t v, int64_t ignore, T* dx) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    T* dr = dx + i * v;
    if (tgt[i] == ignore) {
      std::fill(dr, dr + v, T(0));
      continue;
    }
    const T* xr = x + i * v;
    const T gi = g[i * g_stride] * scale, m = stat[2 * i], ls = stat[2 * i + 1];
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) dr[j] = vexp((xr[j] - m) - ls) * gi;
    if (tgt[i] >= 0 && tgt[i] < v) dr[tgt[i]] -= gi;  // else in another vocabulary shard
  }
}

template <class T>
void entropy_forward(const T* x, int64_t n, int64_t v, T* stat, T* h, int64_t chunk) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * v;
    // Online s = sum e^z and w = sum e^z z with z = x - m <= 0: H = log s - w / s needs no
    // difference of large numbers. When the max moves by d < 0: w' = e^d (w + d s), s' = e^d s.
    T m = kNegInf<T>;
    double s = 0.0, w = 0.0;
    for (int64_t c = 0; c < v; c += chunk) {
      const int64_t cn = std::min(chunk, v - c);
      const T* xc = xr + c;
      T cm = chunk_max(xc, cn);
      if (!(cm > kNegInf<T>)) {
        if (has_nan(xc, cn)) s = w = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      if (cm > m) {
        if (s > 0) {
          double d = double(m - cm), f = std::exp(d);
          w = f * (w + d * s);
          s *= f;
        }
        m = cm;
      }
      const T mm = m;
      T cs = 0, cw = 0;
#pragma omp simd reduction(+ : cs, cw)
      for (int64_t j = 0; j < cn; ++j) {
        T z = xc[j] - mm;
        T e = vexp(z);
        cs += e;
        cw += e > T(0) ? e * z : T(0);  // -inf entries: 0, not 0 * -inf
      }
      s += cs;
      w += cw;
    }
    double ls = std::log(s);
    stat[2 * i] = m;
    stat[2 * i + 1] = T(ls);
    h[i] = T(ls - w / s);
  }
}

template <class T>
void entropy_backward(const T* x, const T* stat, const T* h, const T* g, int64_t n, int64_t v,
                      T* dx) {
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* xr = x + i * v;
    T* dr = dx + i * v;
    const T m = stat[2 * i], ls = stat[2 * i + 1], hi = h[i], gi = g[i];
#pragma omp simd
    for (int64_t j = 0; j < v; ++j) {
      T lp = (xr[j] - m) - ls;
      T p = vexp(lp);
      dr[j] = p > T(0) ? -gi * p * (lp + hi) : T(0);
    }
  }
}

namespace {

// Per-element quantities of the divergences: log-probs of both rows (scale = 1 / temperature).
template <class T>
struct DivRow {
  const T* s;
  const T* t;
  T ms, lss, mt, lst, scale;
  T lq(int64_t j) const { return (s[j] - ms) * scale - lss; }
  T lp(int64_t j) const { return (t[j] - mt) * scale - lst; }
};

// log M = log(beta P + (1-beta) Q) from the log-probs, as a log-add-exp of the two weighted terms.
template <class T>
inline T log_mix(T lp, T lq, T log_b, T log_1b) {
  T u = lp + log_b, w = lq + log_1b;
  T hi = u > w ? u : w, lo = u > w ? w : u;
  return hi + log1p_unit(vexp(lo - hi));  // both -inf: NaN, but then P = Q = 0 and it is unused
}

template <class T, Divergence K>
void kl_forward_t(const T* s, const T* t, int64_t n, int64_t v, double beta, double inv_temp,
                  T* out, T* stats, int64_t chunk) {
  const T scale = T(inv_temp);
  const T log_b = T(std::log(beta)), log_1b = T(std::log1p(-beta));
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* sr = s + i * v;
    const T* tr = t + i * v;
    OnlineLse<T> os, ot;
    for (int64_t c = 0; c < v; c += chunk) {
      const int64_t cn = std::min(chunk, v - c);
      os.add(sr + c, cn, scale);
      ot.add(tr + c, cn, scale);
    }
    const DivRow<T> r{sr, tr, os.m, os.log_s(), ot.m, ot.log_s(), scale};
    double kp = 0.0, kq = 0.0;
    for (int64_t c = 0; c < v; c += chunk) {
      const int64_t ce = std::min(c + chunk, v);
      T ap = 0, aq = 0;
      if constexpr (K == Divergence::forward) {  // sum P (log P - log Q)
#pragma omp simd reduction(+ : ap)
        for (int64_t j = c; j < ce; ++j) {
          T lp = r.lp(j), p = vexp(lp);
          ap += p > T(0) ? p * (lp - r.lq(j)) : T(0);
        }
      } else if constexpr (K == Divergence::reverse) {  // sum Q (log Q - log P)
#pragma omp simd reduction(+ : aq)
        for (int64_t j = c; j < ce; ++j) {
          T lq = r.lq(j), q = vexp(lq);
          aq += q > T(0) ? q * (lq - r.lp(j)) : T(0);
        }
      } else {  // sum P (log P - log M) and sum Q (log Q - log M)
#pragma omp simd reduction(+ : ap, aq)
        for (int64_t j = c; j < ce; ++j) {
          T lp = r.lp(j), lq = r.lq(j);
          T lm = log_mix(lp, lq, log_b, log_1b);
          T p = vexp(lp), q = vexp(lq);
          ap += p > T(0) ? p * (lp - lm) : T(0);
          aq += q > T(0) ? q * (lq - lm) : T(0);
        }
      }
      kp += double(ap);
      kq += double(aq);
    }
    T* st = stats + 6 * i;
    st[0] = r.ms;
    st[1] = r.lss;
    st[2] = r.mt;
    st[3] = r.lst;
    st[4] = T(kp);
    st[5] = T(kq);
    if constexpr (K == Divergence::forward)
      out[i] = T(kp);
    else if constexpr (K == Divergence::reverse)
      out[i] = T(kq);
    else
      out[i] = T(beta * kp + (1.0 - beta) * kq);
  }
}

// dJ/ds = scale * Q * (dJ/dQ - E_Q[dJ/dQ]) and likewise for t, written per kind:
//   forward: ds = (Q - P),                     dt = P (log P - log Q - k_p)
//   reverse: ds = Q (log Q - log P - k_q),     dt = (P - Q)
//   jsd:     ds = (1-beta) Q (log Q - log M - k_q), dt = beta P (log P - log M - k_p)
// each times g * scale; P = 0 (or Q = 0) terms are 0, also where the log is -inf.
template <class T, Divergence K, bool WS, bool WT>
void kl_backward_t(const T* s, const T* t, const T* stats, const T* g, int64_t n, int64_t v,
                   double beta, double inv_temp, T* ds, T* dt) {
  const T scale = T(inv_temp);
  const T log_b = T(std::log(beta)), log_1b = T(std::log1p(-beta));
#pragma omp parallel for schedule(static) if (n * v > kParallelMin && n > 1)
  for (int64_t i = 0; i < n; ++i) {
    const T* st = stats + 6 * i;
    const DivRow<T> r{s + i * v, t + i * v, st[0], st[1], st[2], st[3], scale};
    const T kp = st[4], kq = st[5];
    const T gs = g[i] * scale;
    T* dsr = WS ? ds + i * v : nullptr;
    T* dtr = WT ? dt + i * v : nullptr;
    if constexpr (K == Divergence::forward) {
      const T gs_neg = -gs;
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) {
        T lp = r.lp(j), lq = r.lq(j), p = vexp(lp);
        if constexpr (WS) dsr[j] = gs * vexp(lq) + gs_neg * p;
        if constexpr (WT) dtr[j] = p > T(0) ? gs * p * (lp - lq - kp) : T(0);
      }
    } else if constexpr (K == Divergence::reverse) {
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) {
        T lp = r.lp(j), lq = r.lq(j), q = vexp(lq);
        if constexpr (WS) dsr[j] = q > T(0) ? gs * q * (lq - lp - kq) : T(0);
        if constexpr (WT) dtr[j] = gs * (vexp(lp) - q);
      }
    } else {
      const T gsq = gs * T(1.0 - beta), gsp = gs * T(beta);
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) {
        T lp = r.lp(j), lq = r.lq(j);
        T lm = log_mix(lp, lq, log_b, log_1b);
        if constexpr (WS) {
          T q = vexp(lq);
          dsr[j] = q > T(0) ? gsq * q * (lq - lm - kq) : T(0);
        }
        if constexpr (WT) {
          T p = vexp(lp);
          dtr[j] = p > T(0) ? gsp * p * (lp - lm - kp) : T(0);
        }
      }
    }
  }
}

template <class T, Divergence K>
void kl_backward_k(const T* s, const T* t, const T* stats, const T* g, int64_t n, int64_t v,
                   double beta, double inv_temp, T* ds, T* dt) {
  if (ds && dt)
    kl_backward_t<T, K, true, true>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
  else if (ds)
    kl_backward_t<T, K, true, false>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
  else if (dt)
    kl_backward_t<T, K, false, true>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
}

}  // namespace

template <class T>
void kl_forward(const T* s, const T* t, int64_t n, int64_t v, Divergence kind, double beta,
                double inv_temp, T* out, T* stats, int64_t chunk) {
  switch (kind) {
    case Divergence::forward:
      kl_forward_t<T, Divergence::forward>(s, t, n, v, beta, inv_temp, out, stats, chunk);
      break;
    case Divergence::reverse:
      kl_forward_t<T, Divergence::reverse>(s, t, n, v, beta, inv_temp, out, stats, chunk);
      break;
    case Divergence::jsd:
      kl_forward_t<T, Divergence::jsd>(s, t, n, v, beta, inv_temp, out, stats, chunk);
      break;
  }
}

template <class T>
void kl_backward(const T* s, const T* t, const T* stats, const T* g, int64_t n, int64_t v,
                 Divergence kind, double beta, double inv_temp, T* ds, T* dt) {
  switch (kind) {
    case Divergence::forward:
      kl_backward_k<T, Divergence::forward>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
      break;
    case Divergence::reverse:
      kl_backward_k<T, Divergence::reverse>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
      break;
    case Divergence::jsd:
      kl_backward_k<T, Divergence::jsd>(s, t, stats, g, n, v, beta, inv_temp, ds, dt);
      break;
  }
}

#define FTUNE_LOSS_INSTANTIATE(T)                                                                  \
  template void row_stats<T>(const T*, int64_t, int64_t, T*, int64_t);                             \
  template void softmax_forward<T>(const T*, int64_t, int64_t, bool, T*);                          \
  template void softmax_backward<T>(const T*, const T*, int64_t, int64_t, bool, T*);               \
  template void nll_forward<T>(const T*, const int64_t*, int64_t, int64_t, int64_t, T*, T*,        \
                               int64_t);                                                           \
  template void nll_backward<T>(const T*, const int64_t*, const T*, const T*, int64_t, T, int64_t, \
                                int64_t, int64_t, T*);                                             \
  template void entropy_forward<T>(const T*, int64_t, int64_t, T*, T*, int64_t);                   \
  template void entropy_backward<T>(const T*, const T*, const T*, const T*, int64_t, int64_t, T*); \
  template void kl_forward<T>(const T*, const T*, int64_t, int64_t, Divergence, double, double,    \
                              T*, T*, int64_t);                                                    \
  template void kl_backward<T>(const T*, const T*, const T*, const T*, int64_t, int64_t,           \
                               Divergence, double, double, T*, T*);
FTUNE_LOSS_INSTANTIATE(float)
FTUNE_LOSS_INSTANTIATE(double)
#undef FTUNE_LOSS_INSTANTIATE

}  // namespace ftune::kernels::cpu
