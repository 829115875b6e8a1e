// AdamW (against an f64 reference written from the formula, and against torch through the
// committed fixture tests/fixtures/optim_adamw.json), LR schedules and gradient clipping.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <omp.h>

#include "core/ops.h"
#include "core/optim.h"
#include "core/rng.h"

using namespace ftune;
using namespace ftune::optim;

namespace {

// One param of the f64 reference: torch.optim.AdamW's single-tensor loop, term by term.
struct RefParam {
  std::vector<double> p, m, v;
  int64_t t = 0;
  void step(const std::vector<double>& g, double lr, double wd, double b1, double b2, double eps) {
    ++t;
    const double bc1 = 1 - std::pow(b1, double(t)), bc2 = 1 - std::pow(b2, double(t));
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      p[i] -= lr * (m[i] / bc1) / (std::sqrt(v[i] / bc2) + eps);
    }
  }
};

RefParam ref_of(const Tensor& p) {
  auto v = p.to_vector<double>();
  return {v, std::vector<double>(v.size(), 0.0), std::vector<double>(v.size(), 0.0)};
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) d = std::max(d, std::fabs(a[i] - b[i]));
  return d;
}

const Tensor& state_tensor(const OptimizerState& st, const std::string& name) {
  for (const auto& [n, t] : st.tensors)
    if (n == name) return t;
  ADD_FAILURE() << "no state tensor " << name;
  static Tensor none;
  return none;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// Two groups (decay on the matrix only, a half lr on the vector), a changing lr, and a step on
// which one param has no gradient: its own step count lags, which changes its bias correction.
TEST(AdamW, MatchesF64ReferenceWithGroupsAndSkippedParams) {
  Generator gen(1);
  Tensor w = randn({6, 9}, gen).set_requires_grad(true);
  Tensor b = randn({9}, gen).set_requires_grad(true);
  AdamWOptions o;
  o.lr = 1e-2;
  o.beta1 = 0.8;
  o.beta2 = 0.99;
  o.weight_decay = 0.3;  // the default: w's group leaves it unset
  ParamGroup gw{{{"w", w}}};
  ParamGroup gb{{{"b", b}}, 0.5, 0.0};
  AdamW opt({gw, gb}, o);
  RefParam rw = ref_of(w), rb = ref_of(b);
  for (int step = 0; step < 6; ++step) {
    const double lr = 1e-2 * (1.0 - 0.1 * step);
    Tensor g1 = randn(w.shape(), gen), g2 = randn(b.shape(), gen, 0.0, 3.0);
    w.set_grad(g1);
    if (step != 2) b.set_grad(g2);
    opt.set_lr(lr);
    opt.step();
    rw.step(g1.to_vector<double>(), lr, 0.3, o.beta1, o.beta2, o.eps);
    if (step != 2) rb.step(g2.to_vector<double>(), lr * 0.5, 0.0, o.beta1, o.beta2, o.eps);
    opt.zero_grad();
    EXPECT_FALSE(w.grad().defined());
    EXPECT_FALSE(b.grad().defined());
    // f32 against f64: a few ulps per step on values of order 1.
    EXPECT_LT(max_diff(w.to_vector<double>(), rw.p), 2e-6) << "step " << step;
    EXPECT_LT(max_diff(b.to_vector<double>(), rb.p), 2e-6) << "step " << step;
  }
  EXPECT_EQ(opt.step_count(), 6);
  OptimizerState st = opt.export_state();
  EXPECT_EQ(st.step, 6);
  EXPECT_EQ(state_tensor(st, "w.step").item(), 6);
  EXPECT_EQ(state_tensor(st, "b.step").item(), 5);
  EXPECT_LT(max_diff(state_tensor(st, "w.exp_avg").to_vector<double>(), rw.m), 1e-6);
  EXPECT_LT(max_diff(state_tensor(st, "b.exp_avg_sq").to_vector<double>(), rb.v), 1e-5);
}

TEST(AdamW, WeightDecayIsDecoupled) {
  // Zero gradient: m = v = 0, so the Adam term is 0 and only p *= 1 - lr * wd remains.
  Tensor p = Tensor::full({4}, 2.0).set_requires_grad(true);
  AdamWOptions o;
  o.lr = 0.1;
  o.weight_decay = 0.5;
  AdamW opt({ParamGroup{{{"p", p}}, 2.0}}, o);  // lr_scale 2: group lr 0.2
  p.set_grad(Tensor::zeros({4}));
  opt.step();
  for (double x : p.to_vector<double>()) EXPECT_FLOAT_EQ(x, 2.0 * (1 - 0.2 * 0.5));
}

// A bf16 param is updated through an f32 master: the master follows exactly the f32 run with
// the same (bf16-representable) gradients, and the param is the master rounded to bf16.
TEST(AdamW, Bf16ParamKeepsAnF32Master) {
  Generator gen(5);
  Tensor init = randn({257}, gen).to(DType::bf16).to(DType::f32);  // bf16-exact start
  Tensor p32 = init.clone().set_requires_grad(true);
  Tensor p16 = init.to(DType::bf16).set_requires_grad(true);
  Tensor p16f = init.to(DType::bf16).set_requires_grad(true);  // bf16 param, f32 gradients
  AdamWOptions o;
  o.lr = 1e-4;  // updates far below bf16's resolution: only the master remembers them
  AdamW a32({ParamGroup{{{"p", p32}}}}, o), a16({ParamGroup{{{"p", p16}}}}, o),
      a16f({ParamGroup{{{"p", p16f}}}}, o);
  for (int step = 0; step < 20; ++step) {
    Tensor g = randn({257}, gen).to(DType::bf16);
    p32.set_grad(g.to(DType::f32));
    p16.set_grad(g);
    p16f.set_grad(g.to(DType::f32));
    a32.step();
    a16.step();
    a16f.step();
  }
  for (AdamW* a : {&a16, &a16f}) {
    Tensor master = state_tensor(a->export_state(), "p.master");
    ASSERT_EQ(master.dtype(), DType::f32);
    EXPECT_EQ(ops::max_abs_diff(master, p32), 0.0);
  }
  EXPECT_EQ(ops::max_abs_diff(p16.to(DType::f32), p32.to(DType::bf16).to(DType::f32)), 0.0);
  EXPECT_EQ(ops::max_abs_diff(p16f, p16), 0.0);
  // The f32 run moved by ~20 * lr; without the master most bf16 values could not have moved.
  EXPECT_GT(ops::max_abs_diff(p32, init), 1e-3);
}

TEST(AdamW, MasterIsTakenAtTheFirstUpdate) {
  // Weights loaded after the optimizer is made (before any step) are not lost.
  Tensor p = Tensor::zeros({3}, DType::bf16).set_requires_grad(true);
  AdamWOptions o;
  o.weight_decay = 0;
  AdamW opt({ParamGroup{{{"p", p}}}}, o);
  p.copy_(Tensor::full({3}, 5.0));
  p.set_grad(Tensor::zeros({3}, DType::bf16));
  opt.step();
  EXPECT_EQ(p.to_vector<double>(), (std::vector<double>{5.0, 5.0, 5.0}));
}

// Export, import into a fresh optimizer over copies of the params, continue both: bit-identical.
TEST(AdamW, StateRoundTripContinuesExactly) {
  Generator gen(8);
  auto make = [&](Tensor& w, Tensor& h) {
    ParamGroup g1{{{"layer.weight", w}}, 1.0, 0.1};
    ParamGroup g2{{{"layer.h16", h}}, 0.5, 0.0};
    AdamWOptions o;
    o.lr = 3e-3;
    return AdamW({g1, g2}, o);
  };
  Tensor w1 = randn({5, 4}, gen).set_requires_grad(true);
  Tensor h1 = randn({7}, gen).to(DType::bf16).set_requires_grad(true);
  AdamW a = make(w1, h1);
  std::vector<std::pair<Tensor, Tensor>> grads;
  for (int i = 0; i < 6; ++i)
    grads.emplace_back(randn({5, 4}, gen), randn({7}, gen).to(DType::bf16));
  for (int i = 0; i < 3; ++i) {
    w1.set_grad(grads[i].first);
    h1.set_grad(grads[i].second);
    a.step();
  }
  OptimizerState st = a.export_state();
  EXPECT_EQ(st.tensors.size(), 3u + 4u);  // bf16 param: + master
  Tensor w2 = w1.detach().clone().set_requires_grad(true);
  Tensor h2 = Tensor::zeros({7}, DType::bf16).set_requires_grad(true);  // set from the master
  AdamW b = make(w2, h2);
  b.import_state(st);
  EXPECT_EQ(b.step_count(), 3);
  EXPECT_EQ(ops::max_abs_diff(h2.to(DType::f32), h1.to(DType::f32)), 0.0);
  for (int i = 3; i < 6; ++i) {
    for (auto [w, h] : {std::pair{w1, h1}, std::pair{w2, h2}}) {
      w.set_grad(grads[i].first);
      h.set_grad(grads[i].second);
    }
    a.step();
    b.step();
  }
  EXPECT_EQ(ops::max_abs_diff(w1, w2), 0.0);
  EXPECT_EQ(ops::max_abs_diff(h1.to(DType::f32), h2.to(DType::f32)), 0.0);
  EXPECT_EQ(ops::max_abs_diff(state_tensor(a.export_state(), "layer.h16.exp_avg_sq"),
                              state_tensor(b.export_state(), "layer.h16.exp_avg_sq")),
            0.0);
}

// A run may resume with its params in another dtype: f32 state into bf16 params (no master:
// taken from the param) and back (the master is ignored).
TEST(AdamW, ImportAcrossParamDtypes) {
  Generator gen(12);
  Tensor p = randn({9}, gen).set_requires_grad(true);
  AdamW a({ParamGroup{{{"p", p}}}});
  for (int i = 0; i < 2; ++i) {
    p.set_grad(randn({9}, gen));
    a.step();
  }
  const OptimizerState st32 = a.export_state();
  Tensor q = p.detach().to(DType::bf16).set_requires_grad(true);
  Tensor q32 = q.detach().to(DType::f32).set_requires_grad(true);  // the f32 twin of q
  AdamW b({ParamGroup{{{"p", q}}}}), b32({ParamGroup{{{"p", q32}}}});
  b.import_state(st32);
  b32.import_state(st32);
  Tensor g = randn({9}, gen).to(DType::bf16);
  q.set_grad(g);
  q32.set_grad(g.to(DType::f32));
  b.step();
  b32.step();
  EXPECT_EQ(ops::max_abs_diff(state_tensor(b.export_state(), "p.master"), q32), 0.0);
  AdamW c({ParamGroup{{{"p", Tensor::zeros({9}).set_requires_grad(true)}}}});
  c.import_state(b.export_state());  // has "p.master": ignored for an f32 param
  EXPECT_EQ(c.step_count(), 3);
}

TEST(AdamW, ImportRejectsForeignStateAndChangesNothing) {
  Tensor w = Tensor::ones({2, 3}).set_requires_grad(true);
  AdamW opt({ParamGroup{{{"w", w}}}});
  w.set_grad(Tensor::ones({2, 3}));
  opt.step();
  const OptimizerState good = opt.export_state();
  auto with = [&](auto edit) {
    OptimizerState s = good;
    for (auto& [n, t] : s.tensors) t = t.clone();
    edit(s);
    return s;
  };
  OptimizerState missing = with([](OptimizerState& s) { s.tensors.pop_back(); });
  OptimizerState extra =
      with([](OptimizerState& s) { s.tensors.emplace_back("q.exp_avg", Tensor::zeros({1})); });
  OptimizerState shape = with([](OptimizerState& s) {
    s.tensors[0].second = Tensor::zeros({3, 2});
  });
  OptimizerState twice = with([](OptimizerState& s) { s.tensors.push_back(s.tensors[0]); });
  OptimizerState poisoned = with([](OptimizerState& s) {
    s.step = 99;
    s.tensors[0].second.fill_(7.0);
    s.tensors.emplace_back("other.step", Tensor::zeros({}));
  });
  EXPECT_NE(error_of([&] { opt.import_state(missing); }).find("has no tensor 'w."),
            std::string::npos);
  EXPECT_NE(error_of([&] { opt.import_state(extra); }).find("'q.exp_avg' belongs to no parameter"),
            std::string::npos);
  EXPECT_NE(error_of([&] { opt.import_state(shape); }).find("expected shape [2, 3]"),
            std::string::npos);
  EXPECT_NE(error_of([&] { opt.import_state(twice); }).find("twice"), std::string::npos);
  EXPECT_NE(error_of([&] { opt.import_state(poisoned); }).find("[adamw]"), std::string::npos);
  // Nothing of the rejected states got in.
  OptimizerState now = opt.export_state();
  EXPECT_EQ(now.step, 1);
  EXPECT_EQ(ops::max_abs_diff(state_tensor(now, "w.exp_avg"), state_tensor(good, "w.exp_avg")),
            0.0);
}

TEST(AdamW, RejectsBadParams) {
  Tensor w = Tensor::ones({2}).set_requires_grad(true);
  EXPECT_NE(error_of([&] {
              AdamW({ParamGroup{{{"a", w}, {"b", w}}}});
            }).find("already in the optimizer"),
            std::string::npos);
  Tensor v = Tensor::ones({2}).set_requires_grad(true);
  EXPECT_NE(error_of([&] {
              AdamW({ParamGroup{{{"a", w}}}, ParamGroup{{{"a", v}}}});
            }).find("two parameters"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              AdamW({ParamGroup{{{"d", Tensor::ones({2}, DType::f64)}}}});
            }).find("f32, bf16 or f16"),
            std::string::npos);
  AdamWOptions o;
  o.beta2 = 1.0;
  EXPECT_NE(error_of([&] { AdamW({ParamGroup{{{"a", w}}}}, o); }).find("betas"), std::string::npos);
}

