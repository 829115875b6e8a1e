// CUDA loss kernels (kernels/loss.h, namespace cuda) against the CPU kernels run in f64 on the
// same inputs (already rounded to the GPU dtype): f32/bf16/f16 logits, odd vocabularies (1000,
// 32003) and Llama 3's 128256, rows at 16-byte-misaligned offsets (the scalar head/tail and the
// scalar-access paths), ignored rows, logits of scale 30 (stability), KL of all three kinds at two
// temperatures, bitwise run-to-run determinism, and the ops on bf16 GPU tensors against the CPU ops.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/autograd.h"
#include "core/ops.h"
#include "kernels/loss.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

constexpr int64_t kIgnore = -100;
const DType kDtypes[] = {DType::f32, DType::bf16, DType::f16};

struct Shape2 {
  int64_t n, v;
};
// Odd vocabularies (no multiple of any vector width) and the 128k one.
const Shape2 kShapes[] = {{7, 1000}, {5, 32003}, {3, 128256}};

// Logits of one case: f64 host values and the same values on the GPU in dtype dt. `shift` > 0
// places the GPU rows `shift` elements into their buffer, so no row starts 16-byte aligned.
struct Logits {
  int64_t n = 0, v = 0;
  DType dt = DType::f32;
  std::vector<double> host;
  Tensor buf;  // GPU [shift + n * v]
  int64_t shift = 0;
  const void* dev() const {
    return static_cast<const char*>(buf.raw_data()) + shift * int64_t(dtype_size(dt));
  }
};

Logits make_logits(int64_t n, int64_t v, DType dt, double scale, uint64_t seed, int64_t shift = 0) {
  Generator g(seed);
  Tensor h = rand_host({shift + n * v}, g, dt, scale);  // f32 values exactly representable in dt
  Logits l;
  l.n = n;
  l.v = v;
  l.dt = dt;
  l.shift = shift;
  l.host = h.slice(0, shift, shift + n * v).to_vector<double>();
  l.buf = to_gpu(h, dt);
  return l;
}

// Targets: every fourth row (from row 1) ignored, the rest random in [0, v).
std::vector<int64_t> make_targets(int64_t n, int64_t v, uint64_t seed) {
  Generator g(seed);
  std::vector<int64_t> t = randint({n}, g, 0, v).to_vector<int64_t>();
  for (int64_t i = 1; i < n; i += 4) t[size_t(i)] = kIgnore;
  return t;
}

Tensor dev_f32(int64_t n) { return Tensor::empty({n}, DType::f32, Device::cuda(0)); }
Tensor dev_of(int64_t n, DType dt) { return Tensor::empty({n}, dt, Device::cuda(0)); }
Tensor host_t(const std::vector<double>& v) { return Tensor::from_vector(v, {int64_t(v.size())}, Device::cpu()).to(DType::f64); }
std::vector<double> back(const Tensor& d) { return d.to(Device::cpu()).to_vector<double>(); }

// Tolerance of an [N, V] output stored in dt: the dtype's rounding, and for f16 the absolute step
// of its subnormals (tiny probabilities round to multiples of 6e-8).
double out_rtol(DType dt) { return dt == DType::f32 ? 1e-4 : dtype_rtol(dt); }
double out_atol(DType dt, double a) { return dt == DType::f16 ? a + 1e-7 : a; }

std::string what(DType dt, int64_t n, int64_t v, double scale) {
  return str_cat(dtype_name(dt), " ", n, "x", v, " scale ", scale);
}

// ---- cross-entropy ---------------------------------------------------------------------------------

