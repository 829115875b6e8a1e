// ZeRO-1's sharded AdamW on one GPU (the single communicator: dp 1, zero 1) against optim::AdamW
// on the GPU, bf16 parameters with f32 masters (and an f32 one), over 3 steps with a skipped
// gradient and a changing lr. Both run the same multi-tensor kernel, whose every element is
// computed with explicitly rounded operations, so parameters and state must agree bit for bit;
// the clip norm sums in another grouping (shards of buckets vs parameters) and is compared with a
// tolerance.
#include <gtest/gtest.h>

#include <cstring>
#include <map>

#include "core/autograd.h"
#include "core/optim.h"
#include "parallel/data_parallel.h"
#include "tests/cuda/cuda_test_util.h"

namespace ftune::test {
namespace {

const Shape kShapes[] = {{5, 3}, {7}, {33, 65}, {3}, {4099}};
DType dtype_of(size_t i) { return i == 1 ? DType::f32 : DType::bf16; }

std::vector<uint32_t> bits(const Tensor& t) {
  std::vector<float> f = t.to(Device::cpu()).to(DType::f32).to_vector<float>();
  std::vector<uint32_t> b(f.size());
  std::memcpy(b.data(), f.data(), f.size() * sizeof(float));
  return b;
}

TEST(CudaZero, ShardedAdamWEqualsAdamWOnOneGpu) {
  FTUNE_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  Generator gen(5);
  std::vector<Tensor> a, b;
  optim::NamedTensors na, nb;
  for (size_t i = 0; i < std::size(kShapes); ++i) {
    Tensor init = rand_host(kShapes[i], gen, dtype_of(i));
    a.push_back(to_gpu(init, dtype_of(i)).set_requires_grad());
    b.push_back(to_gpu(init, dtype_of(i)).set_requires_grad());
    na.emplace_back("p" + std::to_string(i), a.back());
    nb.emplace_back("p" + std::to_string(i), b.back());
  }
  optim::AdamWOptions o;
  o.lr = 1e-2;
  o.weight_decay = 0.1;
  optim::AdamW ref(optim::decay_groups(na, o.weight_decay), o);
  // 0.002 MB: one parameter a bucket (the f32 one apart by its dtype).
  parallel::GradReducer red(b, parallel::make_single_communicator(),
                            parallel::ReducerOptions{0.002, true});
  ASSERT_GT(red.num_buckets(), 1u);
  parallel::ShardedAdamW zero(optim::decay_groups(nb, o.weight_decay), o, red);
  for (int t = 0; t < 3; ++t) {
    for (size_t i = 0; i < a.size(); ++i) {
      if (t == 1 && i == 3) continue;  // skipped: its step does not advance
      Tensor g = to_gpu(rand_host(kShapes[i], gen, dtype_of(i)), dtype_of(i));
      a[i].set_grad(g.clone());
      b[i].set_grad(g.clone());
    }
    red.finish();
    const double sa = optim::grad_sum_squares(a), sb = zero.grad_sum_squares();
    EXPECT_NEAR(sa, sb, 1e-6 * sa) << "step " << t;
    const double lr = 1e-2 * (1 + t);
    ref.set_lr(lr);
    zero.set_lr(lr);
    ref.step();
    zero.step();
    ref.zero_grad();
    zero.zero_grad();
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_TRUE(b[i].device() == gpu);
      EXPECT_EQ(b[i].dtype(), dtype_of(i));
      EXPECT_EQ(bits(a[i]), bits(b[i])) << "step " << t << " param " << i;
    }
  }
  optim::OptimizerState xa = ref.export_state(), xb = zero.export_state();
  EXPECT_EQ(xa.step, xb.step);
  ASSERT_EQ(xa.tensors.size(), xb.tensors.size());
  std::map<std::string, Tensor> by;
  for (const auto& [k, t] : xb.tensors) by[k] = t;
  for (const auto& [k, t] : xa.tensors) {
    ASSERT_TRUE(by.count(k)) << k;
    EXPECT_TRUE(by[k].device().is_cpu()) << k;
    EXPECT_EQ(bits(t), bits(by[k])) << k;
  }
  ASSERT_TRUE(by.count("p0.master"));
  EXPECT_EQ(by["p3.step"].item(), 2);

  // Clipping scales the shards on the device like clip_grad_norm scales the gradients.
  for (size_t i = 0; i < a.size(); ++i) {
    Tensor g = to_gpu(rand_host(kShapes[i], gen, dtype_of(i), 3.0), dtype_of(i));
    a[i].set_grad(g.clone());
    b[i].set_grad(g.clone());
  }
  red.finish();
  const double ca = optim::clip_grad_norm(a, 0.5), cb = zero.clip_grad_norm(0.5);
  EXPECT_NEAR(ca, cb, 1e-6 * ca);
  EXPECT_GT(ca, 0.5);
  EXPECT_NEAR(zero.grad_sum_squares(), optim::grad_sum_squares(a), 1e-4 * 0.25);
  // The clipped gradients within the rounding of the scale: the same update.
  ref.step();
  zero.step();
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(all_close(b[i], a[i], 1e-5, dtype_rtol(dtype_of(i))))
        << "clipped step, param " << i;
}

}  // namespace
}  // namespace ftune::test
