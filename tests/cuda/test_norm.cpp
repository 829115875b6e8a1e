// CUDA LayerNorm / RMSNorm (kernels/cuda/norm.cu) against the CPU kernels: forward (y, mean,
// rstd), backward (dx, dweight, dbias, each alone too), the fused residual forward, determinism of
// dweight, and the ops on the GPU in bf16 with autograd. Sizes cover the warp-per-row and
// block-per-row kernels, rows that are not a multiple of the 16-byte vector (element-wise path),
// rows longer than the register cache, and many rows.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>

#include "core/ops.h"
#include "kernels/norm.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

struct Size {
  int64_t N, D;
};
// 1000, 4100: odd row lengths (4100 is not a multiple of 8 16-bit elements); 8192: the large
// model case; 20000/20001: longer than the register cache of both kernels; 1029 x 128 and
// 4096 x 1000: many rows over a few hundred row groups; 1000 x 8192 and 2500 x 2048: more rows
// than the pipelined kernels' resident blocks (each block loops, prefetching its next row).
const Size kSizes[] = {{7, 1000},  {5, 4100},  {3, 8192}, {64, 1},     {33, 31},
                       {1029, 128}, {4, 20000}, {3, 20001}, {2, 513},  {4096, 1000},
                       {9, 2048},   {1000, 8192}, {2500, 2048}};
const DType kTypes[] = {DType::f32, DType::bf16, DType::f16};

std::string label(DType dt, const Size& s) {
  return std::string(dtype_name(dt)) + " " + std::to_string(s.N) + "x" + std::to_string(s.D);
}

Tensor cpu_empty(const Shape& s, DType dt = DType::f32) { return Tensor::empty(s, dt); }
Tensor gpu_empty(const Shape& s, DType dt) { return Tensor::empty(s, dt, Device::cuda(0)); }

// Output tolerance for an O(1) value stored in dt.
double tol(DType dt) { return dt == DType::f32 ? 1e-4 : 2 * dtype_rtol(dt); }

void check_forward(bool layer, DType dt, const Size& sz, bool with_bias) {
  SCOPED_TRACE(std::string(layer ? "layer_norm " : "rms_norm ") + label(dt, sz) +
               (with_bias ? " bias" : ""));
  Generator gen(17 + sz.N * 3 + sz.D);
  const Shape xs{sz.N, sz.D};
  // An offset mean makes the LayerNorm centring matter.
  Tensor x = rand_host(xs, gen, dt, 1.0, layer ? 0.5 : 0.0);
  Tensor w = rand_host({sz.D}, gen, dt);
  Tensor b = with_bias ? rand_host({sz.D}, gen, dt) : Tensor();
  Tensor y = cpu_empty(xs), mean = cpu_empty({sz.N}, DType::f64), rstd = cpu_empty({sz.N}, DType::f64);
  Tensor gy = gpu_empty(xs, dt), gmean = gpu_empty({sz.N}, DType::f32),
         grstd = gpu_empty({sz.N}, DType::f32);
  const double eps = 1e-5;
  if (layer) {
    kernels::cpu::layer_norm_forward(x, w, b, eps, y, mean, rstd);
    kernels::cuda::layer_norm_forward(to_gpu(x, dt), to_gpu(w, dt),
                                      with_bias ? to_gpu(b, dt) : Tensor(), eps, gy, gmean, grstd);
    EXPECT_TRUE(all_close(to_host(gmean), mean.to(DType::f32), 1e-5, 1e-5)) << "mean";
  } else {
    kernels::cpu::rms_norm_forward(x, w, eps, y, rstd);
    kernels::cuda::rms_norm_forward(to_gpu(x, dt), to_gpu(w, dt), eps, gy, grstd);
  }
  EXPECT_TRUE(all_close(to_host(grstd), rstd.to(DType::f32), 0, 1e-5)) << "rstd";
  EXPECT_TRUE(all_close(to_host(gy), y, tol(dt), dtype_rtol(dt))) << "y";
}

