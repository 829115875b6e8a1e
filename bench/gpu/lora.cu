// LoRA linear forward + backward (dx, dA, dB; W frozen), bf16, tokens 8192, d 4096 -> 4096, r 16:
// the fused kernels (kernels/lora.h) against the unfused composition a framework runs
// (y = x W^T; t = x A^T; l = t B^T; y += s l; backward: gl = s g; dB = gl^T t; dt = gl B;
// dA = dt^T x; dx = g W; dx += dt A via a full-size temporary), both on cuBLASLt, in one binary.
// bench/gpu/torch_lora.py times PyTorch's autograd on the same shapes. Each case also runs the
// other low-rank path (FTUNE_LORA_FUSED) as an A/B row.
#include <cuda_bf16.h>

#include <cstdlib>
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

}  // namespace

FTUNE_GPU_BENCH(lora) {
  const int64_t M = 8192, in = 4096, out = 4096, r = 16;
  const float s = 2.0f;
  const kernels::LoraDims d{M, in, out, r};
  auto B = [](int64_t n) { return random_device(2, n, 1, 0.02f, uint64_t(n) ^ 0x5eed); };
  void* x = random_device(2, M * in, 1, 1.0f, 11);
  void* w = B(out * in);
  void* a = B(r * in);
  void* b = random_device(2, out * r, 1, 0.02f, 12);
  void* g = random_device(2, M * out, 1, 1.0f, 13);
  void *y = B(M * out), *u = B(M * r), *xd = B(M * in), *du = B(M * r);
  void *dx = B(M * in), *da = B(r * in), *db = B(out * r);
  void *l = B(M * out), *tmp = B(M * in), *gl = B(M * out);
  // GEMM flops: base fwd + dx (2 x 2 M in out) and the adapter's 6 skinny GEMMs.
  const double flops = 2.0 * (2.0 * M * in * out) + 2.0 * (3.0 * M * in * r + 3.0 * M * out * r);
  for (double p : {0.0, 0.1}) {
    const uint64_t seed = 7;
    auto fused = [&] {
      kernels::cuda::lora_forward<bf16>(d, (bf16*)x, (bf16*)w, nullptr, (bf16*)a, (bf16*)b, s, p,
                                        seed, (bf16*)xd, (bf16*)u, (bf16*)y);
      kernels::cuda::lora_backward<bf16>(d, (bf16*)g, (bf16*)x, (bf16*)w, (bf16*)a, (bf16*)b,
                                         (bf16*)u, s, p, seed, (bf16*)du, (bf16*)xd, nullptr,
                                         (bf16*)dx, (bf16*)da, (bf16*)db);
    };
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
    row.ms = ctx.time_ms(fused, 3, 20);
    row.ref_ms = ctx.time_ms(unfused, 3, 20);
    row.ref_name = "unfused (cuBLASLt + passes)";
    row.flops = flops;
    // Full-size tensors that must move at least: x read twice (fwd, dA), g read twice, W twice,
    // y and dx written once.
    row.bytes = 2.0 * (2.0 * M * in + 2.0 * M * out + 2.0 * in * out + M * out + M * in);
    ctx.add(row);
    Row fwd;
    fwd.name = "lora_linear fwd bf16 8192x4096x4096 r16 p=" + std::string(p > 0 ? "0.1" : "0");
    fwd.ms = ctx.time_ms(
        [&] {
          kernels::cuda::lora_forward<bf16>(d, (bf16*)x, (bf16*)w, nullptr, (bf16*)a, (bf16*)b, s,
                                            p, seed, (bf16*)xd, (bf16*)u, (bf16*)y);
        },
        3, 20);
    fwd.flops = 2.0 * M * in * out + 2.0 * M * in * r + 2.0 * M * out * r;
    fwd.ref_ms =
        ctx.time_ms([&] { mm(false, true, M, out, in, 1.f, x, in, w, in, 0.f, y, out); }, 3, 20);
    fwd.ref_name = "base GEMM alone";
    ctx.add(fwd);
    // A/B of the low-rank path (FTUNE_LORA_FUSED, kernels/lora.h): with dropout the default is
    // the fused tensor-core kernels, so the other row is cuBLASLt + dropout passes; without, the
    // default is cuBLASLt, so the other row is the fused kernels. ref: the default path's time.
    const char* other = p > 0 ? "0" : "1";
    ::setenv("FTUNE_LORA_FUSED", other, 1);
    Row ab;
    ab.name = row.name + (p > 0 ? " (cuBLASLt + dropout passes)" : " (fused low-rank kernels)");
    ab.ms = ctx.time_ms(fused, 3, 20);
    Row abf;
    abf.name = fwd.name + (p > 0 ? " (cuBLASLt + dropout passes)" : " (fused low-rank kernels)");
    abf.ms = ctx.time_ms(
        [&] {
          kernels::cuda::lora_forward<bf16>(d, (bf16*)x, (bf16*)w, nullptr, (bf16*)a, (bf16*)b, s,
                                            p, seed, (bf16*)xd, (bf16*)u, (bf16*)y);
        },
        3, 20);
    ::unsetenv("FTUNE_LORA_FUSED");
    ab.ref_ms = row.ms;
    ab.ref_name = "default path";
    ab.flops = row.flops;
    ab.bytes = row.bytes;
    ctx.add(ab);
    abf.ref_ms = fwd.ms;
    abf.ref_name = "default path";
    abf.flops = fwd.flops;
    ctx.add(abf);
  }
  for (void* p : {x, w, a, b, g, y, u, xd, du, dx, da, db, l, tmp, gl}) free_device(p);

  // The 0.5B end-to-end step's MLP shapes (d 896, ffn 4864: gate/up, then down), fwd+bwd with
  // each low-rank path: where the skinny GEMMs are smallest, the A/B that sets FTUNE_LORA_FUSED's
  // default. ref: the default path's time.
  for (auto [in2, out2] : {std::pair<int64_t, int64_t>{896, 4864}, {4864, 896}}) {
    const kernels::LoraDims d2{M, in2, out2, r};
    void* x2 = random_device(2, M * in2, 1, 1.0f, 21);
    void* w2 = B(out2 * in2);
    void* a2 = B(r * in2);
    void* b2 = random_device(2, out2 * r, 1, 0.02f, 22);
    void* g2 = random_device(2, M * out2, 1, 1.0f, 23);
    void *y2 = B(M * out2), *u2 = B(M * r), *du2 = B(M * r), *dx2 = B(M * in2);
    void *da2 = B(r * in2), *db2 = B(out2 * r);
    const double flops2 =
        2.0 * (2.0 * M * in2 * out2) + 2.0 * (3.0 * M * in2 * r + 3.0 * M * out2 * r);
    for (double p : {0.0, 0.1}) {
      auto step = [&] {
        kernels::cuda::lora_forward<bf16>(d2, (bf16*)x2, (bf16*)w2, nullptr, (bf16*)a2,
                                          (bf16*)b2, s, p, 7, nullptr, (bf16*)u2, (bf16*)y2);
        kernels::cuda::lora_backward<bf16>(d2, (bf16*)g2, (bf16*)x2, (bf16*)w2, (bf16*)a2,
                                           (bf16*)b2, (bf16*)u2, s, p, 7, (bf16*)du2, nullptr,
                                           nullptr, (bf16*)dx2, (bf16*)da2, (bf16*)db2);
      };
      Row def;
      def.name = "lora_linear fwd+bwd bf16 8192x" + std::to_string(in2) + "x" +
                 std::to_string(out2) + " r16 p=" + std::string(p > 0 ? "0.1" : "0");
      def.ms = ctx.time_ms(step, 3, 20);
      def.flops = flops2;
      ::setenv("FTUNE_LORA_FUSED", p > 0 ? "0" : "1", 1);
      Row ab;
      ab.name = def.name + (p > 0 ? " (cuBLASLt + dropout passes)" : " (fused low-rank kernels)");
      ab.ms = ctx.time_ms(step, 3, 20);
      ::unsetenv("FTUNE_LORA_FUSED");
      ab.flops = flops2;
      ab.ref_ms = def.ms;
      ab.ref_name = "default path";
      ctx.add(def);
      ctx.add(ab);
    }
    for (void* q : {x2, w2, a2, b2, g2, y2, u2, du2, dx2, da2, db2}) free_device(q);
  }
}
