// parallel::CommStats: the MPI backend's accounting of time and bytes inside MPI calls
// (bench/scaling reads it).
#include <gtest/gtest.h>

#include "mpi_world.h"
#include "parallel/communicator.h"

using namespace ftune;
using ftune::testing::world;

namespace {

struct StatsOff {  // leaves accounting off whatever the test does
  ~StatsOff() {
    parallel::set_comm_stats_enabled(false);
    parallel::reset_comm_stats();
  }
};

}  // namespace

TEST(CommStats, CountsCollectivesBytesAndTime) {
  StatsOff guard;
  auto& w = world();
  parallel::reset_comm_stats();
  parallel::set_comm_stats_enabled(true);
  Tensor t = Tensor::ones({1000}, DType::f32);
  w->all_reduce(t);  // one collective of 4000 bytes
  auto work = w->all_reduce_async(t);
  work->wait();  // a second one; waits add time, not calls
  Tensor in = Tensor::ones({3}, DType::f64), out = Tensor::zeros({3 * w->size()}, DType::f64);
  w->all_gather(in, out);  // 24 bytes from this rank
  parallel::CommStats s = parallel::comm_stats();
  EXPECT_EQ(s.calls, 3);
  EXPECT_EQ(s.bytes, 2 * 4000 + 24);
  EXPECT_GT(s.seconds, 0.0);
  EXPECT_LT(s.seconds, 60.0);
  EXPECT_FLOAT_EQ(t.data<float>()[0], float(w->size() * w->size()));
  // Off: nothing is added; reset clears.
  parallel::set_comm_stats_enabled(false);
  w->all_reduce(t);
  EXPECT_EQ(parallel::comm_stats().calls, 3);
  parallel::reset_comm_stats();
  EXPECT_EQ(parallel::comm_stats().calls, 0);
  EXPECT_EQ(parallel::comm_stats().bytes, 0);
  EXPECT_EQ(parallel::comm_stats().seconds, 0.0);
}

TEST(CommStats, SingleBackendCountsNothing) {
  StatsOff guard;
  auto one = parallel::make_single_communicator();
  parallel::reset_comm_stats();
  parallel::set_comm_stats_enabled(true);
  Tensor t = Tensor::ones({10}, DType::f32);
  one->all_reduce(t);
  EXPECT_EQ(parallel::comm_stats().calls, 0);
  EXPECT_EQ(parallel::comm_stats().bytes, 0);
}
