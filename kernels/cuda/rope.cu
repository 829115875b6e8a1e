// CUDA twin of kernels/rope.h. One block per token (grid-stride): the block computes the token's
// cos/sin row once in shared memory (angles in f64, as on the CPU, rounded to f32), then rotates
// all H heads with 16-byte vectors over each half of the head.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/rope.h"

namespace ftune::kernels::cuda {

namespace {

template <class T, class I, bool VEC>
__global__ void rope_kernel(const T* __restrict__ x, const I* __restrict__ pos, int64_t rows, int64_t npos,
                            int H, int D, double theta, float sign, T* __restrict__ out) {
  extern __shared__ double smem[];
  const int half = D / 2;
  double* inv_freq = smem;                           // [half]
  float* cs = reinterpret_cast<float*>(smem + half);  // [half]
  float* sn = cs + half;                             // [half]
  for (int i = threadIdx.x; i < half; i += blockDim.x) inv_freq[i] = pow(theta, -2.0 * double(i) / double(D));
  constexpr int V = VEC ? kVec<T> : 1;
  const int per_head = half / V;
  const int items = H * per_head;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    __syncthreads();  // inv_freq written; the previous token's cs/sn read
    const double p = double(pos[r % npos]);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
      double s, c;
      sincos(p * inv_freq[i], &s, &c);
      cs[i] = float(c);
      sn[i] = sign * float(s);
    }
    __syncthreads();
    const T* xr = x + r * int64_t(H) * D;
    T* o = out + r * int64_t(H) * D;
    for (int it = threadIdx.x; it < items; it += blockDim.x) {
      const int h = it / per_head, i0 = (it - h * per_head) * V;
      const int64_t b = int64_t(h) * D + i0;
      float x1[V], x2[V], y1[V], y2[V];
      if constexpr (VEC) {
        load_vec(xr + b, x1);
        load_vec(xr + b + half, x2);
      } else {
        x1[0] = to_f(xr[b]);
        x2[0] = to_f(xr[b + half]);
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const float c = cs[i0 + e], s = sn[i0 + e];
        y1[e] = x1[e] * c - x2[e] * s;
        y2[e] = x2[e] * c + x1[e] * s;
      }
      if constexpr (VEC) {
        store_vec(o + b, y1);
        store_vec(o + b + half, y2);
      } else {
        o[b] = from_f<T>(y1[0]);
        o[b + half] = from_f<T>(y2[0]);
      }
    }
  }
}

}  // namespace

void rope(const Tensor& x, const Tensor& positions, double theta, bool inverse, Tensor& out) {
  const char* op = "rope";
  check_cuda(op, x, "x");
  check_cuda(op, positions, "positions");
  check_cuda(op, out, "out");
  FTUNE_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "[rope] x must be [B, T, H, D] with D even, got ", x.desc());
  FTUNE_CHECK(out.shape() == x.shape() && out.dtype() == x.dtype() && out.device() == x.device(), "[rope] out ",
              out.desc(), " must match x ", x.desc());
  FTUNE_CHECK(positions.dtype() == DType::i32 || positions.dtype() == DType::i64, "[rope] positions must be i32 or i64, got ",
              positions.desc());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3), rows = B * T;
  const int64_t npos = positions.numel();
  FTUNE_CHECK(npos == T || npos == B * T, "[rope] positions ", positions.desc(), " must be [T] or [B, T] for x ",
              x.desc());
  FTUNE_CHECK(D <= 8192 && H * D < (int64_t(1) << 30), "[rope] head too large: ", x.desc());
  if (x.numel() == 0) return;
  const int half = int(D / 2);
  const size_t smem = size_t(half) * (sizeof(double) + 2 * sizeof(float));
  const float sign = inverse ? -1.f : 1.f;
  kernels::cuda::dispatch_float(x.dtype(), op, [&](auto tag) {
    using Tv = typename decltype(tag)::type;
    constexpr int V = kVec<Tv>;
    const bool vec = half % V == 0 && aligned16(x.raw_data()) && aligned16(out.raw_data());
    const int64_t items = H * (vec ? half / V : half);
    const int threads = int(std::min<int64_t>(256, std::max<int64_t>(32, (items + 31) / 32 * 32)));
    const int64_t cap = int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device())) * 32;
    const unsigned grid = unsigned(std::min(rows, cap));
    const Tv* px = static_cast<const Tv*>(x.raw_data());
    Tv* po = static_cast<Tv*>(out.raw_data());
    auto go = [&](auto itag) {
      using I = typename decltype(itag)::type;
      const I* pp = static_cast<const I*>(positions.raw_data());
      if (vec)
        rope_kernel<Tv, I, true><<<grid, threads, smem, stream()>>>(px, pp, rows, npos, int(H), int(D), theta, sign, po);
      else
        rope_kernel<Tv, I, false><<<grid, threads, smem, stream()>>>(px, pp, rows, npos, int(H), int(D), theta, sign, po);
    };
    if (positions.dtype() == DType::i32)
      go(Tag<int32_t>{});
    else
      go(Tag<int64_t>{});
    FTUNE_LAUNCH_CHECK(op);
  });
}

}  // namespace ftune::kernels::cuda