TEST(AdamW, DecayGroupsSplitMatricesFromVectors) {
  NamedTensors ps = {{"a.weight", Tensor::ones({2, 3})},
                     {"a.bias", Tensor::ones({2})},
                     {"norm.weight", Tensor::ones({3})},
                     {"b.weight", Tensor::ones({3, 2, 2})}};
  auto gs = decay_groups(ps, 0.1);
  ASSERT_EQ(gs.size(), 2u);
  ASSERT_EQ(gs[0].params.size(), 2u);
  EXPECT_EQ(gs[0].params[0].first, "a.weight");
  EXPECT_EQ(gs[0].params[1].first, "b.weight");
  EXPECT_EQ(gs[0].weight_decay.value(), 0.1);
  ASSERT_EQ(gs[1].params.size(), 2u);
  EXPECT_EQ(gs[1].params[0].first, "a.bias");
  EXPECT_EQ(gs[1].weight_decay.value(), 0.0);
  EXPECT_EQ(decay_groups({{"v", Tensor::ones({2})}}, 0.1).size(), 1u);
}

// ---------------------------------------------------------------- torch fixture

TEST(AdamW, MatchesTorchFixture) {
  std::ifstream f(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/optim_adamw.json");
  ASSERT_TRUE(f)
      << "missing tests/fixtures/optim_adamw.json (tests/fixtures/make_optim_fixture.py)";
  const nlohmann::json fx = nlohmann::json::parse(f)["adamw"];
  auto tensor = [&](const nlohmann::json& values, const std::string& name) {
    Shape s = fx["shapes"][name].get<Shape>();
    return Tensor::from_vector(values.get<std::vector<float>>(), s);
  };
  std::map<std::string, Tensor> params;
  for (const auto& [name, v] : fx["init"].items())
    params[name] = tensor(v, name).set_requires_grad(true);
  std::vector<ParamGroup> groups;
  for (const auto& g : fx["groups"]) {
    ParamGroup pg;
    for (const auto& n : g["params"])
      pg.params.emplace_back(n.get<std::string>(), params.at(n.get<std::string>()));
    pg.lr_scale = g["lr_scale"].get<double>();
    pg.weight_decay = g["weight_decay"].get<double>();
    groups.push_back(pg);
  }
  AdamWOptions o;
  o.beta1 = fx["beta1"].get<double>();
  o.beta2 = fx["beta2"].get<double>();
  o.eps = fx["eps"].get<double>();
  AdamW opt(groups, o);
  for (const auto& st : fx["steps"]) {
    for (const auto& [name, g] : st["grads"].items()) {
      if (g.is_null())
        params.at(name).zero_grad();
      else
        params.at(name).set_grad(tensor(g, name));
    }
    opt.set_lr(st["lr"].get<double>());
    opt.step();
  }
  // torch runs the same f32 formula; left: its lerp for m and rounding order, about an ulp.
  for (const auto& [name, v] : fx["expected"].items()) {
    auto want = v.get<std::vector<double>>();
    auto got = params.at(name).to_vector<double>();
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-7 + 4e-7 * std::fabs(want[i])) << name << "[" << i << "]";
  }
  OptimizerState state = opt.export_state();
  for (const auto& [name, v] : fx["expected_state"].items()) {
    const Tensor& t = state_tensor(state, name);
    if (v.is_number_integer()) {
      EXPECT_EQ(t.item(), v.get<double>()) << name;
      continue;
    }
    // m and v sum terms of the size of g (about 1) and g^2 that partly cancel: absolute error.
    auto want = v.get<std::vector<double>>();
    auto got = t.to_vector<double>();
    for (size_t i = 0; i < want.size(); ++i)
      EXPECT_NEAR(got[i], want[i], 1e-7 + 1e-6 * std::fabs(want[i])) << name << "[" << i << "]";
  }
}

