// CUDA twins of kernels/embedding.h.
// forward: a row gather, each row copied in the widest unit (16 bytes when aligned).
// backward (deterministic): the positions are sorted by id (CUB radix sort, stable, so equal ids
// keep increasing n) and summed per run of one id in f32 by fixed tiles of the sorted order (see
// tile_sum_kernel): every dweight element has one writer and one summation order, no atomics.
// Rows no id touches are zeroed by their own kernel (touched rows are written once, by the sums);
// accumulating (a tied embedding's rows into the LM head's gradient), they are left as they are
// and each touched row's sum is added once. With ftune::cuda::deterministic() off, f32 takes a
// float-atomic scatter instead (onto the values, accumulating).
#include <cub/device/device_radix_sort.cuh>
#include <cstdlib>

#include "kernels/cuda/common.cuh"
#include "kernels/embedding.h"

namespace ftune::kernels::cuda {

namespace {

template <class F>
void dispatch_index(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::i32: f(Tag<int32_t>{}); return;
    case DType::i64: f(Tag<int64_t>{}); return;
    default: FTUNE_THROW("[", op, "] ids must be i32 or i64, got ", dtype_name(t));
  }
}

template <class I>
__global__ void first_bad_kernel(const I* __restrict__ ids, int64_t n, int64_t V, unsigned long long* first) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t v = int64_t(ids[i]);
    if (v < 0 || v >= V) atomicMin(first, (unsigned long long)i);  // integer min: order-free
  }
}

// out[row] = w[ids[row]], rows of `units` elements of U; tpr threads per row (a power of two).
template <class U, class I>
__global__ void gather_rows_kernel(const U* __restrict__ w, const I* __restrict__ ids, int64_t rows, int64_t units,
                                   int tpr, U* __restrict__ out) {
  const int sub = threadIdx.x / tpr, lane = threadIdx.x % tpr, rpb = blockDim.x / tpr;
  for (int64_t r = int64_t(blockIdx.x) * rpb + sub; r < rows; r += int64_t(gridDim.x) * rpb) {
    const U* src = w + int64_t(ids[r]) * units;
    U* dst = out + r * units;
    for (int64_t c = lane; c < units; c += tpr) dst[c] = src[c];
  }
}

// Also marks the rows some id touches (every writer stores the same 1: the race is benign).
template <class I>
__global__ void sort_prep_kernel(const I* __restrict__ ids, int64_t n, uint32_t* __restrict__ keys,
                                 int32_t* __restrict__ pos, uint8_t* __restrict__ touched) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = uint32_t(ids[i]);
    pos[i] = int32_t(i);
    if (touched) touched[ids[i]] = 1;  // null when accumulating: no zero fill follows
  }
}

// Zeroes the rows of dweight [V, D] no id touches (the tile kernels write every touched row in
// full), so those rows are written once instead of twice. One block per row, 16-byte stores when
// VEC (D % kVec == 0 and dweight aligned).
template <class T, bool VEC>
__global__ void zero_untouched_kernel(T* __restrict__ dw, const uint8_t* __restrict__ touched, int64_t V,
                                      int64_t D) {
  constexpr int W = VEC ? kVec<T> : 1;
  const int64_t units = D / W;
  for (int64_t r = blockIdx.x; r < V; r += gridDim.x) {
    if (touched[r]) continue;  // uniform over the block
    T* row = dw + r * D;
    for (int64_t c = threadIdx.x; c < units; c += blockDim.x) {
      if constexpr (VEC)
        *reinterpret_cast<uint4*>(row + c * W) = make_uint4(0u, 0u, 0u, 0u);
      else
        row[c] = from_f<T>(0.f);
    }
  }
}