TEST(CudaLoss, NllForwardBackwardMatchCpu) {
  FTUNE_REQUIRE_GPU();
  uint64_t seed = 1;
  for (DType dt : kDtypes)
    for (Shape2 sh : kShapes)
      for (double scale : {1.0, 30.0}) {
        const int64_t n = sh.n, v = sh.v;
        SCOPED_TRACE(what(dt, n, v, scale));
        ++seed;
        Logits x = make_logits(n, v, dt, scale, seed, /*shift=*/int64_t(seed % 3));
        std::vector<int64_t> tgt = make_targets(n, v, ++seed);
        Tensor tgt_d = Tensor::from_vector(tgt, {n}).to(Device::cuda(0));
        // reference
        std::vector<double> stat_r(static_cast<size_t>(2 * n)), nll_r(static_cast<size_t>(n)), g(static_cast<size_t>(n)),
            dx_r(static_cast<size_t>(n * v));
        kernels::cpu::nll_forward<double>(x.host.data(), tgt.data(), n, v, kIgnore, stat_r.data(),
                                          nll_r.data());
        Generator gg(++seed);
        g = randn({n}, gg).to_vector<double>();
        kernels::cpu::nll_backward<double>(x.host.data(), tgt.data(), stat_r.data(), g.data(), 1,
                                           0.5, n, v, kIgnore, dx_r.data());
        // GPU
        Tensor stat = dev_f32(2 * n), nll = dev_f32(n);
        kernels::cuda::nll_forward(x.dev(), dt, tgt_d.data<int64_t>(), n, v, kIgnore,
                                   stat.data<float>(), nll.raw_data(), DType::f32, 1.0f);
        const double atol = 2e-5 * (1.0 + scale);
        EXPECT_TRUE(all_close(nll, host_t(nll_r), atol, 1e-5)) << "nll";
        EXPECT_TRUE(all_close(stat, host_t(stat_r), atol, 1e-6)) << "stat (m exact, ls)";
        // token log-probs: sign -1 into the logits dtype
        Tensor lp = dev_of(n, dt);
        kernels::cuda::nll_forward(x.dev(), dt, tgt_d.data<int64_t>(), n, v, kIgnore,
                                   stat.data<float>(), lp.raw_data(), dt, -1.0f);
        std::vector<double> neg(nll_r);
        for (double& e : neg) e = -e;
        EXPECT_TRUE(all_close(lp, host_t(neg), atol, dtype_rtol(dt))) << "log-probs";

        Tensor g_d = Tensor::from_vector(g, {n}).to(DType::f32).to(Device::cuda(0));
        Tensor dx = dev_of(n * v, dt);
        kernels::cuda::nll_backward(x.dev(), dt, tgt_d.data<int64_t>(), stat.data<float>(),
                                    g_d.data<float>(), 1, 0.5f, n, v, kIgnore, dx.raw_data());
        EXPECT_TRUE(all_close(dx, host_t(dx_r), out_atol(dt, 1e-6), out_rtol(dt))) << "dlogits";
        auto dxh = back(dx);
        for (int64_t i = 1; i < n; i += 4)  // ignored rows: exact zeros
          for (int64_t j = 0; j < v; ++j) ASSERT_EQ(dxh[size_t(i * v + j)], 0.0) << i << "," << j;
        // scalar upstream gradient (g_stride 0)
        kernels::cpu::nll_backward<double>(x.host.data(), tgt.data(), stat_r.data(), g.data(), 0,
                                           0.25, n, v, kIgnore, dx_r.data());
        kernels::cuda::nll_backward(x.dev(), dt, tgt_d.data<int64_t>(), stat.data<float>(),
                                    g_d.data<float>(), 0, 0.25f, n, v, kIgnore, dx.raw_data());
        EXPECT_TRUE(all_close(dx, host_t(dx_r), out_atol(dt, 1e-6), out_rtol(dt))) << "dlogits, scalar g";
      }
}

