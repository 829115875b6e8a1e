// Targeted tests of the nn ops (core/ops/nn.cpp): bad input throws naming the op and shapes,
// hand-computed RoPE values, determinism of the scattering backwards, numerically hard inputs.
// The reference and gradient checks of every op are in tests/ops/table_nn.cpp.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <functional>
#include <string>

#include "core/ops.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "kernels/norm.h"
#include "tests/profiler_model.h"

using namespace ftune;

namespace {

// Runs f, expecting an ftune::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const auto& p : parts)
      EXPECT_NE(m.find(p), std::string::npos) << "'" << p << "' not in: " << m;
    return;
  }
  ADD_FAILURE() << "no ftune::Error thrown";
}

Tensor f64(std::vector<double> v, Shape s) { return Tensor::from_vector(v, s); }

// Runs f with n OpenMP threads, restoring the previous count.
template <class F>
auto with_threads(int n, F f) {
  const int prev = omp_get_max_threads();
  omp_set_num_threads(n);
  auto r = f();
  omp_set_num_threads(prev);
  return r;
}

}  // namespace

// ------------------------------------------------------------------ embedding

TEST(NnEmbedding, OutOfRangeIdNamesIdPositionAndShapes) {
  Tensor w = Tensor::zeros({7, 3});
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{0, 6, 2, 5, 7, 1}, {2, 3});
  expect_error([&] { ops::embedding(w, ids); },
               {"[embedding]", "id 7", "position [1, 1]", "i64[2, 3]", "[0, 7)", "f32[7, 3]"});
  Tensor neg = Tensor::from_vector(std::vector<int32_t>{1, -1}, {2});
  expect_error([&] { ops::embedding(w, neg); }, {"[embedding]", "id -1", "position [1]", "i32[2]"});
}

TEST(NnEmbedding, RejectsBadWeightAndIdsDtype) {
  Tensor ids = Tensor::from_vector(std::vector<int64_t>{0, 1}, {2});
  expect_error([&] { ops::embedding(Tensor::zeros({7}), ids); },
               {"[embedding]", "weight", "f32[7]"});
  expect_error(
      [&] {
        ops::embedding(Tensor::zeros({7, 3}), Tensor::zeros({2}));
      },
      {"[embedding]", "ids", "i32 or i64", "f32[2]"});
  expect_error(
      [&] {
        ops::embedding(Tensor::zeros({7, 3}, DType::i32), ids);
      },
      {"[embedding]", "weight"});
}

TEST(NnEmbedding, ShapeAndRepeatedIdsAccumulate) {
  Tensor w = f64({0, 1, 10, 11, 20, 21}, {3, 2}).set_requires_grad(true);
  Tensor ids = Tensor::from_vector(std::vector<int32_t>{2, 0, 2, 2}, {2, 2});
  Tensor out = ops::embedding(w, ids);
  ASSERT_EQ(out.shape(), (Shape{2, 2, 2}));
  EXPECT_EQ(out.to_vector<double>(), (std::vector<double>{20, 21, 0, 1, 20, 21, 20, 21}));
  Tensor dy = f64({1, 2, 3, 4, 5, 6, 7, 8}, {2, 2, 2});
  out.backward(dy);
  // Row 2 gets positions 0, 2, 3; row 0 gets position 1; row 1 nothing.
  EXPECT_EQ(w.grad().to_vector<double>(), (std::vector<double>{3, 4, 0, 0, 1 + 5 + 7, 2 + 6 + 8}));
}

TEST(NnEmbedding, BackwardIsDeterministicAcrossThreadCounts) {
  Generator gen(3);
  Tensor ids = randint({3000}, gen, 0, 50);  // many repeats per row
  Tensor dy = randn({3000, 64}, gen);
  auto grad_with = [&](int threads) {
    return with_threads(threads, [&] {
      Tensor w = Tensor::zeros({50, 64}).set_requires_grad(true);
      ops::embedding(w, ids).backward(dy);
      return w.grad().to_vector<float>();
    });
  };
  auto g1 = grad_with(1);
  EXPECT_EQ(g1, grad_with(2));
  EXPECT_EQ(g1, grad_with(3));
}