TEST(ClipGradNorm, MatchesTorchFixture) {
  std::ifstream f(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/optim_adamw.json");
  ASSERT_TRUE(f);
  const nlohmann::json fx = nlohmann::json::parse(f)["clip"];
  ASSERT_EQ(fx.size(), 2u);
  for (const auto& c : fx) {
    std::vector<Tensor> ps;
    for (size_t i = 0; i < c["shapes"].size(); ++i) {
      Shape s = c["shapes"][i].get<Shape>();
      Tensor p = Tensor::zeros(s).set_requires_grad(true);
      p.set_grad(Tensor::from_vector(c["grads"][i].get<std::vector<float>>(), s));
      ps.push_back(p);
    }
    const double norm = clip_grad_norm(ps, c["max_norm"].get<double>());
    EXPECT_NEAR(norm, c["norm"].get<double>(), 1e-6 * norm);
    for (size_t i = 0; i < ps.size(); ++i) {
      auto want = c["clipped"][i].get<std::vector<double>>();
      auto got = ps[i].grad().to_vector<double>();
      for (size_t j = 0; j < want.size(); ++j)
        EXPECT_NEAR(got[j], want[j], 1e-7 + 1e-6 * std::fabs(want[j]));
    }
  }
}

// ---------------------------------------------------------------- schedules

TEST(LRSchedule, ConstantWithWarmup) {
  LRSchedule s(ScheduleKind::constant, 2e-4, 10, 0);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(1), 0.1);
  EXPECT_DOUBLE_EQ(s.multiplier(5), 0.5);
  EXPECT_DOUBLE_EQ(s.multiplier(10), 1.0);
  EXPECT_DOUBLE_EQ(s.multiplier(100000), 1.0);
  EXPECT_DOUBLE_EQ(s.lr_at(5), 1e-4);
  EXPECT_DOUBLE_EQ(LRSchedule(ScheduleKind::constant, 1.0, 0, 0).multiplier(0), 1.0);
}