TEST(CudaLoss, DeterministicRunToRun) {
  FTUNE_REQUIRE_GPU();
  const int64_t n = 9, v = 32003;
  Logits x = make_logits(n, v, DType::bf16, 4.0, 77);
  std::vector<int64_t> tgt = make_targets(n, v, 78);
  Tensor tgt_d = Tensor::from_vector(tgt, {n}).to(Device::cuda(0));
  Tensor g = Tensor::full({n}, 1.0, DType::f32, Device::cuda(0));
  std::vector<double> first_nll, first_dx;
  for (int rep = 0; rep < 3; ++rep) {
    Tensor stat = dev_f32(2 * n), nll = dev_f32(n), dx = dev_of(n * v, DType::bf16);
    kernels::cuda::nll_forward(x.dev(), x.dt, tgt_d.data<int64_t>(), n, v, kIgnore,
                               stat.data<float>(), nll.raw_data(), DType::f32, 1.0f);
    kernels::cuda::nll_backward(x.dev(), x.dt, tgt_d.data<int64_t>(), stat.data<float>(),
                                g.data<float>(), 1, 1.0f, n, v, kIgnore, dx.raw_data());
    if (rep == 0) {
      first_nll = back(nll);
      first_dx = back(dx);
    } else {
      EXPECT_EQ(back(nll), first_nll);
      EXPECT_EQ(back(dx), first_dx);
    }
  }
}

// An entirely -inf row gives stat (-inf, -inf) like the CPU; a NaN poisons its row only.
TEST(CudaLoss, RowStatsEdgeRows) {
  FTUNE_REQUIRE_GPU();
  const int64_t n = 3, v = 1001;
  Generator g(5);
  std::vector<double> h = randn({n * v}, g).to_vector<double>();
  for (int64_t j = 0; j < v; ++j) h[size_t(j)] = -INFINITY;  // row 0
  h[size_t(v + 500)] = NAN;                                   // row 1
  Tensor x = Tensor::from_vector(h, {n * v}).to(DType::f32).to(Device::cuda(0));
  Tensor stat = dev_f32(2 * n);
  kernels::cuda::row_stats(x.raw_data(), DType::f32, n, v, stat.data<float>());
  auto s = back(stat);
  EXPECT_EQ(s[0], -INFINITY);
  EXPECT_EQ(s[1], -INFINITY);
  EXPECT_TRUE(std::isnan(s[3]));
  std::vector<double> ref(static_cast<size_t>(2 * n));
  kernels::cpu::row_stats<double>(h.data(), n, v, ref.data());
  EXPECT_NEAR(s[4], ref[4], 0.0);
  EXPECT_NEAR(s[5], ref[5], 1e-5);
}

// ---- softmax, row stats --------------------------------------------------------------------------

TEST(CudaLoss, SoftmaxAndRowStatsMatchCpu) {
  FTUNE_REQUIRE_GPU();
  uint64_t seed = 100;
  for (DType dt : kDtypes)
    for (Shape2 sh : kShapes)
      for (bool log : {false, true}) {
        const int64_t n = sh.n, v = sh.v;
        SCOPED_TRACE(what(dt, n, v, 3.0) + (log ? " log" : ""));
        Logits x = make_logits(n, v, dt, 3.0, ++seed);
        std::vector<double> stat_r(static_cast<size_t>(2 * n)), y_r(static_cast<size_t>(n * v));
        kernels::cpu::row_stats<double>(x.host.data(), n, v, stat_r.data());
        Tensor stat = dev_f32(2 * n);
        kernels::cuda::row_stats(x.dev(), dt, n, v, stat.data<float>());
        EXPECT_TRUE(all_close(stat, host_t(stat_r), 1e-5, 1e-6)) << "row stats";

        kernels::cpu::softmax_forward<double>(x.host.data(), n, v, log, y_r.data());
        Tensor y = dev_of(n * v, dt);
        kernels::cuda::softmax_forward(x.dev(), dt, n, v, log, y.raw_data());
        EXPECT_TRUE(all_close(y, host_t(y_r), out_atol(dt, log ? 1e-5 : 1e-9), out_rtol(dt)))
            << "forward";

        // backward from the GPU's own (rounded) y, as autograd would
        std::vector<double> yh = back(y), dx_r(static_cast<size_t>(n * v));
        Generator gg(++seed);
        Tensor dy_h = rand_host({n * v}, gg, dt);
        std::vector<double> dy = dy_h.to_vector<double>();
        kernels::cpu::softmax_backward<double>(yh.data(), dy.data(), n, v, log, dx_r.data());
        Tensor dy_d = to_gpu(dy_h, dt), dx = dev_of(n * v, dt);
        kernels::cuda::softmax_backward(y.raw_data(), dy_d.raw_data(), dt, n, v, log, dx.raw_data());
        EXPECT_TRUE(all_close(dx, host_t(dx_r), out_atol(dt, log ? 1e-4 : 1e-6), out_rtol(dt)))
            << "backward";
      }
}

