// cuBLASLt GEMM (kernels::cuda::gemm) against the CPU GEMM on the same dtype-rounded inputs:
// f32 (TF32 off: tolerances a TF32 result would fail), bf16 and f16 with f32 accumulation, every
// transpose, odd sizes (1, 7, 129, 1000), batched strided (and a shared B), bias epilogue with
// alpha/beta, mixed bf16 -> f32 output, k == 0, misaligned pointers with padded leading dims,
// and the matmul / linear ops with gradients in bf16.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "core/cuda_runtime.h"
#include "core/ops.h"
#include "kernels/matmul.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

struct Case {
  DType dt = DType::f32;   // A and B
  DType cdt = DType::f32;  // C
  bool ta = false, tb = false;
  int64_t m = 1, n = 1, k = 1, batch = 1;
  bool shared_b = false;  // stride_b = 0
  bool bias = false;
  float alpha = 1.f, beta = 0.f;
};

std::string describe(const Case& c) {
  std::ostringstream s;
  s << dtype_name(c.dt) << "->" << dtype_name(c.cdt) << (c.ta ? " A^T" : " A")
    << (c.tb ? " B^T" : " B") << " m=" << c.m << " n=" << c.n << " k=" << c.k
    << " batch=" << c.batch << (c.shared_b ? " shared_b" : "") << (c.bias ? " bias" : "")
    << " alpha=" << c.alpha << " beta=" << c.beta;
  return s.str();
}

// Tolerances: the inputs are N(0, 1), so a dot product of length k has scale sqrt(k).
// f32 outputs (f32 or bf16/f16 inputs, whose products are exact in f32): only the summation
// order differs. bf16/f16 outputs: one rounding of the f32 result.
void tolerances(DType cdt, int64_t k, double* atol, double* rtol) {
  const double s = std::sqrt(double(std::max<int64_t>(k, 1)));
  if (cdt == DType::f32) {
    *atol = 2e-5 * s;
    *rtol = 1e-5;
  } else {
    *atol = 1e-4 * s;
    *rtol = dtype_rtol(cdt);
  }
}

void run_case(const Case& c, uint64_t seed) {
  SCOPED_TRACE(describe(c));
  Generator gen(seed);
  const int64_t bb = c.shared_b ? 1 : c.batch;
  Tensor ha = rand_host(c.ta ? Shape{c.batch, c.k, c.m} : Shape{c.batch, c.m, c.k}, gen, c.dt);
  Tensor hb = rand_host(c.tb ? Shape{bb, c.n, c.k} : Shape{bb, c.k, c.n}, gen, c.dt);
  Tensor hc = rand_host({c.batch, c.m, c.n}, gen, c.cdt);
  Tensor hbias = rand_host({c.n}, gen, c.cdt);
  Tensor da = to_gpu(ha, c.dt), db = to_gpu(hb, c.dt);
  Tensor dc = c.beta != 0.f ? to_gpu(hc, c.cdt)
                            : Tensor::empty({c.batch, c.m, c.n}, c.cdt, Device::cuda(0));
  Tensor dbias = to_gpu(hbias, c.cdt);

  kernels::cuda::GemmArgs g;
  g.trans_a = c.ta;
  g.trans_b = c.tb;
  g.m = c.m;
  g.n = c.n;
  g.k = c.k;
  g.ab_dtype = c.dt;
  g.c_dtype = c.cdt;
  g.a = da.raw_data();
  g.lda = c.ta ? c.m : c.k;
  g.b = db.raw_data();
  g.ldb = c.tb ? c.k : c.n;
  g.c = dc.raw_data();
  g.ldc = c.n;
  g.alpha = c.alpha;
  g.beta = c.beta;
  g.batch = c.batch;
  g.stride_a = c.m * c.k;
  g.stride_b = c.shared_b ? 0 : c.k * c.n;
  g.stride_c = c.m * c.n;
  g.bias = c.bias ? dbias.raw_data() : nullptr;
  kernels::cuda::gemm(g);

  // Reference: the CPU GEMM per batch entry on the rounded values, then + bias.
  Tensor ref = c.beta != 0.f ? hc.clone() : Tensor::zeros({c.batch, c.m, c.n});
  float* pr = ref.data<float>();
  for (int64_t i = 0; i < c.batch; ++i)
    kernels::cpu::gemm<float>(c.ta, c.tb, c.m, c.n, c.k, c.alpha, ha.data<float>() + i * c.m * c.k,
                              g.lda, hb.data<float>() + (c.shared_b ? 0 : i * c.k * c.n), g.ldb,
                              c.beta, pr + i * c.m * c.n, c.n);
  if (c.bias)
    for (int64_t r = 0; r < c.batch * c.m; ++r)
      for (int64_t j = 0; j < c.n; ++j) pr[r * c.n + j] += hbias.data<float>()[j];
  double atol, rtol;
  tolerances(c.cdt, c.k, &atol, &rtol);
  EXPECT_TRUE(all_close(to_host(dc), ref, atol, rtol));
}

