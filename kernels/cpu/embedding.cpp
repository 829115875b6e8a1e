#include "kernels/embedding.h"

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

namespace ftune::kernels::cpu {

namespace {

constexpr int64_t kParallelMin = 1 << 15;  // elements; below this threads cost more than they save

template <class F>
decltype(auto) dispatch_index(DType t, const char* op, F&& fn) {
  switch (t) {
    case DType::i32:
      return fn.template operator()<int32_t>();
    case DType::i64:
      return fn.template operator()<int64_t>();
    default:
      FTUNE_THROW("[", op, "] ids must be i32 or i64, got ", dtype_name(t));
  }
}

}  // namespace

int64_t first_bad_id(const Tensor& ids, int64_t V) {
  return dispatch_index(ids.dtype(), "embedding", [&]<class I>() -> int64_t {
    const I* id = ids.data<I>();
    const int64_t n = ids.numel();
    for (int64_t i = 0; i < n; ++i)
      if (id[i] < 0 || int64_t(id[i]) >= V) return i;
    return -1;
  });
}

void embedding_forward(const Tensor& weight, const Tensor& ids, Tensor& out) {
  const int64_t D = weight.size(1), n = ids.numel();
  dispatch_float(weight.dtype(), "embedding", [&]<class T>() {
    dispatch_index(ids.dtype(), "embedding", [&]<class I>() {
      const T* w = weight.data<T>();
      const I* id = ids.data<I>();
      T* o = out.data<T>();
#pragma omp parallel for schedule(static) if (n * D > kParallelMin)
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(o + i * D, w + int64_t(id[i]) * D, size_t(D) * sizeof(T));
    });
  });
}

void embedding_backward(const Tensor& dy, const Tensor& ids, Tensor& dweight, bool accumulate) {
  const int64_t V = dweight.size(0), D = dweight.size(1), n = ids.numel();
  dispatch_float(dweight.dtype(), "embedding_backward", [&]<class T>() {
    dispatch_index(ids.dtype(), "embedding_backward", [&]<class I>() {
      const I* id = ids.data<I>();
      const T* g = dy.data<T>();
      T* dw = dweight.data<T>();
      // Positions sorted by id (stable: equal ids keep increasing n), then cut into runs of one id.
      std::vector<int64_t> order(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), int64_t(0));
      std::stable_sort(order.begin(), order.end(),
                       [id](int64_t a, int64_t b) { return id[a] < id[b]; });
      std::vector<int64_t> run_start;
      run_start.reserve(size_t(n) + 1);
      for (int64_t k = 0; k < n; ++k)
        if (k == 0 || id[order[k]] != id[order[k - 1]]) run_start.push_back(k);
      run_start.push_back(n);
      const int64_t runs = int64_t(run_start.size()) - 1;

      if (accumulate) {  // each row's sum in a buffer (the overwrite's bits), then one add
#pragma omp parallel if (int64_t(n) * D > kParallelMin)
        {
          std::vector<T> buf(static_cast<size_t>(D));
#pragma omp for schedule(dynamic, 8)
          for (int64_t r = 0; r < runs; ++r) {
            std::fill(buf.begin(), buf.end(), T(0));
            for (int64_t k = run_start[r]; k < run_start[r + 1]; ++k) {
              const T* src = g + order[k] * D;
              T* b = buf.data();
#pragma omp simd
              for (int64_t j = 0; j < D; ++j) b[j] += src[j];
            }
            T* dst = dw + int64_t(id[order[run_start[r]]]) * D;
            for (int64_t j = 0; j < D; ++j) dst[j] += buf[size_t(j)];
          }
        }
        return;
      }
#pragma omp parallel if (V * D > kParallelMin)
      {
#pragma omp for schedule(static)
        for (int64_t v = 0; v < V; ++v) std::memset(dw + v * D, 0, size_t(D) * sizeof(T));
          // The implicit barrier above orders the zeroing before the accumulation.
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < runs; ++r) {
          T* dst = dw + int64_t(id[order[run_start[r]]]) * D;
          for (int64_t k = run_start[r]; k < run_start[r + 1]; ++k) {
            const T* src = g + order[k] * D;
#pragma omp simd
            for (int64_t j = 0; j < D; ++j) dst[j] += src[j];
          }
        }
      }
    });
  });
}

}  // namespace ftune::kernels::cpu
