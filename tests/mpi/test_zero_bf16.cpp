// ZeRO-1 with 16-bit parameters under mpirun (2 and 4 ranks): parallel::ShardedAdamW on bf16
// parameters (and one f32 parameter in its own bucket) against plain data parallelism with
// optim::AdamW keeping f32 masters, both fed the same given gradients. The CPU trainer trains in
// f32 only (sft.cpp refuses dtype bf16 with device: cpu), so the optimizers are compared directly.
//
// Bit-exact, not "close": every gradient is a bf16 value with |g| >= 2^-10 (or 0) and |g| < 8, so
// the f32 sum over the ranks is exact whatever order MPI's all-reduce or reduce-scatter adds in
// (multiples of 2^-17 below 2^5: 22 bits), and so are the f64 sums of squares of the clip norm.
// Both paths then feed the same bf16 gradients to the same kernel with the same constants. With
// arbitrary gradients, all-reduce and reduce-scatter may associate the f32 sum differently at 4+
// ranks, and the results may differ by the rounding of that sum (1 bf16 ulp of a gradient).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/optim.h"
#include "core/rng.h"
#include "parallel/data_parallel.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using parallel::GradReducer;
using parallel::ReducerOptions;
using parallel::ShardedAdamW;
using testing::world;

// 52 bytes: buckets of several bf16 parameters whose shards start and end mid-parameter; the f32
// parameter (index 1) gets its own bucket (a bucket has one dtype).
constexpr double kBucketMb = 0.00005;
const Shape kShapes[] = {{5, 3}, {7}, {4, 4}, {3}, {6, 2}, {2, 9}};
DType dtype_of(size_t i) { return i == 1 ? DType::f32 : DType::bf16; }

std::vector<Tensor> make_params(uint64_t seed) {
  Generator g(seed);
  std::vector<Tensor> ps;
  for (size_t i = 0; i < std::size(kShapes); ++i) {
    ps.push_back(randn(kShapes[i], g).to(dtype_of(i)));
    ps.back().set_requires_grad(true);
  }
  return ps;
}

optim::NamedTensors named(const std::vector<Tensor>& ps) {
  optim::NamedTensors out;
  for (size_t i = 0; i < ps.size(); ++i) out.emplace_back("p" + std::to_string(i), ps[i]);
  return out;
}

// Rank r's gradient of parameter i at step t: bf16 values, tiny ones flushed to 0 (see above).
Tensor grad_for(int r, size_t i, int t, double scale = 1.0) {
  Generator g(7000 + 31 * uint64_t(r) + 7 * i + 1009 * uint64_t(t));
  std::vector<float> x = randn(kShapes[i], g).to(DType::bf16).to_vector<float>();
  for (float& v : x) {
    v = float(v * scale);
    if (std::fabs(v) < 1.0f / 1024) v = 0;
  }
  return Tensor::from_vector(x, kShapes[i]).to(dtype_of(i));
}

// Which parameters get a gradient at step t on rank r: at step 1 parameter 3 is unused
// everywhere (skipped: its step count does not advance), at step 2 parameter 0 only on rank 0.
bool used(size_t i, int t, int r) {
  if (t == 1 && i == 3) return false;
  if (t == 2 && i == 0) return r == 0;
  return true;
}

void set_grads(std::vector<Tensor>& ps, int r, int t) {
  for (size_t i = 0; i < ps.size(); ++i)
    if (used(i, t, r)) ps[i].set_grad(grad_for(r, i, t, t == 0 ? 4.0 : 1.0));
}

// The bits of a tensor as f32 values (bf16 -> f32 is exact).
std::vector<uint32_t> bits(const Tensor& t) {
  std::vector<float> f = t.to(DType::f32).to_vector<float>();
  std::vector<uint32_t> b(f.size());
  std::memcpy(b.data(), f.data(), f.size() * sizeof(float));
  return b;
}

void expect_same_params(const std::vector<Tensor>& a, const std::vector<Tensor>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].dtype(), b[i].dtype()) << what;
    EXPECT_EQ(bits(a[i]), bits(b[i])) << what << ": param " << i;
  }
}