const int64_t kSizes[] = {1, 7, 129, 1000};

TEST(CudaGemm, EverySizeF32AndBf16) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 1;
  for (DType dt : {DType::f32, DType::bf16})
    for (int64_t m : kSizes)
      for (int64_t n : kSizes)
        for (int64_t k : kSizes) {
          Case c;
          c.dt = c.cdt = dt;
          c.m = m;
          c.n = n;
          c.k = k;
          run_case(c, seed++);
        }
}

TEST(CudaGemm, TransposesEveryDtype) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  const int64_t shapes[][3] = {{1, 1, 1},      {7, 129, 1000}, {129, 1000, 7}, {1000, 7, 129},
                               {1, 1000, 129}, {1000, 1, 7},   {129, 129, 1},  {256, 512, 1024}};
  uint64_t seed = 100;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int t = 0; t < 4; ++t)
      for (auto& s : shapes) {
        Case c;
        c.dt = c.cdt = dt;
        c.ta = t & 1;
        c.tb = t & 2;
        c.m = s[0];
        c.n = s[1];
        c.k = s[2];
        run_case(c, seed++);
      }
}

TEST(CudaGemm, BatchedStrided) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 200;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int t = 0; t < 4; ++t)
      for (bool shared : {false, true}) {
        Case c;
        c.dt = c.cdt = dt;
        c.ta = t & 1;
        c.tb = t & 2;
        c.m = 7;
        c.n = 129;
        c.k = 33;
        c.batch = 5;
        c.shared_b = shared;
        run_case(c, seed++);
        c.m = 130;
        c.n = 64;
        c.k = 1000;
        c.batch = 3;
        run_case(c, seed++);
      }
}

TEST(CudaGemm, BiasAlphaBetaAndMixedOutput) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 300;
  for (DType dt : {DType::f32, DType::bf16, DType::f16})
    for (int mixed = 0; mixed < (dt == DType::f32 ? 1 : 2); ++mixed)
      for (bool bias : {false, true})
        for (float beta : {0.f, 0.5f})
          for (int t = 0; t < 4; ++t) {
            const DType cdt = mixed ? DType::f32 : dt;
            Case c;
            c.dt = dt;
            c.cdt = cdt;
            c.ta = t & 1;
            c.tb = t & 2;
            c.m = 129;
            c.n = 77;
            c.k = 300;
            c.bias = bias;
            c.alpha = 0.75f;
            c.beta = beta;
            run_case(c, seed++);
            c.batch = 2;  // bias broadcast over every batch entry
            c.m = 7;
            run_case(c, seed++);
          }
}

// gemm_autotune: each new plan times the heuristic's top candidates, into a scratch C when beta is
// not 0, so C keeps its values until the chosen algorithm runs (beta 0.5 reads them; beta 0 times
// into C, which the real call then overwrites), with a bias, batched, large k
// (split-K candidates), every dtype; the results are the CPU's. Plans made with autotuning off
// are not reused with it on (and the other way round).
TEST(CudaGemm, AutotunedPlansMatchCpu) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  uint64_t seed = 500;
  for (bool tuned : {true, false})
    for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
      ftune::cuda::set_gemm_autotune(tuned);
      Case c;
      c.dt = c.cdt = dt;
      c.tb = true;
      c.m = 1000;
      c.n = 768;
      c.k = 4096;
      c.alpha = 0.75f;
      c.beta = 0.5f;
      c.bias = true;
      run_case(c, seed++);
      c.bias = false;
      c.beta = 0.f;
      c.batch = 3;
      c.m = 129;
      c.n = 64;
      c.k = 1000;
      run_case(c, seed++);
      if (dt != DType::f32) {
        c.cdt = DType::f32;  // 16-bit inputs, f32 C
        c.batch = 1;
        c.beta = 0.5f;
        run_case(c, seed++);
      }
    }
  ftune::cuda::set_gemm_autotune(false);
}

