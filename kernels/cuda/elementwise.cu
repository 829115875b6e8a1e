// CUDA twins of kernels/elementwise.h. Math in f32 (values of bf16/f16 widened on load, rounded
// once on store). Contiguous inputs take a 16-byte vector path; broadcast and strided views take
// a general path that walks the coalesced dims. Reductions keep f32 partials, reduced in a fixed
// order (no atomics), so results are deterministic for a given shape and device.
#include <cmath>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/map.cuh"
#include "kernels/elementwise.h"

namespace ftune::kernels::cuda {

namespace {

// ---- op functors (f32) ------------------------------------------------------------------------

__device__ __forceinline__ float apply_binary(BinaryOp op, float x, float y) {
  switch (op) {
    case BinaryOp::add: return x + y;
    case BinaryOp::sub: return x - y;
    case BinaryOp::mul: return x * y;
    case BinaryOp::div: return x / y;
  }
  return 0.f;
}

__device__ __forceinline__ float apply_unary(UnaryOp op, float x, float s) {
  switch (op) {
    case UnaryOp::neg: return -x;
    case UnaryOp::exp: return expf(x);
    case UnaryOp::log: return logf(x);
    case UnaryOp::sqrt: return sqrtf(x);
    case UnaryOp::tanh: return tanhf(x);
    case UnaryOp::sigmoid: return 1.f / (1.f + expf(-x));
    case UnaryOp::relu: return x > 0.f ? x : 0.f;
    case UnaryOp::square: return x * x;
    case UnaryOp::add_scalar: return x + s;
    case UnaryOp::mul_scalar: return x * s;
  }
  return 0.f;
}

// dy * f'(x), with y = f(x) available (the formulas of the CPU kernel).
__device__ __forceinline__ float apply_unary_grad(UnaryOp op, float x, float y, float dy, float s) {
  switch (op) {
    case UnaryOp::neg: return -dy;
    case UnaryOp::exp: return dy * y;
    case UnaryOp::log: return dy / x;
    case UnaryOp::sqrt: return dy / (2.f * y);
    case UnaryOp::tanh: return dy * (1.f - y * y);
    case UnaryOp::sigmoid: return dy * y * (1.f - y);
    case UnaryOp::relu: return x > 0.f ? dy : 0.f;
    case UnaryOp::square: return dy * 2.f * x;
    case UnaryOp::add_scalar: return dy;
    case UnaryOp::mul_scalar: return dy * s;
  }
  return 0.f;
}

struct BinaryF {
  BinaryOp op;
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = apply_binary(op, x[0], x[1]); }
};
struct UnaryF {
  UnaryOp op;
  float s;
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = apply_unary(op, x[0], s); }
};
struct UnaryGradF {  // inputs x, y, dy
  UnaryOp op;
  float s;
  __device__ void operator()(const float (&x)[3], float (&y)[1]) const {
    y[0] = apply_unary_grad(op, x[0], x[1], x[2], s);
  }
};
struct AxpyF {  // inputs a, b
  float alpha;
  __device__ void operator()(const float (&x)[2], float (&y)[1]) const { y[0] = x[0] + alpha * x[1]; }
};
struct ScaleF {
  float s;
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = x[0] * s; }
};

// ---- strided (broadcast) elementwise ------------------------------------------------------------

constexpr int kMaxDims = 8;

// Sizes of the coalesced dims of the (contiguous) output and the element strides of NI inputs.
template <int NI>
struct Strided {
  int nd = 0;
  int64_t size[kMaxDims];
  int64_t stride[NI][kMaxDims];
};