void expect_same_state(const optim::OptimizerState& a, const optim::OptimizerState& b,
                       const std::string& what) {
  EXPECT_EQ(a.step, b.step) << what;
  ASSERT_EQ(a.tensors.size(), b.tensors.size()) << what;
  std::map<std::string, Tensor> by;
  for (const auto& [k, t] : b.tensors) by[k] = t;
  for (const auto& [k, t] : a.tensors) {
    ASSERT_TRUE(by.count(k)) << what << ": " << k;
    EXPECT_EQ(t.dtype(), by[k].dtype()) << what << ": " << k;
    EXPECT_EQ(t.shape(), by[k].shape()) << what << ": " << k;
    EXPECT_TRUE(by[k].device().is_cpu()) << what << ": " << k;
    EXPECT_EQ(bits(t), bits(by[k])) << what << ": " << k;
  }
}

// Plain data parallelism (all-reduce, optim::AdamW with masters) and ZeRO-1 on copies.
struct Pair {
  optim::AdamWOptions o;
  std::vector<Tensor> a, b;
  std::unique_ptr<GradReducer> plain, sharded;
  std::unique_ptr<optim::AdamW> ref;
  std::unique_ptr<ShardedAdamW> zero;

  explicit Pair(uint64_t seed) : a(make_params(seed)), b(make_params(seed)) {
    o.lr = 1e-2;
    o.weight_decay = 0.1;
    plain = std::make_unique<GradReducer>(a, world(), ReducerOptions{kBucketMb, false});
    sharded = std::make_unique<GradReducer>(b, world(), ReducerOptions{kBucketMb, true});
    ref = std::make_unique<optim::AdamW>(optim::decay_groups(named(a), o.weight_decay), o);
    zero = std::make_unique<ShardedAdamW>(optim::decay_groups(named(b), o.weight_decay), o,
                                          *sharded);
  }
  // One step of each on the same gradients; clipping at max_norm (0: none). Returns the norms.
  std::pair<double, double> step(int t, double max_norm) {
    const int r = world()->rank();
    const double lr = 1e-2 * (1.0 + 0.25 * t);  // a schedule
    set_grads(a, r, t);
    plain->finish();
    double na = max_norm > 0 ? optim::clip_grad_norm(a, max_norm) : 0;
    ref->set_lr(lr);
    ref->step();
    ref->zero_grad();
    set_grads(b, r, t);
    sharded->finish();
    double nb = max_norm > 0 ? zero->clip_grad_norm(max_norm) : 0;
    zero->set_lr(lr);
    zero->step();
    zero->zero_grad();
    return {na, nb};
  }
};

TEST(ZeroBf16, ShardedAdamWEqualsAdamWWithMastersBitForBit) {
  Pair p(11);
  ASSERT_GE(p.sharded->num_buckets(), 3u);
  // Before any update the exported master is the parameter itself, as optim::AdamW's.
  expect_same_state(p.ref->export_state(), p.zero->export_state(), "before the first step");
  for (int t = 0; t < 5; ++t) {
    auto [na, nb] = p.step(t, t % 2 == 0 ? 1.5 : 0.0);
    EXPECT_EQ(na, nb) << "clip norm, step " << t;
    if (t == 0) EXPECT_GT(na, 1.5) << "the first step must clip";
    expect_same_params(p.a, p.b, "step " + std::to_string(t));
  }
  for (size_t i = 0; i < p.b.size(); ++i) EXPECT_EQ(p.b[i].dtype(), dtype_of(i));
  optim::OptimizerState sa = p.ref->export_state(), sb = p.zero->export_state();
  expect_same_state(sa, sb, "after 5 steps");
  // The masters are f32 and not the bf16 parameters (they hold bits bf16 drops).
  std::map<std::string, Tensor> st;
  for (const auto& [k, t] : sb.tensors) st[k] = t;
  ASSERT_TRUE(st.count("p0.master"));
  EXPECT_FALSE(st.count("p1.master")) << "an f32 parameter has no master";
  EXPECT_EQ(st["p0.master"].dtype(), DType::f32);
  EXPECT_NE(bits(st["p0.master"]), bits(p.b[0])) << "the master is more than the bf16 param";
  EXPECT_EQ(bits(st["p0.master"].to(DType::bf16)), bits(p.b[0]));
  EXPECT_EQ(st["p3.step"].item(), 4);  // skipped once
  EXPECT_EQ(st["p0.step"].item(), 5);  // rank 0's gradient at step 2 counts everywhere
}

