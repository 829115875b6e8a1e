#include "kernels/norm.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements
// dweight/dbias are summed over rows in this many fixed row chunks, then over chunks in order:
// the result does not depend on the thread count, and the partials need no atomics.
constexpr int64_t kMaxChunks = 64;
constexpr int64_t kColBlock = 256;

// The f64 mean as hi + lo in T: x - hi is exact when x is near the mean (Sterbenz), so
// (x - hi) - lo keeps the centring accurate when |mean| >> std, in plain (vectorized) T arithmetic.
template <class T>
std::pair<T, T> split_mean(double mu) {
  const T hi = T(mu);
  return {hi, T(mu - double(hi))};
}

// kCenter: LayerNorm (subtract the mean, optional bias); otherwise RMSNorm.
template <class T, bool kCenter>
void norm_forward_t(const T* x, const T* w, const T* b, int64_t N, int64_t D, double eps, T* y,
                    double* mean, double* rstd) {
#pragma omp parallel for schedule(static) if (N * D > kParallelMin)
  for (int64_t r = 0; r < N; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    // Two passes in f64 (mean, then squared deviations): no cancellation when |mean| >> std.
    double mu = 0.0;
    if constexpr (kCenter) {
      double s = 0.0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < D; ++j) s += double(xr[j]);
      mu = s / double(D);
    }
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) {
      const double d = double(xr[j]) - mu;
      ss += d * d;
    }
    const double rs = 1.0 / std::sqrt(ss / double(D) + eps);
    rstd[r] = rs;
    const T rt = T(rs);
    if constexpr (kCenter) {
      mean[r] = mu;
      const std::pair<T, T> split = split_mean<T>(mu);  // no structured binding: clang 14 omp simd
      const T mh = split.first, ml = split.second;
      if (b) {
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) yr[j] = ((xr[j] - mh) - ml) * rt * w[j] + b[j];
      } else {
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) yr[j] = ((xr[j] - mh) - ml) * rt * w[j];
      }
    } else {
      // Same rounding order as HF: weight * (x * rstd).
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) yr[j] = w[j] * (xr[j] * rt);
    }
  }
}

// With xhat = (x - mean) * rstd and g = dy * w:
//   LayerNorm dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm   dx = rstd * (g - xhat * mean(g * xhat))
//   dw = sum over rows of dy * xhat, db = sum over rows of dy.
template <class T, bool kCenter>
void norm_backward_t(const T* dy, const T* x, const T* w, const double* mean, const double* rstd,
                     int64_t N, int64_t D, T* dx, T* dw, T* db, bool acc) {
  const int64_t nchunk = std::clamp<int64_t>(N, 1, kMaxChunks);
  std::vector<double> pw(dw ? size_t(nchunk * D) : 0), pb(db ? size_t(nchunk * D) : 0);
#pragma omp parallel for schedule(static) if (N * D > kParallelMin)
  for (int64_t c = 0; c < nchunk; ++c) {
    double* cw = dw ? pw.data() + c * D : nullptr;
    double* cb = db ? pb.data() + c * D : nullptr;
    std::vector<T> row(acc && dx ? size_t(D) : 0);
    for (int64_t r = c * N / nchunk; r < (c + 1) * N / nchunk; ++r) {
      const T* xr = x + r * D;
      const T* gr = dy + r * D;
      const std::pair<T, T> split = split_mean<T>(kCenter ? mean[r] : 0.0);
      const T mh = split.first, ml = split.second;
      const T rt = T(rstd[r]);
      if (dx) {
        double sg = 0.0, sgx = 0.0;
#pragma omp simd reduction(+ : sg, sgx)
        for (int64_t j = 0; j < D; ++j) {
          const double g = double(gr[j]) * double(w[j]);
          sg += g;
          sgx += g * (double((xr[j] - mh) - ml) * double(rt));
        }
        const T a = T(sg / double(D));
        const T cc = T(sgx / double(D));
        T* dxr = dx + r * D;
        // With acc, dx goes through a row buffer and is then added to the sum so far: the same
        // two roundings as the engine's sum of the two gradients (no multiply-add contracted
        // across them), so a checkpointed block, whose input is a leaf the engine sums at, gets
        // the same bits.
        T* out = acc ? row.data() : dxr;
        if constexpr (kCenter) {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j)
            out[j] = rt * (gr[j] * w[j] - a - ((xr[j] - mh) - ml) * rt * cc);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) out[j] = rt * (gr[j] * w[j] - xr[j] * rt * cc);
        }
        if (acc) {
#pragma omp simd
          for (int64_t j = 0; j < D; ++j) dxr[j] = dxr[j] + out[j];
        }
      }
      if (cw) {
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) cw[j] += double(gr[j]) * double(((xr[j] - mh) - ml) * rt);
      }
      if (cb) {
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) cb[j] += double(gr[j]);
      }
    }
  }
  // Sum the chunk partials in chunk order, a block of columns per task.
  auto reduce = [&](const std::vector<double>& part, T* out) {
#pragma omp parallel for schedule(static) if (nchunk * D > kParallelMin)
    for (int64_t j0 = 0; j0 < D; j0 += kColBlock) {
      const int64_t j1 = std::min(D, j0 + kColBlock);
      double acc[kColBlock] = {};
      for (int64_t c = 0; c < nchunk; ++c) {
        const double* p = part.data() + c * D;
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) acc[j - j0] += p[j];
      }
      for (int64_t j = j0; j < j1; ++j) out[j] = T(acc[j - j0]);
    }
  };
  if (dw) reduce(pw, dw);
  if (db) reduce(pb, db);
}