// Drops size-1 dims and merges neighbours that every input walks as one dim, so a broadcast
// [N, D] + [D] becomes 2 dims and a same-shape contiguous pair becomes 1.
template <int NI>
Strided<NI> coalesce(const char* op, const Shape& shape, const Tensor* const (&in)[NI]) {
  Strided<NI> s;
  int64_t sz[64];
  int64_t st[NI][64];
  int nd = 0;
  FTUNE_CHECK(shape.size() <= 64, "[", op, "] too many dims: ", shape.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    sz[nd] = shape[d];
    for (int k = 0; k < NI; ++k) st[k][nd] = in[k]->strides()[d];
    ++nd;
  }
  // Walk outer to inner, appending each dim to the list or folding it into the last entry.
  int m = 0;
  int64_t msz[64];
  int64_t mst[NI][64];
  for (int d = 0; d < nd; ++d) {
    bool merge = m > 0;
    // Entry m-1 is the outer neighbour of dim d: one dim when it steps over all of d.
    for (int k = 0; k < NI && merge; ++k) merge = mst[k][m - 1] == st[k][d] * sz[d];
    if (merge) {
      msz[m - 1] *= sz[d];
      for (int k = 0; k < NI; ++k) mst[k][m - 1] = st[k][d];
    } else {
      msz[m] = sz[d];
      for (int k = 0; k < NI; ++k) mst[k][m] = st[k][d];
      ++m;
    }
  }
  FTUNE_CHECK(m <= kMaxDims, "[", op, "] the CUDA kernel takes at most ", kMaxDims,
              " non-mergeable dims, got ", m, " for shape ", shape_str(shape));
  s.nd = m;
  for (int d = 0; d < m; ++d) {
    s.size[d] = msz[d];
    for (int k = 0; k < NI; ++k) s.stride[k][d] = mst[k][d];
  }
  return s;
}

// The element offsets of flat index i in each of the NI operands. Idx: the type of the index's
// div/mod walk (32-bit when there are < 2^31 elements: several times cheaper than 64-bit
// division); offsets are 64-bit.
template <int NI, class Idx>
__device__ __forceinline__ void strided_offsets(const Strided<NI>& s, int64_t i,
                                                int64_t (&off)[NI]) {
#pragma unroll
  for (int k = 0; k < NI; ++k) off[k] = 0;
  Idx r = Idx(i);
  for (int d = s.nd - 1; d >= 0; --d) {
    const Idx size = Idx(s.size[d]);
    const Idx q = r / size;
    const int64_t c = int64_t(r - q * size);
    r = q;
#pragma unroll
    for (int k = 0; k < NI; ++k) off[k] += c * s.stride[k][d];
  }
}

template <class T, int NI, class Idx, class F>
__global__ void strided_kernel(Strided<NI> s, Ptrs<T, NI> in, T* __restrict__ out, int64_t n, F f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[NI];
    strided_offsets<NI, Idx>(s, i, off);
    float x[NI], y[1];
#pragma unroll
    for (int k = 0; k < NI; ++k) x[k] = to_f(in.p[k][off[k]]);
    f(x, y);
    out[i] = from_f<T>(y[0]);
  }
}

// a += alpha * b through a's strides (a slice of a wider tensor; its elements distinct), b any
// view of a's shape: input 0 of s is a, input 1 is b. The arithmetic of AxpyF on a contiguous a.
template <class T, class Idx>
__global__ void axpy_strided_kernel(Strided<2> s, T* a, const T* __restrict__ b, int64_t n,
                                    float alpha) {
  const AxpyF f{alpha};
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[2];
    strided_offsets<2, Idx>(s, i, off);
    const float x[2] = {to_f(a[off[0]]), to_f(b[off[1]])};
    float y[1];
    f(x, y);
    a[off[0]] = from_f<T>(y[0]);
  }
}

// The row-broadcast fast path: out is [rows, cols] (contiguous) and input k's element (r, c) is at
// p[k] + r * rs[k] + c * cs[k] with cs[k] 0 (one value per row) or 1 (a row of cols elements, e.g.
// a bias with rs = 0). 16-byte vectors along the row: cols % kVec == 0, every row of a cs = 1
// input 16-byte aligned. Idx: the type of the vector index's division by the row length.
template <int NI>
struct RowStrides {
  int64_t rs[NI];
  int cs[NI];
};
template <class T, int NI, class Idx, class F>
__global__ void rowwise_vec_kernel(Ptrs<T, NI> in, RowStrides<NI> st, T* __restrict__ out,
                                   int64_t rows, int64_t cols, F f) {
  constexpr int V = kVec<T>;
  const Idx cv = Idx(cols / V);  // vectors per row
  const int64_t nv = rows * int64_t(cv);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t v = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; v < nv; v += stride) {
    const Idx row = Idx(v) / cv;
    const int64_t col = int64_t(Idx(v) - row * cv) * V;
    float x[NI][V];
#pragma unroll
    for (int k = 0; k < NI; ++k) {
      const T* p = in.p[k] + int64_t(row) * st.rs[k];
      if (st.cs[k]) {
        load_vec(p + col, x[k]);
      } else {
        const float s = to_f(p[0]);
#pragma unroll
        for (int e = 0; e < V; ++e) x[k][e] = s;
      }
    }
    float y[V];
#pragma unroll
    for (int e = 0; e < V; ++e) {
      float xe[NI], ye[1];
#pragma unroll
      for (int k = 0; k < NI; ++k) xe[k] = x[k][e];
      f(xe, ye);
      y[e] = ye[0];
    }
    store_vec(out + v * V, y);
  }
}

