// Device fill and cast over contiguous buffers: one grid-stride loop per dtype pair, 16-byte
// vectors for the float/bf16/f16 pairs.
#include "kernels/copy.h"
#include "kernels/cuda/common.cuh"

namespace ftune::kernels::cuda {

namespace {

// Device-side storage types for each DType, and conversions through float/double.
template <class T> __device__ inline double to_f64(T v) { return double(v); }
template <> __device__ inline double to_f64<__nv_bfloat16>(__nv_bfloat16 v) { return double(__bfloat162float(v)); }
template <> __device__ inline double to_f64<__half>(__half v) { return double(__half2float(v)); }
template <> __device__ inline double to_f64<bool>(bool v) { return v ? 1.0 : 0.0; }

template <class T> __device__ inline T from_f64(double v) { return T(v); }
template <> __device__ inline float from_f64<float>(double v) { return float(v); }
template <> __device__ inline __nv_bfloat16 from_f64<__nv_bfloat16>(double v) { return __float2bfloat16_rn(float(v)); }
template <> __device__ inline __half from_f64<__half>(double v) { return __float2half_rn(float(v)); }
template <> __device__ inline bool from_f64<bool>(double v) { return v != 0.0; }

// Integers convert directly (an i64 above 2^53 survives); everything else through f64.
template <class S, class D>
__device__ inline D convert(S v) {
  if constexpr (std::is_integral_v<S> && std::is_integral_v<D> && !std::is_same_v<D, bool>)
    return D(v);
  else
    return from_f64<D>(to_f64<S>(v));
}

template <class S, class D>
__global__ void cast_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = convert<S, D>(src[i]);
}

// Float <-> bf16/f16 conversions move units of 8 elements: one 16-byte vector of the 2-byte type,
// two of f32. Each thread loads kCastUnroll units (units u, u + stride, ...) before it converts and
// stores any, so a bf16 -> f32 thread has 4 loads in flight instead of one. src and dst 16-byte
// aligned; the n % 8 tail goes element by element.
constexpr int kCastUnroll = 4;
template <class S, class D>
__global__ void cast_vec_kernel(const S* __restrict__ src, D* __restrict__ dst, int64_t n) {
  constexpr int U = 8, VS = kVec<S>, VD = kVec<D>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t nu = n / U;
  for (int64_t base = tid; base < nu; base += kCastUnroll * stride) {
    Vec<S> in[kCastUnroll][U / VS];
#pragma unroll
    for (int j = 0; j < kCastUnroll; ++j) {
      const int64_t u = base + j * stride;
      if (u < nu) {
#pragma unroll
        for (int h = 0; h < U / VS; ++h)
          in[j][h] = *reinterpret_cast<const Vec<S>*>(src + u * U + h * VS);
      }
    }
#pragma unroll
    for (int j = 0; j < kCastUnroll; ++j) {
      const int64_t u = base + j * stride;
      if (u < nu) {
        float x[U];
#pragma unroll
        for (int h = 0; h < U / VS; ++h)
#pragma unroll
          for (int e = 0; e < VS; ++e) x[h * VS + e] = to_f(in[j][h].v[e]);
#pragma unroll
        for (int h = 0; h < U / VD; ++h) {
          float t[VD];
#pragma unroll
          for (int e = 0; e < VD; ++e) t[e] = x[h * VD + e];
          store_vec(dst + u * U + h * VD, t);
        }
      }
    }
  }
  for (int64_t i = nu * U + tid; i < n; i += stride) dst[i] = from_f<D>(to_f(src[i]));
}

template <class T>
constexpr bool kIsVecFloat = std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>;

template <class D>
__global__ void fill_kernel(D* __restrict__ dst, D value, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}


// Calls f(Tag<T>{}) with the device storage type of t (C++17: no templated lambdas in .cu files).
template <class F>
void dispatch(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: f(Tag<float>{}); return;
    case DType::f64: f(Tag<double>{}); return;
    case DType::bf16: f(Tag<__nv_bfloat16>{}); return;
    case DType::f16: f(Tag<__half>{}); return;
    case DType::i32: f(Tag<int32_t>{}); return;
    case DType::i64: f(Tag<int64_t>{}); return;
    case DType::b8: f(Tag<bool>{}); return;
  }
  FTUNE_THROW("[", op, "] bad dtype");
}