// ------------------------------------------------------------------ norms

TEST(NnNorm, RejectsWrongWeightAndBiasShapes) {
  Tensor x = Tensor::zeros({2, 8});
  expect_error([&] { ops::layer_norm(x, Tensor::ones({7}), Tensor(), 1e-5); },
               {"[layer_norm]", "weight must be [8]", "f32[2, 8]", "f32[7]"});
  expect_error(
      [&] {
        ops::layer_norm(x, Tensor::ones({8}), Tensor::zeros({2, 8}), 1e-5);
      },
      {"[layer_norm]", "bias must be [8]", "f32[2, 8]"});
  expect_error(
      [&] {
        ops::rms_norm(x, Tensor::ones({1, 8}), 1e-6);
      },
      {"[rms_norm]", "weight must be [8]", "f32[1, 8]"});
  expect_error([&] { ops::rms_norm(x, Tensor::ones({8}, DType::f64), 1e-6); },
               {"[rms_norm]", "dtype", "f64[8]"});
  expect_error([&] { ops::rms_norm(x, Tensor::ones({8}), -1.0); }, {"[rms_norm]", "eps"});
  expect_error([&] { ops::layer_norm(x, Tensor(), Tensor(), 1e-5); }, {"[layer_norm]", "weight"});
}

TEST(NnNorm, ConstantRowGivesBiasAndFiniteGradients) {
  Tensor x = Tensor::full({2, 16}, 3.0).set_requires_grad(true);
  Tensor w = Tensor::ones({16}).set_requires_grad(true);
  Tensor b = Tensor::full({16}, 0.25).set_requires_grad(true);
  Tensor y = ops::layer_norm(x, w, b, 1e-5);
  for (float v : y.to_vector<float>()) EXPECT_FLOAT_EQ(v, 0.25f);
  ops::sum(y).backward();
  for (const Tensor& g : {x.grad(), w.grad(), b.grad()})
    for (float v : g.to_vector<float>()) EXPECT_TRUE(std::isfinite(v));
}

// A row with |mean| >> std: f32 statistics from E[x^2] - E[x]^2 would lose every digit; the
// kernel's f64 two-pass statistics match an f64 reference on the same (f32) values.
TEST(NnNorm, LayerNormLargeMeanMatchesF64) {
  Generator gen(5);
  Tensor x = ops::add_scalar(randn({4, 256}, gen, 0.0, 0.01), 3000.0);
  Tensor w = Tensor::ones({256}), b = Tensor::zeros({256});
  Tensor y = ops::layer_norm(x, w, b, 1e-6);
  Tensor y64 = ops::layer_norm(x.to(DType::f64), w.to(DType::f64), b.to(DType::f64), 1e-6);
  // |y| <= ~4: f32 rounding only. Rounding the mean to f32 (error up to 1.2e-4 against std 0.01)
  // before centring would cost ~1e-2 here.
  EXPECT_LT(ops::max_abs_diff(y, y64), 2e-5);
  Tensor r = ops::rms_norm(x, w, 1e-6);
  Tensor r64 = ops::rms_norm(x.to(DType::f64), w.to(DType::f64), 1e-6);
  EXPECT_LT(ops::max_abs_diff(r, r64), 1e-6);
}

TEST(NnNorm, WeightGradientIsDeterministicAcrossThreadCounts) {
  Generator gen(9);
  Tensor x = randn({301, 96}, gen), dy = randn({301, 96}, gen);
  auto grads_with = [&](int threads) {
    return with_threads(threads, [&] {
      Tensor w = Tensor::ones({96}).set_requires_grad(true);
      Tensor b = Tensor::zeros({96}).set_requires_grad(true);
      ops::layer_norm(x, w, b, 1e-5).backward(dy);
      Tensor w2 = Tensor::ones({96}).set_requires_grad(true);
      ops::rms_norm(x, w2, 1e-6).backward(dy);
      auto v = w.grad().to_vector<float>();
      for (float f : b.grad().to_vector<float>()) v.push_back(f);
      for (float f : w2.grad().to_vector<float>()) v.push_back(f);
      return v;
    });
  };
  auto g1 = grads_with(1);
  EXPECT_EQ(g1, grads_with(2));
  EXPECT_EQ(g1, grads_with(4));
}