// The sorted positions are cut into fixed tiles of kTile. One warp per (tile, slice of 32*V
// columns) walks its tile in order, summing each run of one id in f32:
//   - a run that begins and ends in the tile is written to dweight directly;
//   - the tile's first run, when it began in an earlier tile, goes to part[tile][0] (head);
//   - the tile's last run, when it continues into the next tile (and began in this one), goes to
//     part[tile][1] (tail).
// tile_carry_kernel then adds, for each run that crosses tiles, its tail and the following tiles'
// heads in tile order. Every element has one writer and a fixed order of summation (within a
// tile, increasing n, which is the CPU's order); long runs are summed by many warps at once.
constexpr int kTile = 64;

template <int V>
__device__ __forceinline__ void store_f32(float* p, const float (&a)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) *reinterpret_cast<float4*>(p + e) = make_float4(a[e], a[e + 1], a[e + 2], a[e + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) p[e] = a[e];
  }
}
template <int V>
__device__ __forceinline__ void add_f32(const float* p, float (&a)[V]) {
  if constexpr (V % 4 == 0) {
#pragma unroll
    for (int e = 0; e < V; e += 4) {
      const float4 q = *reinterpret_cast<const float4*>(p + e);
      a[e] += q.x;
      a[e + 1] += q.y;
      a[e + 2] += q.z;
      a[e + 3] += q.w;
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) a[e] += p[e];
  }
}

// A finished run's sum into its dweight row: overwritten, or with add (a tied embedding's
// gradient added into the LM head's) dst = round(dst + round_T(acc)): the overwrite, then the
// engine's add of two T values in f32, bit for bit.
template <class T, bool VEC, int V>
__device__ __forceinline__ void store_row(T* dst, const float (&acc)[V], bool add) {
  if constexpr (VEC) {
    if (add) {
      float o[V];
      load_vec(dst, o);
#pragma unroll
      for (int e = 0; e < V; ++e) o[e] = __fadd_rn(o[e], to_f(from_f<T>(acc[e])));
      store_vec(dst, o);
    } else {
      store_vec(dst, acc);
    }
  } else {
    *dst = add ? from_f<T>(__fadd_rn(to_f(*dst), to_f(from_f<T>(acc[0])))) : from_f<T>(acc[0]);
  }
}

template <class T, bool VEC>
__global__ void tile_sum_kernel(const T* __restrict__ dy, const uint32_t* __restrict__ keys,
                                const int32_t* __restrict__ order, int64_t n, int64_t D, int64_t slices,
                                int64_t tiles, float* __restrict__ part, T* __restrict__ dw, bool add) {
  constexpr int V = VEC ? kVec<T> : 1;
  constexpr int U = 4;  // rows loaded ahead of their (in-order) accumulation
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; item < tiles * slices; item += warps) {
    const int64_t t = item / slices, s = item - t * slices;
    const int64_t c0 = (s * 32 + lane) * V;
    if (c0 >= D) continue;  // no shuffles below: a lane may leave alone
    const int64_t ts = t * kTile, te = min(n, ts + kTile);
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    uint32_t id = keys[ts];
    int64_t rs = ts;  // first position of the current run in this tile
    // Writes the run [rs, k) of id: dweight, or a head/tail partial when it crosses the tile.
    auto flush = [&](int64_t k) {
      const bool began_before = rs == ts && ts > 0 && keys[ts - 1] == id;
      const bool continues = k == te && te < n && keys[te] == id;
      if (began_before || continues) {
        store_f32<V>(part + (t * 2 + (began_before ? 0 : 1)) * D + c0, acc);
      } else {
        store_row<T, VEC>(dw + int64_t(id) * D + c0, acc, add);
      }
    };
    for (int64_t k = ts; k < te; k += U) {
      uint32_t kid[U];
      float x[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k + u < te) {
          kid[u] = keys[k + u];
          const T* src = dy + int64_t(order[k + u]) * D + c0;
          if constexpr (VEC)
            load_vec(src, x[u]);
          else
            x[u][0] = to_f(*src);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k + u < te) {
          if (kid[u] != id) {
            flush(k + u);
            id = kid[u];
            rs = k + u;
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = 0.f;
          }
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += x[u][e];
        }
      }
    }
    flush(te);
  }
}

