// The in-process thread communicator of tests/thread_group.h (the harness of the GPU
// tensor-parallel tests): its collectives against the values they must give, the tp x dp grid it
// splits into, a failing rank that does not hang the others, and the vocab-parallel loss over 3
// threads against ops::cross_entropy (the same check as tests/mpi/test_tp_ops.cpp, without mpirun).
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <vector>

#include "core/ops.h"
#include "core/rng.h"
#include "parallel/tp_ops.h"
#include "tests/thread_group.h"

namespace ftune {
namespace {

using parallel::Communicator;
using parallel::ReduceOp;
using test::run_ranks;

TEST(ThreadGroup, CollectivesGiveEveryRankTheSameResult) {
  for (int n : {1, 2, 3}) {
    run_ranks(n, [n](int r, std::shared_ptr<Communicator> c) {
      EXPECT_EQ(c->rank(), r);
      EXPECT_EQ(c->size(), n);
      EXPECT_EQ(c->backend(), "thread");
      // rank r holds {r + 1, 10 (r + 1)}.
      const float a = float(r + 1), b = 10.0f * float(r + 1);
      Tensor t = Tensor::from_vector<float>({a, b}, {2});
      c->all_reduce(t);
      const float s = float(n * (n + 1) / 2);
      EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{s, 10 * s}));
      Tensor m = Tensor::from_vector<float>({a, -b}, {2});
      c->all_reduce_async(m, ReduceOp::max)->wait();
      EXPECT_EQ(m.to_vector<float>(), (std::vector<float>{float(n), -10.0f}));
      Tensor av = Tensor::from_vector<double>({double(r)}, {1});
      c->all_reduce(av, ReduceOp::avg);
      EXPECT_DOUBLE_EQ(av.item(), (n - 1) / 2.0);
      Tensor g = Tensor::zeros({2 * n}, DType::i64);
      c->all_gather(Tensor::from_vector<int64_t>({r, 100 + r}, {2}), g);
      std::vector<int64_t> want;
      for (int q = 0; q < n; ++q) want.insert(want.end(), {q, 100 + q});
      EXPECT_EQ(g.to_vector<int64_t>(), want);
      // reduce_scatter: block q of every rank's input is q + r; rank r gets sum over ranks of r +
      // q'.
      std::vector<float> in;
      for (int q = 0; q < n; ++q) in.insert(in.end(), {float(q + r), float(q + r)});
      Tensor out = Tensor::zeros({2});
      c->reduce_scatter(Tensor::from_vector(in, {2 * n}), out);
      const float rs = float(n * r + n * (n - 1) / 2);
      EXPECT_EQ(out.to_vector<float>(), (std::vector<float>{rs, rs}));
      Tensor bc = Tensor::full({3}, double(r), DType::bf16);
      c->broadcast(bc, n - 1);
      EXPECT_EQ(bc.to_vector<float>(), (std::vector<float>(3, float(n - 1))));
      c->barrier();
    });
  }
}

// make_grid's two splits (tp-major, as under MPI): the groups and ranks, and collectives in each.
TEST(ThreadGroup, SplitsIntoTheTpByDpGrid) {
  run_ranks(4, [](int r, std::shared_ptr<Communicator> c) {
    parallel::ProcessGrid g = parallel::make_grid(c, 2);
    EXPECT_EQ(g.tp, 2);
    EXPECT_EQ(g.dp, 2);
    EXPECT_EQ(g.tp_rank, r % 2);
    EXPECT_EQ(g.dp_rank, r / 2);
    Tensor t = Tensor::from_vector<float>({float(r)}, {1});
    g.tp_group->all_reduce(t);  // ranks {0, 1} and {2, 3}
    EXPECT_EQ(t.item(), r < 2 ? 1.0 : 5.0);
    Tensor d = Tensor::from_vector<float>({float(r)}, {1});
    g.dp_group->all_reduce(d);  // ranks {0, 2} and {1, 3}
    EXPECT_EQ(d.item(), r % 2 ? 4.0 : 2.0);
  });
}

// A rank that throws while the others wait in a collective: they are released with an error and
// the first rank's exception is the one rethrown.
TEST(ThreadGroup, AFailingRankReleasesTheOthers) {
  std::atomic<int> released{0};
  try {
    run_ranks(3, [&](int r, std::shared_ptr<Communicator> c) {
      if (r == 1) FTUNE_THROW("rank 1 fails");
      try {
        Tensor t = Tensor::zeros({1});
        c->all_reduce(t);
      } catch (const Error&) {
        ++released;
        throw;
      }
    });
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("rank 1 fails"), std::string::npos) << e.what();
  }
  EXPECT_EQ(released.load(), 2);
}

