// lora_linear beyond the op table: the dropout mask, frozen base weights, partial gradients
// (each backward path of the kernel), and bad inputs.
#include <gtest/gtest.h>

#include <cmath>

#include "core/ops.h"
#include "core/rng.h"
#include "kernels/lora.h"

using namespace ftune;

namespace {

struct Lora {
  Tensor x, w, b, a, bb;
};

Lora make(Shape xs, int64_t out, int64_t r, DType dt = DType::f64, uint64_t seed = 3) {
  Generator g(seed);
  const int64_t in = xs.back();
  return {randn(xs, g, 0, 1, dt), randn({out, in}, g, 0, 1, dt), randn({out}, g, 0, 1, dt),
          randn({r, in}, g, 0, 1, dt), randn({out, r}, g, 0, 1, dt)};
}

}  // namespace

TEST(LoraLinear, DropoutMaskFollowsThePhiloxRuleAndRate) {
  const int64_t n = 1 << 18;
  const double p = 0.25;
  std::vector<float> x(n, 1.0f), y(n);
  kernels::cpu::lora_dropout<float>(x.data(), y.data(), n, p, 42);
  int64_t dropped = 0;
  for (int64_t i = 0; i < n; ++i) {
    bool drop = double(philox_uniform(42, kernels::kLoraDropoutStream, uint64_t(i))) < p;
    ASSERT_EQ(y[i], drop ? 0.0f : float(1.0 / (1.0 - p))) << "element " << i;
    dropped += drop;
  }
  // 2^18 Bernoulli(0.25) draws: the standard deviation of the rate is under 0.001.
  EXPECT_NEAR(double(dropped) / n, p, 0.005);
  std::vector<uint8_t> keep(n);
  kernels::cpu::lora_dropout_keep(keep.data(), n, p, 42);
  for (int64_t i = 0; i < n; ++i) ASSERT_EQ(keep[i], y[i] != 0.0f) << "element " << i;
}

// A column slice of the input (a row-parallel shard) draws exactly its slice of the full input's
// mask, for offsets and widths off the 4-element Philox blocks and rows longer than one task.
TEST(LoraLinear, ColumnSliceMaskIsTheSliceOfTheFullMask) {
  const double p = 0.3;
  const uint64_t seed = 77;
  struct Case {
    int64_t rows, full, offset, width;
  };
  for (Case c : {Case{5, 16, 8, 8}, Case{3, 11, 3, 5}, Case{4, 7, 0, 6}, Case{2, 2503, 1, 2501},
                 Case{9, 10, 9, 1}}) {
    SCOPED_TRACE(testing::Message() << "rows " << c.rows << " full " << c.full << " cols ["
                                    << c.offset << ", +" << c.width << ")");
    const int64_t nf = c.rows * c.full, n = c.rows * c.width;
    Generator g(c.full);
    std::vector<double> xf = randn({nf}, g, 0, 1, DType::f64).to_vector<double>();
    std::vector<double> yf(nf), x(n), acc(n, 0.5), y(n);
    std::vector<uint8_t> keepf(nf), keep(n);
    kernels::cpu::lora_dropout<double>(xf.data(), yf.data(), nf, p, seed);
    kernels::cpu::lora_dropout_keep(keepf.data(), nf, p, seed);
    for (int64_t i = 0; i < c.rows; ++i)
      for (int64_t j = 0; j < c.width; ++j) x[i * c.width + j] = xf[i * c.full + c.offset + j];
    const kernels::LoraMaskCols cols{c.width, c.offset, c.full};
    kernels::cpu::lora_dropout<double>(x.data(), y.data(), n, p, seed, cols);
    kernels::cpu::lora_dropout_accumulate<double>(acc.data(), x.data(), n, p, seed, cols);
    kernels::cpu::lora_dropout_keep(keep.data(), n, p, seed, cols);
    for (int64_t i = 0; i < c.rows; ++i)
      for (int64_t j = 0; j < c.width; ++j) {
        const int64_t e = i * c.width + j, f = i * c.full + c.offset + j;
        ASSERT_EQ(y[e], yf[f]) << "row " << i << " col " << j;
        ASSERT_NEAR(acc[e], 0.5 + yf[f], 1e-14) << "row " << i << " col " << j;  // FMA
        ASSERT_EQ(keep[e], keepf[f]) << "row " << i << " col " << j;
      }
  }
  // Offset 0 with the full width is the whole input: the plain mask.
  std::vector<float> x(60, 1.0f), a(60), b(60);
  kernels::cpu::lora_dropout<float>(x.data(), a.data(), 60, p, seed);
  kernels::cpu::lora_dropout<float>(x.data(), b.data(), 60, p, seed, {12, 0, 12});
  EXPECT_EQ(a, b);
  EXPECT_THROW(kernels::cpu::lora_dropout<float>(x.data(), b.data(), 60, p, seed, {12, 5, 12}),
               Error);
}

