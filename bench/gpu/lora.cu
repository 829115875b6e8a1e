// LoRA linear forward + backward (dx, dA, dB; W frozen), bf16, tokens 8192, d 4096 -> 4096, r 16:
// the fused kernels (kernels/lora.h) against the unfused composition a framework runs
// (y = x W^T; t = x A^T; l = t B^T; y += s l; backward: gl = s g; dB = gl^T t; dt = gl B;
// dA = dt^T x; dx = g W; dx += dt A via a full-size temporary), both on cuBLASLt, in one binary.
// bench/gpu/torch_lora.py times PyTorch's autograd on the same shapes. Each case also runs the
// other low-rank path (FTUNE_LORA_FUSED) as an A/B row.
#include <cuda_bf16.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <utility>

#include "bench/gpu/gpu_bench.h"
#include "kernels/cuda/common.cuh"
#include "kernels/lora.h"
#include "kernels/matmul.h"

namespace {

using namespace ftune;
using namespace ftune::bench;
using Bf = __nv_bfloat16;

// out = ca * a (+ s * b when b is not null) over n bf16 elements (16-byte vectors; n % 8 == 0).
__global__ void axpy_bf16(const Bf* a, const Bf* b, Bf* out, float ca, float s, int64_t n) {
  using namespace ftune::kernels::cuda;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * 8; i < n;
       i += int64_t(gridDim.x) * blockDim.x * 8) {
    float va[8], vb[8];
    load_vec(a + i, va);
    if (b) load_vec(b + i, vb);
#pragma unroll
    for (int j = 0; j < 8; ++j) va[j] = ca * va[j] + (b ? s * vb[j] : 0.f);
    store_vec(out + i, va);
  }
}

void axpy(const void* a, const void* b, void* out, float ca, float s, int64_t n) {
  axpy_bf16<<<1024, 256, 0, kernels::cuda::stream()>>>(
      static_cast<const Bf*>(a), static_cast<const Bf*>(b), static_cast<Bf*>(out), ca, s, n);
  BENCH_CUDA(cudaGetLastError());
}

void mm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const void* a, int64_t lda,
        const void* b, int64_t ldb, float beta, void* c, int64_t ldc) {
  kernels::cuda::gemm<bf16>(ta, tb, m, n, k, alpha, static_cast<const bf16*>(a), lda,
                            static_cast<const bf16*>(b), ldb, beta, static_cast<bf16*>(c), ldc);
}

// n bf16 values ~ N(0, 0.02^2) on the device (weights, and outputs the kernels overwrite).
void* small_random(int64_t n) { return random_device(2, n, 1, 0.02f, uint64_t(n) ^ 0x5eed); }

// The fused LoRA linear's buffers at one shape (tokens M, in -> out, rank r, scale s) and its
// calls: the forward, and forward + backward (dx, dA, dB), at dropout p.
struct LoraCase {
  kernels::LoraDims d;
  float s;
  void *x, *w, *a, *b, *g, *y, *u, *du, *dx, *da, *db;
  LoraCase(int64_t M, int64_t in, int64_t out, int64_t r, float scale)
      : d{M, in, out, r}, s(scale) {
    auto B = small_random;
    x = random_device(2, M * in, 1, 1.0f, 11);
    w = B(out * in);
    a = B(r * in);
    b = random_device(2, out * r, 1, 0.02f, 12);
    g = random_device(2, M * out, 1, 1.0f, 13);
    y = B(M * out);
    u = B(M * r);
    du = B(M * r);
    dx = B(M * in);
    da = B(r * in);
    db = B(out * r);
  }
  ~LoraCase() {
    for (void* q : {x, w, a, b, g, y, u, du, dx, da, db}) free_device(q);
  }
  LoraCase(const LoraCase&) = delete;
  LoraCase& operator=(const LoraCase&) = delete;
  // xd null: the kernels take a scratch of their own where the unfused path needs drop(x).
  void forward(double p) const {
    kernels::cuda::lora_forward<bf16>(d, (bf16*)x, (bf16*)w, nullptr, (bf16*)a, (bf16*)b, s, p, 7,
                                      nullptr, (bf16*)u, (bf16*)y);
  }
  void step(double p) const {
    forward(p);
    kernels::cuda::lora_backward<bf16>(d, (bf16*)g, (bf16*)x, (bf16*)w, (bf16*)a, (bf16*)b,
                                       (bf16*)u, s, p, 7, (bf16*)du, nullptr, nullptr, (bf16*)dx,
                                       (bf16*)da, (bf16*)db);
  }
  // GEMM flops: base fwd + dx (2 x 2 M in out) and the adapter's 6 skinny GEMMs.
  double step_flops() const {
    return 2.0 * (2.0 * d.m * d.in * d.out) +
           2.0 * (3.0 * d.m * d.in * d.r + 3.0 * d.m * d.out * d.r);
  }
  double forward_flops() const {
    return 2.0 * d.m * d.in * d.out + 2.0 * d.m * d.in * d.r + 2.0 * d.m * d.out * d.r;
  }
};