// tile_sum_shfl_kernel (the default; FTUNE_EMB_SHFL=0 selects tile_sum_kernel): the same sums in
// the same order; the tile's ids and positions are loaded once per warp (two per lane, kTile = 64)
// and handed out with shuffles, so the dy loads of a group of U rows wait for no index load. Every
// lane runs the whole loop (the run boundaries depend only on the ids: uniform over the warp);
// lanes past D load and store nothing. 3 blocks of 256 per SM (bf16: 80 registers, a few bytes
// of spill).
template <class T, bool VEC>
__global__ void __launch_bounds__(256, 3)
tile_sum_shfl_kernel(const T* __restrict__ dy, const uint32_t* __restrict__ keys,
                     const int32_t* __restrict__ order, int64_t n, int64_t D, int64_t slices,
                     int64_t tiles, float* __restrict__ part, T* __restrict__ dw, bool add) {
  static_assert(kTile == 64, "two ids per lane");
  constexpr int V = VEC ? kVec<T> : 1;
  constexpr int U = 4;  // rows loaded ahead of their (in-order) accumulation
  constexpr unsigned kAll = 0xffffffffu;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; item < tiles * slices; item += warps) {
    const int64_t t = item / slices, s = item - t * slices;
    const int64_t c0 = (s * 32 + lane) * V;
    const bool active = c0 < D;
    const int64_t ts = t * kTile, te = min(n, ts + kTile);
    uint32_t kq[2];
    int32_t oq[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t k = ts + q * 32 + lane;
      kq[q] = k < te ? keys[k] : 0u;
      oq[q] = k < te ? order[k] : 0;
    }
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    uint32_t id = __shfl_sync(kAll, kq[0], 0);
    int64_t rs = ts;  // first position of the current run in this tile
    // Writes the run [rs, k) of id: dweight, or a head/tail partial when it crosses the tile.
    auto flush = [&](int64_t k) {
      const bool began_before = rs == ts && ts > 0 && keys[ts - 1] == id;
      const bool continues = k == te && te < n && keys[te] == id;
      if (!active) return;
      if (began_before || continues) {
        store_f32<V>(part + (t * 2 + (began_before ? 0 : 1)) * D + c0, acc);
      } else {
        store_row<T, VEC>(dw + int64_t(id) * D + c0, acc, add);
      }
    };
#pragma unroll 1
    for (int j = 0; j < kTile; j += U) {
      const int64_t k = ts + j;
      uint32_t kid[U];
      Vec<T> x[U];  // raw: half the registers of f32 copies for 16-bit T
#pragma unroll
      for (int u = 0; u < U; ++u) {
        // Shuffles by every lane (uniform), before the bound: positions past te are never used.
        const bool hi = j + u >= 32;  // a select, not an indexed (local-memory) array
        kid[u] = __shfl_sync(kAll, hi ? kq[1] : kq[0], (j + u) & 31);
        const int32_t pos = __shfl_sync(kAll, hi ? oq[1] : oq[0], (j + u) & 31);
        if (k + u < te && active) {
          const T* src = dy + int64_t(pos) * D + c0;
          if constexpr (VEC)
            x[u] = *reinterpret_cast<const Vec<T>*>(src);
          else
            x[u].v[0] = *src;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (k + u < te) {
          if (kid[u] != id) {
            flush(k + u);
            id = kid[u];
            rs = k + u;
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = 0.f;
          }
          if (active) {
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] += to_f(x[u].v[e]);
          }
        }
      }
    }
    flush(te);
  }
}