// ---- entropy ---------------------------------------------------------------------------------------

TEST(CudaLoss, EntropyMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  uint64_t seed = 200;
  for (DType dt : kDtypes)
    for (Shape2 sh : kShapes)
      for (double scale : {1.0, 30.0}) {
        const int64_t n = sh.n, v = sh.v;
        SCOPED_TRACE(what(dt, n, v, scale));
        ++seed;
        Logits x = make_logits(n, v, dt, scale, seed, /*shift=*/int64_t(seed % 5));
        std::vector<double> stat_r(static_cast<size_t>(2 * n)), h_r(static_cast<size_t>(n)), dx_r(static_cast<size_t>(n * v));
        kernels::cpu::entropy_forward<double>(x.host.data(), n, v, stat_r.data(), h_r.data());
        Generator gg(++seed);
        std::vector<double> g = randn({n}, gg).to_vector<double>();
        kernels::cpu::entropy_backward<double>(x.host.data(), stat_r.data(), h_r.data(), g.data(),
                                               n, v, dx_r.data());
        Tensor stat = dev_f32(2 * n), h = dev_f32(n);
        kernels::cuda::entropy_forward(x.dev(), dt, n, v, stat.data<float>(), h.data<float>());
        EXPECT_TRUE(all_close(h, host_t(h_r), 2e-5, 1e-5)) << "entropy";
        EXPECT_TRUE(all_close(stat, host_t(stat_r), 2e-5 * (1 + scale), 1e-6)) << "stat";
        Tensor g_d = Tensor::from_vector(g, {n}).to(DType::f32).to(Device::cuda(0));
        Tensor dx = dev_of(n * v, dt);
        kernels::cuda::entropy_backward(x.dev(), dt, stat.data<float>(), h.data<float>(),
                                        g_d.data<float>(), n, v, dx.raw_data());
        EXPECT_TRUE(all_close(dx, host_t(dx_r), out_atol(dt, 1e-6), out_rtol(dt))) << "dlogits";
      }
}

// ---- KL / JSD --------------------------------------------------------------------------------------

