#include "parallel/checkpoint_io.h"

#include "core/error.h"

namespace ftune::parallel {

void save_checkpoint_parallel(const std::string& path, const Checkpoint& local_part,
                              const std::vector<TensorSlice>& slices, Communicator& comm) {
  void* handle = comm.size() > 1 ? comm.native_handle() : nullptr;
  FTUNE_CHECK(comm.size() == 1 || (handle && comm.backend() == "mpi"), "[checkpoint] ", path,
              ": a sharded save needs an MPI communicator, got the ", comm.backend(),
              " backend with ", comm.size(), " ranks");
  save_checkpoint_sharded(path, local_part, slices, handle);
}

}  // namespace ftune::parallel