// A pre-norm block's residual fan-in, h feeding both norm(h) and the residual add: the norm's
// backward adds its dx into the gradient the add already gave h (accumulation_target). In f64,
// against the two shares formed by separate backward passes and summed; with the add made
// after the norm (its backward runs first: the block's order) and before it (no sum to add into
// yet), and with the norm's weight frozen. The profiler counts one engine sum fewer at h.
TEST(NnNorm, BackwardAddsDxIntoTheResidualGradient) {
  Generator gen(12);
  const int64_t N = 6, D = 10;
  Tensor x0 = randn({N, D}, gen).to(DType::f64);
  Tensor w = randn({D}, gen).to(DType::f64), b = randn({D}, gen).to(DType::f64);
  Tensor g1 = randn({N, D}, gen).to(DType::f64), g2 = randn({N, D}, gen).to(DType::f64);
  for (bool layer : {false, true})
    for (bool add_last : {true, false})
      for (bool train_w : {true, false}) {
        SCOPED_TRACE(std::string(layer ? "layer_norm" : "rms_norm") + (add_last ? " add last" : "") +
                     (train_w ? " weight trained" : ""));
        auto norm = [&](const Tensor& h, const Tensor& wt) {
          return layer ? ops::layer_norm(h, wt, b, 1e-5) : ops::rms_norm(h, wt, 1e-5);
        };
        // Separately: the residual share is 1.5 g1, the norm's from its own pass.
        Tensor xa = x0.clone().set_requires_grad(true);
        ops::sum(ops::mul(norm(ops::mul_scalar(xa, 1.5), w), g2)).backward();
        Tensor want = ops::add(ops::mul_scalar(g1, 1.5), xa.grad());
        Tensor wt = w.clone().set_requires_grad(train_w);
        Tensor xb = x0.clone().set_requires_grad(true);
        Tensor h = ops::mul_scalar(xb, 1.5);
        Tensor r, y;
        if (add_last) {
          y = norm(h, wt);
          r = ops::add(h, g1);
        } else {
          r = ops::add(h, g1);
          y = norm(h, wt);
        }
        ops::add(ops::sum(ops::mul(r, g1)), ops::sum(ops::mul(y, g2))).backward();
        EXPECT_LT(ops::max_abs_diff(xb.grad(), want), 1e-12);
      }

  auto sums_at_h = [&](bool norm_fan_in) {
    return test::backward_sums([&] {
      Tensor x = x0.clone().set_requires_grad(true);
      Tensor h = ops::mul_scalar(x, 1.5);
      // Without the fan-in: the same norm of a copy of h (made by an op, so no leaf).
      Tensor y = ops::rms_norm(norm_fan_in ? h : ops::mul_scalar(x, 1.5), w, 1e-5);
      Tensor r = ops::add(h, g1);
      return ops::add(ops::sum(ops::mul(r, g1)), ops::sum(ops::mul(y, g2)));
    });
  };
  // The separate copy adds one sum at the leaf x; the fan-in at h would add one in the engine.
  EXPECT_EQ(sums_at_h(true), sums_at_h(false) - 1.0);
}

