#include "kernels/elementwise.h"

#include <cmath>
#include <limits>

#include "kernels/cpu/strided.h"

namespace ftune::kernels::cpu {

namespace {

template <class T>
inline T apply_binary(BinaryOp op, T x, T y) {
  switch (op) {
    case BinaryOp::add: return x + y;
    case BinaryOp::sub: return x - y;
    case BinaryOp::mul: return x * y;
    case BinaryOp::div: return x / y;
  }
  return T(0);
}

template <class T, BinaryOp OP>
void binary_t(const Tensor& a, const Tensor& b, Tensor& out) {
  const T* pa = static_cast<const T*>(a.raw_data());
  const T* pb = static_cast<const T*>(b.raw_data());
  T* po = out.data<T>();
  strided_for<3>(out.shape(), {&out.strides(), &a.strides(), &b.strides()},
                 [&](int64_t n, const std::array<int64_t, 3>& off, const std::array<int64_t, 3>& st) {
                   T* o = po + off[0];
                   const T* x = pa + off[1];
                   const T* y = pb + off[2];
                   if (st[1] == 1 && st[2] == 1) {
                     for (int64_t i = 0; i < n; ++i) o[i] = apply_binary<T>(OP, x[i], y[i]);
                   } else if (st[1] == 1 && st[2] == 0) {
                     const T yv = *y;
                     for (int64_t i = 0; i < n; ++i) o[i] = apply_binary<T>(OP, x[i], yv);
                   } else {
                     for (int64_t i = 0; i < n; ++i) o[i] = apply_binary<T>(OP, x[i * st[1]], y[i * st[2]]);
                   }
                 });
}

template <class T>
inline T apply_unary(UnaryOp op, T x, T s) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return std::exp(x);
    case UnaryOp::log: return std::log(x);
    case UnaryOp::sqrt: return std::sqrt(x);
    case UnaryOp::tanh: return std::tanh(x);
    case UnaryOp::sigmoid: return T(1) / (T(1) + std::exp(-x));
    case UnaryOp::relu: return x > T(0) ? x : T(0);
    case UnaryOp::square: return x * x;
    case UnaryOp::add_scalar: return x + s;
    case UnaryOp::mul_scalar: return x * s;
  }
  return T(0);
}

// dy * f'(x), with y = f(x) available.
template <class T>
inline T apply_unary_grad(UnaryOp op, T x, T y, T dy, T s) {
  switch (op) {
    case UnaryOp::neg: return -dy;
    case UnaryOp::exp: return dy * y;
    case UnaryOp::log: return dy / x;
    case UnaryOp::sqrt: return dy / (T(2) * y);
    case UnaryOp::tanh: return dy * (T(1) - y * y);
    case UnaryOp::sigmoid: return dy * y * (T(1) - y);
    case UnaryOp::relu: return x > T(0) ? dy : T(0);
    case UnaryOp::square: return dy * T(2) * x;
    case UnaryOp::add_scalar: return dy;
    case UnaryOp::mul_scalar: return dy * s;
  }
  return T(0);
}

}  // namespace

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  dispatch_float(out.dtype(), "binary", [&]<class T>() {
    switch (op) {
      case BinaryOp::add: binary_t<T, BinaryOp::add>(a, b, out); break;
      case BinaryOp::sub: binary_t<T, BinaryOp::sub>(a, b, out); break;
      case BinaryOp::mul: binary_t<T, BinaryOp::mul>(a, b, out); break;
      case BinaryOp::div: binary_t<T, BinaryOp::div>(a, b, out); break;
    }
  });
}

void unary(UnaryOp op, const Tensor& a, Tensor& out, double scalar) {
  dispatch_float(out.dtype(), "unary", [&]<class T>() {
    const T* pa = static_cast<const T*>(a.raw_data());
    T* po = out.data<T>();
    const T s = T(scalar);
    strided_for<2>(out.shape(), {&out.strides(), &a.strides()},
                   [&](int64_t n, const std::array<int64_t, 2>& off, const std::array<int64_t, 2>& st) {
                     for (int64_t i = 0; i < n; ++i) po[off[0] + i] = apply_unary<T>(op, pa[off[1] + i * st[1]], s);
                   });
  });
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& dy, Tensor& dx, double scalar) {
  dispatch_float(dx.dtype(), "unary_backward", [&]<class T>() {
    const T* px = x.data<T>();
    const T* py = y.data<T>();
    const T* pg = dy.data<T>();
    T* pd = dx.data<T>();
    const T s = T(scalar);
    const int64_t n = dx.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) pd[i] = apply_unary_grad<T>(op, px[i], py[i], pg[i], s);
  });
}