TEST(CudaNorm, ForwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kTypes)
    for (const Size& s : kSizes) {
      check_forward(false, dt, s, false);
      check_forward(true, dt, s, true);
    }
  check_forward(true, DType::bf16, {5, 4100}, false);
  check_forward(true, DType::f32, {33, 31}, false);
}

// need: which of dx, dweight, dbias to compute (bit 0, 1, 2); bit 3: dx added into a gradient
// summed so far (accumulate_dx).
void check_backward(bool layer, DType dt, const Size& sz, int need) {
  SCOPED_TRACE(std::string(layer ? "layer_norm_backward " : "rms_norm_backward ") + label(dt, sz) +
               " need " + std::to_string(need));
  Generator gen(91 + sz.N + sz.D * 7);
  const Shape xs{sz.N, sz.D};
  Tensor x = rand_host(xs, gen, dt, 1.0, layer ? 0.5 : 0.0);
  Tensor w = rand_host({sz.D}, gen, dt);
  Tensor dy = rand_host(xs, gen, dt);
  const double eps = 1e-5;
  // CPU reference from the CPU statistics; GPU from the GPU forward's f32 statistics.
  Tensor y = cpu_empty(xs), mean = cpu_empty({sz.N}, DType::f64), rstd = cpu_empty({sz.N}, DType::f64);
  Tensor gx = to_gpu(x, dt), gw = to_gpu(w, dt), gdy = to_gpu(dy, dt);
  Tensor gy = gpu_empty(xs, dt), gmean = gpu_empty({sz.N}, DType::f32),
         grstd = gpu_empty({sz.N}, DType::f32);
  if (layer) {
    kernels::cpu::layer_norm_forward(x, w, Tensor(), eps, y, mean, rstd);
    kernels::cuda::layer_norm_forward(gx, gw, Tensor(), eps, gy, gmean, grstd);
  } else {
    kernels::cpu::rms_norm_forward(x, w, eps, y, rstd);
    kernels::cuda::rms_norm_forward(gx, gw, eps, gy, grstd);
  }
  const bool want_dx = need & 1, want_dw = need & 2, want_db = layer && (need & 4);
  Tensor dx = want_dx ? cpu_empty(xs) : Tensor(), dw = want_dw ? cpu_empty({sz.D}) : Tensor(),
         db = want_db ? cpu_empty({sz.D}) : Tensor();
  Tensor gdx = want_dx ? gpu_empty(xs, dt) : Tensor(), gdw = want_dw ? gpu_empty({sz.D}, dt) : Tensor(),
         gdb = want_db ? gpu_empty({sz.D}, dt) : Tensor();
  const bool acc = want_dx && (need & 8);
  if (acc) {
    Tensor sum_so_far = rand_host(xs, gen, dt);
    dx.copy_(sum_so_far);
    gdx.copy_(to_gpu(sum_so_far, dt));
  }
  if (layer) {
    kernels::cpu::layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db, acc);
    kernels::cuda::layer_norm_backward(gdy, gx, gw, gmean, grstd, gdx, gdw, gdb, acc);
  } else {
    kernels::cpu::rms_norm_backward(dy, x, w, rstd, dx, dw, acc);
    kernels::cuda::rms_norm_backward(gdy, gx, gw, grstd, gdx, gdw, acc);
  }
  // Column sums over N rows grow like sqrt(N): scale the absolute tolerance with them.
  const double col_atol = tol(dt) * std::sqrt(double(sz.N));
  if (want_dx) EXPECT_TRUE(all_close(to_host(gdx), dx, tol(dt), dtype_rtol(dt))) << "dx";
  if (want_dw) EXPECT_TRUE(all_close(to_host(gdw), dw, col_atol, dtype_rtol(dt))) << "dweight";
  if (want_db) EXPECT_TRUE(all_close(to_host(gdb), db, col_atol, dtype_rtol(dt))) << "dbias";
}