// Launches rowwise_vec_kernel when the coalesced layout is a row broadcast it takes; false if not.
template <class T, int NI, class F>
bool try_rowwise(const char* op, const Strided<NI>& s, const Ptrs<T, NI>& p, T* po, int64_t n,
                 F f) {
  constexpr int V = kVec<T>;
  if (s.nd < 1 || s.nd > 2 || !aligned16(po)) return false;
  const int64_t rows = s.nd == 2 ? s.size[0] : 1, cols = s.size[s.nd - 1];
  if (cols % V != 0) return false;
  RowStrides<NI> st;
  for (int k = 0; k < NI; ++k) {
    const int64_t cs = s.stride[k][s.nd - 1];
    st.rs[k] = s.nd == 2 ? s.stride[k][0] : 0;
    if (cs != 0 && cs != 1) return false;
    st.cs[k] = int(cs);
    if (cs == 1 && (st.rs[k] % V != 0 || !aligned16(p.p[k]))) return false;
  }
  const int64_t nv = n / V;
  if (nv < (int64_t(1) << 31))
    rowwise_vec_kernel<T, NI, uint32_t, F><<<grid_1d(nv, 256), 256, 0, stream()>>>(p, st, po, rows,
                                                                                   cols, f);
  else
    rowwise_vec_kernel<T, NI, uint64_t, F><<<grid_1d(nv, 256), 256, 0, stream()>>>(p, st, po, rows,
                                                                                   cols, f);
  FTUNE_LAUNCH_CHECK(op);
  return true;
}

// out = f(in...) for inputs that are views of out's shape; out contiguous.
template <class T, int NI, class F>
void launch_strided_or_map(const char* op, const Tensor* const (&in)[NI], Tensor& out, F f) {
  const int64_t n = out.numel();
  if (n == 0) return;
  Strided<NI> s = coalesce<NI>(op, out.shape(), in);
  bool dense = s.nd <= 1;
  for (int k = 0; k < NI && dense; ++k) dense = s.nd == 0 || s.stride[k][0] == 1;
  Ptrs<T, NI> p;
  for (int k = 0; k < NI; ++k) p.p[k] = static_cast<const T*>(in[k]->raw_data());
  if (dense) {
    OutPtrs<T, 1> o;
    o.p[0] = static_cast<T*>(out.raw_data());
    launch_map<T, NI, 1>(op, p, o, n, f);
    return;
  }
  T* po = static_cast<T*>(out.raw_data());
  if (try_rowwise<T, NI, F>(op, s, p, po, n, f)) return;
  if (n < (int64_t(1) << 31))
    strided_kernel<T, NI, uint32_t, F><<<grid_1d(n, 256), 256, 0, stream()>>>(s, p, po, n, f);
  else
    strided_kernel<T, NI, uint64_t, F><<<grid_1d(n, 256), 256, 0, stream()>>>(s, p, po, n, f);
  FTUNE_LAUNCH_CHECK(op);
}

void check_out(const char* op, const Tensor& out, const Tensor& like) {
  check_cuda(op, out, "out");
  FTUNE_CHECK(out.dtype() == like.dtype(), "[", op, "] out ", out.desc(), " must have the dtype of ", like.desc());
  FTUNE_CHECK(like.device() == out.device(), "[", op, "] ", like.desc(), " is not on ", out.device().str());
  FTUNE_CHECK(like.shape() == out.shape(), "[", op, "] ", like.desc(), " must have out's shape ", out.desc());
}

// ---- reductions -----------------------------------------------------------------------------------

constexpr int kRowThreads = 256;