// h = x + r in T: the residual stream as the fused GPU kernel writes it.
template <class T>
void add_rows(const T* x, const T* r, T* h, int64_t n) {
#pragma omp parallel for simd schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) h[i] = T(x[i] + r[i]);
}

void check_residual(const char* op, const Tensor& x, const Tensor& residual, const Tensor& h) {
  FTUNE_CHECK(residual.defined() && h.defined(), "[", op, "] residual and h_out must be defined");
  FTUNE_CHECK(residual.shape() == x.shape() && h.shape() == x.shape() &&
                  residual.dtype() == x.dtype() && h.dtype() == x.dtype(),
              "[", op, "] residual ", residual.desc(), " and h_out ", h.desc(), " must match x ",
              x.desc());
}

template <class T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}

}  // namespace

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        Tensor& y, Tensor& mean, Tensor& rstd) {
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  dispatch_float(x.dtype(), "layer_norm", [&]<class T>() {
    norm_forward_t<T, true>(x.data<T>(), weight.data<T>(), ptr_or_null<T>(bias), N, D, eps,
                            y.data<T>(), mean.data<double>(), rstd.data<double>());
  });
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                         Tensor& dbias, bool accumulate_dx) {
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  dispatch_float(x.dtype(), "layer_norm_backward", [&]<class T>() {
    norm_backward_t<T, true>(dy.data<T>(), x.data<T>(), weight.data<T>(), mean.data<double>(),
                             rstd.data<double>(), N, D, ptr_or_null<T>(dx), ptr_or_null<T>(dweight),
                             ptr_or_null<T>(dbias), accumulate_dx);
  });
}

void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd) {
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  dispatch_float(x.dtype(), "rms_norm", [&]<class T>() {
    norm_forward_t<T, false>(x.data<T>(), weight.data<T>(), nullptr, N, D, eps, y.data<T>(),
                             nullptr, rstd.data<double>());
  });
}

void rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                       Tensor& dx, Tensor& dweight, bool accumulate_dx) {
  const int64_t D = x.size(-1), N = D ? x.numel() / D : 0;
  dispatch_float(x.dtype(), "rms_norm_backward", [&]<class T>() {
    norm_backward_t<T, false>(dy.data<T>(), x.data<T>(), weight.data<T>(), nullptr,
                              rstd.data<double>(), N, D, ptr_or_null<T>(dx),
                              ptr_or_null<T>(dweight), nullptr, accumulate_dx);
  });
}

void rms_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                               double eps, Tensor& y, Tensor& h_out, Tensor& rstd) {
  check_residual("rms_norm_residual", x, residual, h_out);
  dispatch_float(x.dtype(), "rms_norm_residual", [&]<class T>() {
    add_rows<T>(x.data<T>(), residual.data<T>(), h_out.data<T>(), x.numel());
  });
  rms_norm_forward(h_out, weight, eps, y, rstd);
}

void layer_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                 const Tensor& bias, double eps, Tensor& y, Tensor& h_out,
                                 Tensor& mean, Tensor& rstd) {
  check_residual("layer_norm_residual", x, residual, h_out);
  dispatch_float(x.dtype(), "layer_norm_residual", [&]<class T>() {
    add_rows<T>(x.data<T>(), residual.data<T>(), h_out.data<T>(), x.numel());
  });
  layer_norm_forward(h_out, weight, bias, eps, y, mean, rstd);
}

}  // namespace ftune::kernels::cpu
