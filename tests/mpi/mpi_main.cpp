// gtest main for the MPI tests: every rank runs every test (the collectives need all ranks);
// only rank 0 prints gtest's report, and the process exit code is non-zero on any rank's failure,
// which mpirun turns into the job's exit code.
#include <gtest/gtest.h>

#include <cstdio>

#include "tests/mpi/mpi_world.h"

namespace ftune::testing {
std::shared_ptr<parallel::Communicator>& world() {
  static std::shared_ptr<parallel::Communicator> w;
  return w;
}
}  // namespace ftune::testing

namespace {

// A fatal failure (ASSERT_*) on one rank makes it leave the test early, skipping collectives the
// other ranks are in: the job would hang until ctest's timeout. Take the job down at once, with
// the failure printed, instead.
class AbortOnFatalFailure : public ::testing::EmptyTestEventListener {
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.fatally_failed()) return;
    std::fprintf(stderr, "test_mpi: fatal failure on rank %d at %s:%d: %s\n",
                 ftune::testing::world() ? ftune::testing::world()->rank() : -1,
                 r.file_name() ? r.file_name() : "?", r.line_number(), r.summary());
    std::fflush(stderr);
    ftune::parallel::abort_job(1);
  }
};

}  // namespace

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  auto& w = ftune::testing::world();
  w = ftune::parallel::make_world_communicator("mpi");
  if (w->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());  // gtest owns it
  }
  ::testing::UnitTest::GetInstance()->listeners().Append(new AbortOnFatalFailure);  // gtest owns it
  int rc = RUN_ALL_TESTS();
  // Every rank's verdict: fail the job if any rank failed.
  int64_t failed = w->all_reduce_int(rc != 0 ? 1 : 0);
  if (w->rank() == 0 && failed)
    std::fprintf(stderr, "test_mpi: %lld rank(s) failed\n", (long long)failed);
  w.reset();
  ftune::parallel::finalize_mpi();
  return failed ? 1 : 0;
}
