// bf16 GEMM throughput of kernels::cuda::gemm (cuBLASLt, first heuristic algorithm, as the ops
// call it) against cuBLAS's best in the same binary: the faster of cublasGemmEx
// (CUBLAS_GEMM_DEFAULT_TENSOR_OP) and each of cuBLASLt's top 8 heuristic algorithms timed.
// Layout of a linear layer: C[m, n] = A[m, k] B[n, k]^T (row-major), random N(0, 1) data.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <string>

#include "bench/gpu/gpu_bench.h"
#include "core/cuda_runtime.h"
#include "kernels/matmul.h"

#define BENCH_CUBLAS(expr)                                              \
  do {                                                                  \
    cublasStatus_t st_ = (expr);                                        \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                   \
      FTUNE_THROW("[bench] ", #expr, ": ", cublasGetStatusString(st_)); \
  } while (0)

namespace {

using namespace ftune;
using namespace ftune::bench;

// Median ms of the best of cuBLASLt's top heuristic algorithms for row-major C = A B^T
// (column-major: C^T [n, m] = B [n, k] (as k x n, op T) x A^T [k, m]).
double best_lt_ms(Ctx& ctx, int64_t m, int64_t n, int64_t k, const void* a, const void* b, void* c,
                  void* ws, size_t ws_bytes, int* tried) {
  cublasLtHandle_t h;
  BENCH_CUBLAS(cublasLtCreate(&h));
  cublasLtMatmulDesc_t op;
  BENCH_CUBLAS(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  BENCH_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  BENCH_CUBLAS(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  cublasLtMatrixLayout_t la, lb, lc;
  BENCH_CUBLAS(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, k, n, k));
  BENCH_CUBLAS(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, k, m, k));
  BENCH_CUBLAS(cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, n, m, n));
  cublasLtMatmulPreference_t pref;
  BENCH_CUBLAS(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t wsb = ws_bytes;
  BENCH_CUBLAS(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &wsb, sizeof(wsb)));
  cublasLtMatmulHeuristicResult_t res[8];
  int found = 0;
  BENCH_CUBLAS(cublasLtMatmulAlgoGetHeuristic(h, op, la, lb, lc, lc, pref, 8, res, &found));
  const float alpha = 1.f, beta = 0.f;
  double best = 1e30;
  *tried = 0;
  for (int i = 0; i < found; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    ++*tried;
    double ms = ctx.time_ms([&] {
      BENCH_CUBLAS(cublasLtMatmul(h, op, &alpha, b, la, a, lb, &beta, c, lc, c, lc, &res[i].algo,
                                  ws, ws_bytes, 0));
    });
    best = std::min(best, ms);
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(op);
  cublasLtDestroy(h);
  return best;
}

}  // namespace

FTUNE_GPU_BENCH(matmul) {
  // The last three: the 0.5B end-to-end step's shapes (8192 tokens, d 896, ffn 4864, 2 kv heads
  // of 64: q/o, k/v, gate/up).
  const int64_t shapes[][3] = {{4096, 4096, 4096}, {8192, 8192, 8192}, {8192, 4096, 4096},
                               {8192, 11008, 4096}, {8192, 896, 896},   {8192, 128, 896},
                               {8192, 4864, 896}};
  cublasHandle_t blas;
  BENCH_CUBLAS(cublasCreate(&blas));
  BENCH_CUBLAS(cublasSetStream(blas, 0));
  const size_t ws_bytes = size_t(32) << 20;
  void* ws = nullptr;
  BENCH_CUDA(cudaMalloc(&ws, ws_bytes));
  BENCH_CUBLAS(cublasSetWorkspace(blas, ws, ws_bytes));
  for (auto& s : shapes) {
    const int64_t m = s[0], n = s[1], k = s[2];
    void* a = random_device(2, m * k, 1);
    void* b = random_device(2, n * k, 1, 1.0f, 2);
    void* c = random_device(2, m * n, 1, 1.0f, 3);
    kernels::cuda::GemmArgs g;
    g.trans_b = true;
    g.m = m;
    g.n = n;
    g.k = k;
    g.ab_dtype = g.c_dtype = DType::bf16;
    g.a = a;
    g.lda = k;
    g.b = b;
    g.ldb = k;
    g.c = c;
    g.ldc = n;
    const bool tune_before = ftune::cuda::gemm_autotune();
    ftune::cuda::set_gemm_autotune(false);
    const double ours = ctx.time_ms([&] { kernels::cuda::gemm(g); });
    ftune::cuda::set_gemm_autotune(true);  // the autotuned plan (its timing runs in the warm-up)
    const double tuned = ctx.time_ms([&] { kernels::cuda::gemm(g); });
    ftune::cuda::set_gemm_autotune(tune_before);
    const float alpha = 1.f, beta = 0.f;
    const double gemm_ex = ctx.time_ms([&] {
      BENCH_CUBLAS(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, b,
                                CUDA_R_16BF, int(k), a, CUDA_R_16BF, int(k), &beta, c, CUDA_R_16BF,
                                int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
    });
    int tried = 0;
    const double lt = best_lt_ms(ctx, m, n, k, a, b, c, ws, ws_bytes, &tried);
    Row r;
    r.name = "gemm bf16 " + std::to_string(m) + "x" + std::to_string(n) + "x" + std::to_string(k);
    r.ms = ours;
    r.flops = 2.0 * double(m) * double(n) * double(k);
    r.bytes = 2.0 * double(m * k + n * k + m * n);
    r.ref_ms = std::min(gemm_ex, lt);
    r.ref_name = lt < gemm_ex ? "cublasLt best of " + std::to_string(tried) : "cublasGemmEx";
    char note[160];
    std::snprintf(note, sizeof note, "GemmEx %.0f, Lt best %.0f TFLOP/s", r.flops / (gemm_ex * 1e9),
                  r.flops / (lt * 1e9));
    r.note = note;
    ctx.add(r);
    Row t = r;
    t.name += " autotuned";
    t.ms = tuned;
    t.note = "gemm_autotune: the fastest of cuBLASLt's top 8, timed at first use";
    ctx.add(t);
    free_device(a);
    free_device(b);
    free_device(c);
  }
  cublasDestroy(blas);
  cudaFree(ws);
}