// Ranks that call different collectives (rank 1 returns while rank 0 waits in an all-reduce):
// an error, not a hang.
TEST(ThreadGroup, MismatchedCollectivesFailInsteadOfHanging) {
  try {
    run_ranks(2, [](int r, std::shared_ptr<Communicator> c) {
      if (r == 1) return;
      Tensor t = Tensor::zeros({1});
      c->all_reduce(t);
    });
    FAIL() << "no exception";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("different collectives"), std::string::npos) << e.what();
  }
}

// The vocab-parallel loss over 3 threads: value and gradient equal ops::cross_entropy's on the
// whole logits, with shards of unequal sizes (10 = 4 + 4 + 2) and ignored rows.
TEST(ThreadGroup, VocabParallelCrossEntropyEqualsCrossEntropy) {
  Generator gen(7);
  const int64_t V = 10;
  Tensor logits = randn({6, V}, gen, 0.0, 3.0);
  std::vector<int64_t> t = randint({6}, gen, 0, V).to_vector<int64_t>();
  t[0] = 0;
  t[1] = V - 1;
  t[4] = -100;
  Tensor targets = Tensor::from_vector(t, {6});
  Tensor fl = logits.clone().set_requires_grad(true);
  Tensor ref = ops::cross_entropy(fl, targets, -100, ops::Reduction::sum);
  ref.backward(Tensor::scalar(0.5));
  run_ranks(3, [&](int r, std::shared_ptr<Communicator> c) {
    parallel::Range rg = parallel::shard_range(V, 3, r);
    Tensor mine =
        logits.slice(1, rg.offset, rg.offset + rg.size).contiguous().set_requires_grad(true);
    Tensor got =
        parallel::vocab_parallel_cross_entropy(mine, targets, c, -100, ops::Reduction::sum);
    EXPECT_NEAR(got.item(), ref.item(), 1e-5 * std::fabs(ref.item())) << "rank " << r;
    got.backward(Tensor::scalar(0.5));
    Tensor want = fl.grad().slice(1, rg.offset, rg.offset + rg.size);
    EXPECT_LT(ops::max_abs_diff(mine.grad(), want), 1e-6) << "rank " << r;
  });
}

// ignore_index 0: on rank 1 (columns 5..9) the target 5 is local column 0, which must not read as
// ignored. And logits whose other shard lies 800 above the target's (exp of the difference
// overflows f64): the loss stays finite, as ops::cross_entropy's.
TEST(ThreadGroup, VocabParallelCrossEntropyIgnoreIndexZeroAndFarApartShards) {
  Generator gen(8);
  const int64_t V = 10;
  Tensor logits = randn({4, V}, gen, 0.0, 2.0).to(DType::f64);
  Tensor big = logits.slice(0, 3, 4);
  big.copy_(Tensor::from_vector<double>({0, 0, 0, 0, 0, 800, 800, 800, 800, 800}, {1, V}));
  Tensor targets = Tensor::from_vector<int64_t>({5, 0, 9, 1}, {4});
  Tensor fl = logits.clone().set_requires_grad(true);
  Tensor ref = ops::cross_entropy(fl, targets, 0, ops::Reduction::none);
  ref.backward(Tensor::ones({4}, DType::f64));
  ASSERT_TRUE(std::isfinite(ref.to_vector<double>()[3]));
  run_ranks(2, [&](int r, std::shared_ptr<Communicator> c) {
    Tensor mine = logits.slice(1, 5 * r, 5 * r + 5).contiguous().set_requires_grad(true);
    Tensor got = parallel::vocab_parallel_cross_entropy(mine, targets, c, 0, ops::Reduction::none);
    std::vector<double> g = got.to_vector<double>(), want = ref.to_vector<double>();
    for (size_t i = 0; i < 4; ++i)
      EXPECT_NEAR(g[i], want[i], 1e-12 * std::max(1.0, std::fabs(want[i]))) << "row " << i;
    got.backward(Tensor::ones({4}, DType::f64));
    EXPECT_LT(ops::max_abs_diff(mine.grad(), fl.grad().slice(1, 5 * r, 5 * r + 5)), 1e-12);
  });
}

}  // namespace
}  // namespace ftune