TEST(CudaLoss, KlAllKindsMatchCpu) {
  FTUNE_REQUIRE_GPU();
  using kernels::Divergence;
  uint64_t seed = 300;
  const Shape2 shapes[] = {{6, 1000}, {3, 32003}, {2, 128256}};
  for (DType dt : kDtypes)
    for (Shape2 sh : shapes)
      for (Divergence kind : {Divergence::forward, Divergence::reverse, Divergence::jsd})
        for (double temp : {1.0, 0.7, 2.0}) {
          const int64_t n = sh.n, v = sh.v;
          const double beta = 0.3;
          SCOPED_TRACE(what(dt, n, v, 3.0) + " kind " + std::to_string(int(kind)) + " temp " +
                       std::to_string(temp));
          // teacher = student + noise: a realistic (small) divergence
          Logits s = make_logits(n, v, dt, 3.0, ++seed);
          Generator gn(++seed);
          Tensor noise = randn({n * v}, gn, 0.0, 1.0);
          std::vector<double> t = noise.to_vector<double>();
          for (size_t i = 0; i < t.size(); ++i) t[i] += s.host[i];
          Tensor th = Tensor::from_vector(t, {n * v}).to(dt).to(DType::f32);
          t = th.to_vector<double>();
          Tensor t_d = to_gpu(th, dt);
          std::vector<double> out_r(static_cast<size_t>(n)), st_r(static_cast<size_t>(6 * n)), ds_r(static_cast<size_t>(n * v)),
              dt_r(static_cast<size_t>(n * v));
          kernels::cpu::kl_forward<double>(s.host.data(), t.data(), n, v, kind, beta, 1.0 / temp,
                                           out_r.data(), st_r.data());
          Generator gg(++seed);
          std::vector<double> g = randn({n}, gg).to_vector<double>();
          kernels::cpu::kl_backward<double>(s.host.data(), t.data(), st_r.data(), g.data(), n, v,
                                            kind, beta, 1.0 / temp, ds_r.data(), dt_r.data());
          Tensor out = dev_f32(n), st = dev_f32(6 * n);
          kernels::cuda::kl_forward(s.dev(), t_d.raw_data(), dt, n, v, kind, beta, 1.0 / temp,
                                    out.data<float>(), st.data<float>());
          EXPECT_TRUE(all_close(out, host_t(out_r), 2e-5, 1e-4)) << "divergence";
          EXPECT_TRUE(all_close(st, host_t(st_r), 2e-5, 1e-4)) << "stats";
          Tensor g_d = Tensor::from_vector(g, {n}).to(DType::f32).to(Device::cuda(0));
          Tensor ds = dev_of(n * v, dt), dtt = dev_of(n * v, dt);
          kernels::cuda::kl_backward(s.dev(), t_d.raw_data(), dt, st.data<float>(),
                                     g_d.data<float>(), n, v, kind, beta, 1.0 / temp,
                                     ds.raw_data(), dtt.raw_data());
          const double atol = out_atol(dt, 1e-2 / double(v));
          EXPECT_TRUE(all_close(ds, host_t(ds_r), atol, out_rtol(dt))) << "d student";
          EXPECT_TRUE(all_close(dtt, host_t(dt_r), atol, out_rtol(dt))) << "d teacher";
          // only one of the two gradients wanted
          Tensor ds2 = dev_of(n * v, dt);
          kernels::cuda::kl_backward(s.dev(), t_d.raw_data(), dt, st.data<float>(),
                                     g_d.data<float>(), n, v, kind, beta, 1.0 / temp,
                                     ds2.raw_data(), nullptr);
          EXPECT_EQ(back(ds2), back(ds));
        }
}

// ---- the ops on GPU tensors ------------------------------------------------------------------------

