// GEMMs through cuBLASLt. Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, so
// cuBLASLt is handed B as its "A" and A as its "B" with the transposes unchanged, and C as an
// n x m column-major matrix (the bias epilogue then broadcasts a length-n vector over the m
// columns, i.e. over our rows). Per thread and device: one cublasLt handle; per (device, stream):
// one workspace from the caching allocator; a cache of descriptors + the heuristic's algorithm
// keyed by everything they depend on (shapes, strides, dtypes, pointer alignment, TF32, bias).
// With autotuning (ftune::cuda::gemm_autotune) the algorithm is the fastest of the heuristic's
// top candidates, timed on the call's operands at the plan's first use (into C when beta is 0,
// else into a scratch C).
#include <cublasLt.h>

#include <cstring>
#include <map>
#include <memory>
#include <tuple>
#include <unordered_map>

#include "core/allocator.h"
#include "kernels/cuda/common.cuh"
#include "kernels/matmul.h"

#define CUBLAS_CHECK(expr)                                                                      \
  do {                                                                                          \
    cublasStatus_t st_ = (expr);                                                                \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                           \
      FTUNE_THROW("[cublas] ", #expr, ": ", cublasLtGetStatusString(st_), " (", int(st_), ")"); \
  } while (0)

namespace ftune::kernels::cuda {

namespace {

constexpr size_t kWorkspaceBytes = size_t(32) << 20;
constexpr size_t kMaxPlans = 512;
constexpr int kTuneCandidates = 8;  // the heuristic's top picks timed by the autotuner
constexpr int kTuneRuns = 3;        // timed runs of each, after one warm-up
// The largest scratch C the autotuner allocates (beta != 0): beyond it the plan keeps the
// heuristic's first pick (an LM-head chunk's f32 dW sum or a large LoRA output is 0.5-2 GB).
constexpr int64_t kTuneScratchBytes = int64_t(64) << 20;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::f32:
      return CUDA_R_32F;
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::f16:
      return CUDA_R_16F;
    default:
      FTUNE_THROW("[gemm] cuBLASLt GEMMs take f32, bf16 or f16, got ", dtype_name(t));
  }
}

// The largest power of two (<= 256) dividing the address of every batch entry's matrix.
uint32_t alignment(const void* p, int64_t stride_elems, size_t esize, int64_t batch) {
  uint64_t v = reinterpret_cast<uintptr_t>(p);
  if (batch > 1) v |= uint64_t(stride_elems) * esize;
  uint32_t al = 256;
  while (al > 1 && (v & (al - 1))) al >>= 1;
  return al;
}

struct Key {
  int device = 0;
  bool ta = false, tb = false, bias = false, tf32 = false, tuned = false;
  int64_t m = 0, n = 0, k = 0, lda = 0, ldb = 0, ldc = 0, batch = 0, sa = 0, sb = 0, sc = 0;
  DType ab = DType::f32, c = DType::f32;
  uint32_t al_a = 0, al_b = 0, al_c = 0;
  auto tie() const {
    return std::tie(device, ta, tb, bias, tf32, tuned, m, n, k, lda, ldb, ldc, batch, sa, sb, sc,
                    ab, c, al_a, al_b, al_c);
  }
  bool operator==(const Key& o) const { return tie() == o.tie(); }
};
struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull;
    auto mix = [&](uint64_t v) { h = (h ^ v) * 1099511628211ull; };
    mix(uint64_t(k.device) | uint64_t(k.ta) << 8 | uint64_t(k.tb) << 9 | uint64_t(k.bias) << 10 |
        uint64_t(k.tf32) << 11 | uint64_t(k.tuned) << 12 | uint64_t(k.ab) << 16 |
        uint64_t(k.c) << 24);
    for (int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc, k.batch, k.sa, k.sb, k.sc})
      mix(uint64_t(v));
    mix(uint64_t(k.al_a) | uint64_t(k.al_b) << 16 | uint64_t(k.al_c) << 32);
    return size_t(h);
  }
};