TEST(LRSchedule, LinearWithWarmup) {
  LRSchedule s(ScheduleKind::linear, 1.0, 10, 110);
  EXPECT_DOUBLE_EQ(s.multiplier(4), 0.4);
  EXPECT_DOUBLE_EQ(s.multiplier(10), 1.0);
  EXPECT_DOUBLE_EQ(s.multiplier(35), 0.75);
  EXPECT_DOUBLE_EQ(s.multiplier(60), 0.5);
  EXPECT_DOUBLE_EQ(s.multiplier(110), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(500), 0.0);
  LRSchedule m(ScheduleKind::linear, 1.0, 10, 110, 0.1);
  EXPECT_DOUBLE_EQ(m.multiplier(5), 0.5);  // warmup starts from 0, not from the floor
  EXPECT_DOUBLE_EQ(m.multiplier(60), 0.55);
  EXPECT_DOUBLE_EQ(m.multiplier(110), 0.1);
  EXPECT_DOUBLE_EQ(m.multiplier(500), 0.1);
}

TEST(LRSchedule, CosineWithWarmup) {
  // HF get_cosine_schedule_with_warmup(warmup 10, total 110): 0.5 * (1 + cos(pi * progress)).
  LRSchedule s(ScheduleKind::cosine, 3e-4, 10, 110);
  EXPECT_DOUBLE_EQ(s.multiplier(0), 0.0);
  EXPECT_DOUBLE_EQ(s.multiplier(9), 0.9);
  EXPECT_DOUBLE_EQ(s.multiplier(10), 1.0);
  EXPECT_NEAR(s.multiplier(35), 0.8535533905932737, 1e-15);
  EXPECT_NEAR(s.multiplier(60), 0.5, 1e-15);
  EXPECT_NEAR(s.multiplier(85), 0.14644660940672627, 1e-15);
  EXPECT_NEAR(s.multiplier(110), 0.0, 1e-15);
  EXPECT_NEAR(s.multiplier(160), 0.0, 1e-15);  // stays at the floor past the end
  EXPECT_NEAR(s.lr_at(60), 1.5e-4, 1e-18);
  LRSchedule m(ScheduleKind::cosine, 1.0, 0, 100, 0.1);
  EXPECT_DOUBLE_EQ(m.multiplier(0), 1.0);
  EXPECT_NEAR(m.multiplier(50), 0.55, 1e-15);
  EXPECT_NEAR(m.multiplier(100), 0.1, 1e-15);
}