TEST(CudaNorm, BackwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kTypes)
    for (const Size& s : kSizes) {
      check_backward(false, dt, s, 3);
      check_backward(true, dt, s, 7);
      check_backward(false, dt, s, 8 | 3);
      check_backward(true, dt, s, 8 | 1);
    }
}

// FTUNE_NORM_PIPE=0 turns the pipelined fast path off: the generic kernels must still match on the
// shapes the fast path would take.
TEST(CudaNorm, GenericKernelsWithPipelineOff) {
  FTUNE_REQUIRE_GPU();
  ::setenv("FTUNE_NORM_PIPE", "0", 1);
  for (DType dt : kTypes)
    for (const Size& s : {Size{3, 8192}, Size{4096, 1000}, Size{9, 2048}, Size{1000, 8192}}) {
      check_forward(false, dt, s, false);
      check_forward(true, dt, s, true);
      check_backward(false, dt, s, 3);
      check_backward(true, dt, s, 7);
      check_backward(false, dt, s, 8 | 3);
      check_backward(true, dt, s, 8 | 1);
    }
  ::unsetenv("FTUNE_NORM_PIPE");
}

// accumulate_dx is the engine's sum bit for bit: the kernel adding into S equals the kernel
// writing dx followed by ops::add(S, dx) (a checkpointed block, whose input is a leaf, takes the
// second way), on every kernel path (warp rows, block rows, pipelined, generic).
TEST(CudaNorm, AccumulateEqualsTheEngineSumBitForBit) {
  FTUNE_REQUIRE_GPU();
  for (const char* pipe : {"1", "0"}) {
    ::setenv("FTUNE_NORM_PIPE", pipe, 1);
    for (DType dt : kTypes)
      for (const Size& s : {Size{7, 1000}, Size{33, 31}, Size{64, 256}, Size{9, 4096}, Size{5, 4100}})
        for (bool layer : {false, true}) {
          SCOPED_TRACE(label(dt, s) + (layer ? " layer_norm" : " rms_norm") + " pipe " + pipe);
          Generator gen(71 + s.N * 3 + s.D);
          const Shape xs{s.N, s.D};
          Tensor x = to_gpu(rand_host(xs, gen, dt, 1.0, layer ? 0.5 : 0.0), dt);
          Tensor w = to_gpu(rand_host({s.D}, gen, dt), dt);
          Tensor dy = to_gpu(rand_host(xs, gen, dt), dt);
          Tensor sum = to_gpu(rand_host(xs, gen, dt), dt);
          Tensor y = gpu_empty(xs, dt), mean = gpu_empty({s.N}, DType::f32),
                 rstd = gpu_empty({s.N}, DType::f32);
          Tensor dx = gpu_empty(xs, dt), acc = sum.clone(), none;
          if (layer) {
            kernels::cuda::layer_norm_forward(x, w, Tensor(), 1e-5, y, mean, rstd);
            kernels::cuda::layer_norm_backward(dy, x, w, mean, rstd, dx, none, none);
            kernels::cuda::layer_norm_backward(dy, x, w, mean, rstd, acc, none, none, true);
          } else {
            kernels::cuda::rms_norm_forward(x, w, 1e-5, y, rstd);
            kernels::cuda::rms_norm_backward(dy, x, w, rstd, dx, none);
            kernels::cuda::rms_norm_backward(dy, x, w, rstd, acc, none, true);
          }
          const std::vector<double> want = ops::add(sum, dx).to(Device::cpu()).to_vector<double>();
          EXPECT_EQ(acc.to(Device::cpu()).to_vector<double>(), want);
        }
  }
  ::unsetenv("FTUNE_NORM_PIPE");
}

TEST(CudaNorm, BackwardEachOutputAlone) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : {DType::f32, DType::bf16})
    for (const Size& s : {Size{7, 1000}, Size{4, 20000}, Size{33, 31}, Size{300, 4096}})
      for (int need : {1, 2, 4, 6}) {
        check_backward(true, dt, s, need);
        if (need < 4) check_backward(false, dt, s, need);
      }
}

