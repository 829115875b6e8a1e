// The op-level step profiler (core/profiler.h) on a CPU training step of a small decoder whose
// op calls are known by construction (tests/profiler_model.h).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "core/profiler.h"
#include "tests/profiler_model.h"

namespace ftune {
namespace {

using test::ToyConfig;
using test::ToyModel;

using test::find_row;
using test::make_opt;

double calls_of(const profiler::Report& r, const std::string& phase, const std::string& label) {
  const profiler::Row* row = find_row(r, phase, label);
  return row ? row->calls : 0.0;
}

struct ProfilerTest : ::testing::Test {
  void SetUp() override { profiler::reset(); }
  void TearDown() override { profiler::reset(); }
};

TEST_F(ProfilerTest, CountsEveryForwardOpBackwardNodeAndOptimizerCall) {
  ToyConfig c;
  ToyModel m(c, 7, Device::cpu());
  auto opt = make_opt(m);
  const int steps = 2;
  test::GraphCount graph;
  for (int s = 0; s < steps; ++s) test::profiled_step(m, opt, Device::cpu(), true, &graph);
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  EXPECT_EQ(r.steps, steps);
  EXPECT_EQ(r.clean_steps, 0);
  EXPECT_FALSE(r.gpu);

  // Forward: exactly the ops the model calls, each counted once per call (linear's inner
  // matmul/add and cross_entropy's inner ops are not separate rows), nothing else.
  auto fwd = m.expected_forward_calls();
  double fwd_rows = 0;
  for (const auto& row : r.rows) {
    if (row.phase != "forward") continue;
    fwd_rows += row.calls;
    ASSERT_TRUE(fwd.count(row.label)) << "unexpected forward label '" << row.label << "'";
  }
  for (const auto& [label, n] : fwd) EXPECT_EQ(calls_of(r, "forward", label), double(n)) << label;
  int64_t fwd_total = 0;
  for (const auto& [label, n] : fwd) fwd_total += n;
  EXPECT_EQ(fwd_rows, double(fwd_total));

  // Backward: one call per graph node, labelled by the forward op that made it.
  const int64_t L = c.layers, kv = c.kv_heads * c.head_dim();
  EXPECT_EQ(calls_of(r, "backward", "bwd linear [16,16]"), double(2 * L));
  EXPECT_EQ(calls_of(r, "backward", "bwd linear [" + std::to_string(kv) + ",16]"), double(2 * L));
  EXPECT_EQ(calls_of(r, "backward", "bwd linear [40,16]"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd rms_norm"), double(2 * L + 1));
  EXPECT_EQ(calls_of(r, "backward", "bwd attention"), double(L));
  EXPECT_EQ(calls_of(r, "backward", "bwd rope"), double(2 * L));
  EXPECT_EQ(calls_of(r, "backward", "bwd swiglu"), double(L));
  EXPECT_EQ(calls_of(r, "backward", "bwd add"), double(2 * L));
  EXPECT_EQ(calls_of(r, "backward", "bwd embedding"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd cross_entropy"), 1.0);
  // view nodes made by Tensor::view outside any op keep their own name.
  EXPECT_EQ(calls_of(r, "backward", "bwd (view)"), double(graph.nodes["view"])) << "views";
  int64_t nodes = 0;
  for (const auto& [name, n] : graph.nodes) nodes += n;
  // Besides the nodes: the engine's sums, and the loss's seed gradient (ones: one fill).
  EXPECT_EQ(calls_of(r, "backward", "fill"), 1.0);
  double bwd_nodes = 0, accum = 0;
  for (const auto& row : r.rows) {
    if (row.phase != "backward" || row.label == "fill") continue;
    if (row.label == "autograd accumulate")
      accum += row.calls;
    else
      bwd_nodes += row.calls;
    EXPECT_TRUE(row.label == "autograd accumulate" || row.label.rfind("bwd ", 0) == 0) << row.label;
  }
  EXPECT_EQ(bwd_nodes, double(nodes));
  EXPECT_EQ(accum, double(graph.accumulations));

  EXPECT_EQ(calls_of(r, "optimizer", "adamw"), 1.0);
  ASSERT_EQ(r.phases.size(), 3u);
  EXPECT_EQ(r.phases[0].name, "forward");
  EXPECT_EQ(r.phases[1].name, "backward");
  EXPECT_EQ(r.phases[2].name, "optimizer");
  EXPECT_EQ(r.intervals, int64_t(fwd_rows + bwd_nodes + accum + 2));  // + fill, adamw
}

TEST_F(ProfilerTest, TotalsAddUpAndStayWithinTheStep) {
  ToyModel m(ToyConfig{}, 3, Device::cpu());
  auto opt = make_opt(m);
  for (int s = 0; s < 3; ++s) test::profiled_step(m, opt, Device::cpu(), true);
  test::profiled_step(m, opt, Device::cpu(), false);
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  EXPECT_EQ(r.steps, 3);
  EXPECT_EQ(r.clean_steps, 1);
  double host = 0, gpu = 0;
  for (const auto& row : r.rows) {
    EXPECT_GE(row.host_ms, 0.0) << row.label;
    host += row.host_ms;
    gpu += row.gpu_ms;
  }
  EXPECT_NEAR(host, r.attributed_host_ms, 1e-9 * (1 + host));
  EXPECT_EQ(gpu, 0.0);  // a CPU step has no GPU time
  EXPECT_GT(r.attributed_host_ms, 0.0);
  EXPECT_LE(r.attributed_host_ms, r.issue_ms);
  EXPECT_LE(r.issue_ms, r.wall_ms);
  // The phases partition the step's issue time.
  double ph = 0, ph_clean = 0;
  for (const auto& p : r.phases) {
    ph += p.issue_ms;
    ph_clean += p.clean_issue_ms;
  }
  EXPECT_NEAR(ph, r.issue_ms, 1e-6 * (1 + r.issue_ms));
  EXPECT_NEAR(ph_clean, r.clean_issue_ms, 1e-6 * (1 + r.clean_issue_ms));
  EXPECT_GT(r.clean_wall_ms, 0.0);

  // The table and the JSON carry every row.
  const std::string table = profiler::format_table(r);
  for (const auto& row : r.rows) EXPECT_NE(table.find(row.label), std::string::npos) << row.label;
  auto js = nlohmann::json::parse(profiler::to_json(r));
  ASSERT_EQ(js["rows"].size(), r.rows.size());
  EXPECT_EQ(js["rows"][0]["label"], r.rows[0].label);
  EXPECT_EQ(js["steps"], 3);
  EXPECT_DOUBLE_EQ(js["rows"][0]["calls"].get<double>(), r.rows[0].calls);
  // Rows come largest first.
  for (size_t i = 1; i < r.rows.size(); ++i) EXPECT_GE(r.rows[i - 1].host_ms, r.rows[i].host_ms);
  // max_rows folds the rest into one line.
  const std::string short_table = profiler::format_table(r, 2);
  EXPECT_NE(short_table.find("(" + std::to_string(r.rows.size() - 2) + " more labels)"),
            std::string::npos);
}

TEST_F(ProfilerTest, ProfilingLeavesTheResultsBitIdentical) {
  ToyModel a(ToyConfig{}, 11, Device::cpu()), b(ToyConfig{}, 11, Device::cpu());
  auto oa = make_opt(a), ob = make_opt(b);
  for (int s = 0; s < 2; ++s) {
    Tensor la = a.forward();
    la.backward();
    oa.step();
    oa.zero_grad();
    EXPECT_FALSE(profiler::hooks_on());
    Tensor lb = test::profiled_step(b, ob, Device::cpu(), true);
    EXPECT_FALSE(profiler::hooks_on());
    EXPECT_EQ(la.item(), lb.item());
  }
  for (size_t i = 0; i < a.params.size(); ++i)
    EXPECT_EQ(a.params[i].to_vector<float>(), b.params[i].to_vector<float>()) << "param " << i;
  // Steps outside begin/end and steps without op hooks record no op.
  profiler::reset();
  Tensor l = a.forward();
  l.backward();
  profiler::begin_step(Device::cpu(), false);
  EXPECT_FALSE(profiler::hooks_on());
  a.forward().backward();
  profiler::end_step();
  profiler::Report r = profiler::report();
  EXPECT_EQ(r.steps, 0);
  EXPECT_EQ(r.clean_steps, 1);
  EXPECT_TRUE(r.rows.empty());
}

TEST_F(ProfilerTest, CompositeOpsAreOneRowAndTheirNodesCarryTheirLabel) {
  Generator g(5);
  Tensor x = randn({4, 6}, g).set_requires_grad(true);
  Tensor mask = randn({4, 6}, g).to(DType::f32);
  mask = ops::sub(mask, mask).to(DType::b8);  // all false: where_mask is mul/add/neg inside
  profiler::begin_step(Device::cpu());
  profiler::phase("forward");
  Tensor y = ops::sum(ops::where_mask(mask, x, 2.0));
  profiler::phase("backward");
  y.backward();
  profiler::end_step();
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  EXPECT_EQ(calls_of(r, "forward", "where_mask"), 1.0);
  EXPECT_EQ(calls_of(r, "forward", "sum"), 1.0);
  for (const auto& row : r.rows)
    if (row.phase == "forward")
      EXPECT_TRUE(row.label == "where_mask" || row.label == "sum") << row.label;
  // Inside where_mask the node that reaches x is mul(x, mask): labelled by where_mask.
  EXPECT_EQ(calls_of(r, "backward", "bwd where_mask (mul)"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd sum"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd mul"), 0.0);
}

TEST_F(ProfilerTest, CheckpointedBlocksAreTimedOpByOp) {
  Generator g(9);
  Tensor x = randn({3, 8}, g).set_requires_grad(true);
  Tensor w = randn({8, 8}, g).set_requires_grad(true);
  Tensor nw = Tensor::ones({8}).set_requires_grad(true);
  auto block = [&](const Tensor& h) { return ops::rms_norm(ops::linear(h, w), nw, 1e-5); };
  profiler::begin_step(Device::cpu());
  profiler::phase("forward");
  Tensor y = ops::sum(checkpoint(block, x, {w, nw}));
  profiler::phase("backward");
  y.backward();
  profiler::end_step();
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  EXPECT_EQ(calls_of(r, "forward", "linear [8,8]"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "linear [8,8]"), 1.0);  // the recompute
  EXPECT_EQ(calls_of(r, "backward", "rms_norm"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd linear [8,8]"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd rms_norm"), 1.0);
  EXPECT_EQ(calls_of(r, "backward", "bwd (checkpoint)"), 0.0);
  ASSERT_TRUE(x.grad().defined());
}

TEST_F(ProfilerTest, OtherThreadsAreNotTimed) {
  Tensor a = Tensor::ones({4}), b = Tensor::ones({4});
  profiler::begin_step(Device::cpu());
  std::thread t([&] { ops::add(a, b); });
  t.join();
  ops::mul(a, b);
  profiler::end_step();
  profiler::Report r = profiler::report();
  EXPECT_EQ(calls_of(r, "step", "mul"), 1.0);  // no phase(): the step's implicit phase
  EXPECT_EQ(calls_of(r, "step", "add"), 0.0);
}

TEST_F(ProfilerTest, MisuseThrows) {
  EXPECT_THROW(profiler::end_step(), Error);
  profiler::begin_step(Device::cpu());
  EXPECT_THROW(profiler::begin_step(Device::cpu()), Error);
  EXPECT_THROW(profiler::reset(), Error);
  profiler::end_step();
  EXPECT_FALSE(profiler::in_step());
  // A step abandoned after an exception adds nothing and leaves the hooks off.
  profiler::reset();
  profiler::begin_step(Device::cpu());
  EXPECT_THROW(ops::add(Tensor::ones({2}), Tensor::ones({3})), Error);
  profiler::cancel_step();
  EXPECT_FALSE(profiler::in_step());
  EXPECT_FALSE(profiler::hooks_on());
  EXPECT_EQ(profiler::report().steps, 0);
  profiler::begin_step(Device::cpu());
  ops::add(Tensor::ones({2}), Tensor::ones({2}));
  profiler::end_step();
  EXPECT_EQ(calls_of(profiler::report(), "step", "add"), 1.0);
}

}  // namespace
}  // namespace ftune