// The kernels' accumulate_dx is the engine's sum bit for bit (dx rounded, then added), also on
// the OpenMP path (rows split over threads, each with its row buffer): in f32, against the kernel
// writing dx and ops::add.
TEST(NnNorm, AccumulateIsTheEngineSumBitForBit) {
  Generator gen(13);
  const int64_t N = 96, D = 1024;
  Tensor x = randn({N, D}, gen, 0.3, 1.0), w = randn({D}, gen), dy = randn({N, D}, gen);
  Tensor sum = randn({N, D}, gen);
  for (bool layer : {false, true}) {
    SCOPED_TRACE(layer ? "layer_norm" : "rms_norm");
    Tensor y = Tensor::empty({N, D}), mean = Tensor::empty({N}, DType::f64),
           rstd = Tensor::empty({N}, DType::f64);
    Tensor dx = Tensor::empty({N, D}), acc = sum.clone(), none;
    if (layer) {
      kernels::cpu::layer_norm_forward(x, w, Tensor(), 1e-5, y, mean, rstd);
      kernels::cpu::layer_norm_backward(dy, x, w, mean, rstd, dx, none, none);
      kernels::cpu::layer_norm_backward(dy, x, w, mean, rstd, acc, none, none, true);
    } else {
      kernels::cpu::rms_norm_forward(x, w, 1e-5, y, rstd);
      kernels::cpu::rms_norm_backward(dy, x, w, rstd, dx, none);
      kernels::cpu::rms_norm_backward(dy, x, w, rstd, acc, none, true);
    }
    EXPECT_EQ(acc.to_vector<float>(), ops::add(sum, dx).to_vector<float>());
  }
}

// ------------------------------------------------------------------ rope

TEST(NnRope, RejectsBadShapes) {
  Tensor pos = Tensor::from_vector(std::vector<int64_t>{0, 1}, {2});
  expect_error(
      [&] {
        ops::rope(Tensor::zeros({1, 2, 1, 3}), pos, 1e4);
      },
      {"[rope]", "head_dim", "even", "f32[1, 2, 1, 3]"});
  expect_error(
      [&] {
        ops::rope(Tensor::zeros({2, 4, 8}), pos, 1e4);
      },
      {"[rope]", "[B, T, H, D]", "f32[2, 4, 8]"});
  expect_error(
      [&] {
        ops::rope(Tensor::zeros({1, 3, 1, 4}), pos, 1e4);
      },
      {"[rope]", "positions", "i64[2]", "f32[1, 3, 1, 4]"});
  expect_error(
      [&] {
        ops::rope(Tensor::zeros({2, 2, 1, 4}), Tensor::zeros({2, 2}, DType::i32).view({4}), 1e4);
      },
      {"[rope]", "positions", "i32[4]"});
  expect_error(
      [&] {
        ops::rope(Tensor::zeros({1, 2, 1, 4}), Tensor::zeros({2}), 1e4);
      },
      {"[rope]", "positions", "i32 or i64"});
  expect_error([&] { ops::rope(Tensor::zeros({1, 2, 1, 4}), pos, 0.0); }, {"[rope]", "theta"});
}

TEST(NnRope, PositionZeroIsIdentity) {
  Generator gen(1);
  Tensor x = randn({2, 3, 2, 8}, gen);
  Tensor pos = Tensor::zeros({2, 3}, DType::i64);
  EXPECT_EQ(ops::rope(x, pos, 10000.0).to_vector<float>(), x.to_vector<float>());
}

// D = 2: inv_freq = [1], so position p rotates (x0, x1) by p radians.
TEST(NnRope, HeadDim2IsPlaneRotationByPositionRadians) {
  const std::vector<int64_t> ps{1, 2, 3, 1000, 32000};
  Tensor x = f64({0.6, -0.8}, {1, 1, 1, 2}).expand({1, 5, 1, 2}).contiguous();
  Tensor pos = Tensor::from_vector(ps, {5});
  auto y = ops::rope(x, pos, 10000.0).to_vector<double>();
  auto y32 = ops::rope(x.to(DType::f32), pos, 10000.0).to_vector<double>();
  for (size_t t = 0; t < ps.size(); ++t) {
    const double c = std::cos(double(ps[t])), s = std::sin(double(ps[t]));
    EXPECT_NEAR(y[2 * t], 0.6 * c + 0.8 * s, 1e-12) << "p=" << ps[t];
    EXPECT_NEAR(y[2 * t + 1], -0.8 * c + 0.6 * s, 1e-12) << "p=" << ps[t];
    // f32 data, f64 angles: an f32 angle at p = 32000 would be off by ~1e-3 rad.
    EXPECT_NEAR(y32[2 * t], 0.6 * c + 0.8 * s, 2e-7) << "p=" << ps[t];
    EXPECT_NEAR(y32[2 * t + 1], -0.8 * c + 0.6 * s, 2e-7) << "p=" << ps[t];
  }
}