// The wired ops in bf16 on the GPU against the CPU ops in f32 on the same (rounded) values,
// forward and gradient, with the autograd bookkeeping (mean over counted rows, ignored rows).
TEST(CudaLoss, OpsInBf16MatchCpuOps) {
  FTUNE_REQUIRE_GPU();
  const int64_t b = 3, t = 5, v = 1003;
  Generator g(9);
  Tensor xh = rand_host({b, t, v}, g, DType::bf16, 3.0);
  Tensor th = rand_host({b, t, v}, g, DType::bf16, 3.0);
  std::vector<int64_t> tg = make_targets(b * t, v, 10);
  Tensor tgt = Tensor::from_vector(tg, {b, t});
  auto run = [&](bool gpu, int which) {
    Tensor x = gpu ? to_gpu(xh, DType::bf16) : xh.clone();
    Tensor tt = gpu ? to_gpu(th, DType::bf16) : th.clone();
    x.set_requires_grad(true);
    Tensor y;
    switch (which) {
      case 0: y = ops::cross_entropy(x, gpu ? tgt.to(Device::cuda(0)) : tgt); break;
      case 1: y = ops::cross_entropy(x, gpu ? tgt.to(Device::cuda(0)) : tgt, kIgnore, ops::Reduction::sum); break;
      case 2: y = ops::token_logprobs(x, gpu ? tgt.to(Device::cuda(0)) : tgt); break;
      case 3: y = ops::entropy(x); break;
      case 4: y = ops::kl_div(x, tt, ops::KLKind::jsd, 0.5, 1.5); break;
      case 5: y = ops::log_softmax(x); break;
    }
    Generator gw(12);
    Tensor w = randn(y.shape(), gw).to(DType::bf16).to(DType::f32);  // the same weights on both
    if (gpu) {
      // Losses and token log-probs are f32 on the GPU; the other ops keep the logits' dtype.
      const DType want = which <= 2 ? DType::f32 : DType::bf16;
      EXPECT_EQ(y.dtype(), want) << which;
      EXPECT_TRUE(y.device().is_cuda());
      w = w.to(want).to(Device::cuda(0));
    }
    y.backward(w);
    return std::make_pair(y.detach().to(Device::cpu()).to(DType::f32),
                          x.grad().to(Device::cpu()).to(DType::f32));
  };
  for (int which = 0; which < 6; ++which) {
    SCOPED_TRACE(which);
    auto [yc, gc] = run(false, which);
    auto [yg, gg] = run(true, which);
    EXPECT_TRUE(all_close(yg, yc, 1e-3, dtype_rtol(DType::bf16))) << "output";
    // log_softmax's gradient uses its saved bf16 output (exp(y) off by ~1.6%): the kernel test
    // above checks it against the CPU on the same y instead
    if (which != 5)
      EXPECT_TRUE(all_close(gg, gc, 1e-5, 2 * dtype_rtol(DType::bf16))) << "gradient";
  }
}

}  // namespace
}  // namespace ftune::test

