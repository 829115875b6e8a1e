// Tensor parallelism at the model level with the ranks as threads of this process
// (tests/thread_group.h): each family's tp-2 model (sharded, then moved to the device) against the
// unsharded one on the same device: gathered logits, the vocab-parallel loss, every parameter's
// gradient gathered to full shape, and a KV-cache prefill plus one decode step. On the CPU here;
// on the GPU (`*Gpu*`: scripts/gpu_check.sh runs it) the same checks cover the sharded layers,
// the vocab-parallel embedding and loss, and the decode kernel on a rank's kv heads with GPU
// tensors. tests/mpi/test_tp_models.cpp does the CPU checks over MPI.
#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "core/allocator.h"
#include "core/rng.h"
#include "parallel/tp_ops.h"
#include "tests/models/model_test_util.h"
#include "tests/thread_group.h"

namespace ftune {
namespace {

using test::fixture_dir;

// max |a - b| / max |b| (b not all zero).
double rel_err(const Tensor& a, const Tensor& b) {
  double scale = 0.0;
  for (double v : b.to_vector<double>()) scale = std::max(scale, std::fabs(v));
  return ops::max_abs_diff(a.to(Device::cpu()), b.to(Device::cpu())) / std::max(scale, 1e-30);
}

void check_tp2_on(const std::string& fx, Device dev, double tol) {
  SCOPED_TRACE(fx + " on " + dev.str());
  auto ref = Transformer::from_pretrained(fixture_dir(fx));
  ref->to_(dev, DType::f32);
  const int64_t V = ref->config().vocab_size;
  Generator gen(7);
  const Tensor ids = randint({2, 6}, gen, 0, V).to(dev);
  std::vector<int64_t> t = randint({2, 6}, gen, 0, V).to_vector<int64_t>();
  t[1] = -100;
  const Tensor targets = Tensor::from_vector(t, {2, 6}, dev);
  const Tensor ref_logits = ref->forward(ids);
  const Tensor ref_loss = ops::cross_entropy(ref_logits, targets);
  ref_loss.backward();
  KVCache rc = ref->make_cache(2, 8, {0, 1});
  const Tensor ref_prefill = ref->forward(ids.slice(1, 0, 5).contiguous(), {.cache = &rc});
  const Tensor next = ids.slice(1, 5, 6).contiguous();
  const Tensor ref_decode = ref->forward(next, {.cache = &rc});

  test::run_ranks(2, [&](int r, std::shared_ptr<parallel::Communicator> tp) {
    auto mod = Transformer::from_pretrained(fixture_dir(fx));
    mod->shard_for_tp(tp);
    mod->to_(dev, DType::f32);
    for (auto& [n, p] : mod->named_parameters()) ASSERT_EQ(p.device(), dev) << n;
    EXPECT_LT(rel_err(mod->forward(ids), ref_logits), tol) << "gathered logits, rank " << r;
    Tensor shard = mod->forward_logits_shard(ids);
    EXPECT_EQ(shard.device(), dev);
    EXPECT_EQ(shard.size(2), parallel::shard_range(V, 2, r).size);
    Tensor loss =
        parallel::vocab_parallel_cross_entropy(shard, targets, tp, -100, ops::Reduction::mean, V);
    EXPECT_NEAR(loss.item(), ref_loss.item(), tol * std::fabs(ref_loss.item())) << "rank " << r;
    loss.backward();
    const auto infos = mod->shard_infos();
    for (auto& [name, p] : mod->named_parameters()) {
      ASSERT_TRUE(p.grad().defined()) << name;
      auto it = infos.find(name);
      Tensor full =
          it == infos.end() ? p.grad() : parallel::gather_shards(p.grad(), it->second, tp);
      EXPECT_LT(rel_err(full, ref->parameter(name).grad()), tol) << name << ", rank " << r;
    }
    // Generation: each rank caches its own kv heads; prefill, then one decode step.
    KVCache mc = mod->make_cache(2, 8, {0, 1});
    EXPECT_EQ(mc.k[0].size(2), ref->config().num_key_value_heads / 2);
    NoGradGuard no_grad;
    EXPECT_LT(rel_err(mod->forward(ids.slice(1, 0, 5).contiguous(), {.cache = &mc}), ref_prefill),
              tol)
        << "prefill, rank " << r;
    EXPECT_LT(rel_err(mod->forward(next, {.cache = &mc}), ref_decode), tol) << "decode, rank " << r;
  });
}

TEST(TpModelsThreads, FamiliesMatchOneRank) {
  for (const char* fx : {"gpt2", "llama", "qwen2"}) check_tp2_on(fx, Device::cpu(), 1e-5);
}

TEST(TpModelsThreads, GpuFamiliesMatchOneGpu) {
  if (!cuda_available())
    GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  // f32 on the GPU: other summation orders (the row-parallel layers' partial sums, cuBLASLt's
  // per-shape kernels), not other roundings.
  for (const char* fx : {"gpt2", "llama", "qwen2"}) check_tp2_on(fx, Device::cuda(0), 1e-4);
}

}  // namespace
}  // namespace ftune