// export_local_state's flat shards, put together over the ranks, are export_state, ".master"
// included, before the first update (the master is then the parameter) and after.
TEST(ZeroBf16, LocalStateShardsMakeTheFullState) {
  Pair p(12);
  for (int t = 0; t < 3; ++t) {
    optim::OptimizerState full = p.zero->export_state();
    ShardedAdamW::LocalState ls = p.zero->export_local_state();
    ASSERT_EQ(ls.state.tensors.size(), full.tensors.size());
    ASSERT_EQ(ls.flat_offset.size(), full.tensors.size());
    EXPECT_EQ(ls.state.step, full.step);
    int masters = 0;
    for (size_t k = 0; k < full.tensors.size(); ++k) {
      const auto& [name, want] = full.tensors[k];
      const auto& [lname, mine] = ls.state.tensors[k];
      ASSERT_EQ(lname, name) << "the same order";
      masters += name.ends_with(".master");
      if (ls.flat_offset[k] < 0) {
        EXPECT_EQ(bits(mine), bits(want)) << name;
        continue;
      }
      EXPECT_EQ(mine.dtype(), DType::f32) << name;
      EXPECT_TRUE(mine.device().is_cpu()) << name;
      // Disjoint ranges: the sum over the ranks of each rank's range (zeros elsewhere) is exact.
      Tensor sum = Tensor::zeros({want.numel()});
      ASSERT_LE(ls.flat_offset[k] + mine.numel(), want.numel()) << name;
      Tensor cover = Tensor::zeros({want.numel()});
      if (mine.numel() > 0) {
        sum.slice(0, ls.flat_offset[k], ls.flat_offset[k] + mine.numel()).copy_(mine);
        cover.slice(0, ls.flat_offset[k], ls.flat_offset[k] + mine.numel()).fill_(1.0);
      }
      world()->all_reduce(sum);
      world()->all_reduce(cover);
      EXPECT_EQ(bits(sum), bits(want.view({-1}))) << name << " at step " << t;
      for (float c : cover.to_vector<float>()) ASSERT_EQ(c, 1.0f) << name << ": one writer each";
    }
    EXPECT_EQ(masters, 5);  // the bf16 parameters
    p.step(t, 0);
  }
}

