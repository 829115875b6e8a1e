// GEMM: C[m,n] = alpha * op(A) op(B) + beta * C, row-major. CPU goes through OpenBLAS, the GPU
// through cuBLASLt (kernels/cuda/matmul.cu) with f32 accumulation.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace ftune::kernels::cpu {

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc);

}  // namespace ftune::kernels::cpu

namespace ftune::kernels::cuda {

// One (batched, strided) row-major GEMM on the current stream:
//   C[i] = alpha * op(A[i]) op(B[i]) + beta * C[i] (+ bias broadcast over the rows of C[i]),
// op(A[i]) [m, k], op(B[i]) [k, n], C[i] [m, n]; X[i] starts stride_x elements after X[i-1]
// (stride_a or stride_b 0: one matrix shared by every batch entry). A and B are f32, bf16 or f16
// (both the same); C is of A's dtype, or f32 for bf16/f16 inputs. The products accumulate in f32
// (TF32 tensor cores for f32 inputs only when ftune::cuda::allow_tf32()). bias: null or [n] of C's
// dtype (cuBLASLt's bias epilogue). beta == 0: C is not read (may hold NaN). k == 0 gives
// beta * C (+ bias).
struct GemmArgs {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  DType ab_dtype = DType::f32;
  DType c_dtype = DType::f32;
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* c = nullptr;
  int64_t ldc = 0;
  float alpha = 1.f, beta = 0.f;
  int64_t batch = 1, stride_a = 0, stride_b = 0, stride_c = 0;
  const void* bias = nullptr;
};
void gemm(const GemmArgs& args);

// The GemmArgs of one unbatched row-major GEMM with A, B, C (and the bias) of one dtype T.
template <class T>
GemmArgs gemm_args(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                   const T* a, int64_t lda, const T* b, int64_t ldb, float beta, T* c, int64_t ldc,
                   const T* bias = nullptr) {
  GemmArgs g;
  g.trans_a = trans_a;
  g.trans_b = trans_b;
  g.m = m;
  g.n = n;
  g.k = k;
  g.ab_dtype = g.c_dtype = dtype_of<T>::value;
  g.a = a;
  g.lda = lda;
  g.b = b;
  g.ldb = ldb;
  g.c = c;
  g.ldc = ldc;
  g.alpha = alpha;
  g.beta = beta;
  g.bias = bias;
  return g;
}

// The CPU kernel's signature (A, B and C of one dtype; T = float, bf16 or f16). For T = float it
// is exactly cpu::gemm<float>'s, so FTUNE_KERNEL can pick either.
template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, float beta, T* c, int64_t ldc);

}  // namespace ftune::kernels::cuda
