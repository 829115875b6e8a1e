// Multi-tensor unscale + non-finite check of loss scaling (twin of kernels/cpu/amp.cpp; declared
// in kernels/amp.h).
//
// The layout of kernels/cuda/adamw.cu: the host writes a table of per-array descriptors (pointers,
// size, first chunk) to the device; every array is cut into chunks of kChunk elements, numbered
// across arrays, and block b takes chunks b, b + gridDim.x, ..., finding a chunk's array by binary
// search in the table. A chunk never spans two arrays, so a block's work on it is one dtype pair
// over contiguous memory. Each thread ORs its own non-finite flag and, if set, stores 1 into the
// caller's device flag at the end (every writer stores the same value).
#include <algorithm>
#include <cstring>

#include "kernels/amp.h"
#include "kernels/cuda/common.cuh"

namespace ftune::kernels::cuda {

namespace {

constexpr int64_t kChunk = 16384;  // elements; a multiple of the 4-element vectors
constexpr int kThreads = 256;

// Which (input, output) storage types an array has.
enum UnscaleKind : int { kF32F32, kBf16Bf16, kF16F16, kBf16F32, kF16F32 };

struct UnscaleDesc {
  const void* in;
  void* out;
  int64_t n;
  int64_t chunk0;  // global index of the array's first chunk
  int kind;
  int vec;  // in and out both aligned for 4-element accesses
};

// Index of the array holding global chunk ch: the last t with chunk0 <= ch (the table is sorted by
// chunk0 and holds no empty array).
__device__ __forceinline__ int find_array(const UnscaleDesc* __restrict__ d, int nt, int64_t ch) {
  int lo = 0, hi = nt - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (d[mid].chunk0 <= ch)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// 4 elements of T (aligned to 4 * sizeof(T)), to and from f32.
template <class T>
struct alignas(4 * sizeof(T)) Quad4 {
  T v[4];
};

// Exponent bits all ones: inf or NaN (from the bits, whatever the math flags).
__device__ __forceinline__ bool non_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u;
}

// Elements [0, len) of one chunk, by the whole block; returns this thread's flag. x and y may be
// the same memory (in place): each element is read, then written, by one thread.
template <class In, class Out>
__device__ __forceinline__ bool unscale_chunk(const In* x, Out* y, int64_t len, bool vec,
                                              float inv_scale) {
  bool bad = false;
  const int64_t nq = vec ? len / 4 : 0;
  for (int64_t q = threadIdx.x; q < nq; q += blockDim.x) {
    const Quad4<In> a = *reinterpret_cast<const Quad4<In>*>(x + 4 * q);
    Quad4<Out> b;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float f = to_f(a.v[i]);
      bad |= non_finite(f);
      b.v[i] = from_f<Out>(__fmul_rn(f, inv_scale));
    }
    *reinterpret_cast<Quad4<Out>*>(y + 4 * q) = b;
  }
  for (int64_t i = nq * 4 + threadIdx.x; i < len; i += blockDim.x) {
    const float f = to_f(x[i]);
    bad |= non_finite(f);
    y[i] = from_f<Out>(__fmul_rn(f, inv_scale));
  }
  return bad;
}

__global__ void __launch_bounds__(kThreads)
    unscale_multi_kernel(const UnscaleDesc* __restrict__ table, int nt, int64_t total_chunks,
                         float inv_scale, int32_t* __restrict__ found_inf) {
  bool bad = false;
  for (int64_t ch = blockIdx.x; ch < total_chunks; ch += gridDim.x) {
    const UnscaleDesc d = table[find_array(table, nt, ch)];
    const int64_t i0 = (ch - d.chunk0) * kChunk;
    const int64_t len = min(kChunk, d.n - i0);
    const bool vec = d.vec != 0;
    switch (d.kind) {
      case kF32F32:
        bad |= unscale_chunk(static_cast<const float*>(d.in) + i0, static_cast<float*>(d.out) + i0,
                             len, vec, inv_scale);
        break;
      case kBf16Bf16:
        bad |= unscale_chunk(static_cast<const __nv_bfloat16*>(d.in) + i0,
                             static_cast<__nv_bfloat16*>(d.out) + i0, len, vec, inv_scale);
        break;
      case kF16F16:
        bad |= unscale_chunk(static_cast<const __half*>(d.in) + i0,
                             static_cast<__half*>(d.out) + i0, len, vec, inv_scale);
        break;
      case kBf16F32:
        bad |= unscale_chunk(static_cast<const __nv_bfloat16*>(d.in) + i0,
                             static_cast<float*>(d.out) + i0, len, vec, inv_scale);
        break;
      case kF16F32:
        bad |= unscale_chunk(static_cast<const __half*>(d.in) + i0, static_cast<float*>(d.out) + i0,
                             len, vec, inv_scale);
        break;
    }
  }
  if (bad) atomicOr(found_inf, 1);
}

bool aligned_to(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

int unscale_kind(DType in, DType out) {
  if (in == DType::f32 && out == DType::f32) return kF32F32;
  if (in == DType::bf16 && out == DType::bf16) return kBf16Bf16;
  if (in == DType::f16 && out == DType::f16) return kF16F16;
  if (in == DType::bf16 && out == DType::f32) return kBf16F32;
  if (in == DType::f16 && out == DType::f32) return kF16F32;
  FTUNE_THROW("[unscale_grads] input ", dtype_name(in), " with output ", dtype_name(out),
              ": the GPU unscale takes f32, bf16 or f16 inputs into their dtype or f32");
}

}  // namespace

void unscale_check_multi(const std::vector<UnscaleArray>& arrays, float inv_scale,
                         int32_t* found_inf) {
  FTUNE_CHECK(found_inf, "[unscale_grads] null found_inf flag");
  std::vector<UnscaleDesc> table;
  int64_t next = 0;
  for (const UnscaleArray& a : arrays) {
    FTUNE_CHECK(a.n >= 0, "[unscale_grads] negative size ", a.n);
    const int kind = unscale_kind(a.in_dtype, a.out_dtype);
    if (a.n == 0) continue;
    FTUNE_CHECK(a.in && a.out, "[unscale_grads] null array of ", a.n, " elements");
    FTUNE_CHECK(a.in != a.out || a.in_dtype == a.out_dtype, "[unscale_grads] an ",
                dtype_name(a.in_dtype), " input cannot be unscaled in place into ",
                dtype_name(a.out_dtype));
    const bool vec = aligned_to(a.in, 4 * dtype_size(a.in_dtype)) &&
                     aligned_to(a.out, 4 * dtype_size(a.out_dtype));
    table.push_back({a.in, a.out, a.n, next, kind, vec ? 1 : 0});
    next += (a.n + kChunk - 1) / kChunk;
  }
  if (table.empty()) return;
  // The table goes up from pageable memory: cudaMemcpyAsync has staged it when it returns, so
  // `table` may die; the device buffer is reused by the caching allocator only after this stream's
  // later work, so the kernel reads it safely.
  const size_t bytes = table.size() * sizeof(UnscaleDesc);
  Tensor dev = Tensor::empty({int64_t((bytes + 7) / 8)}, DType::i64,
                             Device::cuda(ftune::cuda::current_device()));
  CUDA_CHECK(
      cudaMemcpyAsync(dev.raw_data(), table.data(), bytes, cudaMemcpyHostToDevice, stream()));
  const int64_t cap = int64_t(8) * ftune::cuda::device_sm_count(ftune::cuda::current_device());
  const unsigned grid = unsigned(std::max<int64_t>(1, std::min(next, cap)));
  unscale_multi_kernel<<<grid, kThreads, 0, stream()>>>(
      static_cast<const UnscaleDesc*>(dev.raw_data()), int(table.size()), next, inv_scale,
      found_inf);
  FTUNE_LAUNCH_CHECK("unscale_grads");
}

}  // namespace ftune::kernels::cuda