// Sum of a contiguous [rows, n] over n, each row cut into `splits` chunks of `chunk` elements:
// out[row * splits + c] = sum of chunk c. One block per (row, chunk), grid-stride.
template <class T, class O, bool VEC>
__global__ void row_sum_kernel(const T* __restrict__ a, int64_t rows, int64_t n, int64_t splits,
                               int64_t chunk, O* __restrict__ out) {
  __shared__ float shm[32];
  constexpr int V = kVec<T>;
  for (int64_t b = blockIdx.x; b < rows * splits; b += gridDim.x) {
    const int64_t row = b / splits, c = b - row * splits;
    const int64_t start = c * chunk, end = min(n, start + chunk);
    const T* r = a + row * n;
    float acc = 0.f;
    if (VEC) {
      for (int64_t j = start + int64_t(threadIdx.x) * V; j < end; j += int64_t(blockDim.x) * V) {
        float x[V];
        load_vec(r + j, x);
#pragma unroll
        for (int e = 0; e < V; ++e) acc += x[e];
      }
    } else {
      for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) acc += to_f(r[j]);
    }
    acc = block_sum(acc, shm);
    if (threadIdx.x == 0) out[b] = from_f<O>(acc);
  }
}

// Sum of a contiguous [outer, n, inner] over n, n cut into `splits` chunks: out[o, c, i].
// Block (32, 8): x walks a tile of 32*V columns of inner (V consecutive columns a thread: 16-byte
// loads when VEC, which needs inner % kVec == 0 and an aligned base), y splits the chunk's rows;
// the 8 partials are added in y order.
template <class T, class O, bool VEC>
__global__ void col_sum_kernel(const T* __restrict__ a, int64_t outer, int64_t n, int64_t inner,
                               int64_t tiles, int64_t splits, int64_t chunk, O* __restrict__ out) {
  constexpr int V = VEC ? kVec<T> : 1;
  __shared__ float shm[8][32 * V + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t items = outer * tiles * splits;
  for (int64_t it = blockIdx.x; it < items; it += gridDim.x) {
    const int64_t o = it / (tiles * splits), rem = it - o * tiles * splits;
    const int64_t tile = rem / splits, c = rem - tile * splits;
    const int64_t i0 = (tile * 32 + tx) * V;  // inner % V == 0: i0 < inner covers all V columns
    const int64_t start = c * chunk, end = min(n, start + chunk);
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    if (i0 < inner) {
      for (int64_t j = start + ty; j < end; j += 8) {
        const T* p = a + (o * n + j) * inner + i0;
        if constexpr (VEC) {
          float x[V];
          load_vec(p, x);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += x[e];
        } else {
          acc[0] += to_f(*p);
        }
      }
    }
#pragma unroll
    for (int e = 0; e < V; ++e) shm[ty][tx * V + e] = acc[e];
    __syncthreads();
    if (ty == 0 && i0 < inner) {
#pragma unroll
      for (int e = 0; e < V; ++e) {
        float sum = 0.f;
#pragma unroll
        for (int y = 0; y < 8; ++y) sum += shm[y][tx * V + e];
        out[(o * splits + c) * inner + i0 + e] = from_f<O>(sum);
      }
    }
    __syncthreads();  // shm is rewritten by the next item
  }
}

// (v, i) wins over (v2, i2): NaN first (lowest index among NaNs), else the larger value, ties to
// the lower index. Associative and commutative, so any reduction order gives the CPU's answer
// (the first NaN, else the first maximum).
__device__ __forceinline__ void amax_combine(float& v, int64_t& i, float v2, int64_t i2) {
  const bool n1 = isnan(v), n2 = isnan(v2);
  bool take;
  if (n1 || n2)
    take = n2 && (!n1 || i2 < i);
  else
    take = v2 > v || (v2 == v && i2 < i);
  if (take) {
    v = v2;
    i = i2;
  }
}

__device__ __forceinline__ void warp_amax(float& v, int64_t& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float v2 = __shfl_xor_sync(0xffffffffu, v, o);
    const long long i2 = __shfl_xor_sync(0xffffffffu, (long long)i, o);
    amax_combine(v, i, v2, int64_t(i2));
  }
}

constexpr int64_t kNoIndex = INT64_MAX;

