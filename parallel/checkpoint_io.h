// Sharded checkpoints over a Communicator (issue 5, DESIGN.md "Checkpoints (HDF5)"): every rank
// writes its slices of the full-shape tensors into ONE HDF5 file (parallel HDF5 over MPI-IO),
// and any layout can read it back (io/checkpoint.h: load_checkpoint, load_checkpoint_sharded,
// load_checkpoint_slice).
//
// The HDF5 work lives in io/ (save_checkpoint_sharded, which takes the MPI_Comm as an opaque
// pointer); this layer only hands it the communicator's handle, so io/ does not depend on
// parallel/ (DESIGN.md "Layers").
#pragma once
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "parallel/communicator.h"

namespace ftune::parallel {

// Collective over `comm`: see save_checkpoint_sharded. On the single-rank communicator the slices
// must be whole tensors and it is save_checkpoint. The NCCL backend has no MPI_Comm of its own:
// pass the MPI world (or a split of it) that bootstrapped it.
void save_checkpoint_parallel(const std::string& path, const Checkpoint& local_part,
                              const std::vector<TensorSlice>& slices, Communicator& comm);

}  // namespace ftune::parallel
