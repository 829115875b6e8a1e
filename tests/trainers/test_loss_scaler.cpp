// LossScaler (trainers/loss_scaler.h): torch.amp.GradScaler's defaults and update rule, the f32
// cap on growth, fixed scales, the saved state; unscale_grads / unscale_buffers on CPU tensors
// (f32 and bf16 in place, f16 into f32, found_inf).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "core/error.h"
#include "trainers/loss_scaler.h"

namespace ftune {
namespace {

TEST(LossScaler, DefaultsAreTorchGradScalers) {
  LossScaler s;
  EXPECT_EQ(s.scale(), 65536.0);
  EXPECT_EQ(s.options().growth_factor, 2.0);
  EXPECT_EQ(s.options().backoff_factor, 0.5);
  EXPECT_EQ(s.options().growth_interval, 2000);
  EXPECT_TRUE(s.options().dynamic);
  EXPECT_EQ(s.growth_tracker(), 0);
}

TEST(LossScaler, BacksOffOnOverflowAndGrowsAfterTheInterval) {
  LossScalerOptions o;
  o.init_scale = 1024;
  o.growth_interval = 3;
  LossScaler s(o);
  // (found_inf, scale after, tracker after), as torch's _amp_update_scale_ steps them.
  const struct {
    bool inf;
    double scale;
    int64_t tracker;
  } seq[] = {{false, 1024, 1}, {false, 1024, 2}, {false, 2048, 0}, {true, 1024, 0},
             {true, 512, 0},   {false, 512, 1},  {true, 256, 0},   {false, 256, 1},
             {false, 256, 2},  {false, 512, 0},  {false, 512, 1}};
  int i = 0;
  for (const auto& e : seq) {
    s.update(e.inf);
    EXPECT_EQ(s.scale(), e.scale) << "update " << i;
    EXPECT_EQ(s.growth_tracker(), e.tracker) << "update " << i;
    ++i;
  }
}

TEST(LossScaler, GrowthStopsAtTheLargestF32PowerOfTwo) {
  LossScalerOptions o;
  o.init_scale = std::ldexp(1.0, 127);
  o.growth_interval = 1;
  LossScaler s(o);
  s.update(false);  // 2^128 is not an f32: kept, and the count restarts
  EXPECT_EQ(s.scale(), std::ldexp(1.0, 127));
  EXPECT_EQ(s.growth_tracker(), 0);
  s.update(true);
  EXPECT_EQ(s.scale(), std::ldexp(1.0, 126));
  s.update(false);
  EXPECT_EQ(s.scale(), std::ldexp(1.0, 127));
}

TEST(LossScaler, AFixedScaleNeverChanges) {
  LossScalerOptions o;
  o.init_scale = 300;
  o.dynamic = false;
  LossScaler s(o);
  for (bool inf : {true, false, true, false, false}) s.update(inf);
  EXPECT_EQ(s.scale(), 300.0);
}

TEST(LossScaler, StateRoundTripsExactly) {
  LossScalerOptions o;
  o.init_scale = 1000;  // not a power of two: the saved double must be exact
  o.growth_interval = 5;
  LossScaler a(o);
  for (bool inf : {true, true, false, false, true, false, false, false}) a.update(inf);
  // The state survives a trip through JSON text (as in the checkpoint's trainer_state).
  nlohmann::json saved = nlohmann::json::parse(a.state().dump());
  LossScaler b(o);
  b.load_state(saved);
  EXPECT_EQ(b.scale(), a.scale());
  EXPECT_EQ(b.growth_tracker(), a.growth_tracker());
  EXPECT_EQ(b.growth_tracker(), 3);
  for (bool inf : {false, false, true, false}) {
    a.update(inf);
    b.update(inf);
    EXPECT_EQ(a.scale(), b.scale());
  }
  // A fixed scaler keeps its scale; so does a dynamic one given a fixed scaler's state.
  LossScalerOptions f = o;
  f.dynamic = false;
  f.init_scale = 77;
  LossScaler fixed(f);
  fixed.load_state(saved);
  EXPECT_EQ(fixed.scale(), 77.0);
  LossScaler dyn(o);
  dyn.load_state(fixed.state());
  EXPECT_EQ(dyn.scale(), 1000.0);
  // Bad states name the problem.
  EXPECT_THROW(b.load_state(nlohmann::json{{"scale", "big"}, {"growth_tracker", 0}}), Error);
  EXPECT_THROW(b.load_state(nlohmann::json{{"scale", -1.0}, {"growth_tracker", 0}}), Error);
  EXPECT_THROW(b.load_state(nlohmann::json{{"scale", 4.0}}), Error);
}

TEST(LossScaler, BadOptionsAreRefused) {
  auto make = [](auto edit) {
    LossScalerOptions o;
    edit(o);
    return LossScaler(o);
  };
  EXPECT_THROW(make([](LossScalerOptions& o) { o.init_scale = 0; }), Error);
  EXPECT_THROW(make([](LossScalerOptions& o) { o.init_scale = 1e39; }), Error);
  EXPECT_THROW(make([](LossScalerOptions& o) { o.init_scale = NAN; }), Error);
  EXPECT_THROW(make([](LossScalerOptions& o) { o.growth_factor = 1; }), Error);
  EXPECT_THROW(make([](LossScalerOptions& o) { o.backoff_factor = 1; }), Error);
  EXPECT_THROW(make([](LossScalerOptions& o) { o.growth_interval = 0; }), Error);
}

Tensor param_with_grad(DType dt, const std::vector<float>& g) {
  Tensor p = Tensor::zeros({int64_t(g.size())}, dt).set_requires_grad();
  p.set_grad(Tensor::from_vector<float>(g, {int64_t(g.size())}).to(dt));
  return p;
}

TEST(UnscaleGrads, DividesEveryGradientAndWidensF16) {
  const float s = 4096.0f;
  Tensor a = param_with_grad(DType::f32, {4096.0f, -8192.0f, 3.0f});
  Tensor b = param_with_grad(DType::bf16, {4096.0f, 1.0f});
  // 2^-14 * 4096: unscaled it is 2^-26, below f16's subnormals (f16 would flush it to zero).
  Tensor c = param_with_grad(DType::f16, {std::ldexp(1.0f, -14), 2048.0f});
  Tensor d = Tensor::zeros({2}).set_requires_grad();  // no gradient: left alone
  Tensor c_grad_before = c.grad();
  EXPECT_FALSE(unscale_grads({a, b, c, d}, s));
  EXPECT_EQ(a.grad().to_vector<float>(), (std::vector<float>{1.0f, -2.0f, 3.0f / 4096.0f}));
  EXPECT_EQ(b.grad().dtype(), DType::bf16);
  EXPECT_EQ(b.grad().to_vector<float>(), (std::vector<float>{1.0f, 1.0f / 4096.0f}));
  EXPECT_EQ(c.grad().dtype(), DType::f32);
  EXPECT_FALSE(c.grad().same(c_grad_before));
  EXPECT_EQ(c.grad().to_vector<float>(), (std::vector<float>{std::ldexp(1.0f, -26), 0.5f}));
  EXPECT_FALSE(d.grad().defined());
}

TEST(UnscaleGrads, FindsInfAndNanInAnyTensor) {
  const float inf = std::numeric_limits<float>::infinity();
  for (int where = 0; where < 3; ++where) {
    Tensor a = param_with_grad(DType::f32, {1.0f, where == 0 ? inf : 2.0f});
    Tensor b = param_with_grad(DType::bf16, {where == 1 ? -inf : 1.0f});
    Tensor c = param_with_grad(DType::f16, {1.0f, 2.0f, where == 2 ? std::nanf("") : 3.0f});
    EXPECT_TRUE(unscale_grads({a, b, c}, 2.0)) << where;
  }
  Tensor a = param_with_grad(DType::f32, {1.0f, 2.0f});
  EXPECT_FALSE(unscale_grads({a}, 2.0));
  EXPECT_THROW(unscale_grads({a}, 0.0), Error);
}

TEST(UnscaleGrads, BuffersInPlace) {
  const float inf = std::numeric_limits<float>::infinity();
  Tensor x = Tensor::from_vector<float>({2.0f, 4.0f}, {2});
  Tensor y = Tensor::from_vector<float>({8.0f, inf}, {2});
  EXPECT_FALSE(unscale_buffers({x}, 2.0));
  EXPECT_EQ(x.to_vector<float>(), (std::vector<float>{1.0f, 2.0f}));
  EXPECT_TRUE(unscale_buffers({x, y}, 2.0));
  EXPECT_EQ(y.to_vector<float>()[0], 4.0f);  // written all the same, as torch
}

}  // namespace
}  // namespace ftune
