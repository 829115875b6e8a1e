// A contiguous elementwise map shared by the elementwise and activation kernels: NI inputs and NO
// outputs of one float dtype and length, f applied per element in f32. When every pointer is
// 16-byte aligned each thread moves 16-byte vectors (kVec<T> elements per input and output); the
// n % kVec tail, and unaligned views, go element by element. Included by kernels/cuda/*.cu only.
#pragma once
#include "kernels/cuda/common.cuh"

namespace ftune::kernels::cuda {

template <class T, int N>
struct Ptrs {
  const T* p[N];
};
template <class T, int N>
struct OutPtrs {
  T* p[N];
};

// f: __device__ void operator()(const float (&x)[NI], float (&y)[NO]) const. Inputs may alias
// outputs element for element (in-place updates): each element is read before it is written.
template <class T, int NI, int NO, bool VEC, class F>
__global__ void map_kernel(Ptrs<T, NI> in, OutPtrs<T, NO> out, int64_t n, F f) {
  constexpr int V = VEC ? kVec<T> : 1;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t nv = n / V;
  for (int64_t v = tid; v < nv; v += stride) {
    float x[NI][V];
#pragma unroll
    for (int k = 0; k < NI; ++k) {
      if constexpr (VEC)
        load_vec(in.p[k] + v * V, x[k]);
      else
        x[k][0] = to_f(in.p[k][v]);
    }
    float y[NO][V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float xe[NI], ye[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) xe[k] = x[k][e];
      f(xe, ye);
#pragma unroll
      for (int k = 0; k < NO; ++k) y[k][e] = ye[k];
    }
#pragma unroll
    for (int k = 0; k < NO; ++k) {
      if constexpr (VEC)
        store_vec(out.p[k] + v * V, y[k]);
      else
        out.p[k][v] = from_f<T>(y[k][0]);
    }
  }
  // The tail past the last whole vector (empty when !VEC).
  for (int64_t i = nv * V + tid; i < n; i += stride) {
    float xe[NI], ye[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) xe[k] = to_f(in.p[k][i]);
    f(xe, ye);
#pragma unroll
    for (int k = 0; k < NO; ++k) out.p[k][i] = from_f<T>(ye[k]);
  }
}

template <class T, int NI, int NO, class F>
void launch_map(const char* op, const Ptrs<T, NI>& in, const OutPtrs<T, NO>& out, int64_t n, F f) {
  if (n <= 0) return;
  bool vec = true;
  for (int k = 0; k < NI; ++k) vec = vec && aligned16(in.p[k]);
  for (int k = 0; k < NO; ++k) vec = vec && aligned16(out.p[k]);
  constexpr int kThreads = 256;
  if (vec)
    map_kernel<T, NI, NO, true, F><<<grid_1d(n / kVec<T> + 1, kThreads), kThreads, 0, stream()>>>(in, out, n, f);
  else
    map_kernel<T, NI, NO, false, F><<<grid_1d(n, kThreads), kThreads, 0, stream()>>>(in, out, n, f);
  FTUNE_LAUNCH_CHECK(op);
}

}  // namespace ftune::kernels::cuda
