// bench_gpu family "elementwise": the memory-bound kernels of kernels/{elementwise,activation,
// rope,embedding}.h and the device cast, at sizes far beyond L2 (256M bf16 elements = 512 MiB a
// tensor). Row.bytes counts what must move: each input read once, each output written once.
#include <cuda_bf16.h>

#include <cstdlib>
#include <string>

#include "bench/gpu/gpu_bench.h"
#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/rng.h"
#include "core/tensor.h"
#include "kernels/activation.h"
#include "kernels/elementwise.h"
#include "kernels/embedding.h"
#include "kernels/rope.h"

namespace ftune::bench {
namespace {

// A device tensor of random N(0, scale^2) values (never zeros).
Tensor rand_dev(const Shape& s, DType dt, uint64_t seed, float scale = 1.0f) {
  Tensor t = Tensor::empty(s, dt, Device::cuda(0));
  const int code = dt == DType::f32 ? 0 : dt == DType::bf16 ? 1 : 2;
  void* p = random_device(dtype_size(dt), t.numel(), code, scale, seed);
  BENCH_CUDA(cudaMemcpy(t.raw_data(), p, size_t(t.numel()) * dtype_size(dt), cudaMemcpyDeviceToDevice));
  free_device(p);
  return t;
}

std::string millions(int64_t n) { return std::to_string((n + 500000) / 1000000) + "M"; }

}  // namespace
}  // namespace ftune::bench