// (A 4-loads-in-flight version measured slower on an H200: 27% vs 42% of copy bandwidth.)
// Max (and its index) over n of a contiguous [rows, n]: one block per row. VEC: 16-byte loads
// (rows 16-byte aligned, n a multiple of kVec); the combine is order-free, so any split works.
template <class T, bool VEC>
__global__ void row_amax_kernel(const T* __restrict__ a, int64_t rows, int64_t n, T* __restrict__ out,
                                int64_t* __restrict__ idx) {
  __shared__ float sv[32];
  __shared__ int64_t si[32];
  constexpr int V = VEC ? kVec<T> : 1;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* r = a + row * n;
    float v = -INFINITY;
    int64_t i = kNoIndex;
    for (int64_t j = int64_t(threadIdx.x) * V; j < n; j += int64_t(blockDim.x) * V) {
      if constexpr (VEC) {
        float x[V];
        load_vec(r + j, x);
#pragma unroll
        for (int e = 0; e < V; ++e) amax_combine(v, i, x[e], j + e);
      } else {
        amax_combine(v, i, to_f(r[j]), j);
      }
    }
    warp_amax(v, i);
    __syncthreads();  // sv/si of the previous row were read
    if (lane == 0) {
      sv[warp] = v;
      si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
      v = lane < nw ? sv[lane] : -INFINITY;
      i = lane < nw ? si[lane] : kNoIndex;
      warp_amax(v, i);
      if (lane == 0) {
        out[row] = from_f<T>(v);
        if (idx) idx[row] = i;
      }
    }
  }
}

// Max over n of a contiguous [outer, n, inner]: block (32, 8) per (o, 32-column tile).
template <class T>
__global__ void col_amax_kernel(const T* __restrict__ a, int64_t outer, int64_t n, int64_t inner,
                                int64_t tiles, T* __restrict__ out, int64_t* __restrict__ idx) {
  __shared__ float sv[8][33];
  __shared__ int64_t si[8][33];
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int64_t it = blockIdx.x; it < outer * tiles; it += gridDim.x) {
    const int64_t o = it / tiles, i = (it - o * tiles) * 32 + tx;
    float v = -INFINITY;
    int64_t k = kNoIndex;
    if (i < inner)
      for (int64_t j = ty; j < n; j += 8) amax_combine(v, k, to_f(a[(o * n + j) * inner + i]), j);
    sv[ty][tx] = v;
    si[ty][tx] = k;
    __syncthreads();
    if (ty == 0 && i < inner) {
      for (int y = 1; y < 8; ++y) amax_combine(v, k, sv[y][tx], si[y][tx]);
      out[o * inner + i] = from_f<T>(v);
      if (idx) idx[o * inner + i] = k;
    }
    __syncthreads();
  }
}

unsigned cap_grid(int64_t items) {
  const int64_t cap = int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device())) * 32;
  return unsigned(std::max<int64_t>(1, std::min(items, cap)));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

void binary(BinaryOp op, const Tensor& a, const Tensor& b, Tensor& out) {
  const char* name = "binary";
  check_cuda(name, out, "out");
  for (const Tensor* t : {&a, &b}) {
    FTUNE_CHECK(t->device() == out.device() && t->dtype() == out.dtype() && t->shape() == out.shape(),
                "[", name, "] input ", t->desc(), " must be a view of out's shape, dtype and device ", out.desc());
  }
  kernels::cuda::dispatch_float(out.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Tensor* in[2] = {&a, &b};
    launch_strided_or_map<T, 2>(name, in, out, BinaryF{op});
  });
}

void unary(UnaryOp op, const Tensor& a, Tensor& out, double scalar) {
  const char* name = "unary";
  check_cuda(name, out, "out");
  FTUNE_CHECK(a.device() == out.device() && a.dtype() == out.dtype() && a.shape() == out.shape(), "[",
              name, "] input ", a.desc(), " must match out ", out.desc());
  kernels::cuda::dispatch_float(out.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const Tensor* in[1] = {&a};
    launch_strided_or_map<T, 1>(name, in, out, UnaryF{op, float(scalar)});
  });
}

void unary_backward(UnaryOp op, const Tensor& x, const Tensor& y, const Tensor& dy, Tensor& dx,
                    double scalar) {
  const char* name = "unary_backward";
  check_cuda(name, dx, "dx");
  for (const Tensor* t : {&x, &y, &dy}) {
    check_cuda(name, *t, "input");
    check_out(name, dx, *t);
  }
  kernels::cuda::dispatch_float(dx.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    Ptrs<T, 3> in{{static_cast<const T*>(x.raw_data()), static_cast<const T*>(y.raw_data()),
                   static_cast<const T*>(dy.raw_data())}};
    OutPtrs<T, 1> o{{static_cast<T*>(dx.raw_data())}};
    launch_map<T, 3, 1>(name, in, o, dx.numel(), UnaryGradF{op, float(scalar)});
  });
}