TEST(LRSchedule, NamesAndBadArguments) {
  EXPECT_EQ(schedule_kind_from_name("cosine"), ScheduleKind::cosine);
  EXPECT_EQ(schedule_kind_from_name("linear"), ScheduleKind::linear);
  EXPECT_EQ(schedule_kind_from_name("constant"), ScheduleKind::constant);
  EXPECT_NE(
      error_of([] { schedule_kind_from_name("cosine_with_restarts"); }).find("unknown schedule"),
      std::string::npos);
  EXPECT_NE(
      error_of([] { LRSchedule(ScheduleKind::cosine, 1.0, 20, 10); }).find("less than warmup"),
      std::string::npos);
  EXPECT_NE(error_of([] { LRSchedule(ScheduleKind::linear, 1.0, -1, 10); }).find("negative warmup"),
            std::string::npos);
  EXPECT_NE(
      error_of([] { LRSchedule(ScheduleKind::linear, 1.0, 0, 10, 1.5); }).find("min_lr_ratio"),
      std::string::npos);
}

// ---------------------------------------------------------------- gradient clipping

TEST(ClipGradNorm, ScalesOnlyAboveMaxNorm) {
  auto make = [](std::vector<double> g) {
    Tensor p = Tensor::zeros({int64_t(g.size())}).set_requires_grad(true);
    p.set_grad(Tensor::from_vector(g, {int64_t(g.size())}).to(DType::f32));
    return p;
  };
  Tensor a = make({3, 4}), b = make({12}), none = Tensor::zeros({2}).set_requires_grad(true);
  EXPECT_NEAR(clip_grad_norm({a, b, none}, 20.0), 13.0, 1e-6);  // sqrt(9 + 16 + 144)
  EXPECT_EQ(a.grad().to_vector<double>(), (std::vector<double>{3, 4}));
  EXPECT_NEAR(clip_grad_norm({a, b, none}, 6.5), 13.0, 1e-6);  // returns the norm before clipping
  const double c = 6.5 / (13.0 + 1e-6);
  EXPECT_NEAR(a.grad().to_vector<double>()[1], 4 * c, 1e-6);
  EXPECT_NEAR(b.grad().to_vector<double>()[0], 12 * c, 1e-6);
  EXPECT_NEAR(std::sqrt(grad_sum_squares({a, b})), 6.5, 1e-5);
  EXPECT_FALSE(none.grad().defined());
}

