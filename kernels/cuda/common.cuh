// Shared device-side helpers of the hand-written CUDA kernels: error checks, the storage types of
// each float DType with their f32 conversions, 128-bit vector loads, warp and block reductions in
// f32, dtype dispatch and the launch check. Included by kernels/cuda/*.cu only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"

#define CUDA_CHECK(expr)                                                                       \
  do {                                                                                         \
    cudaError_t err_ = (expr);                                                                 \
    if (err_ != cudaSuccess) FTUNE_THROW("[cuda] ", #expr, ": ", cudaGetErrorString(err_));  \
  } while (0)

// After every launch: a bad configuration shows here, not at the next unrelated call.
#define FTUNE_LAUNCH_CHECK(op)                                                                \
  do {                                                                                        \
    cudaError_t err_ = cudaGetLastError();                                                    \
    if (err_ != cudaSuccess) FTUNE_THROW("[", op, "] kernel launch: ", cudaGetErrorString(err_)); \
  } while (0)

namespace ftune::kernels::cuda {

// The stream this thread's kernels launch on.
inline cudaStream_t stream() { return static_cast<cudaStream_t>(ftune::cuda::current_stream()); }

// ---- storage types and f32 conversions ----------------------------------------------------------
template <class T> __device__ __forceinline__ float to_f(T v) { return float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_f(float v) { return T(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }

template <class T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with T the storage type of a float dtype (f32, bf16, f16); anything else throws.
template <class F>
void dispatch_float(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); return;
    case DType::f16: f(Tag<__half>{}); return;
    default: FTUNE_THROW("[", op, "] the CUDA kernel takes f32, bf16 or f16, got ", dtype_name(t));
  }
}

// ---- 128-bit vectors ------------------------------------------------------------------------------
// kVec<T> elements of T fill 16 bytes.
template <class T> constexpr int kVec = 16 / sizeof(T);

template <class T>
struct alignas(16) Vec {
  T v[kVec<T>];
};

// Loads kVec<T> elements from p (16-byte aligned) into f32 registers.
template <class T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[kVec<T>]) {
  Vec<T> r = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) out[i] = to_f(r.v[i]);
}
template <class T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[kVec<T>]) {
  Vec<T> r;
#pragma unroll
  for (int i = 0; i < kVec<T>; ++i) r.v[i] = from_f<T>(in[i]);
  *reinterpret_cast<Vec<T>*>(p) = r;
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// ---- reductions in f32 ----------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// shm: 32 floats of shared memory. Contains a __syncthreads, so every thread must call it.
__device__ __forceinline__ float block_sum(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // shm may still be read by a previous call
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < nw ? shm[lane] : 0.f;
  return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shm) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  v = lane < nw ? shm[lane] : -INFINITY;
  return warp_max(v);
}

// ---- launch helpers -------------------------------------------------------------------------------
// Blocks for a grid-stride loop over n items: enough to fill the GPU several times, no more.
inline unsigned grid_1d(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  int64_t cap = int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device())) * 32;
  return unsigned(b < 1 ? 1 : (b > cap ? cap : b));
}

// Opts a kernel into more than the default 48 KiB of dynamic shared memory when it needs it.
template <class K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(bytes)));
}

// Host-side precondition checks of a launcher.
inline void check_cuda(const char* op, const Tensor& t, const char* what) {
  FTUNE_CHECK(t.defined(), "[", op, "] ", what, " is undefined");
  FTUNE_CHECK(t.device().is_cuda(), "[", op, "] ", what, " must be on the GPU, got ", t.desc());
  FTUNE_CHECK(t.is_contiguous(), "[", op, "] ", what, " must be contiguous, got ", t.desc());
}

}  // namespace ftune::kernels::cuda