TEST(CudaNorm, DweightIsDeterministic) {
  FTUNE_REQUIRE_GPU();
  Generator gen(5);
  const int64_t N = 3000, D = 4096;
  Tensor x = to_gpu(rand_host({N, D}, gen, DType::bf16), DType::bf16);
  Tensor w = to_gpu(rand_host({D}, gen, DType::bf16), DType::bf16);
  Tensor dy = to_gpu(rand_host({N, D}, gen, DType::bf16), DType::bf16);
  Tensor y = gpu_empty({N, D}, DType::bf16), mean = gpu_empty({N}, DType::f32),
         rstd = gpu_empty({N}, DType::f32);
  kernels::cuda::layer_norm_forward(x, w, Tensor(), 1e-5, y, mean, rstd);
  std::vector<double> first_w, first_b;
  for (int rep = 0; rep < 3; ++rep) {
    Tensor dx = gpu_empty({N, D}, DType::bf16), dw = gpu_empty({D}, DType::bf16),
           db = gpu_empty({D}, DType::bf16);
    kernels::cuda::layer_norm_backward(dy, x, w, mean, rstd, dx, dw, db);
    auto vw = dw.to(Device::cpu()).to_vector<double>(), vb = db.to(Device::cpu()).to_vector<double>();
    if (rep == 0) {
      first_w = vw;
      first_b = vb;
    } else {
      EXPECT_EQ(vw, first_w) << "dweight differs between runs";
      EXPECT_EQ(vb, first_b) << "dbias differs between runs";
    }
  }
}

void check_residual(bool layer, DType dt, const Size& sz, bool in_place) {
  SCOPED_TRACE(std::string(layer ? "layer_norm_residual " : "rms_norm_residual ") +
               label(dt, sz) + (in_place ? " in place" : ""));
  Generator gen(7 + sz.N + sz.D);
  const Shape xs{sz.N, sz.D};
  Tensor x = rand_host(xs, gen, dt), r = rand_host(xs, gen, dt);
  Tensor w = rand_host({sz.D}, gen, dt), b = rand_host({sz.D}, gen, dt);
  const double eps = 1e-6;
  // Reference: h on the CPU (f32, exact for f32 inputs), rounded to dt as the GPU stores it; then
  // the norm of that rounded h.
  Tensor h = cpu_empty(xs), y = cpu_empty(xs), mean = cpu_empty({sz.N}, DType::f64),
         rstd = cpu_empty({sz.N}, DType::f64);
  if (layer)
    kernels::cpu::layer_norm_residual_forward(x, r, w, b, eps, y, h, mean, rstd);
  else
    kernels::cpu::rms_norm_residual_forward(x, r, w, eps, y, h, rstd);
  Tensor h_dt = h.to(dt).to(DType::f32);
  if (dt != DType::f32) {
    if (layer)
      kernels::cpu::layer_norm_forward(h_dt, w, b, eps, y, mean, rstd);
    else
      kernels::cpu::rms_norm_forward(h_dt, w, eps, y, rstd);
  }
  Tensor gx = to_gpu(x, dt), gr = to_gpu(r, dt);
  Tensor gh = in_place ? gr : gpu_empty(xs, dt);
  Tensor gy = gpu_empty(xs, dt), gmean = gpu_empty({sz.N}, DType::f32),
         grstd = gpu_empty({sz.N}, DType::f32);
  if (layer)
    kernels::cuda::layer_norm_residual_forward(gx, gr, to_gpu(w, dt), to_gpu(b, dt), eps, gy, gh,
                                               gmean, grstd);
  else
    kernels::cuda::rms_norm_residual_forward(gx, gr, to_gpu(w, dt), eps, gy, gh, grstd);
  EXPECT_TRUE(all_close(to_host(gh), h_dt, 0, 0)) << "h = x + residual, rounded once";
  EXPECT_TRUE(all_close(to_host(grstd), rstd.to(DType::f32), 0, 1e-5)) << "rstd";
  if (layer) EXPECT_TRUE(all_close(to_host(gmean), mean.to(DType::f32), 1e-5, 1e-5)) << "mean";
  EXPECT_TRUE(all_close(to_host(gy), y, tol(dt), dtype_rtol(dt))) << "y";
}

