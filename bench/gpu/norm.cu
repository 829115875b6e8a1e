// bench_gpu norm: RMSNorm / LayerNorm forward and backward and the fused residual + RMSNorm
// forward (kernels/cuda/norm.cu) on bf16 activations of a large model, 16384 x 8192 (256 MiB per
// tensor, far above L2), plus 16384 x 4096 bf16 and an f32 case. Bytes: each [N, D] input read
// once and each [N, D] output written once (weight, statistics and partial sums are < 1%).
#include <cuda_runtime.h>

#include <cstdlib>
#include <string>

#include "bench/gpu/gpu_bench.h"
#include "core/tensor.h"
#include "kernels/norm.h"

namespace {

using ftune::DType;
using ftune::Device;
using ftune::Tensor;
using ftune::bench::Row;

// A device tensor of N(0, scale^2) values (bench::random_device, copied into tensor storage).
Tensor random_tensor(const ftune::Shape& shape, DType dt, float scale, uint64_t seed) {
  Tensor t = Tensor::empty(shape, dt, Device::cuda(0));
  const int code = dt == DType::f32 ? 0 : dt == DType::bf16 ? 1 : 2;
  void* p = ftune::bench::random_device(ftune::dtype_size(dt), t.numel(), code, scale, seed);
  BENCH_CUDA(cudaMemcpy(t.raw_data(), p, size_t(t.numel()) * ftune::dtype_size(dt),
                        cudaMemcpyDeviceToDevice));
  ftune::bench::free_device(p);
  return t;
}

void bench_shape(ftune::bench::Ctx& ctx, int64_t N, int64_t D, DType dt, bool full) {
  const std::string sz = std::string(ftune::dtype_name(dt)) + " " + std::to_string(N) + "x" +
                         std::to_string(D);
  const double act = double(N) * D * ftune::dtype_size(dt);  // bytes of one [N, D] tensor
  Tensor x = random_tensor({N, D}, dt, 1.0f, 1), dy = random_tensor({N, D}, dt, 1.0f, 2);
  Tensor res = random_tensor({N, D}, dt, 1.0f, 3);
  Tensor w = random_tensor({D}, dt, 1.0f, 4), b = random_tensor({D}, dt, 1.0f, 5);
  Tensor y = Tensor::empty({N, D}, dt, Device::cuda(0)), h = Tensor::empty({N, D}, dt, Device::cuda(0));
  Tensor dx = Tensor::empty({N, D}, dt, Device::cuda(0));
  Tensor dw = Tensor::empty({D}, dt, Device::cuda(0)), db = Tensor::empty({D}, dt, Device::cuda(0));
  Tensor mean = Tensor::empty({N}, DType::f32, Device::cuda(0));
  Tensor rstd = Tensor::empty({N}, DType::f32, Device::cuda(0));
  namespace k = ftune::kernels::cuda;

  Row r;
  r.name = "rms_norm_fwd " + sz;
  r.ms = ctx.time_ms([&] { k::rms_norm_forward(x, w, 1e-6, y, rstd); });
  r.bytes = 2 * act;
  const double rms_fwd_ms = r.ms;
  ctx.add(r);

  r = Row();
  r.name = "rms_norm_bwd " + sz;
  r.ms = ctx.time_ms([&] { k::rms_norm_backward(dy, x, w, rstd, dx, dw); });
  r.bytes = 3 * act;
  r.note = "dx + dweight (deterministic partial sums)";
  ctx.add(r);

  // The generic kernels (FTUNE_NORM_PIPE=0), for comparison with the pipelined default.
  setenv("FTUNE_NORM_PIPE", "0", 1);
  r = Row();
  r.name = "rms_norm_fwd " + sz + " generic";
  r.ms = ctx.time_ms([&] { k::rms_norm_forward(x, w, 1e-6, y, rstd); });
  r.bytes = 2 * act;
  r.note = "FTUNE_NORM_PIPE=0";
  ctx.add(r);
  r = Row();
  r.name = "rms_norm_bwd " + sz + " generic";
  r.ms = ctx.time_ms([&] { k::rms_norm_backward(dy, x, w, rstd, dx, dw); });
  r.bytes = 3 * act;
  r.note = "FTUNE_NORM_PIPE=0";
  ctx.add(r);
  unsetenv("FTUNE_NORM_PIPE");

  r = Row();
  r.name = "rms_norm_residual_fwd " + sz;
  r.ms = ctx.time_ms([&] { k::rms_norm_residual_forward(x, res, w, 1e-6, y, h, rstd); });
  r.bytes = 4 * act;
  // An unfused add would move 3 tensors more than the norm alone: its floor at the norm's rate.
  r.ref_ms = rms_fwd_ms * 5.0 / 2.0;
  r.ref_name = "add + rms_norm (est.)";
  r.note = "reads x, residual; writes h, y";
  ctx.add(r);

  if (!full) return;
  r = Row();
  r.name = "layer_norm_fwd " + sz;
  r.ms = ctx.time_ms([&] { k::layer_norm_forward(x, w, b, 1e-5, y, mean, rstd); });
  r.bytes = 2 * act;
  ctx.add(r);

  r = Row();
  r.name = "layer_norm_bwd " + sz;
  r.ms = ctx.time_ms([&] { k::layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db); });
  r.bytes = 3 * act;
  r.note = "dx + dweight + dbias";
  ctx.add(r);

  setenv("FTUNE_NORM_PIPE", "0", 1);
  r = Row();
  r.name = "layer_norm_fwd " + sz + " generic";
  r.ms = ctx.time_ms([&] { k::layer_norm_forward(x, w, b, 1e-5, y, mean, rstd); });
  r.bytes = 2 * act;
  r.note = "FTUNE_NORM_PIPE=0";
  ctx.add(r);
  r = Row();
  r.name = "layer_norm_bwd " + sz + " generic";
  r.ms = ctx.time_ms([&] { k::layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db); });
  r.bytes = 3 * act;
  r.note = "FTUNE_NORM_PIPE=0";
  ctx.add(r);
  unsetenv("FTUNE_NORM_PIPE");
}

}  // namespace

FTUNE_GPU_BENCH(norm) {
  bench_shape(ctx, 16384, 8192, DType::bf16, true);
  bench_shape(ctx, 16384, 4096, DType::bf16, false);
  bench_shape(ctx, 8192, 4096, DType::f32, false);
}
