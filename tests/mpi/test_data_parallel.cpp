// The gradient reducer and ZeRO-1 under mpirun (2 and 4 ranks): sums against what each rank can
// compute alone, buckets, launch order and overlap with backward, unused parameters, gradient
// accumulation without communication, and ShardedAdamW against optim::AdamW on the summed
// gradients (parameters and exported state).
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

#include "core/autograd.h"
#include "core/ops.h"
#include "core/optim.h"
#include "core/rng.h"
#include "parallel/data_parallel.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using parallel::GradReducer;
using parallel::ReducerOptions;
using testing::world;

// Parameters of assorted shapes, identical on every rank (seeded).
std::vector<Tensor> make_params(uint64_t seed) {
  Generator g(seed);
  std::vector<Tensor> ps;
  for (Shape s : {Shape{5, 3}, Shape{7}, Shape{4, 4}, Shape{3}, Shape{6, 2}}) {
    ps.push_back(randn(s, g));
    ps.back().set_requires_grad(true);
  }
  return ps;
}

// Rank r's input for parameter i: differs per rank, so the sum is not r-independent.
Tensor input_for(int r, size_t i, const Shape& s, int micro = 0) {
  Generator g(1000 + 17 * uint64_t(r) + 5 * i + 101 * uint64_t(micro));
  return randn(s, g);
}

// loss = sum_i sum(p_i * p_i * x_i) over the parameters in `use`: d/dp_i = 2 p_i x_i.
Tensor loss_of(const std::vector<Tensor>& ps, int r, const std::vector<size_t>& use,
               int micro = 0) {
  Tensor loss;
  for (size_t i : use) {
    Tensor t = ops::sum(ops::mul(ops::mul(ps[i], ps[i]), input_for(r, i, ps[i].shape(), micro)));
    loss = loss.defined() ? ops::add(loss, t) : t;
  }
  return loss;
}

std::vector<size_t> all_of(const std::vector<Tensor>& ps) {
  std::vector<size_t> u;
  for (size_t i = 0; i < ps.size(); ++i) u.push_back(i);
  return u;
}

void expect_close(const Tensor& a, const Tensor& b, double tol, const std::string& what) {
  ASSERT_EQ(a.shape(), b.shape()) << what;
  std::vector<float> x = a.to_vector<float>(), y = b.to_vector<float>();
  for (size_t k = 0; k < x.size(); ++k)
    ASSERT_NEAR(x[k], y[k], tol * (1 + std::fabs(y[k]))) << what << " [" << k << "]";
}

TEST(DataParallel, BucketsAreReverseOrderAndSized) {
  auto ps = make_params(1);
  // 0.0001 MB = 104 bytes = 26 floats: params of 15, 7, 16, 3, 12 elements.
  GradReducer red(ps, world(), ReducerOptions{0.0001, false});
  const auto& bs = red.buckets();
  // Reverse order: 4 (12), then 3 (3) fits (15), 2 (16) would not -> new; 1 (7) -> 23; 0 (15)
  // would not -> new.
  ASSERT_EQ(bs.size(), 3u);
  EXPECT_EQ(bs[0].params, (std::vector<size_t>{4, 3}));
  EXPECT_EQ(bs[1].params, (std::vector<size_t>{2, 1}));
  EXPECT_EQ(bs[2].params, (std::vector<size_t>{0}));
  const int n = world()->size();
  for (const auto& b : bs) {
    EXPECT_EQ(b.padded % n, 0);
    EXPECT_GE(b.padded, b.numel);
    EXPECT_EQ(b.shard * n, b.padded);
  }
  GradReducer one(ps, world(), ReducerOptions{});  // 25 MB: one bucket
  EXPECT_EQ(one.num_buckets(), 1u);
}

TEST(DataParallel, AllReduceSumsGradientsAndOverlapsBackward) {
  auto& w = *world();
  const int n = w.size(), r = w.rank();
  auto ps = make_params(2);
  GradReducer red(ps, world(), ReducerOptions{0.00001, false});  // one param per bucket
  ASSERT_EQ(red.num_buckets(), ps.size());
  loss_of(ps, r, all_of(ps)).backward();
  // Launched from the hooks, before the last gradient of the pass was ready: communication
  // overlapped the rest of backward.
  const auto& counts = red.launch_hook_counts();
  ASSERT_FALSE(counts.empty());
  EXPECT_GT(counts.front(), 0);
  EXPECT_LT(counts.front(), red.hooks_in_pass());
  EXPECT_EQ(red.hooks_in_pass(), int64_t(ps.size()));
  red.finish();
  EXPECT_EQ(red.launch_hook_counts().size(), ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    Tensor want = Tensor::zeros(ps[i].shape());
    for (int q = 0; q < n; ++q)
      want = ops::add(want, ops::mul_scalar(ops::mul(ps[i], input_for(q, i, ps[i].shape())), 2));
    expect_close(ps[i].grad(), want, 1e-5, "grad " + std::to_string(i));
  }
}