// For each run that begins in tile t and continues past it: tail(t) + head(t+1) + ... in order.
template <class T, bool VEC>
__global__ void tile_carry_kernel(const uint32_t* __restrict__ keys, int64_t n, int64_t D, int64_t slices,
                                  int64_t tiles, const float* __restrict__ part, T* __restrict__ dw,
                                  bool add) {
  constexpr int V = VEC ? kVec<T> : 1;
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x >> 5);
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; item < tiles * slices; item += warps) {
    const int64_t t = item / slices, s = item - t * slices;
    const int64_t c0 = (s * 32 + lane) * V;
    if (c0 >= D) continue;
    const int64_t ts = t * kTile, te = min(n, ts + kTile);
    if (te >= n) continue;
    const uint32_t id = keys[te - 1];
    if (keys[te] != id) continue;                      // the last run ends in this tile
    if (ts > 0 && keys[ts - 1] == id) continue;        // the whole tile is a run from before
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] = 0.f;
    add_f32<V>(part + (t * 2 + 1) * D + c0, acc);
    for (int64_t t2 = t + 1; t2 < tiles; ++t2) {
      add_f32<V>(part + t2 * 2 * D + c0, acc);
      const int64_t e2 = min(n, (t2 + 1) * kTile);
      if (e2 >= n || keys[e2] != id) break;
    }
    store_row<T, VEC>(dw + int64_t(id) * D + c0, acc, add);
  }
}

template <class I>
__global__ void scatter_add_kernel(const float* __restrict__ dy, const I* __restrict__ ids, int64_t n, int64_t D,
                                   float* __restrict__ dw) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n * D; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / D, c = i - row * D;
    atomicAdd(dw + int64_t(ids[row]) * D + c, dy[i]);
  }
}

unsigned cap_grid(int64_t blocks) {
  const int64_t cap = int64_t(ftune::cuda::device_sm_count(ftune::cuda::current_device())) * 32;
  return unsigned(std::max<int64_t>(1, std::min(blocks, cap)));
}

}  // namespace

int64_t first_bad_id(const Tensor& ids, int64_t V) {
  check_cuda("embedding", ids, "ids");
  const int64_t n = ids.numel();
  if (n == 0) return -1;
  Tensor first = Tensor::empty({1}, DType::i64, ids.device());
  // All ones: ULLONG_MAX for the atomic min, which reads back as -1 ("none") in i64.
  CUDA_CHECK(cudaMemsetAsync(first.raw_data(), 0xFF, sizeof(int64_t), stream()));
  dispatch_index(ids.dtype(), "embedding", [&](auto tag) {
    using I = typename decltype(tag)::type;
    first_bad_kernel<I><<<grid_1d(n, 256), 256, 0, stream()>>>(
        static_cast<const I*>(ids.raw_data()), n, V, static_cast<unsigned long long*>(first.raw_data()));
  });
  FTUNE_LAUNCH_CHECK("embedding");
  return first.to(Device::cpu()).data<int64_t>()[0];
}

void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out) {
  const char* op = "embedding";
  check_cuda(op, weight, "weight");
  check_cuda(op, ids, "ids");
  check_cuda(op, out, "out");
  FTUNE_CHECK(weight.dim() == 2, "[embedding] weight must be [V, D], got ", weight.desc());
  const int64_t D = weight.size(1), n = ids.numel();
  FTUNE_CHECK(out.dtype() == weight.dtype() && out.numel() == n * D && out.device() == weight.device(),
              "[embedding] out ", out.desc(), " must hold ", n, " rows of ", D, " of ", weight.desc());
  if (n == 0 || D == 0) return;
  const int64_t row_bytes = D * int64_t(dtype_size(weight.dtype()));
  auto aligned = [&](int64_t a) {
    return row_bytes % a == 0 && reinterpret_cast<uintptr_t>(weight.raw_data()) % a == 0 &&
           reinterpret_cast<uintptr_t>(out.raw_data()) % a == 0;
  };
  dispatch_index(ids.dtype(), op, [&](auto itag) {
    using I = typename decltype(itag)::type;
    const I* pid = static_cast<const I*>(ids.raw_data());
    auto go = [&](auto utag) {
      using U = typename decltype(utag)::type;
      const int64_t units = row_bytes / int64_t(sizeof(U));
      int tpr = 1;
      while (tpr < units && tpr < 256) tpr *= 2;
      const int rpb = 256 / tpr;
      gather_rows_kernel<U, I><<<cap_grid((n + rpb - 1) / rpb), 256, 0, stream()>>>(
          static_cast<const U*>(weight.raw_data()), pid, n, units, tpr, static_cast<U*>(out.raw_data()));
    };
    if (aligned(16)) go(Tag<uint4>{});
    else if (aligned(8)) go(Tag<uint2>{});
    else if (aligned(4)) go(Tag<uint32_t>{});
    else go(Tag<uint16_t>{});  // every float dtype here is at least 2 bytes
  });
  FTUNE_LAUNCH_CHECK(op);
}