// D = 4, theta = 100: inv_freq = [1, 0.1]; rotate-half pairs dims (0, 2) and (1, 3).
TEST(NnRope, HeadDim4PairsHalvesNotNeighbours) {
  Tensor x = f64({1, 2, 3, 4}, {1, 1, 1, 4});
  Tensor pos = Tensor::from_vector(std::vector<int32_t>{5}, {1});
  auto y = ops::rope(x, pos, 100.0).to_vector<double>();
  const double c0 = std::cos(5.0), s0 = std::sin(5.0), c1 = std::cos(0.5), s1 = std::sin(0.5);
  EXPECT_NEAR(y[0], 1 * c0 - 3 * s0, 1e-12);
  EXPECT_NEAR(y[1], 2 * c1 - 4 * s1, 1e-12);
  EXPECT_NEAR(y[2], 3 * c0 + 1 * s0, 1e-12);
  EXPECT_NEAR(y[3], 4 * c1 + 2 * s1, 1e-12);
}

// R(p)^T = R(-p): the gradient of sum(rope(x, p) * w) is rope(w, -p).
TEST(NnRope, GradientIsRotationByNegatedPositions) {
  Generator gen(2);
  Tensor x = randn({2, 4, 3, 6}, gen, 0.0, 1.0, DType::f64).set_requires_grad(true);
  Tensor w = randn({2, 4, 3, 6}, gen, 0.0, 1.0, DType::f64);
  std::vector<int64_t> p{7, 0, 300, 2, 31999, 5, 5, 1};
  std::vector<int64_t> np;
  for (int64_t v : p) np.push_back(-v);
  ops::sum(ops::mul(ops::rope(x, Tensor::from_vector(p, {2, 4}), 5e5), w)).backward();
  Tensor expect = ops::rope(w, Tensor::from_vector(np, {2, 4}), 5e5);
  EXPECT_LT(ops::max_abs_diff(x.grad(), expect), 1e-13);
}

// ------------------------------------------------------------------ activations

TEST(NnActivation, SwigluRejectsShapeMismatch) {
  expect_error(
      [&] {
        ops::swiglu(Tensor::zeros({2, 3}), Tensor::zeros({2, 4}));
      },
      {"[swiglu]", "f32[2, 3]", "f32[2, 4]"});
  expect_error([&] { ops::swiglu(Tensor::zeros({2}), Tensor::zeros({2}, DType::f64)); },
               {"[swiglu]", "dtype"});
  expect_error([&] { ops::gelu(Tensor::zeros({2}, DType::i64)); }, {"[gelu]", "i64[2]"});
}

// Tails and special values in f32 (the vectorized sigmoid clamps its argument internally).
TEST(NnActivation, ExtremeInputsStayFiniteAndCorrect) {
  std::vector<float> xs{-1e30f, -100.0f, -30.0f, -0.0f, 0.0f, 30.0f, 100.0f, 1e30f};
  Tensor x = Tensor::from_vector(xs, {8}).set_requires_grad(true);
  Tensor g = Tensor::from_vector(xs, {8}).set_requires_grad(true);
  Tensor u = Tensor::ones({8}).set_requires_grad(true);
  auto s = ops::silu(x).to_vector<float>();
  auto ge = ops::gelu(x).to_vector<float>();
  auto sw = ops::swiglu(g, u).to_vector<float>();
  for (size_t i = 0; i < xs.size(); ++i) {
    const double v = xs[i];
    const double silu = v / (1.0 + std::exp(-v));
    EXPECT_NEAR(s[i], silu, 1e-6 * std::fabs(silu) + 1e-30) << "silu(" << v << ")";
    EXPECT_NEAR(sw[i], silu, 1e-6 * std::fabs(silu) + 1e-30) << "swiglu(" << v << ", 1)";
    EXPECT_TRUE(std::isfinite(ge[i])) << "gelu(" << v << ")";
  }
  EXPECT_FLOAT_EQ(ge[6], 100.0f);
  EXPECT_FLOAT_EQ(ge[7], 1e30f);
  EXPECT_NEAR(ge[1], 0.0f, 1e-30);
  // silu(-30) = -30 / (1 + e^30) ~ -2.8e-12: relative precision kept far into the tail.
  EXPECT_NEAR(s[2], -30.0 / (1.0 + std::exp(30.0)), 1e-6 * 2.8e-12);
  ops::sum(ops::add(ops::silu(x), ops::gelu(x))).backward();
  ops::sum(ops::swiglu(g, u)).backward();
  for (const Tensor& t : {x.grad(), g.grad(), u.grad()})
    for (float v : t.to_vector<float>()) EXPECT_TRUE(std::isfinite(v));
  auto dx = x.grad().to_vector<float>();
  EXPECT_FLOAT_EQ(dx[6], 2.0f);  // silu' + gelu' -> 1 + 1 for large x
  EXPECT_NEAR(dx[1], 0.0f, 1e-30);
}