// The A/B of the low-rank path (FTUNE_LORA_FUSED, kernels/lora.h): with dropout the default is
// the fused tensor-core kernels, so the other row is cuBLASLt + dropout passes; without, the
// default is cuBLASLt, so the other row is the fused kernels. ref: the default path's row.
Row other_path(Ctx& ctx, const Row& def, double p, const std::function<void()>& fn) {
  ::setenv("FTUNE_LORA_FUSED", p > 0 ? "0" : "1", 1);
  Row ab;
  ab.name = def.name + (p > 0 ? " (cuBLASLt + dropout passes)" : " (fused low-rank kernels)");
  ab.ms = ctx.time_ms(fn, 3, 20);
  ::unsetenv("FTUNE_LORA_FUSED");
  ab.ref_ms = def.ms;
  ab.ref_name = "default path";
  ab.flops = def.flops;
  ab.bytes = def.bytes;
  return ab;
}

}  // namespace

FTUNE_GPU_BENCH(lora) {
  const int64_t M = 8192, in = 4096, out = 4096, r = 16;
  const float s = 2.0f;
  const LoraCase c(M, in, out, r, s);
  auto B = small_random;
  // The unfused composition's own buffers (drop(x), the low-rank term, dx's share, s g).
  void *xd = B(M * in), *l = B(M * out), *tmp = B(M * in), *gl = B(M * out);
  const void *x = c.x, *w = c.w, *a = c.a, *b = c.b, *g = c.g;
  void *y = c.y, *u = c.u, *du = c.du, *dx = c.dx, *da = c.da, *db = c.db;
  for (double p : {0.0, 0.1}) {
    const uint64_t seed = 7;
    auto unfused = [&] {
      const void* xs = x;
      if (p > 0) {  // drop(x) materialized once, kept for the backward (as autograd saves it)
        kernels::cuda::lora_dropout<bf16>((bf16*)x, (bf16*)xd, M * in, p, seed);
        xs = xd;
      }
      mm(false, true, M, out, in, 1.f, x, in, w, in, 0.f, y, out);    // y = x W^T
      mm(false, true, M, r, in, 1.f, xs, in, a, in, 0.f, u, r);       // t = drop(x) A^T
      mm(false, true, M, out, r, 1.f, u, r, b, r, 0.f, l, out);       // l = t B^T
      axpy(y, l, y, 1.f, s, M * out);                                 // y += s l
      axpy(g, nullptr, gl, s, 0.f, M * out);                          // gl = s g
      mm(true, false, out, r, M, 1.f, gl, out, u, r, 0.f, db, r);     // dB = gl^T t
      mm(false, false, M, r, out, 1.f, gl, out, b, r, 0.f, du, r);    // dt = gl B
      mm(true, false, r, in, M, 1.f, du, r, xs, in, 0.f, da, in);     // dA = dt^T drop(x)
      mm(false, false, M, in, out, 1.f, g, out, w, in, 0.f, dx, in);  // dx = g W
      mm(false, false, M, in, r, 1.f, du, r, a, in, 0.f, tmp, in);    // dx_l = dt A
      if (p > 0) kernels::cuda::lora_dropout<bf16>((bf16*)tmp, (bf16*)tmp, M * in, p, seed);
      axpy(dx, tmp, dx, 1.f, 1.f, M * in);  // dx += dx_l
    };
    Row row;
    row.name = "lora_linear fwd+bwd bf16 8192x4096x4096 r16 p=" + std::string(p > 0 ? "0.1" : "0");
    row.ms = ctx.time_ms([&] { c.step(p); }, 3, 20);
    row.ref_ms = ctx.time_ms(unfused, 3, 20);
    row.ref_name = "unfused (cuBLASLt + passes)";
    row.flops = c.step_flops();
    // Full-size tensors that must move at least: x read twice (fwd, dA), g read twice, W twice,
    // y and dx written once.
    row.bytes = 2.0 * (2.0 * M * in + 2.0 * M * out + 2.0 * in * out + M * out + M * in);
    ctx.add(row);
    Row fwd;
    fwd.name = "lora_linear fwd bf16 8192x4096x4096 r16 p=" + std::string(p > 0 ? "0.1" : "0");
    fwd.ms = ctx.time_ms([&] { c.forward(p); }, 3, 20);
    fwd.flops = c.forward_flops();
    fwd.ref_ms =
        ctx.time_ms([&] { mm(false, true, M, out, in, 1.f, x, in, w, in, 0.f, y, out); }, 3, 20);
    fwd.ref_name = "base GEMM alone";
    ctx.add(fwd);
    ctx.add(other_path(ctx, row, p, [&] { c.step(p); }));
    ctx.add(other_path(ctx, fwd, p, [&] { c.forward(p); }));
  }
  for (void* q : {xd, l, tmp, gl}) free_device(q);

  // The 0.5B end-to-end step's MLP shapes (d 896, ffn 4864: gate/up, then down), fwd+bwd with
  // each low-rank path: where the skinny GEMMs are smallest, the A/B that sets FTUNE_LORA_FUSED's
  // default.
  for (auto [in2, out2] : {std::pair<int64_t, int64_t>{896, 4864}, {4864, 896}}) {
    const LoraCase c2(M, in2, out2, r, s);
    for (double p : {0.0, 0.1}) {
      Row def;
      def.name = "lora_linear fwd+bwd bf16 8192x" + std::to_string(in2) + "x" +
                 std::to_string(out2) + " r16 p=" + std::string(p > 0 ? "0.1" : "0");
      def.ms = ctx.time_ms([&] { c2.step(p); }, 3, 20);
      def.flops = c2.step_flops();
      ctx.add(def);
      ctx.add(other_path(ctx, def, p, [&] { c2.step(p); }));
    }
  }
}
