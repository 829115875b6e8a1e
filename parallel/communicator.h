// Collective communication between the ranks of a job (DESIGN.md "Parallel"). One interface, two
// backends: MPI (CPU tensors; GPU tensors go to MPI as device pointers where the library is
// CUDA-aware, see mpi_cuda_aware(), else staged through the host) and NCCL (GPU tensors,
// CPU ones staged through the GPU, bootstrapped over MPI; parallel/nccl/nccl_communicator.h).
// A process not launched by mpirun, or a build without MPI, gets the single-rank communicator,
// on which every collective is the identity: one recipe runs unchanged from 1 to N ranks.
//
// Every collective is called by all ranks of the communicator in the same order (MPI's rule).
// Tensors are contiguous; f32, f64, i32, i64 go through the backend natively, bf16/f16 are summed
// in f32 (converted on the way). The async variants return a Work to wait on; the tensor must not
// be touched (nor freed) until then.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace ftune::parallel {

enum class ReduceOp { sum, max, min, avg };

// A pending non-blocking collective. wait() completes it (and any conversion back into the
// caller's tensor); destroying an unwaited Work waits.
class Work {
 public:
  virtual ~Work() = default;
  virtual void wait() = 0;
  virtual bool done() = 0;  // non-blocking test; true once complete (wait() still required)
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;  // "single", "mpi", "nccl"

  // In place: t = op over ranks of t.
  virtual void all_reduce(Tensor& t, ReduceOp op = ReduceOp::sum) = 0;
  virtual std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op = ReduceOp::sum) = 0;
  // `t` from `root` to every rank (same shape and dtype everywhere).
  virtual void broadcast(Tensor& t, int root) = 0;
  // in [size * n] -> out [n]: rank r gets op over ranks of in[r*n, (r+1)*n).
  virtual void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op = ReduceOp::sum) = 0;
  virtual std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, Tensor& out,
                                                     ReduceOp op = ReduceOp::sum) = 0;
  // in [n] -> out [size * n], rank r's block at [r*n, (r+1)*n).
  virtual void all_gather(const Tensor& in, Tensor& out) = 0;
  virtual std::unique_ptr<Work> all_gather_async(const Tensor& in, Tensor& out) = 0;
  virtual void barrier() = 0;
  // Sub-communicators as MPI_Comm_split: ranks with the same color form one, ordered by key.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;
  // The backend's own handle, for libraries that take one (parallel HDF5 takes an MPI_Comm):
  // a pointer to this communicator's MPI_Comm for "mpi", nullptr for "single". Valid while the
  // communicator lives.
  virtual void* native_handle() { return nullptr; }
  // MPI backend: true when GPU tensors go to MPI as device pointers (CUDA-aware MPI, decided by
  // mpi_cuda_aware() when the communicator was made), false when they are staged through host
  // copies. Other backends: false.
  virtual bool cuda_aware() const { return false; }

  // Conveniences over all_reduce for metrics (loss sums, token counts).
  double all_reduce_scalar(double v, ReduceOp op = ReduceOp::sum);
  int64_t all_reduce_int(int64_t v, ReduceOp op = ReduceOp::sum);
};

// The one-rank communicator: collectives copy or do nothing.
std::unique_ptr<Communicator> make_single_communicator();

// The job's world. backend "auto": MPI when this build has it and the process runs under an MPI
// launcher (OMPI_COMM_WORLD_SIZE / PMI_SIZE set) with more than one rank, else single. "mpi"
// forces MPI (throws without it), "single" a single rank. "nccl" (builds with NCCL): a NCCL
// communicator on the GPU select_device_for_local_rank() picks, bootstrapped over the MPI world
// under a launcher, else over the single communicator (parallel/nccl/nccl_communicator.h).
// Initialises MPI (thread level FUNNELED) on first use; see MpiRuntime.
std::unique_ptr<Communicator> make_world_communicator(const std::string& backend = "auto");