// lora_linear on column slices of x (its in_offset / in_full) computes the slices' share of the
// full op with the full mask: the shares sum to the full output, and dx to the full dx.
TEST(LoraLinear, ColumnSlicesSumToTheFullOpWithDropout) {
  Lora l = make({3, 4, 10}, 5, 2);
  const double p = 0.4;
  for (auto* t : {&l.x, &l.a, &l.bb}) t->set_requires_grad(true);
  Tensor y = ops::lora_linear(l.x, l.w, Tensor(), l.a, l.bb, 1.5, p, 11);
  Generator g4(4);
  Tensor gy = randn(y.shape(), g4, 0, 1, DType::f64);
  y.backward(gy);
  Tensor sum = Tensor::zeros(y.shape(), DType::f64);
  for (int64_t off : {0, 3, 7}) {  // slices [0, 3), [3, 7), [7, 10)
    const int64_t w = off == 0 ? 3 : off == 3 ? 4 : 3;
    Tensor xs = l.x.detach().slice(2, off, off + w).contiguous().set_requires_grad(true);
    Tensor as = l.a.detach().slice(1, off, off + w).contiguous().set_requires_grad(true);
    Tensor ys = ops::lora_linear(xs, l.w.slice(1, off, off + w), Tensor(), as, l.bb.detach(),
                                 1.5, p, 11, off, 10);
    ys.backward(gy);
    sum = ops::add(sum, ys);
    EXPECT_LT(ops::max_abs_diff(xs.grad(), l.x.grad().slice(2, off, off + w)), 1e-12) << off;
    EXPECT_LT(ops::max_abs_diff(as.grad(), l.a.grad().slice(1, off, off + w)), 1e-12) << off;
  }
  EXPECT_LT(ops::max_abs_diff(sum, y), 1e-12);
  EXPECT_THROW(ops::lora_linear(l.x, l.w, Tensor(), l.a, l.bb, 1.5, p, 11, 1, 10), Error);
}

TEST(LoraLinear, SeedSelectsTheMask) {
  Lora l = make({16, 32}, 8, 4);
  Tensor y1 = ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 0.3, 1);
  Tensor y1b = ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 0.3, 1);
  Tensor y2 = ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 0.3, 2);
  EXPECT_EQ(ops::max_abs_diff(y1, y1b), 0.0);
  EXPECT_GT(ops::max_abs_diff(y1, y2), 1e-3);
}

TEST(LoraLinear, NoDropoutEqualsComposedOps) {
  Lora l = make({2, 5, 12}, 7, 3);
  Tensor y = ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 0.75);
  Tensor lora = ops::matmul(ops::matmul(l.x, l.a.transpose(0, 1)), l.bb.transpose(0, 1));
  Tensor ref = ops::add(ops::linear(l.x, l.w, l.b), ops::mul_scalar(lora, 0.75));
  EXPECT_LT(ops::max_abs_diff(y, ref), 1e-12);
  // A transposed (non-contiguous) x gives the same result.
  Tensor xt = l.x.transpose(0, 1).contiguous().transpose(0, 1);
  ASSERT_FALSE(xt.is_contiguous());
  EXPECT_LT(ops::max_abs_diff(ops::lora_linear(xt, l.w, l.b, l.a, l.bb, 0.75), y), 1e-12);
}

TEST(LoraLinear, BaseWeightAndBiasGetNoGradient) {
  Lora l = make({4, 6}, 5, 2);
  l.w.set_requires_grad(true);
  l.b.set_requires_grad(true);
  // Only frozen inputs require grad: nothing is recorded.
  EXPECT_FALSE(ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0).requires_grad());
  l.a.set_requires_grad(true);
  l.bb.set_requires_grad(true);
  ops::sum(ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 0.1, 5)).backward();
  EXPECT_FALSE(l.w.grad().defined());
  EXPECT_FALSE(l.b.grad().defined());
  EXPECT_TRUE(l.a.grad().defined());
  EXPECT_TRUE(l.bb.grad().defined());
}

