// gtest main for the MPI tests: every rank runs every test (the collectives need all ranks);
// only rank 0 prints gtest's report, and the process exit code is non-zero on any rank's failure,
// which mpirun turns into the job's exit code.
#include <gtest/gtest.h>

#include "tests/mpi/mpi_world.h"

namespace ftune::testing {
std::shared_ptr<parallel::Communicator>& world() {
  static std::shared_ptr<parallel::Communicator> w;
  return w;
}
}  // namespace ftune::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto& w = ftune::testing::world();
  w = ftune::parallel::make_world_communicator("mpi");
  if (w->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());  // gtest owns it
  }
  int rc = RUN_ALL_TESTS();
  // Every rank's verdict: fail the job if any rank failed.
  int64_t failed = w->all_reduce_int(rc != 0 ? 1 : 0);
  if (w->rank() == 0 && failed)
    std::fprintf(stderr, "test_mpi: %lld rank(s) failed\n", (long long)failed);
  w.reset();
  ftune::parallel::finalize_mpi();
  return failed ? 1 : 0;
}