TEST(DataParallel, UnusedParametersDoNotDeadlock) {
  auto& w = *world();
  const int r = w.rank();
  auto ps = make_params(3);
  GradReducer red(ps, world(), ReducerOptions{0.00001, false});
  // Parameter 1 is used on rank 0 only, parameter 3 nowhere.
  std::vector<size_t> use = r == 0 ? std::vector<size_t>{0, 1, 2, 4} : std::vector<size_t>{0, 2, 4};
  loss_of(ps, r, use).backward();
  red.finish();
  EXPECT_TRUE(red.grad_defined(1));
  EXPECT_FALSE(red.grad_defined(3));
  ASSERT_TRUE(ps[1].grad().defined());  // on every rank: rank 0's gradient
  EXPECT_FALSE(ps[3].grad().defined());
  Tensor want = ops::mul_scalar(ops::mul(ps[1], input_for(0, 1, ps[1].shape())), 2);
  expect_close(ps[1].grad(), want, 1e-5, "grad of the param only rank 0 used");
}

TEST(DataParallel, NoCommunicationOnNonFinalMicroBatches) {
  auto& w = *world();
  const int n = w.size(), r = w.rank();
  auto ps = make_params(4);
  GradReducer red(ps, world(), ReducerOptions{0.00002, false});
  red.set_sync(false);
  loss_of(ps, r, all_of(ps), 0).backward();
  EXPECT_TRUE(red.launch_hook_counts().empty());
  // Local only: rank r's own gradient.
  expect_close(ps[0].grad(), ops::mul_scalar(ops::mul(ps[0], input_for(r, 0, ps[0].shape())), 2),
               1e-5, "local grad");
  red.set_sync(true);
  loss_of(ps, r, all_of(ps), 1).backward();
  red.finish();
  for (size_t i = 0; i < ps.size(); ++i) {
    Tensor want = Tensor::zeros(ps[i].shape());
    for (int q = 0; q < n; ++q)
      for (int m = 0; m < 2; ++m)
        want =
            ops::add(want, ops::mul_scalar(ops::mul(ps[i], input_for(q, i, ps[i].shape(), m)), 2));
    expect_close(ps[i].grad(), want, 1e-5, "accumulated grad " + std::to_string(i));
  }
}

optim::NamedTensors named(const std::vector<Tensor>& ps) {
  optim::NamedTensors out;
  for (size_t i = 0; i < ps.size(); ++i) out.emplace_back("p" + std::to_string(i), ps[i]);
  return out;
}

// ZeRO-1 (reduce-scatter, sharded AdamW, all-gather) against plain DP (all-reduce, AdamW), with
// clipping, weight decay on matrices and a parameter that goes unused for a step.
TEST(DataParallel, ZeroOneEqualsPlainAdamW) {
  auto& w = *world();
  const int r = w.rank();
  auto a = make_params(5), b = make_params(5);
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.1;
  GradReducer plain(a, world(), ReducerOptions{0.00002, false});
  optim::AdamW ref(optim::decay_groups(named(a), o.weight_decay), o);
  GradReducer sharded(b, world(), ReducerOptions{0.00002, true});
  ASSERT_GT(sharded.num_buckets(), 1u);
  parallel::ShardedAdamW zero(optim::decay_groups(named(b), o.weight_decay), o, sharded);
  for (int step = 0; step < 4; ++step) {
    std::vector<size_t> use = all_of(a);
    if (step == 1) use.erase(use.begin() + 3);
    loss_of(a, r, use, step).backward();
    plain.finish();
    double na = optim::clip_grad_norm(a, 0.5);
    ref.step();
    ref.zero_grad();
    loss_of(b, r, use, step).backward();
    sharded.finish();
    double nb = zero.clip_grad_norm(0.5);
    zero.step();
    zero.zero_grad();
    EXPECT_NEAR(na, nb, 1e-5 * na) << "step " << step;
    for (size_t i = 0; i < a.size(); ++i)
      expect_close(b[i], a[i], 1e-6,
                   "step " + std::to_string(step) + " param " + std::to_string(i));
  }
  // The exported state is the full-shape state of optim::AdamW, name for name.
  optim::OptimizerState sa = ref.export_state(), sb = zero.export_state();
  EXPECT_EQ(sa.step, sb.step);
  ASSERT_EQ(sa.tensors.size(), sb.tensors.size());
  std::map<std::string, Tensor> by;
  for (auto& [k, t] : sb.tensors) by[k] = t;
  for (auto& [k, t] : sa.tensors) {
    ASSERT_TRUE(by.count(k)) << k;
    expect_close(by[k].to(DType::f32), t.to(DType::f32), 1e-6, k);
  }
  // Import into a fresh sharded optimizer, one more step each: still equal.
  auto c = make_params(5);
  for (size_t i = 0; i < c.size(); ++i) c[i].copy_(b[i]);
  GradReducer red_c(c, world(), ReducerOptions{0.00002, true});
  parallel::ShardedAdamW zc(optim::decay_groups(named(c), o.weight_decay), o, red_c);
  zc.import_state(sa);
  loss_of(a, r, all_of(a), 9).backward();
  plain.finish();
  ref.step();
  loss_of(c, r, all_of(c), 9).backward();
  red_c.finish();
  zc.step();
  for (size_t i = 0; i < a.size(); ++i) expect_close(c[i], a[i], 1e-6, "after import");
}

}  // namespace
}  // namespace ftune