struct Plan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulAlgo_t algo{};
  ~Plan() {
    if (la) cublasLtMatrixLayoutDestroy(la);
    if (lb) cublasLtMatrixLayoutDestroy(lb);
    if (lc) cublasLtMatrixLayoutDestroy(lc);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

// Per-thread state. Never destroyed: a handle or workspace released during static teardown may
// outlive the CUDA context.
struct ThreadState {
  std::map<int, cublasLtHandle_t> handles;
  std::map<std::pair<int, void*>, std::shared_ptr<void>> workspaces;  // (device, stream)
  std::unordered_map<Key, std::unique_ptr<Plan>, KeyHash> plans;
};
ThreadState& state() {
  thread_local ThreadState* s = new ThreadState;
  return *s;
}

cublasLtHandle_t handle(int dev) {
  auto& h = state().handles[dev];
  if (!h) CUBLAS_CHECK(cublasLtCreate(&h));
  return h;
}

void* workspace(int dev, cudaStream_t s) {
  auto& w = state().workspaces[{dev, static_cast<void*>(s)}];
  if (!w) w = cuda_alloc(kWorkspaceBytes, dev);
  return w.get();
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t t, int64_t rows, int64_t cols, int64_t ld,
                                   int64_t batch, int64_t stride) {
  cublasLtMatrixLayout_t l = nullptr;
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&l, t, uint64_t(rows), uint64_t(cols), ld));
  if (batch > 1) {
    int32_t b = int32_t(batch);
    CUBLAS_CHECK(
        cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &b, sizeof(b)));
    CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                                  &stride, sizeof(stride)));
  }
  return l;
}

// Times each usable candidate (one warm-up, then kTuneRuns runs between two events on the current
// stream) on g's A, B (and bias); returns the index of the fastest, or 0 when none could be timed.
// With beta 0 they write C itself (never read; the call that follows overwrites it), else a zeroed
// scratch C of C's extent (C keeps its values), up to kTuneScratchBytes: a larger C keeps the
// first pick. Synchronizes the stream once per new plan.
int fastest_candidate(const Key& key, const Plan& p, cublasLtHandle_t h, const GemmArgs& g,
                      const cublasLtMatmulHeuristicResult_t* res, int found) {
  Tensor scratch;
  void* out = g.c;
  if (g.beta != 0.f) {
    const int64_t extent = key.batch > 1 ? (key.batch - 1) * key.sc + key.m * key.ldc
                                         : key.m * key.ldc;
    if (extent * int64_t(dtype_size(key.c)) > kTuneScratchBytes) return 0;
    scratch = Tensor::zeros({extent}, key.c, Device::cuda(key.device));
    out = scratch.raw_data();
  }
  cudaStream_t s = stream();
  void* ws = workspace(key.device, s);
  struct Events {  // destroyed on every exit, a throwing CUDA_CHECK included
    cudaEvent_t e0 = nullptr, e1 = nullptr;
    ~Events() {
      if (e0) cudaEventDestroy(e0);
      if (e1) cudaEventDestroy(e1);
    }
  } ev;
  CUDA_CHECK(cudaEventCreate(&ev.e0));
  CUDA_CHECK(cudaEventCreate(&ev.e1));
  cudaEvent_t e0 = ev.e0, e1 = ev.e1;
  int best = 0;
  float best_ms = 0.f;
  bool any = false;
  for (int i = 0; i < found; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    auto run = [&] {
      return cublasLtMatmul(h, p.op, &g.alpha, g.b, p.la, g.a, p.lb, &g.beta, out, p.lc, out, p.lc,
                            &res[i].algo, ws, kWorkspaceBytes, s);
    };
    if (run() != CUBLAS_STATUS_SUCCESS) continue;  // this candidate cannot run here: skip it
    CUDA_CHECK(cudaEventRecord(e0, s));
    bool ok = true;
    for (int r = 0; r < kTuneRuns && ok; ++r) ok = run() == CUBLAS_STATUS_SUCCESS;
    CUDA_CHECK(cudaEventRecord(e1, s));
    CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (ok && (!any || ms < best_ms)) {
      best = i;
      best_ms = ms;
      any = true;
    }
  }
  return best;
}