TEST(CudaGemm, EmptyInnerDimension) {
  FTUNE_REQUIRE_GPU();
  uint64_t seed = 400;
  for (DType dt : {DType::f32, DType::bf16})
    for (bool bias : {false, true})
      for (float beta : {0.f, 2.f}) {
        Case c;
        c.dt = c.cdt = dt;
        c.m = 9;
        c.n = 13;
        c.k = 0;
        c.batch = 2;
        c.bias = bias;
        c.beta = beta;
        run_case(c, seed++);
      }
}

// TF32 on: still close at TF32 precision (and the plan cache must not reuse the exact plan).
TEST(CudaGemm, Tf32Switch) {
  FTUNE_REQUIRE_GPU();
  Generator gen(7);
  const int64_t m = 256, n = 256, k = 512;
  Tensor ha = rand_host({m, k}, gen, DType::f32), hb = rand_host({k, n}, gen, DType::f32);
  Tensor da = to_gpu(ha, DType::f32), db = to_gpu(hb, DType::f32);
  Tensor ref = Tensor::zeros({m, n});
  kernels::cpu::gemm<float>(false, false, m, n, k, 1.f, ha.data<float>(), k, hb.data<float>(), n,
                            0.f, ref.data<float>(), n);
  for (bool tf32 : {true, false}) {
    ftune::cuda::set_allow_tf32(tf32);
    Tensor dc = Tensor::empty({m, n}, DType::f32, Device::cuda(0));
    kernels::cuda::gemm<float>(false, false, m, n, k, 1.f, da.data<float>(), k, db.data<float>(), n,
                               0.f, dc.data<float>(), n);
    const double s = std::sqrt(double(k));
    if (tf32)
      EXPECT_TRUE(all_close(to_host(dc), ref, 3e-3 * s, 1e-2));
    else
      EXPECT_TRUE(all_close(to_host(dc), ref, 2e-5 * s, 1e-5)) << "TF32 leaked into an f32 GEMM";
  }
  ftune::cuda::set_allow_tf32(false);
}

// Views into a larger buffer: base pointers off the 16-byte grid and padded leading dimensions.
TEST(CudaGemm, MisalignedAndPaddedOperands) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(8);
    const int64_t m = 37, n = 45, k = 51, lda = k + 3, ldb = n + 5, ldc = n + 1;
    Tensor ha = rand_host({m * lda + 1}, gen, dt), hb = rand_host({k * ldb + 1}, gen, dt);
    Tensor hc = rand_host({m * ldc + 1}, gen, dt);
    Tensor da = to_gpu(ha, dt), db = to_gpu(hb, dt), dc = to_gpu(hc, dt);
    const size_t es = dtype_size(dt);
    kernels::cuda::GemmArgs g;
    g.m = m;
    g.n = n;
    g.k = k;
    g.ab_dtype = g.c_dtype = dt;
    g.a = static_cast<char*>(da.raw_data()) + es;
    g.lda = lda;
    g.b = static_cast<char*>(db.raw_data()) + es;
    g.ldb = ldb;
    g.c = static_cast<char*>(dc.raw_data()) + es;
    g.ldc = ldc;
    g.beta = 1.f;
    kernels::cuda::gemm(g);
    Tensor ref = hc.clone();
    kernels::cpu::gemm<float>(false, false, m, n, k, 1.f, ha.data<float>() + 1, lda,
                              hb.data<float>() + 1, ldb, 1.f, ref.data<float>() + 1, ldc);
    double atol, rtol;
    tolerances(dt, k, &atol, &rtol);
    // Padding columns and the leading element are untouched (compared too: ref keeps them).
    EXPECT_TRUE(all_close(to_host(dc), ref, atol, rtol));
  }
}

