// bench_gpu adamw: one multi-tensor AdamW step over ~500M parameters in 150 tensors (100 of 5M
// elements, 50 of 4099: the vectors of a model), f32 state, and the global grad norm and clipping
// scale over the same gradients (kernels/cuda/adamw.cu).
// Bytes per element: f32 params + f32 grads: read p, g, m, v, write p, m, v = 28. bf16 params with
// f32 masters and bf16 grads: read master, g (2), m, v, write master, m, v, param (2) = 28.
// grad norm: read g. scale: read and write g.
#include <cuda_runtime.h>

#include <string>
#include <vector>

#include "bench/gpu/gpu_bench.h"
#include "kernels/adamw.h"

namespace {

using ftune::DType;
using ftune::bench::Row;
namespace k = ftune::kernels::cuda;

__global__ void abs_inplace(float* p, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    p[i] = fabsf(p[i]) * 1e-3f;
}

// Tensor sizes and their offsets (64-element aligned) inside one flat buffer per array.
struct Layout {
  std::vector<int64_t> n, off;
  int64_t total = 0, padded = 0;
};
Layout make_layout() {
  Layout l;
  for (int i = 0; i < 150; ++i) {
    const int64_t n = i < 100 ? 5000000 : 4099;
    l.n.push_back(n);
    l.off.push_back(l.padded);
    l.total += n;
    l.padded += (n + 63) / 64 * 64;
  }
  return l;
}

void bench_adamw(ftune::bench::Ctx& ctx, DType param_dt, DType grad_dt) {
  const Layout l = make_layout();
  const int pcode = param_dt == DType::f32 ? 0 : param_dt == DType::bf16 ? 1 : 2;
  const int gcode = grad_dt == DType::f32 ? 0 : grad_dt == DType::bf16 ? 1 : 2;
  auto* master = static_cast<float*>(ftune::bench::random_device(4, l.padded, 0, 1.0f, 11));
  auto* m = static_cast<float*>(ftune::bench::random_device(4, l.padded, 0, 1e-2f, 12));
  auto* v = static_cast<float*>(ftune::bench::random_device(4, l.padded, 0, 1.0f, 13));
  abs_inplace<<<1024, 256>>>(v, l.padded);  // a second moment is >= 0
  BENCH_CUDA(cudaGetLastError());
  BENCH_CUDA(cudaDeviceSynchronize());
  char* g = static_cast<char*>(
      ftune::bench::random_device(ftune::dtype_size(grad_dt), l.padded, gcode, 1e-2f, 14));
  char* p = param_dt == DType::f32
                ? nullptr
                : static_cast<char*>(ftune::bench::random_device(2, l.padded, pcode, 1.0f, 15));
  std::vector<k::AdamWTensor> ts;
  std::vector<k::DeviceArray> grads;
  for (size_t i = 0; i < l.n.size(); ++i) {
    k::AdamWTensor t;
    t.master = master + l.off[i];
    t.param = p ? p + l.off[i] * 2 : nullptr;
    t.param_dtype = param_dt;
    t.grad = g + l.off[i] * ftune::dtype_size(grad_dt);
    t.grad_dtype = grad_dt;
    t.m = m + l.off[i];
    t.v = v + l.off[i];
    t.n = l.n[i];
    t.c.decay = 1.0f - 1e-4f * 0.1f;
    t.c.step_size = 1e-4f / (1.0f - 0.9f);
    t.c.bc2_sqrt = 0.0447f;
    ts.push_back(t);
    grads.push_back({const_cast<void*>(t.grad), grad_dt, t.n});
  }
  const double n = double(l.total);
  const std::string sz = std::to_string(int64_t(n / 1e6)) + "M in 150 tensors";
  Row r;
  r.name = std::string("adamw ") + ftune::dtype_name(param_dt) + " param, " +
           ftune::dtype_name(grad_dt) + " grad, " + sz;
  r.ms = ctx.time_ms([&] { k::adamw_update_multi(ts); }, 3, 15);
  r.bytes = 28 * n;
  r.note = "one launch; f32 master, m, v";
  ctx.add(r);

  const double gb = ftune::dtype_size(grad_dt) * n;
  r = Row();
  r.name = std::string("grad_norm ") + ftune::dtype_name(grad_dt) + " " + sz;
  r.ms = ctx.time_ms([&] { k::sum_squares_multi(grads); }, 3, 15);
  r.bytes = gb;
  r.note = "one launch + host sum of block partials (sync)";
  ctx.add(r);

  r = Row();
  r.name = std::string("clip_scale ") + ftune::dtype_name(grad_dt) + " " + sz;
  r.ms = ctx.time_ms([&] { k::scale_inplace_multi(grads, 0.999); }, 3, 15);
  r.bytes = 2 * gb;
  ctx.add(r);

  for (void* q : {static_cast<void*>(master), static_cast<void*>(m), static_cast<void*>(v),
                  static_cast<void*>(g), static_cast<void*>(p)})
    if (q) ftune::bench::free_device(q);
}

}  // namespace

FTUNE_GPU_BENCH(adamw) {
  bench_adamw(ctx, DType::f32, DType::f32);
  bench_adamw(ctx, DType::bf16, DType::bf16);
}