FTUNE_GPU_BENCH(elementwise) {
  using namespace ftune;
  using namespace ftune::bench;
  const DType bf = DType::bf16;
  const double e2 = 2.0;  // bytes per bf16
  const int64_t n = int64_t(256) << 20;
  const std::string sz = " bf16 " + millions(n);
  {
    Tensor a = rand_dev({n}, bf, 1), b = rand_dev({n}, bf, 2), out = Tensor::empty({n}, bf, Device::cuda(0));
    double ms = ctx.time_ms([&] { kernels::cuda::binary(kernels::BinaryOp::add, a, b, out); });
    ctx.add(Row{"add" + sz, ms, 3 * e2 * n});
    Tensor g = rand_dev({n}, bf, 3), dg = Tensor::empty({n}, bf, Device::cuda(0));
    ms = ctx.time_ms([&] { kernels::cuda::gelu_forward(a, out); });
    ctx.add(Row{"gelu fwd" + sz, ms, 2 * e2 * n});
    ms = ctx.time_ms([&] { kernels::cuda::gelu_backward(a, g, dg); });
    ctx.add(Row{"gelu bwd" + sz, ms, 3 * e2 * n});
    ms = ctx.time_ms([&] { kernels::cuda::swiglu_forward(a, b, out); });
    ctx.add(Row{"swiglu fwd" + sz, ms, 3 * e2 * n});
    Tensor du = Tensor::empty({n}, bf, Device::cuda(0));
    ms = ctx.time_ms([&] { kernels::cuda::swiglu_backward(a, b, g, dg, du); });
    ctx.add(Row{"swiglu bwd" + sz, ms, 5 * e2 * n});
    // f32 -> bf16 cast of the same element count.
    Tensor f = rand_dev({n}, DType::f32, 4);
    ms = ctx.time_ms([&] { out.copy_(f); });
    ctx.add(Row{"cast f32->bf16 " + millions(n), ms, 6.0 * n});
    ms = ctx.time_ms([&] { f.copy_(out); });
    ctx.add(Row{"cast bf16->f32 " + millions(n), ms, 6.0 * n});
  }
  cuda_empty_cache();
  {
    // Broadcast (the strided path) and the reductions of a bias gradient / a row sum.
    const int64_t R = 65536, C = 4096;
    Tensor x = rand_dev({R, C}, bf, 9), bias = rand_dev({C}, bf, 10), out = Tensor::empty({R, C}, bf, Device::cuda(0));
    double ms = ctx.time_ms([&] { kernels::cuda::binary(kernels::BinaryOp::add, x, bias.expand({R, C}), out); });
    ctx.add(Row{"add bf16 [64k, 4096] + [4096] (broadcast)", ms, 2 * e2 * R * C + e2 * C});
    Tensor col = Tensor::empty({C}, bf, Device::cuda(0)), row = Tensor::empty({R}, bf, Device::cuda(0));
    ms = ctx.time_ms([&] { kernels::cuda::sum_dim(x, 1, R, C, col); });
    ctx.add(Row{"sum bf16 [64k, 4096] over dim 0", ms, e2 * R * C + e2 * C});
    ms = ctx.time_ms([&] { kernels::cuda::sum_dim(x, R, C, 1, row); });
    ctx.add(Row{"sum bf16 [64k, 4096] over dim 1", ms, e2 * R * C + e2 * R});
    Tensor idx = Tensor::empty({R}, DType::i64, Device::cuda(0));
    ms = ctx.time_ms([&] { kernels::cuda::amax_dim(x, R, C, 1, row, &idx); });
    ctx.add(Row{"amax+argmax bf16 [64k, 4096] over dim 1", ms, e2 * R * C + 10.0 * R});
  }
  cuda_empty_cache();
  {
    // RoPE on a Llama-8B-like q: [16, 4096, 32, 128] = 256M elements, positions [T].
    const int64_t B = 16, T = 4096, H = 32, D = 128;
    Tensor x = rand_dev({B, T, H, D}, bf, 5), out = Tensor::empty({B, T, H, D}, bf, Device::cuda(0));
    Tensor pos = Tensor::arange(T, DType::i64).to(Device::cuda(0));
    double ms = ctx.time_ms([&] { kernels::cuda::rope(x, pos, 500000.0, false, out); });
    ctx.add(Row{"rope fwd bf16 16x4096x32x128", ms, 2 * e2 * x.numel()});
  }
  cuda_empty_cache();
  {
    // Embedding of 64k tokens over a 128k x 4096 vocabulary (Llama 3 8B).
    const int64_t V = 128256, D = 4096, N = 16 * 4096;
    Tensor w = rand_dev({V, D}, bf, 6), out = Tensor::empty({N, D}, bf, Device::cuda(0));
    Generator gen(7);
    Tensor ids = randint({N}, gen, 0, V, DType::i32).to(Device::cuda(0));
    double ms = ctx.time_ms([&] { kernels::cuda::embedding_forward(w, ids, out); });
    ctx.add(Row{"embedding fwd bf16 64k x 4096", ms, 2 * e2 * N * D + 4.0 * N});
    Tensor dy = rand_dev({N, D}, bf, 8), dw = Tensor::empty({V, D}, bf, Device::cuda(0));
    ftune::cuda::set_deterministic(true);
    ms = ctx.time_ms([&] { kernels::cuda::embedding_backward(dy, ids, dw); });
    ctx.add(Row{"embedding bwd bf16 64k x 4096, V 128k", ms, e2 * N * D + e2 * V * D + 4.0 * N, 0, 0, "",
                "writes all of dweight (zeros)"});
    // Skewed: half the tokens share one id (a long run summed by one warp per column slice).
    std::vector<int32_t> h = randint({N}, gen, 0, V, DType::i32).to_vector<int32_t>();
    for (int64_t i = 0; i < N; i += 2) h[size_t(i)] = 17;
    Tensor skew = Tensor::from_vector(h, {N}).to(Device::cuda(0));
    ms = ctx.time_ms([&] { kernels::cuda::embedding_backward(dy, skew, dw); }, 2, 10);
    ctx.add(Row{"embedding bwd bf16, half the ids equal", ms, e2 * N * D + e2 * V * D + 4.0 * N});
    // The tile kernel that loads each id and position itself (FTUNE_EMB_SHFL=0).
    setenv("FTUNE_EMB_SHFL", "0", 1);
    ms = ctx.time_ms([&] { kernels::cuda::embedding_backward(dy, ids, dw); });
    ctx.add(Row{"embedding bwd bf16 64k x 4096, V 128k plain-tile", ms, e2 * N * D + e2 * V * D + 4.0 * N, 0,
                0, "", "FTUNE_EMB_SHFL=0"});
    ms = ctx.time_ms([&] { kernels::cuda::embedding_backward(dy, skew, dw); }, 2, 10);
    ctx.add(Row{"embedding bwd bf16, half the ids equal plain-tile", ms, e2 * N * D + e2 * V * D + 4.0 * N,
                0, 0, "", "FTUNE_EMB_SHFL=0"});
    unsetenv("FTUNE_EMB_SHFL");
  }
  cuda_empty_cache();
}