namespace ftune::test {
namespace {

// ops::linear_cross_entropy on the GPU (chunks of logits through cuBLASLt, the CE kernels, dW
// accumulated by the GEMM in f32 for 16-bit weights) against the same op on the CPU in f64 from
// the same rounded inputs: loss, dh and dW, in f32/bf16/f16, a chunk size that does not divide
// the rows and the automatic one, mean and sum, an upstream gradient of 0.37.
TEST(CudaLoss, LinearCrossEntropyMatchesCpu) {
  FTUNE_REQUIRE_GPU();
  const int64_t N = 37, d = 64, V = 1000;
  for (DType dt : kDtypes)
    for (int64_t chunk : {int64_t(0), int64_t(8)})
      for (auto red : {ops::Reduction::mean, ops::Reduction::sum}) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " chunk ", chunk,
                             red == ops::Reduction::sum ? " sum" : " mean"));
        Generator g(41);
        Tensor h0 = rand_host({N, d}, g, dt, 1.0);  // values exact in dt
        Tensor w0 = rand_host({V, d}, g, dt, 0.2);
        std::vector<int64_t> tv = make_targets(N, V, 42);
        Tensor t = Tensor::from_vector(tv, {N});
        Tensor hc = h0.to(DType::f64).set_requires_grad(true);
        Tensor wc = w0.to(DType::f64).set_requires_grad(true);
        Tensor lc = ops::linear_cross_entropy(hc, wc, t, kIgnore, red, chunk);
        ops::mul_scalar(lc, 0.37).backward();
        Tensor hg = to_gpu(h0, dt).set_requires_grad(true);
        Tensor wg = to_gpu(w0, dt).set_requires_grad(true);
        Tensor lg = ops::linear_cross_entropy(hg, wg, t.to(Device::cuda(0)), kIgnore, red, chunk);
        EXPECT_EQ(lg.dtype(), DType::f32);
        ops::mul_scalar(lg, 0.37).backward();
        const double tol = dt == DType::f32 ? 1e-4 : 2e-2;
        EXPECT_NEAR(lg.item(), lc.item(), tol * std::max(1.0, std::abs(lc.item())));
        auto rel = [](const Tensor& got, const Tensor& ref) {
          const Tensor r = ref.to(DType::f64);
          const double den = std::max(1e-30, std::sqrt(ops::sum(ops::mul(r, r)).item()));
          const Tensor e = ops::sub(got.to(Device::cpu()).to(DType::f64), r);
          return std::sqrt(ops::sum(ops::mul(e, e)).item()) / den;
        };
        EXPECT_LT(rel(hg.grad(), hc.grad()), tol) << "dh";
        EXPECT_LT(rel(wg.grad(), wc.grad()), tol) << "dW";
        EXPECT_EQ(wg.grad().dtype(), dt);
      }
  // A frozen weight (LoRA trains below the head), no gradient at all (evaluation), every target
  // ignored, and no rows: against the CPU in f64.
  auto check_argmax = [&](const Tensor& am, const Tensor& h, const Tensor& w) {
    ASSERT_EQ(am.device(), Device::cuda(0));
    ASSERT_EQ(am.dtype(), DType::i64);
    const std::vector<int64_t> picks = am.to(Device::cpu()).to_vector<int64_t>();
    const std::vector<double> lv = ops::linear(h.to(DType::f64), w.to(DType::f64)).to_vector<double>();
    ASSERT_EQ(picks.size(), size_t(N));
    for (int64_t i = 0; i < N; ++i) {
      ASSERT_TRUE(picks[size_t(i)] >= 0 && picks[size_t(i)] < V) << "row " << i;
      double mx = -1e300;
      for (int64_t j = 0; j < V; ++j) mx = std::max(mx, lv[size_t(i * V + j)]);
      EXPECT_GE(lv[size_t(i * V + picks[size_t(i)])], mx - 1e-2 * std::max(1.0, std::abs(mx)))
          << "row " << i;
    }
  };
  Generator g(43);
  const DType dt = DType::bf16;
  Tensor h0 = rand_host({N, d}, g, dt, 1.0), w0 = rand_host({V, d}, g, dt, 0.2);
  Tensor t = Tensor::from_vector(make_targets(N, V, 44), {N});
  Tensor hc = h0.to(DType::f64).set_requires_grad(true);
  Tensor lc = ops::linear_cross_entropy(hc, w0.to(DType::f64), t, kIgnore, ops::Reduction::mean, 8);
  lc.backward();
  Tensor hg = to_gpu(h0, dt).set_requires_grad(true);
  Tensor lg = ops::linear_cross_entropy(hg, to_gpu(w0, dt), t.to(Device::cuda(0)), kIgnore,
                                        ops::Reduction::mean, 8);
  lg.backward();
  EXPECT_NEAR(lg.item(), lc.item(), 2e-2 * std::abs(lc.item()));
  double hmax = 0;
  for (double x : hc.grad().to_vector<double>()) hmax = std::max(hmax, std::abs(x));
  EXPECT_LT(ops::max_abs_diff(hg.grad().to(Device::cpu()).to(DType::f64), hc.grad()), 2e-2 * hmax);
  {
    NoGradGuard ng;
    Tensor l0 = ops::linear_cross_entropy(to_gpu(h0, dt), to_gpu(w0, dt), t.to(Device::cuda(0)),
                                          kIgnore, ops::Reduction::sum, 8);
    Tensor l1 = ops::linear_cross_entropy(h0.to(DType::f64), w0.to(DType::f64), t, kIgnore,
                                          ops::Reduction::sum, 8);
    EXPECT_NEAR(l0.item(), l1.item(), 2e-2 * std::abs(l1.item()));
    // Evaluation's argmax by chunks: each row's pick is a largest logit of the f64 reference
    // (bf16 logits tie and round: within their rounding of the row's maximum).
    Tensor am;
    Tensor l2 = ops::linear_cross_entropy(to_gpu(h0, dt), to_gpu(w0, dt), t.to(Device::cuda(0)),
                                          kIgnore, ops::Reduction::sum, 8, &am);
    EXPECT_EQ(l2.item(), l0.item());
    check_argmax(am, h0, w0);
  }
  {  // the argmax also with the gradients formed (the fused loss-and-gradient kernel's branch)
    Tensor am;
    Tensor hg2 = to_gpu(h0, dt).set_requires_grad(true);
    ops::linear_cross_entropy(hg2, to_gpu(w0, dt), t.to(Device::cuda(0)), kIgnore,
                              ops::Reduction::sum, 8, &am)
        .backward();
    EXPECT_TRUE(hg2.grad().defined());
    check_argmax(am, h0, w0);
  }
  std::vector<int64_t> none(size_t(N), kIgnore);
  Tensor hz = to_gpu(h0, dt).set_requires_grad(true), wz = to_gpu(w0, dt).set_requires_grad(true);
  Tensor lz = ops::linear_cross_entropy(hz, wz, Tensor::from_vector(none, {N}).to(Device::cuda(0)),
                                        kIgnore, ops::Reduction::mean, 8);
  lz.backward();
  EXPECT_EQ(lz.item(), 0.0);
  for (double x : hz.grad().to(Device::cpu()).to_vector<double>()) EXPECT_EQ(x, 0.0);
  for (double x : wz.grad().to(Device::cpu()).to_vector<double>()) EXPECT_EQ(x, 0.0);
  Tensor he = Tensor::zeros({0, d}, dt, Device::cuda(0)).set_requires_grad(true);
  Tensor we = to_gpu(w0, dt).set_requires_grad(true);
  Tensor le = ops::linear_cross_entropy(he, we, Tensor::zeros({0}, DType::i64, Device::cuda(0)),
                                        kIgnore, ops::Reduction::sum);
  EXPECT_EQ(le.item(), 0.0);
  le.backward();
  for (double x : we.grad().to(Device::cpu()).to_vector<double>()) EXPECT_EQ(x, 0.0);
}

}  // namespace
}  // namespace ftune::test

