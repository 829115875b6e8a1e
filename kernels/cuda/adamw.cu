// Multi-tensor AdamW, sum of squares and in-place scaling on the GPU (twins of
// kernels/cpu/adamw.cpp; declared in kernels/adamw.h).
//
// Each launch covers many tensors: the host writes a table of per-tensor descriptors (pointers,
// size, first chunk) to the device; every tensor is cut into chunks of kChunk elements, numbered
// across tensors, and each block takes chunks blockIdx.x, blockIdx.x + gridDim.x, ..., finding a
// chunk's tensor by binary search in the (small, cached) table. A chunk never spans two tensors,
// so the work of a block is uniform: one dtype combination, contiguous memory.
#include <algorithm>
#include <cstring>
#include <mutex>

#include "kernels/adamw.h"
#include "kernels/cuda/common.cuh"

namespace ftune::kernels::cuda {

namespace {

constexpr int64_t kChunk = 16384;  // elements; a multiple of every vector width
constexpr int kThreads = 256;
constexpr int kUnroll = 4;  // vectors per thread in flight in the sum-of-squares and scale loops

// ---- descriptor tables --------------------------------------------------------------------------
// Pinned host staging for the tables, reused across calls: the previous copy out of it must have
// finished before it is overwritten (an event), so the launches never wait for the whole stream.
struct TableStaging {
  std::mutex mu;
  void* host = nullptr;
  size_t cap = 0;
  cudaEvent_t done = nullptr;
};
TableStaging& staging() {
  static TableStaging s;
  return s;
}

// Copies n descriptors to a new device buffer (kept alive by the returned tensor; the caching
// allocator reuses it only after this stream's later work, so the kernel reads it safely).
template <class D>
Tensor upload_table(const std::vector<D>& table) {
  const size_t bytes = table.size() * sizeof(D);
  Tensor dev = Tensor::empty({int64_t((bytes + 7) / 8)}, DType::i64,
                             Device::cuda(ftune::cuda::current_device()));
  TableStaging& st = staging();
  std::lock_guard<std::mutex> lock(st.mu);
  if (!st.done) CUDA_CHECK(cudaEventCreateWithFlags(&st.done, cudaEventDisableTiming));
  CUDA_CHECK(cudaEventSynchronize(st.done));  // the last copy out of the buffer has finished
  if (st.cap < bytes) {
    if (st.host) CUDA_CHECK(cudaFreeHost(st.host));
    st.host = nullptr;
    st.cap = 0;
    CUDA_CHECK(cudaMallocHost(&st.host, bytes));
    st.cap = bytes;
  }
  std::memcpy(st.host, table.data(), bytes);
  CUDA_CHECK(cudaMemcpyAsync(dev.raw_data(), st.host, bytes, cudaMemcpyHostToDevice, stream()));
  CUDA_CHECK(cudaEventRecord(st.done, stream()));
  return dev;
}

// Index of the tensor holding global chunk ch: the last t with chunk0 <= ch (tables are sorted
// by chunk0 and hold no empty tensor).
template <class D>
__device__ __forceinline__ int find_tensor(const D* __restrict__ d, int nt, int64_t ch) {
  int lo = 0, hi = nt - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (d[mid].chunk0 <= ch) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

unsigned blocks_for(int64_t chunks, int per_sm) {
  const int64_t cap = int64_t(per_sm) * ftune::cuda::device_sm_count(ftune::cuda::current_device());
  return unsigned(std::max<int64_t>(1, std::min(chunks, cap)));
}

// At most per_sm blocks of kThreads per SM, and no more than fit at once: each block owns a fixed
// share of the chunks, so blocks beyond what is resident would run after the others, alone (a
// tail at a fraction of the bandwidth). Depends only on the device and the kernel, so the
// partial sums of a reduction stay reproducible.
template <class K>
unsigned resident_blocks_for(K kernel, int64_t chunks, int per_sm) {
  int fit = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, kThreads, 0));
  return blocks_for(chunks, std::max(1, std::min(per_sm, fit)));
}

// 4 elements of T at p (aligned to 4 * sizeof(T)), to and from f32.
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};
template <class T>
__device__ __forceinline__ void load4(const T* p, float (&o)[4]) {
  const Quad<T> q = *reinterpret_cast<const Quad<T>*>(p);
#pragma unroll
  for (int i = 0; i < 4; ++i) o[i] = to_f(q.v[i]);
}
template <class T>
__device__ __forceinline__ void store4(T* p, const float (&x)[4]) {
  Quad<T> q;
#pragma unroll
  for (int i = 0; i < 4; ++i) q.v[i] = from_f<T>(x[i]);
  *reinterpret_cast<Quad<T>*>(p) = q;
}