// True when this build has MPI.
bool mpi_support();
// CUDA-aware MPI: whether the MPI backend hands GPU tensors' device pointers to MPI (after
// synchronizing the current stream) instead of staging them through host copies.
//   - The library's own answer: Open MPI's mpi-ext.h, compile time (MPIX_CUDA_AWARE_SUPPORT) and
//     run time (MPIX_Query_cuda_support(), which mpirun --mca options can turn off). Other
//     libraries have no such query: unknown, i.e. staging.
//   - FTUNE_MPI_CUDA_AWARE overrides it: 0 forces host staging; 1 asserts CUDA-awareness (trusted
//     where the library cannot tell, an error where it says no).
struct MpiCudaSupport {  // what the MPI library says
  enum class Answer { yes, no, unknown };
  Answer answer = Answer::unknown;
  std::string detail;  // e.g. "Open MPI 4.1.4: MPIX_CUDA_AWARE_SUPPORT 0 (built without CUDA)"
};
struct MpiCudaAware {
  bool aware = false;
  std::string reason;  // one line for the log: the decision and why
};
// The library's answer, queried once (initialises MPI if needed). Without MPI: unknown.
MpiCudaSupport mpi_library_cuda_support();
// The decision for a library answer and FTUNE_MPI_CUDA_AWARE's value (nullptr or "": unset).
// Throws ftune::Error "[parallel] ..." for 1 when the library says no, and for a value that is
// neither 0 nor 1. Pure: no MPI, no environment.
MpiCudaAware decide_mpi_cuda_aware(const MpiCudaSupport& lib, const char* env_value);
// decide_mpi_cuda_aware(mpi_library_cuda_support(), getenv("FTUNE_MPI_CUDA_AWARE")): what an MPI
// communicator made now does with GPU tensors (each one decides when it is made, split() too).
MpiCudaAware mpi_cuda_aware();

// Whether the process was started by an MPI launcher (environment only; initialises nothing).
bool launched_by_mpi();

// Finalises MPI at exit if ftune initialised it. abort_job() is for main(): after an error on
// one rank it takes every rank of the job down (MPI_Abort), so nothing waits forever in a
// collective. A no-op without MPI or when MPI was never initialised.
void abort_job(int code);
void finalize_mpi();
// main()'s error path, shared by the ftune CLI and the MPI test programs. In a job of several
// ranks: prints "<prog>: error on rank R of N: <what>" once on stderr (only the failing rank
// prints it) and, once MPI is initialised, calls abort_job(1), which does not return (before
// MPI_Init it returns 1: mpirun aborts the job when a rank exits non-zero). Outside a job
// prints "<prog>: error: <what>" and returns 1, main()'s exit code.
int report_fatal_error(const char* prog, const char* what);
// This process's rank in the job and the job's size when MPI is initialised, else {0, 1}.
std::pair<int, int> job_rank_and_size();

// The tp x dp grid of DESIGN.md: ranks are laid out tp-major (the tp ranks of one dp replica are
// consecutive, so tensor parallelism stays within a node), world = tp * dp.
struct ProcessGrid {
  int tp = 1, dp = 1;
  int tp_rank = 0, dp_rank = 0;
  std::shared_ptr<Communicator> world, tp_group, dp_group;
};
// Throws ftune::Error "[parallel] ..." when tp does not divide the world size.
ProcessGrid make_grid(std::shared_ptr<Communicator> world, int tp);

// Optional accounting of the time this process spends inside the MPI backend (benchmarks:
// bench/scaling). Off by default; when on, the backend adds the wall time of every call that
// enters MPI (blocking collectives, the start of async ones, Work::wait, Work::done, barrier)
// and the bytes each collective puts on the wire from this rank (its input payload). It counts
// time the calling thread is blocked or progressing MPI, not communication that overlaps
// compute in the background. Main thread only (MPI runs FUNNELED); the single backend counts
// nothing. Cost when off: one branch per call.
struct CommStats {
  double seconds = 0;  // wall time inside MPI calls
  int64_t bytes = 0;   // payload bytes of the collectives started
  int64_t calls = 0;   // collectives started (blocking or async; waits and tests not counted)
};
void set_comm_stats_enabled(bool on);
bool comm_stats_enabled();
CommStats comm_stats();
void reset_comm_stats();
// Used by backends: add one timed interval (and optionally a collective's bytes).
void comm_stats_add(double seconds, int64_t bytes, bool collective);

}  // namespace ftune::parallel