void axpy(Tensor& a, const Tensor& b, double alpha) {
  const char* name = "add_";
  check_cuda(name, a, "a");
  check_cuda(name, b, "b");
  check_out(name, a, b);
  kernels::cuda::dispatch_float(a.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (!a.is_contiguous()) {  // a strided destination (add_ into a slice)
      const int64_t n = a.numel();
      if (n == 0) return;
      const Tensor* ab[2] = {&a, &b};
      const Strided<2> s = coalesce<2>(name, a.shape(), ab);
      auto* pa = static_cast<T*>(a.raw_data());
      auto* pb = static_cast<const T*>(b.raw_data());
      if (n < (int64_t(1) << 31))
        axpy_strided_kernel<T, uint32_t><<<grid_1d(n, 256), 256, 0, stream()>>>(s, pa, pb, n,
                                                                                 float(alpha));
      else
        axpy_strided_kernel<T, uint64_t><<<grid_1d(n, 256), 256, 0, stream()>>>(s, pa, pb, n,
                                                                                 float(alpha));
      FTUNE_LAUNCH_CHECK(name);
      return;
    }
    Ptrs<T, 2> in{{static_cast<const T*>(a.raw_data()), static_cast<const T*>(b.raw_data())}};
    OutPtrs<T, 1> o{{static_cast<T*>(a.raw_data())}};
    launch_map<T, 2, 1>(name, in, o, a.numel(), AxpyF{float(alpha)});
  });
}

void scale_(Tensor& a, double s) {
  const char* name = "mul_";
  check_cuda(name, a, "a");
  kernels::cuda::dispatch_float(a.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    Ptrs<T, 1> in{{static_cast<const T*>(a.raw_data())}};
    OutPtrs<T, 1> o{{static_cast<T*>(a.raw_data())}};
    launch_map<T, 1, 1>(name, in, o, a.numel(), ScaleF{float(s)});
  });
}

void sum_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out) {
  const char* name = "sum";
  // An empty input has nothing to read, whatever its strides (a [4, 0, 3] view need not say
  // contiguous): only its device matters.
  if (a.numel() == 0) FTUNE_CHECK(a.device().is_cuda(), "[sum] a must be on the GPU, got ", a.desc());
  else check_cuda(name, a, "a");
  check_cuda(name, out, "out");
  FTUNE_CHECK(a.dtype() == out.dtype() && a.device() == out.device(), "[sum] out ", out.desc(),
              " does not match input ", a.desc());
  FTUNE_CHECK(outer >= 0 && n >= 0 && inner >= 0 && a.numel() == outer * n * inner &&
                  out.numel() == outer * inner,
              "[sum] [", outer, ", ", n, ", ", inner, "] does not fit input ", a.desc(), " and out ",
              out.desc());
  if (out.numel() == 0) return;
  if (n == 0) {  // the empty sum
    CUDA_CHECK(cudaMemsetAsync(out.raw_data(), 0, size_t(out.numel()) * dtype_size(out.dtype()), stream()));
    return;
  }
  const int64_t target = int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device())) * 4;
  kernels::cuda::dispatch_float(a.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int V = kVec<T>;
    const T* pa = static_cast<const T*>(a.raw_data());
    T* po = static_cast<T*>(out.raw_data());
    if (inner == 1) {
      // Few long rows: cut each into chunks (blocks in parallel), then sum the chunk partials.
      int64_t splits = 1;
      if (outer < target && n > 8192) splits = std::min(ceil_div(target, outer), ceil_div(n, 4096));
      int64_t chunk = ceil_div(ceil_div(n, splits), V) * V;
      splits = ceil_div(n, chunk);
      const bool vec = aligned16(pa) && n % V == 0;
      if (splits == 1) {
        if (vec)
          row_sum_kernel<T, T, true><<<cap_grid(outer), kRowThreads, 0, stream()>>>(pa, outer, n, 1, chunk, po);
        else
          row_sum_kernel<T, T, false><<<cap_grid(outer), kRowThreads, 0, stream()>>>(pa, outer, n, 1, chunk, po);
        FTUNE_LAUNCH_CHECK(name);
        return;
      }
      Tensor part = Tensor::empty({outer, splits}, DType::f32, a.device());
      float* pp = part.data<float>();
      if (vec)
        row_sum_kernel<T, float, true><<<cap_grid(outer * splits), kRowThreads, 0, stream()>>>(pa, outer, n, splits, chunk, pp);
      else
        row_sum_kernel<T, float, false><<<cap_grid(outer * splits), kRowThreads, 0, stream()>>>(pa, outer, n, splits, chunk, pp);
      FTUNE_LAUNCH_CHECK(name);
      row_sum_kernel<float, T, false><<<cap_grid(outer), kRowThreads, 0, stream()>>>(pp, outer, splits, 1, splits, po);
      FTUNE_LAUNCH_CHECK(name);
      return;
    }
    // Columns: enough (o, tile, chunk) blocks to fill the GPU, each thread with 16-byte loads.
    auto columns = [&](auto in_tag, auto out_tag, const auto* src, int64_t outer_, int64_t n_, int64_t splits_,
                       int64_t chunk_, auto* dst) {
      using In = typename decltype(in_tag)::type;
      using Out = typename decltype(out_tag)::type;
      const bool vec = aligned16(src) && inner % kVec<In> == 0;
      const int64_t tiles = ceil_div(inner, 32 * (vec ? kVec<In> : 1));
      const unsigned grid = cap_grid(outer_ * tiles * splits_);
      if (vec)
        col_sum_kernel<In, Out, true><<<grid, dim3(32, 8), 0, stream()>>>(src, outer_, n_, inner, tiles, splits_, chunk_, dst);
      else
        col_sum_kernel<In, Out, false><<<grid, dim3(32, 8), 0, stream()>>>(src, outer_, n_, inner, tiles, splits_, chunk_, dst);
      FTUNE_LAUNCH_CHECK(name);
    };
    const bool vec = aligned16(pa) && inner % V == 0;
    const int64_t tiles = ceil_div(inner, 32 * (vec ? V : 1));
    const int64_t col_target = 2 * target;  // 8 blocks an SM: bytes in flight for a few wide tiles
    int64_t splits = 1;
    if (outer * tiles < col_target && n > 256) splits = std::min(ceil_div(col_target, outer * tiles), ceil_div(n, 128));
    const int64_t chunk = ceil_div(n, splits);
    splits = ceil_div(n, chunk);
    if (splits == 1) {
      columns(Tag<T>{}, Tag<T>{}, pa, outer, n, 1, chunk, po);
      return;
    }
    Tensor part = Tensor::empty({outer, splits, inner}, DType::f32, a.device());
    float* pp = part.data<float>();
    columns(Tag<T>{}, Tag<float>{}, pa, outer, n, splits, chunk, pp);
    columns(Tag<float>{}, Tag<T>{}, static_cast<const float*>(pp), outer, splits, 1, splits, po);
  });
}