void axpy(Tensor& a, const Tensor& b, double alpha) {
  dispatch_float(a.dtype(), "add_", [&]<class T>() {
    T* pa = a.data<T>();
    const T* pb = b.data<T>();
    const T al = T(alpha);
    const int64_t n = a.numel();
    if (!a.is_contiguous()) {  // a strided view (a slice of a wider tensor), run by run
      const Shape bst = contiguous_strides(a.shape());
      strided_for<2>(a.shape(), {&a.strides(), &bst},
                     [&](int64_t m, const std::array<int64_t, 2>& off,
                         const std::array<int64_t, 2>& st) {
                       T* ra = pa + off[0];
                       const T* rb = pb + off[1];
                       if (st[0] == 1) {
#pragma omp simd
                         for (int64_t j = 0; j < m; ++j) ra[j] += al * rb[j];
                       } else {
                         for (int64_t j = 0; j < m; ++j) ra[j * st[0]] += al * rb[j];
                       }
                     });
      return;
    }
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) pa[i] += al * pb[i];
  });
}

void scale_(Tensor& a, double s) {
  dispatch_float(a.dtype(), "mul_", [&]<class T>() {
    T* pa = a.data<T>();
    const T sv = T(s);
    const int64_t n = a.numel();
#pragma omp parallel for schedule(static) if (n > (1 << 15))
    for (int64_t i = 0; i < n; ++i) pa[i] *= sv;
  });
}

void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out) {
  dispatch_float(a.dtype(), "sum", [&]<class T>() {
    const T* pa = a.data<T>();
    T* po = out.data<T>();
    if (inner == 1) {
#pragma omp parallel for schedule(static) if (outer * n > (1 << 15) && outer > 1)
      for (int64_t o = 0; o < outer; ++o) {
        double acc = 0;
        const T* r = pa + o * n;
        for (int64_t j = 0; j < n; ++j) acc += double(r[j]);
        po[o] = T(acc);
      }
      return;
    }
    // Reduce the middle dim: walk rows of `inner` contiguous values, accumulating in f64.
#pragma omp parallel for schedule(static) if (outer * n * inner > (1 << 15))
    for (int64_t o = 0; o < outer; ++o) {
      std::vector<double> acc(size_t(inner), 0.0);
      for (int64_t j = 0; j < n; ++j) {
        const T* r = pa + (o * n + j) * inner;
        for (int64_t i = 0; i < inner; ++i) acc[i] += double(r[i]);
      }
      for (int64_t i = 0; i < inner; ++i) po[o * inner + i] = T(acc[i]);
    }
  });
}

void amax_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor* argmax) {
  dispatch_float(a.dtype(), "amax", [&]<class T>() {
    const T* pa = a.data<T>();
    T* po = out.data<T>();
    int64_t* pi = argmax ? argmax->data<int64_t>() : nullptr;
#pragma omp parallel for schedule(static) if (outer * n * inner > (1 << 15))
    for (int64_t o = 0; o < outer; ++o) {
      for (int64_t i = 0; i < inner; ++i) {
        T best = -std::numeric_limits<T>::infinity();
        int64_t bi = 0;
        for (int64_t j = 0; j < n; ++j) {
          T v = pa[(o * n + j) * inner + i];
          if (std::isnan(best)) break;  // NaN wins, as in torch.amax / argmax
          if (v > best || j == 0 || std::isnan(v)) {
            best = v;
            bi = j;
          }
        }
        po[o * inner + i] = best;
        if (pi) pi[o * inner + i] = bi;
      }
    }
  });
}

}  // namespace ftune::kernels::cpu