inline unsigned grid_for(int64_t n) {
  int64_t blocks = (n + 255) / 256;
  return unsigned(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

constexpr int kMaxDims = 8;
struct StridedLayout {
  int ndim;
  int64_t shape[kMaxDims];
  int64_t src_stride[kMaxDims];
  int64_t dst_stride[kMaxDims];
};

// One thread per element: the flat index is unravelled over the shape (last dim fastest), so
// consecutive threads read consecutive elements of the innermost dim.
template <class S, class D>
__global__ void strided_copy_kernel(const S* __restrict__ src, D* __restrict__ dst, StridedLayout l,
                                    int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t rem = i, so = 0, doff = 0;
    for (int d = l.ndim - 1; d >= 0; --d) {
      int64_t c = rem % l.shape[d];
      rem /= l.shape[d];
      so += c * l.src_stride[d];
      doff += c * l.dst_stride[d];
    }
    dst[doff] = convert<S, D>(src[so]);
  }
}

}  // namespace

void strided_copy(const void* src, DType sdt, const int64_t* src_strides, void* dst, DType ddt,
                  const int64_t* dst_strides, const int64_t* shape, int ndim, int device) {
  FTUNE_CHECK(ndim <= kMaxDims, "[copy_] strided GPU copy of a ", ndim, "-d tensor (at most ", kMaxDims, ")");
  StridedLayout l{};
  int64_t n = 1;
  // Dims of size 1 carry no offset; dropping them keeps the index math short.
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] == 1) continue;
    l.shape[l.ndim] = shape[d];
    l.src_stride[l.ndim] = src_strides[d];
    l.dst_stride[l.ndim] = dst_strides[d];
    ++l.ndim;
    n *= shape[d];
  }
  for (int d = 0; d < ndim; ++d) n = shape[d] == 0 ? 0 : n;
  if (n == 0) return;
  CUDA_CHECK(cudaSetDevice(device));
  dispatch(sdt, "strided_copy", [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch(ddt, "strided_copy", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      strided_copy_kernel<S, D><<<grid_for(n), 256, 0, stream()>>>(static_cast<const S*>(src),
                                                                  static_cast<D*>(dst), l, n);
    });
  });
  FTUNE_LAUNCH_CHECK("strided_copy");
}

void fill(void* dst, DType dt, int64_t n, double value, int device) {
  if (n == 0) return;
  CUDA_CHECK(cudaSetDevice(device));
  dispatch(dt, "fill", [&](auto tag) {
    using D = typename decltype(tag)::type;
    D v;
    if constexpr (std::is_same_v<D, __nv_bfloat16>) v = __float2bfloat16_rn(float(value));
    else if constexpr (std::is_same_v<D, __half>) v = __float2half_rn(float(value));
    else if constexpr (std::is_same_v<D, bool>) v = value != 0.0;
    else v = D(value);
    fill_kernel<D><<<grid_for(n), 256, 0, stream()>>>(static_cast<D*>(dst), v, n);
  });
  CUDA_CHECK(cudaGetLastError());
}

void cast(const void* src, DType sdt, void* dst, DType ddt, int64_t n, int device) {
  if (n == 0) return;
  CUDA_CHECK(cudaSetDevice(device));
  dispatch(sdt, "cast", [&](auto stag) {
    using S = typename decltype(stag)::type;
    dispatch(ddt, "cast", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      if constexpr (kIsVecFloat<S> && kIsVecFloat<D> && !std::is_same_v<S, D>) {
        if (aligned16(src) && aligned16(dst)) {
          cast_vec_kernel<S, D><<<grid_1d(n / (8 * kCastUnroll) + 1, 256), 256, 0, stream()>>>(static_cast<const S*>(src),
                                                                              static_cast<D*>(dst), n);
          return;
        }
      }
      cast_kernel<S, D><<<grid_for(n), 256, 0, stream()>>>(static_cast<const S*>(src), static_cast<D*>(dst), n);
    });
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace ftune::kernels::cuda