TEST(NnActivation, NanPropagates) {
  Tensor x = Tensor::from_vector(std::vector<float>{NAN, 1.0f}, {2});
  EXPECT_TRUE(std::isnan(ops::silu(x).to_vector<float>()[0]));
  EXPECT_TRUE(std::isnan(ops::gelu(x).to_vector<float>()[0]));
  EXPECT_TRUE(std::isnan(ops::swiglu(x, Tensor::ones({2})).to_vector<float>()[0]));
  EXPECT_TRUE(std::isnan(ops::swiglu(Tensor::ones({2}), x).to_vector<float>()[0]));
}

// The f32 activations use a hand-written vectorizable exp; sweep [-100, 100] densely against the
// f64 path (std::exp, itself checked against the naive references in tests/ops/table_nn.cpp).
// Errors are ~1 ulp of max(|ref|, 1): the derivatives take 1 - sigmoid without cancellation.
TEST(NnActivation, F32MatchesF64DenselyWithinUlps) {
  const int n = 50001;  // step 0.004
  std::vector<float> v(n);
  for (int i = 0; i < n; ++i) v[size_t(i)] = -100.0f + 200.0f * float(i) / float(n - 1);
  Tensor x32 = Tensor::from_vector(v, {n});
  Tensor up32 = ops::add_scalar(ops::mul_scalar(x32, 0.01), 0.5);  // up in [-0.5, 1.5]
  auto run = [&](DType dt) {
    // Fresh leaves (to() of the same dtype returns its input).
    Tensor x = x32.to(dt).detach().set_requires_grad(true);
    Tensor g = x32.to(dt).detach().set_requires_grad(true);
    Tensor u = up32.to(dt).detach().set_requires_grad(true);
    std::vector<Tensor> outs{ops::silu(x), ops::gelu(x), ops::swiglu(g, u)};
    Tensor w = Tensor::ones({n}, dt);
    ops::sum(ops::mul(ops::add(ops::silu(x), ops::mul_scalar(ops::gelu(x), 3.0)), w)).backward();
    ops::sum(ops::swiglu(g, u)).backward();
    outs.push_back(x.grad());
    outs.push_back(g.grad());
    outs.push_back(u.grad());
    return outs;
  };
  auto a = run(DType::f32), b = run(DType::f64);
  const char* names[] = {"silu",          "gelu",       "swiglu", "silu' + 3 gelu'",
                         "dswiglu/dgate", "dswiglu/dup"};
  for (size_t k = 0; k < a.size(); ++k) {
    auto got = a[k].to_vector<double>(), ref = b[k].to_vector<double>();
    double worst = 0;
    size_t wi = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double e = std::fabs(got[i] - ref[i]) / (std::fabs(ref[i]) + 1.0);
      if (!(e <= worst)) worst = e, wi = i;
    }
    EXPECT_LT(worst, 5e-7) << names[k] << " at x = " << v[wi] << ": " << got[wi] << " vs "
                           << ref[wi];
  }
}
