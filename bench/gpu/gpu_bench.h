// bench_gpu: the GPU kernel benchmarks (bench/gpu/*.cu). Each family registers its cases with
// FTUNE_GPU_BENCH; main measures the device's copy bandwidth first, runs every case (or those
// matching --filter), and prints one table: achieved GB/s against the copy bandwidth for memory-
// bound kernels (the floor is the bytes that must move over that bandwidth), TFLOP/s against the
// reference (cuBLAS's best, torch, ...) for compute-bound ones.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/error.h"

#define BENCH_CUDA(expr)                                                                        \
  do {                                                                                          \
    cudaError_t err_ = (expr);                                                                  \
    if (err_ != cudaSuccess) FTUNE_THROW("[bench] ", #expr, ": ", cudaGetErrorString(err_));  \
  } while (0)

namespace ftune::bench {

struct Row {
  std::string name;      // "rms_norm_fwd bf16 16384x4096"
  double ms = 0;         // median over the timed repetitions
  double bytes = 0;      // bytes that must move (each input read once, each output written once)
  double flops = 0;      // 0 for memory-bound kernels
  double ref_ms = 0;     // the reference's median (0: none)
  std::string ref_name;  // "cublas best", "copy", ...
  std::string note;
};

struct Ctx {
  double copy_gbps = 0;  // measured device-to-device copy bandwidth (read + write bytes)
  std::vector<Row> rows;
  // Median ms of fn over reps launches after warmup ones, each timed with CUDA events on stream 0.
  // Between repetitions the L2 is flushed when flush_l2 (inputs larger than L2 need not).
  double time_ms(const std::function<void()>& fn, int warmup = 5, int reps = 30, bool flush_l2 = false);
  void add(Row r) { rows.push_back(std::move(r)); }
};

struct Registry {
  static std::vector<std::pair<std::string, std::function<void(Ctx&)>>>& all() {
    static std::vector<std::pair<std::string, std::function<void(Ctx&)>>> v;
    return v;
  }
  Registry(const char* name, std::function<void(Ctx&)> f) { all().emplace_back(name, std::move(f)); }
};

// Random device buffers (never zeros): n elements of f32/bf16/f16 filled from N(0, scale^2).
void* random_device(size_t bytes_per_elem, int64_t n, int dtype_code, float scale = 1.0f, uint64_t seed = 1);
void free_device(void* p);

}  // namespace ftune::bench

#define FTUNE_GPU_BENCH_CAT2(a, b) a##b
#define FTUNE_GPU_BENCH_CAT(a, b) FTUNE_GPU_BENCH_CAT2(a, b)
// FTUNE_GPU_BENCH(family) { ... ctx.add(row); }
#define FTUNE_GPU_BENCH(family)                                                                 \
  static void FTUNE_GPU_BENCH_CAT(bench_fn_, family)(::ftune::bench::Ctx & ctx);               \
  static ::ftune::bench::Registry FTUNE_GPU_BENCH_CAT(bench_reg_, family)(                      \
      #family, FTUNE_GPU_BENCH_CAT(bench_fn_, family));                                         \
  static void FTUNE_GPU_BENCH_CAT(bench_fn_, family)(::ftune::bench::Ctx & ctx)
