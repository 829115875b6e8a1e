// The NCCL backend of parallel/communicator.h (issue 5): collectives on GPU tensors through NCCL,
// bootstrapped over another communicator (MPI for a job, the single communicator for one rank).
// Built only with FTUNE_CUDA=ON and NCCL found (FTUNE_HAVE_NCCL); docs/distributed.md "NCCL".
//
// Streams: every collective runs on the communicator's own NCCL stream, which first waits (with
// an event) for the caller's current stream (ftune::cuda::current_stream()), so the inputs the
// caller just wrote are ready. A blocking collective and Work::wait() make the current stream wait
// for the collective's completion event: later kernels on it see the result, and the host is not
// blocked. Work::done() queries the event without blocking.
//
// CPU tensors are staged through the GPU (copied to the communicator's device, reduced there,
// copied back; the host waits for those): the trainer's metric scalars and flags stay CPU tensors.
// GPU tensors must be on the communicator's device. Dtypes: f32, f64, bf16, f16, i32, i64
// (16-bit reduced natively by NCCL; avg of integers refused, as in the MPI backend).
#pragma once
#include <memory>

#include "parallel/communicator.h"

namespace ftune::parallel {

#ifdef FTUNE_HAVE_NCCL
// Collective over `bootstrap`'s ranks: rank 0 makes the ncclUniqueId, the bootstrap broadcasts
// it, every rank calls ncclCommInitRank on `device` (made current). The result keeps `bootstrap`
// (split() splits it too). backend() == "nccl"; native_handle() is the ncclComm_t.
std::unique_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> bootstrap,
                                                     int device);
// The NCCL library's version code (NCCL_VERSION_CODE style, e.g. 22809 for 2.28.9).
int nccl_version();
#endif

// True when this build has the NCCL backend.
constexpr bool nccl_support() {
#ifdef FTUNE_HAVE_NCCL
  return true;
#else
  return false;
#endif
}

}  // namespace ftune::parallel