TEST(CudaNorm, ResidualForwardMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kTypes)
    for (const Size& s : kSizes) {
      check_residual(false, dt, s, false);
      check_residual(true, dt, s, false);
    }
  for (DType dt : kTypes) {
    check_residual(false, dt, {9, 4096}, true);
    check_residual(true, dt, {5, 4100}, true);
  }
}

TEST(CudaNorm, CpuResidualTwinIsAddThenNorm) {  // runs without a GPU too: the reference itself
  Generator gen(3);
  Tensor x = randn({6, 37}, gen), r = randn({6, 37}, gen), w = randn({37}, gen);
  Tensor h = cpu_empty({6, 37}), y = cpu_empty({6, 37}), rstd = cpu_empty({6}, DType::f64);
  kernels::cpu::rms_norm_residual_forward(x, r, w, 1e-6, y, h, rstd);
  Tensor h_ref = ops::add(x, r);
  EXPECT_TRUE(all_close(h, h_ref, 0, 0));
  Tensor y_ref = cpu_empty({6, 37}), rstd_ref = cpu_empty({6}, DType::f64);
  kernels::cpu::rms_norm_forward(h_ref, w, 1e-6, y_ref, rstd_ref);
  EXPECT_TRUE(all_close(y, y_ref, 0, 0));
  EXPECT_TRUE(all_close(rstd, rstd_ref, 0, 0));
}

// The ops on the GPU in bf16 (the CPU has no bf16 kernels: the reference is f32 on the same
// rounded values), with autograd through the saved f32 statistics.
TEST(CudaNorm, OpsRunOnGpuInBf16WithGradients) {
  FTUNE_REQUIRE_GPU();
  const DType dt = DType::bf16;
  for (bool layer : {false, true}) {
    SCOPED_TRACE(layer ? "layer_norm" : "rms_norm");
    Generator gen(23);
    Tensor x = rand_host({4, 3, 1000}, gen, dt), w = rand_host({1000}, gen, dt),
           b = rand_host({1000}, gen, dt), gout = rand_host({4, 3, 1000}, gen, dt);
    Tensor cx = x.detach().set_requires_grad(), cw = w.detach().set_requires_grad(),
           cb = b.detach().set_requires_grad();
    Tensor gx = to_gpu(x, dt).set_requires_grad(), gw = to_gpu(w, dt).set_requires_grad(),
           gb = to_gpu(b, dt).set_requires_grad();
    Tensor cy = layer ? ops::layer_norm(cx, cw, cb, 1e-5) : ops::rms_norm(cx, cw, 1e-5);
    Tensor gy = layer ? ops::layer_norm(gx, gw, gb, 1e-5) : ops::rms_norm(gx, gw, 1e-5);
    ASSERT_TRUE(gy.device().is_cuda());
    EXPECT_EQ(gy.dtype(), dt);
    EXPECT_TRUE(all_close(to_host(gy), cy, tol(dt), dtype_rtol(dt))) << "y";
    cy.backward(gout);
    gy.backward(to_gpu(gout, dt));
    EXPECT_TRUE(all_close(to_host(gx.grad()), cx.grad(), tol(dt), dtype_rtol(dt))) << "dx";
    EXPECT_TRUE(all_close(to_host(gw.grad()), cw.grad(), tol(dt) * 4, dtype_rtol(dt))) << "dw";
    if (layer)
      EXPECT_TRUE(all_close(to_host(gb.grad()), cb.grad(), tol(dt) * 4, dtype_rtol(dt))) << "db";
  }
}

}  // namespace
}  // namespace ftune::test