// The ops on the GPU in bf16 with gradients, against the CPU ops in f32 on the rounded values.
TEST(CudaGemm, OpsBf16WithGradients) {
  FTUNE_REQUIRE_GPU();
  ftune::cuda::set_allow_tf32(false);
  const DType dt = DType::bf16;
  Generator gen(9);
  // linear with bias: x [2, 65, 96], w [130, 96], b [130]
  Tensor hx = rand_host({2, 65, 96}, gen, dt), hw = rand_host({130, 96}, gen, dt);
  Tensor hb = rand_host({130}, gen, dt), hg = rand_host({2, 65, 130}, gen, dt);
  Tensor cx = hx.clone().set_requires_grad(true), cw = hw.clone().set_requires_grad(true);
  Tensor cb = hb.clone().set_requires_grad(true);
  Tensor gx = to_gpu(hx, dt).set_requires_grad(true), gw = to_gpu(hw, dt).set_requires_grad(true);
  Tensor gb = to_gpu(hb, dt).set_requires_grad(true);
  Tensor cy = ops::linear(cx, cw, cb), gy = ops::linear(gx, gw, gb);
  ASSERT_TRUE(gy.device().is_cuda());
  EXPECT_TRUE(all_close(to_host(gy), cy, 1e-4 * std::sqrt(96.0), dtype_rtol(dt)));
  cy.backward(hg);
  gy.backward(to_gpu(hg, dt));
  EXPECT_TRUE(all_close(to_host(gx.grad()), cx.grad(), 1e-4 * std::sqrt(130.0), dtype_rtol(dt)));
  EXPECT_TRUE(all_close(to_host(gw.grad()), cw.grad(), 1e-4 * std::sqrt(130.0), dtype_rtol(dt)));
  EXPECT_TRUE(all_close(to_host(gb.grad()), cb.grad(), 1e-4 * std::sqrt(130.0), dtype_rtol(dt)));

  // batched matmul [3, 33, 40] @ [3, 40, 17] and a shared 2-d right operand
  for (bool shared : {false, true}) {
    SCOPED_TRACE(shared ? "shared b" : "batched b");
    Tensor ha = rand_host({3, 33, 40}, gen, dt);
    Tensor hbm = rand_host(shared ? Shape{40, 17} : Shape{3, 40, 17}, gen, dt);
    Tensor hgm = rand_host({3, 33, 17}, gen, dt);
    Tensor ca = ha.clone().set_requires_grad(true), cbm = hbm.clone().set_requires_grad(true);
    Tensor ga = to_gpu(ha, dt).set_requires_grad(true),
           gbm = to_gpu(hbm, dt).set_requires_grad(true);
    Tensor co = ops::matmul(ca, cbm), go = ops::matmul(ga, gbm);
    EXPECT_TRUE(all_close(to_host(go), co, 1e-4 * std::sqrt(40.0), dtype_rtol(dt)));
    co.backward(hgm);
    go.backward(to_gpu(hgm, dt));
    EXPECT_TRUE(all_close(to_host(ga.grad()), ca.grad(), 1e-4 * std::sqrt(17.0), dtype_rtol(dt)));
    EXPECT_TRUE(all_close(to_host(gbm.grad()), cbm.grad(), 1e-4 * std::sqrt(99.0), dtype_rtol(dt)));
  }
}

// Three linears on one input that is an op output (q/k/v on a normed input): the later dX GEMMs
// add into the gradient summed so far (autograd's accumulation_target, beta = 1 on the GPU).
// f32 and bf16 on the GPU against the same graph on the CPU in f64.
TEST(CudaGemm, LinearFanInAddsIntoTheSumSoFar) {
  FTUNE_REQUIRE_GPU();
  const int64_t N = 37, d = 64;
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator g(61);
    Tensor x0 = rand_host({N, d}, g, dt);
    std::vector<Tensor> ws, gs;
    for (int64_t o : {64, 16, 16}) {
      ws.push_back(rand_host({o, d}, g, dt, 0.2));
      gs.push_back(rand_host({N, o}, g, dt));
    }
    auto grad_of = [&](const Device& dev, DType t) {
      auto on = [&](const Tensor& h) { return dev.is_cuda() ? to_gpu(h, t) : h.to(t); };
      Tensor a = on(x0).set_requires_grad(true);
      Tensor x = ops::mul_scalar(a, 2.0);
      Tensor l;
      for (size_t i = 0; i < ws.size(); ++i) {
        Tensor s = ops::sum(ops::mul(ops::linear(x, on(ws[i])), on(gs[i])));
        l = l.defined() ? ops::add(l, s) : s;
      }
      l.backward();
      return a.grad().to(Device::cpu()).to(DType::f64);
    };
    Tensor want = grad_of(Device::cpu(), DType::f64), got = grad_of(Device::cuda(0), dt);
    double m = 0;
    for (double v : want.to_vector<double>()) m = std::max(m, std::abs(v));
    EXPECT_LT(ops::max_abs_diff(got, want), (dt == DType::f32 ? 1e-4 : 3e-2) * m);
  }
}

}  // namespace
}  // namespace ftune::test
