#include "kernels/matmul.h"

#include <cblas.h>

namespace ftune::kernels::cpu {

template <>
void gemm<float>(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
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