// ---- AdamW --------------------------------------------------------------------------------------
// Which (grad, param) storage types a tensor has.
enum AdamKind : int { kF32F32, kBf16Bf16, kF32Bf16, kF16F16, kF32F16 };

struct AdamDesc {
  float* master;
  void* param;
  const void* grad;
  float* m;
  float* v;
  int64_t n;
  int64_t chunk0;  // global index of the tensor's first chunk
  AdamWConsts c;
  int kind;
  int vec;  // every array aligned for 4-element accesses
};

// The update of cpu::adamw_update, operation by operation in the same order, with each product
// and sum rounded on its own (no fused multiply-add), as torch.optim.AdamW writes it.
__device__ __forceinline__ void adamw_elem(float& p, float g, float& m, float& v,
                                           const AdamWConsts& c) {
  g = __fmul_rn(g, c.grad_scale);  // the clipping coefficient (1: exact)
  const float one_b1 = __fsub_rn(1.0f, c.beta1), one_b2 = __fsub_rn(1.0f, c.beta2);
  const float mi = __fadd_rn(__fmul_rn(c.beta1, m), __fmul_rn(one_b1, g));
  const float vi = __fadd_rn(__fmul_rn(c.beta2, v), __fmul_rn(__fmul_rn(one_b2, g), g));
  m = mi;
  v = vi;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), c.bc2_sqrt), c.eps);
  p = __fsub_rn(__fmul_rn(p, c.decay), __fmul_rn(c.step_size, __fdiv_rn(mi, denom)));
}

// Elements [i0, i0 + len) of one tensor, by the whole block. P = float: the master is the param.
template <class G, class P>
__device__ __forceinline__ void adamw_chunk(const AdamDesc& d, int64_t i0, int64_t len) {
  float* pm = d.master + i0;
  float* mm = d.m + i0;
  float* vv = d.v + i0;
  const G* gg = static_cast<const G*>(d.grad) + i0;
  P* pp = std::is_same<P, float>::value ? nullptr : static_cast<P*>(d.param) + i0;
  const AdamWConsts c = d.c;
  const int64_t nq = d.vec ? len / 4 : 0;
  for (int64_t q = threadIdx.x; q < nq; q += blockDim.x) {
    float p[4], g[4], m[4], v[4];
    load4(pm + 4 * q, p);
    load4(gg + 4 * q, g);
    load4(mm + 4 * q, m);
    load4(vv + 4 * q, v);
#pragma unroll
    for (int i = 0; i < 4; ++i) adamw_elem(p[i], g[i], m[i], v[i], c);
    store4(pm + 4 * q, p);
    store4(mm + 4 * q, m);
    store4(vv + 4 * q, v);
    if constexpr (!std::is_same<P, float>::value) store4(pp + 4 * q, p);
  }
  for (int64_t i = nq * 4 + threadIdx.x; i < len; i += blockDim.x) {
    float p = pm[i], m = mm[i], v = vv[i];
    adamw_elem(p, to_f(gg[i]), m, v, c);
    pm[i] = p;
    mm[i] = m;
    vv[i] = v;
    if constexpr (!std::is_same<P, float>::value) pp[i] = from_f<P>(p);
  }
}

__global__ void __launch_bounds__(kThreads)
adamw_multi_kernel(const AdamDesc* __restrict__ table, int nt, int64_t total_chunks) {
  for (int64_t ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
    const int t = find_tensor(table, nt, ch);
    const AdamDesc d = table[t];
    const int64_t i0 = (ch - d.chunk0) * kChunk;
    const int64_t len = min(kChunk, d.n - i0);
    switch (d.kind) {
      case kF32F32: adamw_chunk<float, float>(d, i0, len); break;
      case kBf16Bf16: adamw_chunk<__nv_bfloat16, __nv_bfloat16>(d, i0, len); break;
      case kF32Bf16: adamw_chunk<float, __nv_bfloat16>(d, i0, len); break;
      case kF16F16: adamw_chunk<__half, __half>(d, i0, len); break;
      case kF32F16: adamw_chunk<float, __half>(d, i0, len); break;
    }
  }
}