Plan& plan_for(const Key& key, cublasLtHandle_t h, const GemmArgs& g) {
  auto& plans = state().plans;
  auto it = plans.find(key);
  if (it != plans.end()) return *it->second;
  if (plans.size() >= kMaxPlans) plans.clear();  // shapes churn: start over rather than grow
  auto p = std::make_unique<Plan>();
  const cublasComputeType_t ct =
      key.ab == DType::f32 && key.tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->op, ct, CUDA_R_32F));
  // cuBLASLt's A is our B and its B is our A (see the top of the file).
  cublasOperation_t op_a = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_b = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)));
  CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)));
  if (key.bias) {
    cublasLtEpilogue_t ep = CUBLASLT_EPILOGUE_BIAS;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &ep, sizeof(ep)));
  }
  const cudaDataType_t tab = cuda_type(key.ab), tc = cuda_type(key.c);
  // Stored (pre-op) shapes, column-major: our row-major X [r, c] is X^T [c, r] there.
  p->la =
      make_layout(tab, key.tb ? key.k : key.n, key.tb ? key.n : key.k, key.ldb, key.batch, key.sb);
  p->lb =
      make_layout(tab, key.ta ? key.m : key.k, key.ta ? key.k : key.m, key.lda, key.batch, key.sa);
  p->lc = make_layout(tc, key.n, key.m, key.ldc, key.batch, key.sc);

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = kWorkspaceBytes;
  uint32_t al_a = key.al_b, al_b = key.al_a, al_c = key.al_c;  // swapped like the operands
  cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(
      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                              &al_a, sizeof(al_a));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                              &al_b, sizeof(al_b));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                              &al_c, sizeof(al_c));
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                              &al_c, sizeof(al_c));
  // Split-K partial sums must be reduced in f32: the in-place and output-type schemes add them up
  // in C's dtype, which for a bf16 C loses several ulps per split (seen on an H200: 16% off at
  // k = 1000 with cancelling terms). Only no split, or a reduction in the compute type.
  uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                              &reduction, sizeof(reduction));
  cublasLtMatmulHeuristicResult_t res[kTuneCandidates] = {};
  int found = 0;
  if (st == CUBLAS_STATUS_SUCCESS)
    st = cublasLtMatmulAlgoGetHeuristic(h, p->op, p->la, p->lb, p->lc, p->lc, pref,
                                        key.tuned ? kTuneCandidates : 1, res, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  CUBLAS_CHECK(st);
  FTUNE_CHECK(found > 0, "[gemm] cuBLASLt has no algorithm for ", key.ta ? "A^T" : "A", " ",
              key.tb ? "B^T" : "B", " m=", key.m, " n=", key.n, " k=", key.k, " lda=", key.lda,
              " ldb=", key.ldb, " ldc=", key.ldc, " batch=", key.batch, " ", dtype_name(key.ab),
              " -> ", dtype_name(key.c), key.bias ? " with bias" : "");
  int pick = 0;
  if (key.tuned && found > 1) {
    if (key.bias) {  // the timed runs read the call's bias
      const void* bp = g.bias;
      CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp,
                                                  sizeof(bp)));
    }
    pick = fastest_candidate(key, *p, h, g, res, found);
  }
  p->algo = res[pick].algo;
  return *plans.emplace(key, std::move(p)).first->second;
}

// k == 0: C = beta * C (+ bias[j]); beta == 0 writes without reading C.
template <class T>
__global__ void scale_bias_kernel(T* __restrict__ c, const T* __restrict__ bias, int64_t rows,
                                  int64_t n, int64_t ldc, int64_t batch, int64_t stride_c,
                                  float beta) {
  const int64_t total = batch * rows * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % n, row = (i / n) % rows, bt = i / (n * rows);
    T* p = c + bt * stride_c + row * ldc + j;
    float v = beta == 0.f ? 0.f : beta * to_f(*p);
    if (bias) v += to_f(bias[j]);
    *p = from_f<T>(v);
  }
}