TEST(ClipGradNorm, NonFiniteNormIsReturnedWithoutScaling) {
  for (double bad : {std::numeric_limits<double>::infinity(), std::nan("")}) {
    Tensor p = Tensor::zeros({3}).set_requires_grad(true);
    p.set_grad(Tensor::from_vector(std::vector<float>{1.0f, float(bad), 2.0f}, {3}));
    const double n = clip_grad_norm({p}, 1.0);
    EXPECT_FALSE(std::isfinite(n));
    EXPECT_EQ(std::isnan(n), std::isnan(bad));
    EXPECT_EQ(p.grad().to_vector<double>()[2], 2.0);
  }
}

TEST(ClipGradNorm, Bf16Gradients) {
  Tensor p = Tensor::zeros({2}, DType::bf16).set_requires_grad(true);
  p.set_grad(Tensor::from_vector(std::vector<float>{6.0f, 8.0f}, {2}).to(DType::bf16));
  EXPECT_NEAR(clip_grad_norm({p}, 5.0), 10.0, 1e-9);
  auto g = p.grad().to_vector<double>();
  EXPECT_NEAR(g[0], 3.0, 0.02);  // halved, rounded to bf16
  EXPECT_NEAR(g[1], 4.0, 0.02);
}

TEST(AdamW, FailedStepChangesNothing) {
  Generator gen(2);
  Tensor a = randn({4}, gen).set_requires_grad(true);
  Tensor b = randn({3}, gen).set_requires_grad(true);
  AdamW opt({ParamGroup{{{"a", a}, {"b", b}}}});
  auto before = a.to_vector<float>();
  a.set_grad(randn({4}, gen));
  b.set_grad(randn({5}, gen));  // wrong shape: the step must refuse before touching a
  EXPECT_THROW(opt.step(), Error);
  EXPECT_EQ(a.to_vector<float>(), before);
  EXPECT_EQ(opt.step_count(), 0);
}