bool aligned_to(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// ---- sum of squares and scaling -------------------------------------------------------------------
enum ArrKind : int { kArrF32, kArrBf16, kArrF16, kArrF64 };

struct ArrDesc {
  void* data;
  int64_t n;
  int64_t chunk0;
  int kind;
  int vec;  // 16-byte aligned
};

int arr_kind(DType t, const char* op) {
  switch (t) {
    case DType::f32: return kArrF32;
    case DType::bf16: return kArrBf16;
    case DType::f16: return kArrF16;
    case DType::f64: return kArrF64;
    default: FTUNE_THROW("[", op, "] arrays are f32, f64, bf16 or f16, got ", dtype_name(t));
  }
}

// This thread's share of sum(x^2) over x[0, len), in f32 (f64 arrays: in f64, then rounded).
template <class T>
__device__ __forceinline__ float chunk_sumsq(const T* x, int64_t len, bool vec) {
  if constexpr (std::is_same<T, double>::value) {
    double s = 0.0;
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) s += x[i] * x[i];
    return float(s);
  } else {
    constexpr int V = kVec<T>;
    float s = 0.f;
    const int64_t nv = vec ? len / V : 0;
    const int64_t bd = blockDim.x;
    int64_t k = threadIdx.x;
    // kUnroll 16-byte loads in flight per thread before they are summed.
    for (; k + (kUnroll - 1) * bd < nv; k += kUnroll * bd) {
      float f[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec(x + (k + u * bd) * V, f[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int i = 0; i < V; ++i) s += f[u][i] * f[u][i];
    }
    for (; k < nv; k += bd) {
      float f[V];
      load_vec(x + k * V, f);
#pragma unroll
      for (int i = 0; i < V; ++i) s += f[i] * f[i];
    }
    for (int64_t i = nv * V + threadIdx.x; i < len; i += blockDim.x) {
      const float f = to_f(x[i]);
      s += f * f;
    }
    return s;
  }
}

// partial[b] = sum over the chunks of block b (in its loop order) of the chunk's sum, in f64.
__global__ void __launch_bounds__(kThreads)
sumsq_multi_kernel(const ArrDesc* __restrict__ table, int nt, int64_t total_chunks,
                   double* __restrict__ partial) {
  __shared__ float shm[32];
  double acc = 0.0;
  for (int64_t ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
    const ArrDesc d = table[find_tensor(table, nt, ch)];
    const int64_t i0 = (ch - d.chunk0) * kChunk;
    const int64_t len = min(kChunk, d.n - i0);
    float s = 0.f;
    switch (d.kind) {
      case kArrF32: s = chunk_sumsq(static_cast<const float*>(d.data) + i0, len, d.vec); break;
      case kArrBf16:
        s = chunk_sumsq(static_cast<const __nv_bfloat16*>(d.data) + i0, len, d.vec);
        break;
      case kArrF16: s = chunk_sumsq(static_cast<const __half*>(d.data) + i0, len, d.vec); break;
      case kArrF64: s = chunk_sumsq(static_cast<const double*>(d.data) + i0, len, d.vec); break;
    }
    s = block_sum(s, shm);
    acc += double(s);
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <class T>
__device__ __forceinline__ void chunk_scale(T* x, int64_t len, bool vec, double s) {
  if constexpr (std::is_same<T, double>::value) {
    for (int64_t i = threadIdx.x; i < len; i += blockDim.x) x[i] *= s;
  } else {
    constexpr int V = kVec<T>;
    const float sf = float(s);  // as the CPU: x = T(float(x) * float(s))
    const int64_t nv = vec ? len / V : 0;
    const int64_t bd = blockDim.x;
    int64_t k = threadIdx.x;
    for (; k + (kUnroll - 1) * bd < nv; k += kUnroll * bd) {
      float f[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec(x + (k + u * bd) * V, f[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < V; ++i) f[u][i] *= sf;
        store_vec(x + (k + u * bd) * V, f[u]);
      }
    }
    for (; k < nv; k += bd) {
      float f[V];
      load_vec(x + k * V, f);
#pragma unroll
      for (int i = 0; i < V; ++i) f[i] *= sf;
      store_vec(x + k * V, f);
    }
    for (int64_t i = nv * V + threadIdx.x; i < len; i += blockDim.x) x[i] = from_f<T>(to_f(x[i]) * sf);
  }
}

__global__ void __launch_bounds__(kThreads)
scale_multi_kernel(const ArrDesc* __restrict__ table, int nt, int64_t total_chunks, double s) {
  for (int64_t ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
    const ArrDesc d = table[find_tensor(table, nt, ch)];
    const int64_t i0 = (ch - d.chunk0) * kChunk;
    const int64_t len = min(kChunk, d.n - i0);
    switch (d.kind) {
      case kArrF32: chunk_scale(static_cast<float*>(d.data) + i0, len, d.vec, s); break;
      case kArrBf16: chunk_scale(static_cast<__nv_bfloat16*>(d.data) + i0, len, d.vec, s); break;
      case kArrF16: chunk_scale(static_cast<__half*>(d.data) + i0, len, d.vec, s); break;
      case kArrF64: chunk_scale(static_cast<double*>(d.data) + i0, len, d.vec, s); break;
    }
  }
}

// The table of arrays (empty ones left out) and the total chunk count.
std::vector<ArrDesc> arr_table(const std::vector<DeviceArray>& xs, const char* op,
                               int64_t* chunks) {
  std::vector<ArrDesc> table;
  int64_t next = 0;
  for (const DeviceArray& a : xs) {
    FTUNE_CHECK(a.n >= 0, "[", op, "] negative size ", a.n);
    const int kind = arr_kind(a.dtype, op);
    if (a.n == 0) continue;
    FTUNE_CHECK(a.data, "[", op, "] null array of ", a.n, " elements");
    table.push_back({a.data, a.n, next, kind, aligned16(a.data) ? 1 : 0});
    next += (a.n + kChunk - 1) / kChunk;
  }
  *chunks = next;
  return table;
}

}  // namespace

void adamw_update_multi(const std::vector<AdamWTensor>& ts) {
  std::vector<AdamDesc> table;
  int64_t next = 0;
  for (const AdamWTensor& t : ts) {
    FTUNE_CHECK(t.n >= 0, "[adamw] negative size ", t.n);
    if (t.n == 0) continue;
    FTUNE_CHECK(t.master && t.grad && t.m && t.v, "[adamw] null master/grad/m/v pointer");
    int kind = -1;
    if (t.param_dtype == DType::f32 && t.grad_dtype == DType::f32) kind = kF32F32;
    if (t.param_dtype == DType::bf16)
      kind = t.grad_dtype == DType::bf16 ? kBf16Bf16 : t.grad_dtype == DType::f32 ? kF32Bf16 : -1;
    if (t.param_dtype == DType::f16)
      kind = t.grad_dtype == DType::f16 ? kF16F16 : t.grad_dtype == DType::f32 ? kF32F16 : -1;
    FTUNE_CHECK(kind >= 0, "[adamw] param ", dtype_name(t.param_dtype), " with grad ",
                dtype_name(t.grad_dtype), ": the GPU update takes f32/f32, bf16 or f16 params "
                "with grads of their dtype or f32");
    FTUNE_CHECK(kind == kF32F32 || t.param, "[adamw] null 16-bit param pointer");
    const bool vec = aligned_to(t.master, 16) && aligned_to(t.m, 16) && aligned_to(t.v, 16) &&
                     aligned_to(t.grad, 4 * dtype_size(t.grad_dtype)) &&
                     (kind == kF32F32 || aligned_to(t.param, 4 * dtype_size(t.param_dtype)));
    AdamDesc d;
    d.master = t.master;
    d.param = t.param;
    d.grad = t.grad;
    d.m = t.m;
    d.v = t.v;
    d.n = t.n;
    d.chunk0 = next;
    d.c = t.c;
    d.kind = kind;
    d.vec = vec ? 1 : 0;
    table.push_back(d);
    next += (t.n + kChunk - 1) / kChunk;
  }
  if (table.empty()) return;
  Tensor dev = upload_table(table);
  adamw_multi_kernel<<<resident_blocks_for(adamw_multi_kernel, next, 8), kThreads, 0, stream()>>>(
      static_cast<const AdamDesc*>(dev.raw_data()), int(table.size()), next);
  FTUNE_LAUNCH_CHECK("adamw");
}

double sum_squares_multi(const std::vector<DeviceArray>& xs) {
  int64_t chunks = 0;
  std::vector<ArrDesc> table = arr_table(xs, "grad_norm", &chunks);
  if (table.empty()) return 0.0;
  Tensor dev = upload_table(table);
  // The block count depends only on the device: the same inputs give the same sum.
  const unsigned grid = resident_blocks_for(sumsq_multi_kernel, chunks, 8);
  Tensor part = Tensor::empty({int64_t(grid)}, DType::f64, dev.device());
  sumsq_multi_kernel<<<grid, kThreads, 0, stream()>>>(static_cast<const ArrDesc*>(dev.raw_data()),
                                                      int(table.size()), chunks,
                                                      static_cast<double*>(part.raw_data()));
  FTUNE_LAUNCH_CHECK("grad_norm");
  std::vector<double> host(grid);
  CUDA_CHECK(cudaMemcpyAsync(host.data(), part.raw_data(), grid * sizeof(double),
                             cudaMemcpyDeviceToHost, stream()));
  CUDA_CHECK(cudaStreamSynchronize(stream()));
  double total = 0.0;
  for (double v : host) total += v;
  return total;
}

void scale_inplace_multi(const std::vector<DeviceArray>& xs, double s) {
  int64_t chunks = 0;
  std::vector<ArrDesc> table = arr_table(xs, "scale_grads", &chunks);
  if (table.empty()) return;
  Tensor dev = upload_table(table);
  scale_multi_kernel<<<blocks_for(chunks, 8), kThreads, 0, stream()>>>(
      static_cast<const ArrDesc*>(dev.raw_data()), int(table.size()), chunks, s);
  FTUNE_LAUNCH_CHECK("scale_grads");
}

}  // namespace ftune::kernels::cuda