void amax_dim(const Tensor& a, int64_t outer, int64_t n, int64_t inner, Tensor& out, Tensor* argmax) {
  const char* name = "amax";
  check_cuda(name, a, "a");
  check_cuda(name, out, "out");
  FTUNE_CHECK(a.dtype() == out.dtype() && a.device() == out.device(), "[amax] out ", out.desc(),
              " does not match input ", a.desc());
  FTUNE_CHECK(outer >= 0 && n > 0 && inner >= 0 && a.numel() == outer * n * inner &&
                  out.numel() == outer * inner,
              "[amax] [", outer, ", ", n, ", ", inner, "] does not fit input ", a.desc(), " and out ",
              out.desc());
  int64_t* pi = nullptr;
  if (argmax) {
    check_cuda(name, *argmax, "argmax");
    FTUNE_CHECK(argmax->dtype() == DType::i64 && argmax->numel() == outer * inner, "[amax] argmax must be i64 with ",
                outer * inner, " elements, got ", argmax->desc());
    pi = argmax->data<int64_t>();
  }
  if (out.numel() == 0) return;
  kernels::cuda::dispatch_float(a.dtype(), name, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pa = static_cast<const T*>(a.raw_data());
    T* po = static_cast<T*>(out.raw_data());
    if (inner == 1) {
      if (aligned16(pa) && n % kVec<T> == 0)
        row_amax_kernel<T, true><<<cap_grid(outer), kRowThreads, 0, stream()>>>(pa, outer, n, po, pi);
      else
        row_amax_kernel<T, false><<<cap_grid(outer), kRowThreads, 0, stream()>>>(pa, outer, n, po, pi);
    } else {
      const int64_t tiles = ceil_div(inner, 32);
      col_amax_kernel<T><<<cap_grid(outer * tiles), dim3(32, 8), 0, stream()>>>(pa, outer, n, inner, tiles, po, pi);
    }
    FTUNE_LAUNCH_CHECK(name);
  });
}

}  // namespace ftune::kernels::cuda