// Each subset of {x, A, B} takes its own path through the backward kernel (with dropout: the
// mask drawn once into bytes, or regenerated per use); all must agree with the full backward.
TEST(LoraLinear, PartialGradientsMatchFullBackward) {
  for (double p : {0.0, 0.2}) {
    Lora l = make({3, 4, 10}, 6, 3);
    Generator g(11);
    Tensor gy = randn({3, 4, 6}, g, 0, 1, DType::f64);
    auto grads = [&](bool gx, bool ga, bool gb) {
      Tensor x = l.x.clone().set_requires_grad(gx);
      Tensor a = l.a.clone().set_requires_grad(ga);
      Tensor b = l.bb.clone().set_requires_grad(gb);
      ops::lora_linear(x, l.w, l.b, a, b, 1.25, p, 77).backward(gy);
      return std::vector<Tensor>{x.grad(), a.grad(), b.grad()};
    };
    auto full = grads(true, true, true);
    for (int mask = 1; mask < 7; ++mask) {
      auto part = grads(mask & 1, mask & 2, mask & 4);
      for (int i = 0; i < 3; ++i) {
        SCOPED_TRACE("p " + std::to_string(p) + " mask " + std::to_string(mask) + " input " +
                     std::to_string(i));
        ASSERT_EQ(part[i].defined(), bool(mask & (1 << i)));
        if (part[i].defined()) EXPECT_LT(ops::max_abs_diff(part[i], full[i]), 1e-12);
      }
    }
  }
}

TEST(LoraLinear, DropoutGradientOfXIsMaskedAndScaled) {
  // W = 0 isolates the LoRA path: dx = drop'(scale * g B A), zero exactly where x was dropped.
  Lora l = make({8, 16}, 4, 2);
  Tensor w0 = Tensor::zeros({4, 16}, DType::f64);
  Tensor x = l.x.clone().set_requires_grad(true);
  ops::sum(ops::lora_linear(x, w0, Tensor(), l.a, l.bb, 1.0, 0.5, 9)).backward();
  auto gx = x.grad().to_vector<double>();
  int zeros = 0;
  for (size_t i = 0; i < gx.size(); ++i) {
    bool drop = double(philox_uniform(9, kernels::kLoraDropoutStream, i)) < 0.5;
    if (drop) EXPECT_EQ(gx[i], 0.0) << i;
    zeros += drop;
  }
  EXPECT_GT(zeros, 20);
  EXPECT_LT(zeros, 108);
}

TEST(LoraLinear, EmptyBatch) {
  Lora l = make({0, 6}, 5, 2);
  l.a.set_requires_grad(true);
  l.bb.set_requires_grad(true);
  Tensor y = ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 0.1, 1);
  EXPECT_EQ(y.shape(), (Shape{0, 5}));
  y.backward(Tensor::zeros({0, 5}, DType::f64));
  EXPECT_EQ(ops::max_abs_diff(l.a.grad(), Tensor::zeros({2, 6}, DType::f64)), 0.0);
  EXPECT_EQ(ops::max_abs_diff(l.bb.grad(), Tensor::zeros({5, 2}, DType::f64)), 0.0);
}

TEST(LoraLinear, BadInputsThrowNamingTheOp) {
  Lora l = make({4, 6}, 5, 2, DType::f32);
  auto throws = [](auto f, const char* what) {
    try {
      f();
      ADD_FAILURE() << "no throw: " << what;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("[lora_linear]"), std::string::npos) << e.what();
    }
  };
  throws([&] { ops::lora_linear(l.x, l.w, l.b, l.a.transpose(0, 1), l.bb, 1.0); }, "A shape");
  throws([&] { ops::lora_linear(l.x, l.w, l.b, l.a, l.bb.transpose(0, 1), 1.0); }, "B shape");
  throws([&] { ops::lora_linear(l.x, l.w.transpose(0, 1), l.b, l.a, l.bb, 1.0); }, "W shape");
  throws([&] { ops::lora_linear(l.x, l.w, Tensor::zeros({4}), l.a, l.bb, 1.0); }, "bias");
  throws([&] { ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, 1.0); }, "dropout 1");
  throws([&] { ops::lora_linear(l.x, l.w, l.b, l.a, l.bb, 1.0, -0.1); }, "dropout < 0");
  throws([&] { ops::lora_linear(l.x, l.w, l.b, l.a.to(DType::f64), l.bb, 1.0); }, "dtype");
  throws([&] { ops::lora_linear(l.x, l.w, l.b, Tensor(), l.bb, 1.0); }, "undefined A");
}
