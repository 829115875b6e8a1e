// The MPI world of test_mpi (tests/mpi/mpi_main.cpp sets it up before the tests run).
#pragma once
#include <memory>

#include "parallel/communicator.h"

namespace ftune::testing {
std::shared_ptr<parallel::Communicator>& world();
}  // namespace ftune::testing
