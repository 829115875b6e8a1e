#include "kernels/matmul.h"

#include <cblas.h>

#include <algorithm>
#include <limits>

#include "core/error.h"

namespace ftune::kernels::cpu {

namespace {

// CBLAS takes int sizes: refuse what would be truncated instead of computing garbage.
void check_blas_dims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  const int64_t mx = std::max({m, n, k, lda, ldb, ldc});
  FTUNE_CHECK(mx <= int64_t(std::numeric_limits<int>::max()), "[gemm] dimension ", mx,
              " exceeds the BLAS int range (m=", m, ", n=", n, ", k=", k, ")");
}

// One name for the s/d CBLAS entry points, so gemm<T> is written once.
inline void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, float alpha,
                      const float* a, int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k, double alpha,
                      const double* a, int lda, const double* b, int ldb, double beta, double* c,
                      int ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
inline void blas_gemv(CBLAS_TRANSPOSE t, int m, int n, float alpha, const float* a, int lda,
                      const float* x, int incx, float beta, float* y) {
  cblas_sgemv(CblasRowMajor, t, m, n, alpha, a, lda, x, incx, beta, y, 1);
}
inline void blas_gemv(CBLAS_TRANSPOSE t, int m, int n, double alpha, const double* a, int lda,
                      const double* x, int incx, double beta, double* y) {
  cblas_dgemv(CblasRowMajor, t, m, n, alpha, a, lda, x, incx, beta, y, 1);
}

}  // namespace

template <class T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
          const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty inner product: C = beta * C (BLAS may skip the write altogether)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  check_blas_dims(m, n, k, lda, ldb, ldc);
  if (m == 1) {  // one row (decode): gemv, which streams B once instead of repacking it
    const int incx = int(ta ? lda : 1);
    if (tb)
      blas_gemv(CblasNoTrans, int(n), int(k), alpha, b, int(ldb), a, incx, beta, c);
    else
      blas_gemv(CblasTrans, int(k), int(n), alpha, b, int(ldb), a, incx, beta, c);
    return;
  }
  blas_gemm(ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n), int(k),
            alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<double>(bool, bool, int64_t, int64_t, int64_t, double, const double*, int64_t,
                           const double*, int64_t, double, double*, int64_t);

}  // namespace ftune::kernels::cpu