// ZeRO bf16 -> plain bf16 and back, and ZeRO at dp n -> ZeRO at dp 1: the imported run goes on
// bit for bit as the one that wrote the state. The importing parameters are spoiled first: the
// import sets a 16-bit parameter from its master.
TEST(ZeroBf16, CheckpointRoundTripsWithAndWithoutZero) {
  const int r = world()->rank(), n = world()->size();
  Pair p(13);
  for (int t = 0; t < 3; ++t) p.step(t, 0);

  auto spoiled_copy = [](const std::vector<Tensor>& src) {
    std::vector<Tensor> c = make_params(99);
    for (size_t i = 0; i < c.size(); ++i)
      if (src[i].dtype() == DType::f32) c[i].copy_(src[i]);  // an f32 param has no master
    return c;
  };
  // ZeRO -> plain: optim::AdamW over all-reduced gradients.
  std::vector<Tensor> c = spoiled_copy(p.b);
  GradReducer red_c(c, world(), ReducerOptions{kBucketMb, false});
  optim::AdamW adam_c(optim::decay_groups(named(c), p.o.weight_decay), p.o);
  adam_c.import_state(p.zero->export_state());
  expect_same_params(c, p.b, "ZeRO -> plain, imported");
  // plain -> ZeRO.
  std::vector<Tensor> d = spoiled_copy(p.a);
  GradReducer red_d(d, world(), ReducerOptions{kBucketMb, true});
  ShardedAdamW zero_d(optim::decay_groups(named(d), p.o.weight_decay), p.o, red_d);
  zero_d.import_state(p.ref->export_state());
  expect_same_params(d, p.a, "plain -> ZeRO, imported");
  // ZeRO at dp n -> ZeRO at dp 1: the single communicator, fed the summed gradient (exact).
  std::vector<Tensor> e = spoiled_copy(p.b);
  GradReducer red_e(e, parallel::make_single_communicator(), ReducerOptions{kBucketMb, true});
  ShardedAdamW zero_e(optim::decay_groups(named(e), p.o.weight_decay), p.o, red_e);
  zero_e.import_state(p.zero->export_state());
  expect_same_params(e, p.b, "dp n -> dp 1, imported");

  for (int t = 3; t < 6; ++t) {
    const double lr = 1e-2 * (1.0 + 0.25 * t);
    p.step(t, t == 4 ? 1.0 : 0.0);
    set_grads(c, r, t);
    red_c.finish();
    if (t == 4) optim::clip_grad_norm(c, 1.0);
    adam_c.set_lr(lr);
    adam_c.step();
    adam_c.zero_grad();
    set_grads(d, r, t);
    red_d.finish();
    if (t == 4) zero_d.clip_grad_norm(1.0);
    zero_d.set_lr(lr);
    zero_d.step();
    zero_d.zero_grad();
    for (size_t i = 0; i < e.size(); ++i) {  // every rank's gradient, summed here
      bool any = false;
      Tensor sum = Tensor::zeros(kShapes[i]);
      for (int q = 0; q < n; ++q) {
        if (!used(i, t, q)) continue;
        any = true;
        sum = ops::add(sum, grad_for(q, i, t).to(DType::f32));
      }
      if (any) e[i].set_grad(sum.to(dtype_of(i)));
    }
    red_e.finish();
    if (t == 4) zero_e.clip_grad_norm(1.0);
    zero_e.set_lr(lr);
    zero_e.step();
    zero_e.zero_grad();
    const std::string at = " at step " + std::to_string(t);
    expect_same_params(c, p.b, "ZeRO -> plain" + at);
    expect_same_params(d, p.a, "plain -> ZeRO" + at);
    expect_same_params(e, p.b, "dp n -> dp 1" + at);
  }
  expect_same_state(p.zero->export_state(), adam_c.export_state(), "ZeRO -> plain, state");
  expect_same_state(p.ref->export_state(), zero_d.export_state(), "plain -> ZeRO, state");
  expect_same_state(p.zero->export_state(), zero_e.export_state(), "dp n -> dp 1, state");
}

// The state of an f32 run (no ".master") resumes a bf16 run: the master is then taken from the
// parameter at its next update, with and without ZeRO alike.
TEST(ZeroBf16, StateWithoutMastersTakesThemFromTheParameters) {
  Pair p(14);
  for (int t = 0; t < 2; ++t) p.step(t, 0);
  optim::OptimizerState st = p.ref->export_state();
  std::erase_if(st.tensors, [](const auto& kv) { return kv.first.ends_with(".master"); });
  Pair q(15);  // other parameters: the masters must come from these
  q.ref->import_state(st);
  q.zero->import_state(st);
  expect_same_params(q.a, q.b, "imported");
  expect_same_state(q.ref->export_state(), q.zero->export_state(), "imported");
  for (int t = 2; t < 4; ++t) {
    q.step(t, 0);
    expect_same_params(q.a, q.b, "step " + std::to_string(t));
  }
  expect_same_state(q.ref->export_state(), q.zero->export_state(), "after");
}

TEST(ZeroBf16, RejectsUnsupportedParameters) {
  Tensor p = Tensor::zeros({8}, DType::f64);
  p.set_requires_grad(true);
  GradReducer red({p}, world(), ReducerOptions{kBucketMb, true});
  optim::ParamGroup g;
  g.params.emplace_back("x", p);
  try {
    ShardedAdamW z({g}, optim::AdamWOptions{}, red);
    FAIL() << "an f64 parameter was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("f32, bf16 or f16"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ftune
