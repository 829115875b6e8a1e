// A parallel loop over an N-d index space with K strided operands. The innermost dimension is
// handed to the body as a run (n, offsets, inner strides) so contiguous runs vectorize.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "core/tensor.h"

namespace ftune::kernels::cpu {

template <size_t K, class F>
void strided_for(const Shape& shape, const std::array<const Shape*, K>& strides, F&& body) {
  const int64_t nd = int64_t(shape.size());
  if (nd == 0) {
    std::array<int64_t, K> off{};
    std::array<int64_t, K> inner{};
    body(int64_t(1), off, inner);
    return;
  }
  const int64_t inner_n = shape[nd - 1];
  int64_t outer = 1;
  for (int64_t d = 0; d < nd - 1; ++d) outer *= shape[d];
  if (inner_n == 0 || outer == 0) return;
  std::array<int64_t, K> inner_st;
  for (size_t k = 0; k < K; ++k) inner_st[k] = (*strides[k])[nd - 1];
  const bool par = outer * inner_n > (1 << 15) && outer > 1;
#pragma omp parallel for schedule(static) if (par)
  for (int64_t o = 0; o < outer; ++o) {
    std::array<int64_t, K> off{};
    int64_t rem = o;
    for (int64_t d = nd - 2; d >= 0; --d) {
      int64_t i = rem % shape[d];
      rem /= shape[d];
      for (size_t k = 0; k < K; ++k) off[k] += i * (*strides[k])[d];
    }
    body(inner_n, off, inner_st);
  }
}

}  // namespace ftune::kernels::cpu