void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor& dweight, bool accumulate) {
  const char* op = "embedding_backward";
  check_cuda(op, dy, "dy");
  check_cuda(op, ids, "ids");
  check_cuda(op, dweight, "dweight");
  FTUNE_CHECK(dweight.dim() == 2, "[", op, "] dweight must be [V, D], got ", dweight.desc());
  const int64_t V = dweight.size(0), D = dweight.size(1), n = ids.numel();
  FTUNE_CHECK(dy.dtype() == dweight.dtype() && dy.numel() == n * D && dy.device() == dweight.device(), "[", op,
              "] dy ", dy.desc(), " must hold ", n, " rows of ", D, " of ", dweight.desc());
  FTUNE_CHECK(n < (int64_t(1) << 31) && V < (int64_t(1) << 31), "[", op, "] too many ids (", n, ") or rows (", V,
              ")");
  const bool atomic = !ftune::cuda::deterministic() && dweight.dtype() == DType::f32;
  // The sorted path zeroes only the rows no id touches (below); the others start from zeros.
  // Accumulating, untouched rows keep their values and the atomics add onto them.
  if (accumulate && (n == 0 || D == 0)) return;
  if (n == 0 || D == 0 || (atomic && !accumulate))
    CUDA_CHECK(cudaMemsetAsync(dweight.raw_data(), 0, size_t(V * D) * dtype_size(dweight.dtype()), stream()));
  if (n == 0 || D == 0) return;
  const Device dev = dweight.device();

  if (atomic) {
    dispatch_index(ids.dtype(), op, [&](auto itag) {
      using I = typename decltype(itag)::type;
      scatter_add_kernel<I><<<grid_1d(n * D, 256), 256, 0, stream()>>>(
          dy.data<float>(), static_cast<const I*>(ids.raw_data()), n, D, dweight.data<float>());
    });
    FTUNE_LAUNCH_CHECK(op);
    return;
  }

  Tensor keys = Tensor::empty({n}, DType::i32, dev), keys_sorted = Tensor::empty({n}, DType::i32, dev);
  Tensor pos = Tensor::empty({n}, DType::i32, dev), order = Tensor::empty({n}, DType::i32, dev);
  auto* k_in = static_cast<uint32_t*>(keys.raw_data());
  auto* k_out = static_cast<uint32_t*>(keys_sorted.raw_data());
  auto* p_in = static_cast<int32_t*>(pos.raw_data());
  auto* p_out = static_cast<int32_t*>(order.raw_data());
  // 1 where some id names the row: only the zero fill of the others needs it.
  Tensor touched = accumulate ? Tensor() : Tensor::empty({V}, DType::b8, dev);
  auto* touched_p = accumulate ? nullptr : static_cast<uint8_t*>(touched.raw_data());
  if (touched_p) CUDA_CHECK(cudaMemsetAsync(touched_p, 0, size_t(V), stream()));
  const int ni = int(n);
  int end_bit = 1;
  while (end_bit < 32 && (int64_t(1) << end_bit) < V) ++end_bit;

  dispatch_index(ids.dtype(), op, [&](auto itag) {
    using I = typename decltype(itag)::type;
    sort_prep_kernel<I><<<grid_1d(n, 256), 256, 0, stream()>>>(static_cast<const I*>(ids.raw_data()), n, k_in, p_in,
                                                               touched_p);
  });
  FTUNE_LAUNCH_CHECK(op);
  if (!accumulate) kernels::cuda::dispatch_float(dweight.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* pdw = static_cast<T*>(dweight.raw_data());
    const unsigned zgrid = unsigned(std::min<int64_t>(V, int64_t(ftune::cuda::device_sm_count(dev.index)) * 16));
    if (D % kVec<T> == 0 && aligned16(pdw))
      zero_untouched_kernel<T, true><<<zgrid, 256, 0, stream()>>>(pdw, touched_p, V, D);
    else
      zero_untouched_kernel<T, false><<<zgrid, 256, 0, stream()>>>(pdw, touched_p, V, D);
  });
  FTUNE_LAUNCH_CHECK(op);
  size_t sort_bytes = 0;
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, k_in, k_out, p_in, p_out, ni, 0, end_bit, stream()));
  Tensor temp = Tensor::empty({int64_t(sort_bytes) + 1}, DType::b8, dev);
  size_t temp_bytes = size_t(temp.numel());
  // Stable: positions with equal ids stay in increasing n.
  CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw_data(), temp_bytes, k_in, k_out, p_in, p_out, ni, 0, end_bit,
                                             stream()));

  const int64_t tiles = (n + kTile - 1) / kTile;
  Tensor part = Tensor::empty({tiles, 2, D}, DType::f32, dev);  // head/tail partials per tile
  float* pp = part.data<float>();
  kernels::cuda::dispatch_float(dweight.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int Vw = kVec<T>;
    const bool vec = D % Vw == 0 && aligned16(dy.raw_data()) && aligned16(dweight.raw_data());
    const int64_t width = 32 * (vec ? Vw : 1);
    const int64_t slices = (D + width - 1) / width;
    const unsigned grid = cap_grid((tiles * slices + 7) / 8);  // 8 warps a block
    const T* pdy = static_cast<const T*>(dy.raw_data());
    T* pdw = static_cast<T*>(dweight.raw_data());
    // FTUNE_EMB_SHFL=0 selects the tile kernel that loads each id and position itself.
    const char* env = std::getenv("FTUNE_EMB_SHFL");
    const bool shfl = !(env && env[0] == '0');
    if (vec) {
      if (shfl)
        tile_sum_shfl_kernel<T, true><<<grid, 256, 0, stream()>>>(pdy, k_out, p_out, n, D, slices, tiles, pp, pdw,
                                                                   accumulate);
      else
        tile_sum_kernel<T, true><<<grid, 256, 0, stream()>>>(pdy, k_out, p_out, n, D, slices, tiles, pp, pdw,
                                                              accumulate);
      FTUNE_LAUNCH_CHECK(op);
      tile_carry_kernel<T, true><<<grid, 256, 0, stream()>>>(k_out, n, D, slices, tiles, pp, pdw, accumulate);
    } else {
      if (shfl)
        tile_sum_shfl_kernel<T, false><<<grid, 256, 0, stream()>>>(pdy, k_out, p_out, n, D, slices, tiles, pp, pdw,
                                                                    accumulate);
      else
        tile_sum_kernel<T, false><<<grid, 256, 0, stream()>>>(pdy, k_out, p_out, n, D, slices, tiles, pp, pdw,
                                                               accumulate);
      FTUNE_LAUNCH_CHECK(op);
      tile_carry_kernel<T, false><<<grid, 256, 0, stream()>>>(k_out, n, D, slices, tiles, pp, pdw, accumulate);
    }
  });
  FTUNE_LAUNCH_CHECK(op);
}

}  // namespace ftune::kernels::cuda
