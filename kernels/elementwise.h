// Elementwise and reduction kernels. Inputs are strided views of the output's shape (broadcast
// dims have stride 0); the output is contiguous.
#pragma once
#include <cstdint>

#include "core/tensor.h"

namespace ftune::kernels {

enum class BinaryOp { add, sub, mul, div };
enum class UnaryOp { neg, exp, log, sqrt, tanh, sigmoid, relu, square, add_scalar, mul_scalar };

namespace cpu {
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);  // a, b expanded to out's shape
void unary(UnaryOp op, const Tensor& a, Tensor& out, double scalar = 0.0);
// Backward of a unary op from its input x and output y: dx = dy * f'(x).
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& dy, Tensor& dx, double scalar);
// a += alpha*b, same dtype; b contiguous, a contiguous or a strided view whose elements are
// distinct (add_ into a slice).
void axpy(Tensor& a, const Tensor& b, double alpha);
void scale_(Tensor& a, double s);
// Sums a contiguous [outer, n, inner] tensor over n into out [outer, inner]. Accumulates in f64.
void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out);
void amax_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor* argmax);
}  // namespace cpu

// The GPU twins: same contracts, f32/bf16/f16, math and accumulation in f32 (sum_dim too), no
// atomics (deterministic). binary/unary inputs may be any strided view (broadcast stride 0).
namespace cuda {
void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out);
void unary(UnaryOp op, const Tensor& a, Tensor& out, double scalar = 0.0);
void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& dy, Tensor& dx, double scalar);
void axpy(Tensor& a, const Tensor& b, double alpha);
void scale_(Tensor& a, double s);
void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out);
void amax_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor* argmax);
}  // namespace cuda

}  // namespace ftune::kernels
