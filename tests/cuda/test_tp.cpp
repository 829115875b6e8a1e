// Tensor parallelism's vocabulary ops on the GPU, with ranks as threads of this process
// (tests/thread_group.h: the GPU machine has one GPU and no MPI): the vocab-parallel cross-entropy
// of f32/bf16/f16 GPU logits split over 2 and 3 ranks (unequal shards, an odd vocabulary, ignored
// rows, targets in the first and last columns) against ops::cross_entropy of the whole logits on
// the GPU, value and gradient; and the vocab-parallel embedding against ops::embedding. The
// whole trainer with tp on the GPU: SftRun.GpuTensorParallelMatchesOneGpu (tests/launch).
#include <gtest/gtest.h>

#include <vector>

#include "core/ops.h"
#include "parallel/tp_ops.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/thread_group.h"

namespace ftune::test {
namespace {

TEST(CudaTp, VocabParallelCrossEntropyMatchesCrossEntropy) {
  FTUNE_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  Generator g(21);
  for (DType dt : {DType::f32, DType::bf16, DType::f16}) {
    for (int ranks : {2, 3}) {
      const int64_t n = 9, V = 32003;
      Tensor logits = to_gpu(rand_host({n, V}, g, dt, 3.0), dt);
      std::vector<int64_t> t = randint({n}, g, 0, V).to_vector<int64_t>();
      t[0] = 0;
      t[1] = V - 1;
      t[4] = -100;
      Tensor targets = Tensor::from_vector(t, {n}, gpu);
      for (ops::Reduction red : {ops::Reduction::sum, ops::Reduction::none}) {
        SCOPED_TRACE(str_cat(dtype_name(dt), " ranks ", ranks, " reduction ", int(red)));
        Tensor full = logits.clone().set_requires_grad(true);
        Tensor ref = ops::cross_entropy(full, targets, -100, red);
        // g: 0.5 for the sum, per-row weights for none.
        Tensor gw = red == ops::Reduction::none ? to_gpu(rand_host({n}, g, DType::f32), dt)
                                                : Tensor::scalar(0.5, ref.dtype(), gpu);
        ref.backward(gw);
        run_ranks(ranks, [&](int r, std::shared_ptr<parallel::Communicator> c) {
          parallel::Range rg = parallel::shard_range(V, ranks, r);
          Tensor mine = logits.slice(1, rg.offset, rg.offset + rg.size).contiguous();
          mine.set_requires_grad(true);
          Tensor got = parallel::vocab_parallel_cross_entropy(mine, targets, c, -100, red);
          EXPECT_EQ(got.device(), gpu);
          EXPECT_EQ(got.dtype(), ref.dtype());
          EXPECT_EQ(got.shape(), ref.shape());
          // The loss in f32 on both sides (per-row outputs rounded to dt).
          const double rtol = red == ops::Reduction::none ? dtype_rtol(dt) : 1e-5;
          EXPECT_TRUE(all_close(got, ref, 1e-5, rtol)) << "rank " << r;
          got.backward(gw);
          Tensor want = full.grad().slice(1, rg.offset, rg.offset + rg.size);
          EXPECT_TRUE(all_close(mine.grad(), want, dt == DType::f32 ? 1e-7 : 1e-6, dtype_rtol(dt)))
              << "rank " << r;
        });
      }
    }
  }
}

TEST(CudaTp, VocabParallelEmbeddingMatchesEmbedding) {
  FTUNE_REQUIRE_GPU();
  const Device gpu = Device::cuda(0);
  Generator g(22);
  const int64_t V = 1001, D = 64;
  for (DType dt : {DType::f32, DType::bf16}) {
    Tensor table = to_gpu(rand_host({V, D}, g, dt), dt);
    Tensor ids = randint({3, 17}, g, 0, V).to(gpu);
    Tensor full = table.clone().set_requires_grad(true);
    Tensor ref = ops::embedding(full, ids);
    Tensor gw = to_gpu(rand_host({3, 17, D}, g, dt), dt);
    ref.backward(gw);
    run_ranks(2, [&](int r, std::shared_ptr<parallel::Communicator> c) {
      parallel::Range rg = parallel::shard_range(V, 2, r);
      Tensor mine = table.slice(0, rg.offset, rg.offset + rg.size).contiguous();
      mine.set_requires_grad(true);
      Tensor got = parallel::vocab_parallel_embedding(mine, ids, rg.offset, c);
      EXPECT_EQ(got.device(), gpu);
      EXPECT_TRUE(all_close(got, ref, 0, 0))
          << dtype_name(dt) << " rank " << r;  // one nonzero term
      got.backward(gw);
      EXPECT_TRUE(all_close(mine.grad(), full.grad().slice(0, rg.offset, rg.offset + rg.size), 1e-6,
                            dtype_rtol(dt)))
          << dtype_name(dt) << " rank " << r;
    });
  }
}

}  // namespace
}  // namespace ftune::test