// C = alpha-scaled product (f32, contiguous [batch, rows, n]) + beta * C + bias[j], rounded once.
template <class T>
__global__ void combine_kernel(T* __restrict__ c, const float* __restrict__ prod,
                               const T* __restrict__ bias, int64_t rows, int64_t n, int64_t ldc,
                               int64_t batch, int64_t stride_c, float beta) {
  const int64_t total = batch * rows * n;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % n, row = (i / n) % rows, bt = i / (n * rows);
    T* p = c + bt * stride_c + row * ldc + j;
    float v = prod[i] + (beta == 0.f ? 0.f : beta * to_f(*p));
    if (bias) v += to_f(bias[j]);
    *p = from_f<T>(v);
  }
}

}  // namespace

void gemm(const GemmArgs& g) {
  FTUNE_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0 && g.batch >= 0, "[gemm] bad sizes m=", g.m,
              " n=", g.n, " k=", g.k, " batch=", g.batch);
  FTUNE_CHECK(g.c_dtype == g.ab_dtype || (g.c_dtype == DType::f32 && g.ab_dtype != DType::f32),
              "[gemm] C of ", dtype_name(g.c_dtype), " for ", dtype_name(g.ab_dtype),
              " inputs (C takes the inputs' dtype or f32)");
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  cuda_type(g.ab_dtype);  // throws on f64 and integers
  FTUNE_CHECK(g.ldc >= g.n, "[gemm] ldc ", g.ldc, " < n ", g.n);
  FTUNE_CHECK(g.c != nullptr, "[gemm] C is null");
  const int dev = ftune::cuda::current_device();
  cudaStream_t s = stream();
  if (g.k > 0 && g.bias && g.c_dtype != DType::f32) {
    // A 16-bit C with a bias: cuBLASLt's bias epilogue rounds before the bias is added (seen on an
    // H200: errors of an ulp at the scale of alpha A B where bias cancels it). beta == 0 (linear):
    // C = bias first, then the GEMM adds alpha A B onto it with beta = 1 in one f32 epilogue.
    // beta != 0: the product in f32, then one kernel adds beta C + bias and rounds once.
    if (g.beta == 0.f) {
      GemmArgs pre = g;
      pre.k = 0;
      gemm(pre);
      GemmArgs rest = g;
      rest.bias = nullptr;
      rest.beta = 1.0f;
      gemm(rest);
    } else {
      Tensor prod = Tensor::empty({g.batch, g.m, g.n}, DType::f32, Device::cuda(dev));
      GemmArgs pg = g;
      pg.bias = nullptr;
      pg.beta = 0.f;
      pg.c_dtype = DType::f32;
      pg.c = prod.raw_data();
      pg.ldc = g.n;
      pg.stride_c = g.m * g.n;
      gemm(pg);
      cuda::dispatch_float(g.c_dtype, "gemm", [&](auto tag) {
        using T = typename decltype(tag)::type;
        combine_kernel<T><<<grid_1d(g.batch * g.m * g.n, 256), 256, 0, s>>>(
            static_cast<T*>(g.c), static_cast<const float*>(prod.raw_data()), static_cast<const T*>(g.bias), g.m, g.n, g.ldc,
            g.batch, g.stride_c, g.beta);
      });
      FTUNE_LAUNCH_CHECK("gemm");
    }
    return;
  }
  if (g.k == 0) {
    cuda::dispatch_float(g.c_dtype, "gemm", [&](auto tag) {
      using T = typename decltype(tag)::type;
      scale_bias_kernel<T><<<grid_1d(g.batch * g.m * g.n, 256), 256, 0, s>>>(
          static_cast<T*>(g.c), static_cast<const T*>(g.bias), g.m, g.n, g.ldc, g.batch, g.stride_c,
          g.beta);
    });
    FTUNE_LAUNCH_CHECK("gemm");
    return;
  }
  FTUNE_CHECK(g.a && g.b, "[gemm] A or B is null");
  FTUNE_CHECK(g.lda >= (g.trans_a ? g.m : g.k) && g.ldb >= (g.trans_b ? g.k : g.n), "[gemm] lda ",
              g.lda, " / ldb ", g.ldb, " too small for m=", g.m, " n=", g.n, " k=", g.k);
  FTUNE_CHECK(g.batch <= INT32_MAX, "[gemm] batch ", g.batch, " too large");
  const size_t eab = dtype_size(g.ab_dtype), ec = dtype_size(g.c_dtype);
  FTUNE_CHECK(g.batch == 1 || g.stride_c >= g.m * g.ldc - (g.ldc - g.n),
              "[gemm] batch entries of C overlap (stride_c ", g.stride_c, ")");
  if (g.batch > 1 && (g.stride_a == 0 || g.stride_b == 0)) {
    // A shared operand: one GEMM per entry rather than rely on a zero batch stride in cuBLASLt.
    for (int64_t i = 0; i < g.batch; ++i) {
      GemmArgs one = g;
      one.batch = 1;
      one.a = static_cast<const char*>(g.a) + i * g.stride_a * int64_t(eab);
      one.b = static_cast<const char*>(g.b) + i * g.stride_b * int64_t(eab);
      one.c = static_cast<char*>(g.c) + i * g.stride_c * int64_t(ec);
      gemm(one);
    }
    return;
  }
  Key key;
  key.device = dev;
  key.ta = g.trans_a;
  key.tb = g.trans_b;
  key.bias = g.bias != nullptr;
  key.tf32 = g.ab_dtype == DType::f32 && ftune::cuda::allow_tf32();
  key.tuned = ftune::cuda::gemm_autotune();
  key.m = g.m;
  key.n = g.n;
  key.k = g.k;
  key.lda = g.lda;
  key.ldb = g.ldb;
  key.ldc = g.ldc;
  key.batch = g.batch;
  key.sa = g.batch > 1 ? g.stride_a : 0;
  key.sb = g.batch > 1 ? g.stride_b : 0;
  key.sc = g.batch > 1 ? g.stride_c : 0;
  key.ab = g.ab_dtype;
  key.c = g.c_dtype;
  key.al_a = alignment(g.a, key.sa, eab, g.batch);
  key.al_b = alignment(g.b, key.sb, eab, g.batch);
  key.al_c = alignment(g.c, key.sc, ec, g.batch);
  cublasLtHandle_t h = handle(dev);
  Plan& p = plan_for(key, h, g);
  if (g.bias) {  // the pointer is per call; the descriptor is this thread's own
    const void* bp = g.bias;
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp, sizeof(bp)));
  }
  CUBLAS_CHECK(cublasLtMatmul(h, p.op, &g.alpha, g.b, p.la, g.a, p.lb, &g.beta, g.c, p.lc, g.c,
                              p.lc, &p.algo, workspace(dev, s), kWorkspaceBytes, s));
}

template <class T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const T* a,
          int64_t lda, const T* b, int64_t ldb, float beta, T* c, int64_t ldc) {
  gemm(gemm_args<T>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc));
}

template void gemm<float>(bool, bool, int64_t, int64_t, int64_t, float, const float*, int64_t,
                          const float*, int64_t, float, float*, int64_t);
template void gemm<bf16>(bool, bool, int64_t, int64_t, int64_t, float, const bf16*, int64_t,
                         const bf16*, int64_t, float, bf16*, int64_t);
template void gemm<f16>(bool, bool, int64_t, int64_t, int64_t, float, const f16*, int64_t,
                        const f16*, int64_t, float, f16*, int64_t);

}  // namespace ftune::kernels::cuda
