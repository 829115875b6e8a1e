// The single-rank communicator (a process not launched by mpirun): every collective is the
// identity, and the grid refuses a tp that does not divide the world.
#include <gtest/gtest.h>

#include "parallel/communicator.h"

namespace ftune {
namespace {

TEST(SingleComm, CollectivesAreTheIdentity) {
  auto c = parallel::make_single_communicator();
  EXPECT_EQ(c->size(), 1);
  EXPECT_EQ(c->rank(), 0);
  Tensor t = Tensor::from_vector<float>({1, 2, 3}, {3});
  c->all_reduce(t);
  c->all_reduce_async(t, parallel::ReduceOp::avg)->wait();
  EXPECT_EQ(t.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  Tensor out = Tensor::zeros({3});
  c->reduce_scatter(t, out);
  EXPECT_EQ(out.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  Tensor g = Tensor::zeros({3});
  c->all_gather(t, g);
  EXPECT_EQ(g.to_vector<float>(), (std::vector<float>{1, 2, 3}));
  EXPECT_EQ(c->all_reduce_scalar(2.5), 2.5);
  EXPECT_THROW(c->broadcast(t, 1), Error);
}

TEST(SingleComm, WorldWithoutALauncherIsSingle) {
  if (parallel::launched_by_mpi()) GTEST_SKIP() << "running under an MPI launcher";
  auto w = parallel::make_world_communicator("auto");
  EXPECT_EQ(w->backend(), "single");
  EXPECT_EQ(w->size(), 1);
}

TEST(SingleComm, GridRefusesATpThatDoesNotDivideTheWorld) {
  std::shared_ptr<parallel::Communicator> w = parallel::make_single_communicator();
  parallel::ProcessGrid g = parallel::make_grid(w, 1);
  EXPECT_EQ(g.tp, 1);
  EXPECT_EQ(g.dp, 1);
  try {
    parallel::make_grid(w, 2);
    FAIL() << "tp 2 on 1 rank was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not divide"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ftune
