// The op-level step profiler (core/profiler.h) on the GPU: CUDA events around each op on the
// current stream, resolved once per step. Skips without a GPU.
#include <gtest/gtest.h>

#include "core/allocator.h"
#include "core/profiler.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/profiler_model.h"

namespace ftune {
namespace {

using test::ToyConfig;
using test::ToyModel;

using test::find_row;
using test::make_opt;

TEST(ProfilerCuda, StepCountsMatchTheModelAndGpuTimesAddUp) {
  FTUNE_REQUIRE_GPU();
  profiler::reset();
  ToyConfig c;
  const Device dev = Device::cuda(0);
  ToyModel m(c, 7, dev);
  auto opt = make_opt(m);
  test::profiled_step(m, opt, dev, true);  // warm-up: cuBLAS handles, allocator, event pool
  profiler::reset();
  test::GraphCount graph;
  const int steps = 2;
  for (int s = 0; s < steps; ++s) test::profiled_step(m, opt, dev, true, &graph);
  test::profiled_step(m, opt, dev, false);
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  ASSERT_TRUE(r.gpu);
  EXPECT_EQ(r.steps, steps);
  EXPECT_EQ(r.clean_steps, 1);

  for (const auto& [label, n] : m.expected_forward_calls()) {
    const profiler::Row* row = find_row(r, "forward", label);
    ASSERT_NE(row, nullptr) << label;
    EXPECT_EQ(row->calls, double(n)) << label;
    EXPECT_GT(row->gpu_ms, 0.0) << label;  // every forward op launches at least one kernel
  }
  int64_t nodes = 0;
  for (const auto& [name, n] : graph.nodes) nodes += n;
  double bwd_nodes = 0, accum = 0, gpu_sum = 0;
  for (const auto& row : r.rows) {
    EXPECT_GE(row.gpu_ms, 0.0) << row.label;
    gpu_sum += row.gpu_ms;
    if (row.phase != "backward") continue;
    if (row.label == "autograd accumulate")
      accum += row.calls;
    else if (row.label.rfind("bwd ", 0) == 0)
      bwd_nodes += row.calls;
  }
  EXPECT_EQ(bwd_nodes, double(nodes));
  EXPECT_EQ(accum, double(graph.accumulations));
  ASSERT_NE(find_row(r, "optimizer", "adamw"), nullptr);
  EXPECT_GT(find_row(r, "optimizer", "adamw")->gpu_ms, 0.0);

  // Intervals are disjoint and inside the step: their sum is at most the step's GPU span (each
  // event pair is rounded to ~0.5 us), which is inside the host's wall time.
  EXPECT_NEAR(gpu_sum, r.attributed_gpu_ms, 1e-6 * (1 + gpu_sum));
  EXPECT_GT(r.attributed_gpu_ms, 0.0);
  EXPECT_LE(r.attributed_gpu_ms, r.gpu_ms + 1e-3 * double(r.intervals));
  EXPECT_LE(r.gpu_ms, r.wall_ms + 0.05);
  EXPECT_LE(r.issue_ms, r.wall_ms);
  double ph = 0, ph_clean = 0;
  for (const auto& p : r.phases) {
    ph += p.gpu_ms;
    ph_clean += p.clean_gpu_ms;
  }
  EXPECT_NEAR(ph, r.gpu_ms, 0.01);  // the phases partition the step's span
  EXPECT_NEAR(ph_clean, r.clean_gpu_ms, 0.01);
  EXPECT_GT(r.clean_gpu_ms, 0.0);
  profiler::reset();
}

// The events sit around the right op: a large GEMM's row holds most of the step's GPU time,
// while its host time (an asynchronous launch) is far below it.
TEST(ProfilerCuda, EventsAttributeTimeToTheOpThatRanIt) {
  FTUNE_REQUIRE_GPU();
  profiler::reset();
  const Device dev = Device::cuda(0);
  Generator g(3);
  Tensor a = randn({4096, 4096}, g).to(dev), b = randn({4096, 4096}, g).to(dev);
  Tensor s1 = randn({256}, g).to(dev), s2 = randn({256}, g).to(dev);
  ops::matmul(a, b);  // warm-up (cuBLAS handle and heuristics)
  ops::add(s1, s2);
  cuda_synchronize(0);
  profiler::begin_step(dev);
  ops::matmul(a, b);
  ops::add(s1, s2);
  profiler::end_step();
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  const profiler::Row* mm = find_row(r, "step", "matmul [4096,4096]");
  const profiler::Row* add = find_row(r, "step", "add");
  ASSERT_NE(mm, nullptr);
  ASSERT_NE(add, nullptr);
  EXPECT_GT(mm->gpu_ms, 0.5 * r.gpu_ms);
  EXPECT_GT(mm->gpu_ms, 10 * add->gpu_ms);
  EXPECT_LT(mm->host_ms, 0.5 * mm->gpu_ms);
  EXPECT_GE(r.wall_ms, mm->gpu_ms);
  profiler::reset();
}

TEST(ProfilerCuda, ProfilingLeavesGpuResultsBitIdentical) {
  FTUNE_REQUIRE_GPU();
  profiler::reset();
  const Device dev = Device::cuda(0);
  ToyConfig c;
  ToyModel a(c, 11, dev), b(c, 11, dev), p(c, 11, dev);
  auto oa = make_opt(a), ob = make_opt(b), op = make_opt(p);
  for (int s = 0; s < 2; ++s) {
    for (auto [m, o] : {std::pair{&a, &oa}, std::pair{&b, &ob}}) {
      Tensor l = m->forward();
      l.backward();
      o->step();
      o->zero_grad();
    }
    test::profiled_step(p, op, dev, true);
  }
  for (size_t i = 0; i < a.params.size(); ++i) {
    auto va = a.params[i].to(Device::cpu()).to_vector<float>();
    auto vb = b.params[i].to(Device::cpu()).to_vector<float>();
    auto vp = p.params[i].to(Device::cpu()).to_vector<float>();
    // Only meaningful where two unprofiled runs agree bit for bit (deterministic kernels).
    if (va != vb) {
      ADD_FAILURE() << "param " << i
                    << ": two unprofiled GPU runs differ (non-deterministic kernel)";
      continue;
    }
    EXPECT_EQ(va, vp) << "param " << i;
  }
  profiler::reset();
}

}  // namespace
}  // namespace ftune