TEST(ClipGradNorm, SumOfSquaresIsTheSameForEveryThreadCount) {
  Generator gen(3);
  Tensor p = randn({1 << 20}, gen).set_requires_grad(true);
  p.set_grad(randn({1 << 20}, gen));
  std::vector<double> seen;
  for (int threads : {1, 2, 3, 8}) {
    omp_set_num_threads(threads);
    for (int rep = 0; rep < 5; ++rep) seen.push_back(grad_sum_squares({p}));
  }
  omp_set_num_threads(omp_get_num_procs());
  for (double v : seen) EXPECT_EQ(v, seen[0]);  // bitwise: resume must clip exactly as before
}

// Clipping inside the update: step(clip_coefficient(norm, max)) is clip_grad_norm + step() bit
// for bit on f32 gradients (the same f32 product g * coef), leaves the gradients as they are,
// and step(1) is step(); a bf16 parameter with bf16 gradients follows within bf16 rounding.
TEST(AdamW, ClipCoefficientInsideTheStepEqualsClippingFirst) {
  EXPECT_EQ(clip_coefficient(13.0, 20.0), 1.0);
  EXPECT_EQ(clip_coefficient(13.0, 6.5), 6.5 / (13.0 + 1e-6));
  EXPECT_EQ(clip_coefficient(13.0, 0.0), 1.0);  // clipping off
  EXPECT_EQ(clip_coefficient(std::nan(""), 1.0), 1.0);
  for (DType dt : {DType::f32, DType::bf16}) {
    SCOPED_TRACE(dtype_name(dt));
    Generator gen(7);
    Tensor a0 = randn({37}, gen).to(dt), b0 = randn({5, 3}, gen).to(dt);
    std::vector<Tensor> ga, gb;
    for (int s = 0; s < 3; ++s) {
      ga.push_back(randn({37}, gen, 0.0, 2.0).to(dt));
      gb.push_back(randn({5, 3}, gen, 0.0, 2.0).to(dt));
    }
    auto run = [&](bool inside) {
      Tensor a = a0.clone().set_requires_grad(true), b = b0.clone().set_requires_grad(true);
      AdamW opt({ParamGroup{{{"a", a}, {"b", b}}}}, {});
      for (int s = 0; s < 3; ++s) {
        a.set_grad(ga[s].clone());
        b.set_grad(gb[s].clone());
        if (inside) {
          const auto before = a.grad().to_vector<float>();
          opt.step(clip_coefficient(std::sqrt(grad_sum_squares({a, b})), 1.5));
          EXPECT_EQ(a.grad().to_vector<float>(), before);  // untouched
        } else {
          clip_grad_norm({a, b}, 1.5);
          opt.step();
        }
      }
      return std::make_pair(a.to_vector<float>(), b.to_vector<float>());
    };
    auto x = run(true), y = run(false);
    if (dt == DType::f32) {
      EXPECT_EQ(x.first, y.first);
      EXPECT_EQ(x.second, y.second);
    } else {
      for (size_t i = 0; i < x.first.size(); ++i) EXPECT_NEAR(x.first[i], y.first[i], 2e-2);
      for (size_t i = 0; i < x.second.size(); ++i) EXPECT_NEAR(x.second[i], y.second[i], 2e-2);
    }
    // step(1) is step().
    Tensor c = a0.clone().set_requires_grad(true), d = a0.clone().set_requires_grad(true);
    AdamW oc({ParamGroup{{{"c", c}}}}, {}), od({ParamGroup{{{"d", d}}}}, {});
    c.set_grad(ga[0].clone());
    d.set_grad(ga[0].clone());
    oc.step(1.0);
    od.step();
    EXPECT_EQ(c.to_vector<float>(), d.to_vector<float>());
  }
  Tensor p = Tensor::zeros({2}).set_requires_grad(true);
  AdamW o({ParamGroup{{{"p", p}}}}, {});
  p.set_grad(Tensor::ones({2}));
  EXPECT_THROW(o.step(-1.0), Error);
  EXPECT_THROW(o.step(std::nan("")), Error);
}