namespace ftune::test {
namespace {

// nll_fused (one kernel per row: loss and gradient) is nll_forward + nll_backward with a constant
// upstream gradient, bit for bit: same arithmetic. Odd and 128k vocabularies, ignored rows,
// misaligned rows.
TEST(CudaLoss, NllFusedEqualsForwardThenBackward) {
  FTUNE_REQUIRE_GPU();
  for (DType dt : kDtypes)
    for (const Shape2& sh : kShapes)
      for (int64_t shift : {int64_t(0), int64_t(3)}) {
        SCOPED_TRACE(what(dt, sh.n, sh.v, 4.0) + " shift " + std::to_string(shift));
        Logits l = make_logits(sh.n, sh.v, dt, 4.0, 51, shift);
        Tensor tg = Tensor::from_vector(make_targets(sh.n, sh.v, 52), {sh.n}).to(Device::cuda(0));
        const float scale = 0.125f;
        Tensor stat = dev_f32(2 * sh.n), nll_a = dev_f32(sh.n), nll_b = dev_f32(sh.n);
        Tensor g = Tensor::scalar(1.0, DType::f32, Device::cuda(0));
        Tensor dx_a = dev_of(sh.n * sh.v, dt), dx_b = dev_of(sh.n * sh.v, dt);
        kernels::cuda::nll_forward(l.dev(), dt, tg.data<int64_t>(), sh.n, sh.v, kIgnore,
                                   stat.data<float>(), nll_a.raw_data(), DType::f32, 1.0f);
        kernels::cuda::nll_backward(l.dev(), dt, tg.data<int64_t>(), stat.data<float>(),
                                    g.data<float>(), 0, scale, sh.n, sh.v, kIgnore,
                                    dx_a.raw_data());
        kernels::cuda::nll_fused(l.dev(), dt, tg.data<int64_t>(), sh.n, sh.v, kIgnore, scale,
                                 nll_b.data<float>(), dx_b.raw_data());
        EXPECT_EQ(back(nll_b), back(nll_a));
        EXPECT_EQ(back(dx_b), back(dx_a));
      }
}

}  // namespace
}  // namespace ftune::test
