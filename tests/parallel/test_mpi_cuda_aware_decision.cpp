// How the MPI backend decides between CUDA-aware MPI and host staging (decide_mpi_cuda_aware):
// the library's answer, overridden by FTUNE_MPI_CUDA_AWARE. Pure logic, no MPI: the real
// library's answer and the communicators are tested under mpirun (tests/mpi/test_mpi_cuda_aware).
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "parallel/communicator.h"

namespace ftune {
namespace {

using parallel::decide_mpi_cuda_aware;
using parallel::MpiCudaSupport;
using A = MpiCudaSupport::Answer;

const MpiCudaSupport kYes{A::yes, "lib yes"}, kNo{A::no, "lib no"}, kUnknown{A::unknown, "lib ?"};

TEST(MpiCudaAwareDecision, UnsetFollowsTheLibrary) {
  for (const char* unset : {static_cast<const char*>(nullptr), ""}) {
    EXPECT_TRUE(decide_mpi_cuda_aware(kYes, unset).aware);
    EXPECT_FALSE(decide_mpi_cuda_aware(kNo, unset).aware);
    EXPECT_FALSE(decide_mpi_cuda_aware(kUnknown, unset).aware);  // not assumed
  }
  // The reason says what was decided and quotes the library's detail.
  const std::string r = decide_mpi_cuda_aware(kNo, nullptr).reason;
  EXPECT_NE(r.find("staged through host memory"), std::string::npos) << r;
  EXPECT_NE(r.find("lib no"), std::string::npos) << r;
  EXPECT_NE(decide_mpi_cuda_aware(kUnknown, nullptr).reason.find("FTUNE_MPI_CUDA_AWARE=1"),
            std::string::npos);
  EXPECT_NE(decide_mpi_cuda_aware(kYes, nullptr).reason.find("CUDA-aware"), std::string::npos);
}

TEST(MpiCudaAwareDecision, ZeroForcesStaging) {
  for (const MpiCudaSupport& lib : {kYes, kNo, kUnknown}) {
    parallel::MpiCudaAware d = decide_mpi_cuda_aware(lib, "0");
    EXPECT_FALSE(d.aware) << lib.detail;
    EXPECT_NE(d.reason.find("FTUNE_MPI_CUDA_AWARE=0"), std::string::npos) << d.reason;
  }
}

TEST(MpiCudaAwareDecision, OneAssertsItAndFailsWhereTheLibrarySaysNo) {
  EXPECT_TRUE(decide_mpi_cuda_aware(kYes, "1").aware);
  EXPECT_TRUE(decide_mpi_cuda_aware(kUnknown, "1").aware);  // the user knows better than "?"
  try {
    decide_mpi_cuda_aware(kNo, "1");
    ADD_FAILURE() << "FTUNE_MPI_CUDA_AWARE=1 with a library that is not CUDA-aware must throw";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("[parallel]"), std::string::npos) << m;
    EXPECT_NE(m.find("FTUNE_MPI_CUDA_AWARE=1"), std::string::npos) << m;
    EXPECT_NE(m.find("not CUDA-aware"), std::string::npos) << m;
    EXPECT_NE(m.find("lib no"), std::string::npos) << m;  // why the library says no
  }
}

TEST(MpiCudaAwareDecision, OtherValuesAreErrors) {
  for (const char* v : {"yes", "2", "true", " 1"})
    EXPECT_THROW(decide_mpi_cuda_aware(kYes, v), Error) << v;
}

}  // namespace
}  // namespace ftune
