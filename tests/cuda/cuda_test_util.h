// Helpers of the CUDA-vs-CPU kernel tests: skip without a GPU, random inputs rounded to the
// kernel's dtype (so the CPU reference sees exactly what the GPU sees), device copies, and a
// comparison with a dtype-scaled tolerance that names the worst element.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "core/allocator.h"
#include "core/rng.h"
#include "core/tensor.h"

namespace ftune::test {

inline std::string gpu_skip_reason() {
#ifndef FTUNE_HAVE_CUDA
  return "ftune was built without CUDA (FTUNE_CUDA=OFF)";
#else
  return cuda_available() ? "" : "no GPU is present on this machine (scripts/gpu_check.sh runs these on one)";
#endif
}

// First statement of every GPU test. Poisons new device allocations (NaN bytes), so an output
// element a kernel forgets to write fails the comparison.
#define FTUNE_REQUIRE_GPU()                                                  \
  do {                                                                       \
    std::string why_ = ::ftune::test::gpu_skip_reason();                     \
    if (!why_.empty()) GTEST_SKIP() << why_;                                 \
    ::ftune::cuda_set_alloc_poison(true);                                    \
  } while (0)

// Random normal host tensor, rounded to dt and returned as f32 (the CPU reference's input).
inline Tensor rand_host(const Shape& s, Generator& g, DType dt, double stddev = 1.0, double mean = 0.0) {
  return randn(s, g, mean, stddev).to(dt).to(DType::f32);
}
// The same values on the GPU in dtype dt.
inline Tensor to_gpu(const Tensor& host_f32, DType dt) { return host_f32.to(dt).to(Device::cuda(0)); }
// A GPU tensor back on the host as f32.
inline Tensor to_host(const Tensor& dev) { return dev.to(Device::cpu()).to(DType::f32); }

// Tolerances for an output stored in dt and computed in f32 (the reference in f32/f64).
inline double dtype_rtol(DType dt) {
  switch (dt) {
    case DType::bf16: return 1.6e-2;  // 2 ulp of an 8-bit mantissa
    case DType::f16: return 2e-3;
    default: return 2e-5;
  }
}

// Every element within atol + rtol*|ref| (NaN and inf never pass unless both are the same
// non-finite value); reports the worst element with both values.
inline ::testing::AssertionResult all_close(const Tensor& got, const Tensor& ref, double atol,
                                            double rtol) {
  if (got.shape() != ref.shape())
    return ::testing::AssertionFailure() << "shape " << shape_str(got.shape()) << " vs " << shape_str(ref.shape());
  auto g = got.to(Device::cpu()).to_vector<double>(), r = ref.to(Device::cpu()).to_vector<double>();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    double v;
    if (!std::isfinite(g[i]) || !std::isfinite(r[i]))
      v = (g[i] == r[i]) ? 0 : INFINITY;
    else
      v = std::fabs(g[i] - r[i]) - (atol + rtol * std::fabs(r[i]));
    if (v > worst || (std::isinf(v) && !std::isinf(worst))) {
      worst = v;
      at = i;
    }
  }
  if (worst <= 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "element " << at << " of " << g.size() << ": got " << g[at]
                                       << ", want " << r[at] << " (atol " << atol << ", rtol " << rtol << ")";
}

// Relative error ||got - ref|| / ||ref|| over all elements.
inline double rel_l2(const Tensor& got, const Tensor& ref) {
  auto g = got.to(Device::cpu()).to_vector<double>(), r = ref.to(Device::cpu()).to_vector<double>();
  double num = 0, den = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    num += (g[i] - r[i]) * (g[i] - r[i]);
    den += r[i] * r[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1));
}

// The root mean square of a tensor's values (0 for an empty one).
inline double values_rms(const Tensor& t) {
  auto v = t.to(Device::cpu()).to_vector<double>();
  double s = 0;
  for (double x : v) s += x * x;
  return v.empty() ? 0 : std::sqrt(s / double(v.size()));
}

// LoRA outputs compared at a tolerance relative to their own scale: f32 differs from the CPU
// only in summation order; 16-bit results are sums of separately rounded terms (the base GEMM's
// output, the adapter's product, the dropout-scaled update) that may cancel, so the absolute
// error is a few roundings at the terms' scale (rms), not at the result's (seen on an H200: f16
// dx off by 7 ulps of a small element).
inline ::testing::AssertionResult close_scaled(const Tensor& got, const Tensor& ref, DType dt) {
  const double r = values_rms(ref);
  const double k = dt == DType::f32 ? 2e-5 : dtype_rtol(dt);
  return all_close(got, ref, (dt == DType::f32 ? 1.0 : 4.0) * k * r, k);
}

}  // namespace ftune::test
