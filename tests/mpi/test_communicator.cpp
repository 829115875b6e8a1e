// The MPI communicator under mpirun (2 and 4 ranks): every collective against the values each
// rank can compute alone, every dtype path (native, 16-bit through f32), async + wait, splits
// and the tp x dp grid.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/ops.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using parallel::ReduceOp;
using testing::world;

// Rank r's value at index i: distinct per rank and index, exact in f32 and bf16.
double val(int r, int64_t i) { return double((r + 1) * 3 + (i % 7)) - 4.0; }

TEST(MpiComm, AllReduceSumMaxMinAvgEveryDtype) {
  auto& w = *world();
  const int n = w.size(), r = w.rank();
  ASSERT_GE(n, 2);
  EXPECT_EQ(w.backend(), "mpi");
  for (DType dt : {DType::f32, DType::f64, DType::i32, DType::i64, DType::bf16}) {
    for (ReduceOp op : {ReduceOp::sum, ReduceOp::max, ReduceOp::min}) {
      std::vector<double> mine(37);
      for (int64_t i = 0; i < 37; ++i) mine[size_t(i)] = val(r, i);
      Tensor t = Tensor::from_vector<double>(mine, {37}).to(dt);
      w.all_reduce(t, op);
      std::vector<double> got = t.to_vector<double>();
      for (int64_t i = 0; i < 37; ++i) {
        double want = op == ReduceOp::sum ? 0 : val(0, i);
        for (int q = 0; q < n; ++q) {
          double v = val(q, i);
          want = op == ReduceOp::sum   ? want + v
                 : op == ReduceOp::max ? std::max(want, v)
                                       : std::min(want, v);
        }
        ASSERT_EQ(got[size_t(i)], want) << dtype_name(dt) << " op " << int(op) << " i " << i;
      }
    }
  }
  Tensor a = Tensor::full({5}, double(r + 1));
  w.all_reduce(a, ReduceOp::avg);
  for (float v : a.to_vector<float>()) EXPECT_FLOAT_EQ(v, float(n + 1) / 2.0f);
}

TEST(MpiComm, AsyncAllReduceCompletesOnWait) {
  auto& w = *world();
  std::vector<Tensor> ts;
  std::vector<std::unique_ptr<parallel::Work>> works;
  for (int k = 0; k < 4; ++k) {
    ts.push_back(Tensor::full({1000 + k}, double(w.rank() + k)));
    works.push_back(w.all_reduce_async(ts.back()));
  }
  for (auto& wk : works) wk->wait();
  const int n = w.size();
  for (int k = 0; k < 4; ++k) {
    double want = n * (n - 1) / 2.0 + double(k * n);
    for (float v : ts[size_t(k)].to_vector<float>()) ASSERT_EQ(v, want);
  }
}

TEST(MpiComm, BroadcastReduceScatterAllGather) {
  auto& w = *world();
  const int n = w.size(), r = w.rank();
  Tensor b = Tensor::full({3, 4}, double(r == 1 ? 42 : -1));
  w.broadcast(b, 1);
  for (float v : b.to_vector<float>()) EXPECT_EQ(v, 42.0f);

  const int64_t chunk = 6;
  std::vector<double> in(size_t(chunk * n));
  for (int64_t i = 0; i < chunk * n; ++i) in[size_t(i)] = val(r, i);
  Tensor tin = Tensor::from_vector<double>(in, {chunk * n});
  Tensor tout = Tensor::zeros({chunk}, DType::f64);
  w.reduce_scatter(tin, tout);
  std::vector<double> got = tout.to_vector<double>();
  for (int64_t i = 0; i < chunk; ++i) {
    double want = 0;
    for (int q = 0; q < n; ++q) want += val(q, r * chunk + i);
    EXPECT_EQ(got[size_t(i)], want);
  }

  Tensor mine = Tensor::full({chunk}, double(r * 10));
  Tensor all = Tensor::zeros({n * chunk});
  w.all_gather(mine, all);
  std::vector<float> g = all.to_vector<float>();
  for (int q = 0; q < n; ++q)
    for (int64_t i = 0; i < chunk; ++i) EXPECT_EQ(g[size_t(q * chunk + i)], float(q * 10));
}

TEST(MpiComm, GridSplitsTpMajor) {
  auto w = world();
  const int n = w->size();
  if (n % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  parallel::ProcessGrid g = parallel::make_grid(w, 2);
  EXPECT_EQ(g.tp, 2);
  EXPECT_EQ(g.dp, n / 2);
  EXPECT_EQ(g.tp_rank, w->rank() % 2);
  EXPECT_EQ(g.dp_rank, w->rank() / 2);
  EXPECT_EQ(g.tp_group->size(), 2);
  EXPECT_EQ(g.dp_group->size(), n / 2);
  EXPECT_EQ(g.tp_group->rank(), g.tp_rank);
  // Sum of world ranks within my tp group: the two consecutive ranks of my replica.
  EXPECT_EQ(g.tp_group->all_reduce_int(w->rank()), 4 * g.dp_rank + 1);
  EXPECT_THROW(parallel::make_grid(w, n + 1), Error);
}

}  // namespace
}  // namespace ftune
