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
}  // namespace

template <>
void gemm<float>(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty inner product: C = beta * C (BLAS may skip the write altogether)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == float(0) ? float(0) : beta * c[i * ldc + j];
    return;
  }
  check_blas_dims(m, n, k, lda, ldb, ldc);
  if (m == 1) {  // one row (decode): gemv, which streams B once instead of repacking it
    const int64_t incx = ta ? lda : 1;
    if (tb)
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(n), int(k), alpha, b, int(ldb), a, int(incx), beta, c, 1);
    else
      cblas_sgemv(CblasRowMajor, CblasTrans, int(k), int(n), alpha, b, int(ldb), a, int(incx), beta, c, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n),
              int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

template <>
void gemm<double>(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                  int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // empty inner product: C = beta * C (BLAS may skip the write altogether)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == double(0) ? double(0) : beta * c[i * ldc + j];
    return;
  }
  check_blas_dims(m, n, k, lda, ldb, ldc);
  if (m == 1) {  // one row (decode): gemv, which streams B once instead of repacking it
    const int64_t incx = ta ? lda : 1;
    if (tb)
      cblas_dgemv(CblasRowMajor, CblasNoTrans, int(n), int(k), alpha, b, int(ldb), a, int(incx), beta, c, 1);
    else
      cblas_dgemv(CblasRowMajor, CblasTrans, int(k), int(n), alpha, b, int(ldb), a, int(incx), beta, c, 1);
    return;
  }
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, int(m), int(n),
              int(k), alpha, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

}  // namespace ftune::kernels::cpu
