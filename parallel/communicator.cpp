#include "parallel/communicator.h"

#include <cstdio>
#include <cstdlib>
#include <tuple>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "parallel/nccl/nccl_communicator.h"

namespace ftune::parallel {

double Communicator::all_reduce_scalar(double v, ReduceOp op) {
  Tensor t = Tensor::from_vector<double>({v}, {1});
  all_reduce(t, op);
  return t.data<double>()[0];
}

int64_t Communicator::all_reduce_int(int64_t v, ReduceOp op) {
  FTUNE_CHECK(op != ReduceOp::avg, "[parallel] all_reduce_int: avg of integers");
  Tensor t = Tensor::from_vector<int64_t>({v}, {1});
  all_reduce(t, op);
  return t.data<int64_t>()[0];
}

namespace {

bool g_stats_on = false;
CommStats g_stats;

class DoneWork : public Work {
 public:
  void wait() override {}
  bool done() override { return true; }
};

void check_contiguous(const Tensor& t, const char* what) {
  FTUNE_CHECK(t.defined() && t.is_contiguous(), "[parallel] ", what,
              ": the tensor must be defined and contiguous, got ",
              t.defined() ? t.desc() : std::string("undefined"));
}

// One rank: every collective is the identity (reduce_scatter and all_gather copy).
class SingleCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend() const override { return "single"; }
  void all_reduce(Tensor& t, ReduceOp) override { check_contiguous(t, "all_reduce"); }
  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op) override {
    all_reduce(t, op);
    return std::make_unique<DoneWork>();
  }
  void broadcast(Tensor& t, int root) override {
    check_contiguous(t, "broadcast");
    FTUNE_CHECK(root == 0, "[parallel] broadcast: root ", root, " of a 1-rank communicator");
  }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp) override {
    check_contiguous(in, "reduce_scatter");
    check_contiguous(out, "reduce_scatter");
    FTUNE_CHECK(in.numel() == out.numel(), "[parallel] reduce_scatter: in ", in.desc(), ", out ",
                out.desc(), " (1 rank)");
    if (!in.same(out)) out.copy_(in.view({-1}).view(out.shape()));
  }
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, Tensor& out, ReduceOp op) override {
    reduce_scatter(in, out, op);
    return std::make_unique<DoneWork>();
  }
  void all_gather(const Tensor& in, Tensor& out) override {
    check_contiguous(in, "all_gather");
    check_contiguous(out, "all_gather");
    FTUNE_CHECK(in.numel() == out.numel(), "[parallel] all_gather: in ", in.desc(), ", out ",
                out.desc(), " (1 rank)");
    if (!in.same(out)) out.copy_(in.view({-1}).view(out.shape()));
  }
  std::unique_ptr<Work> all_gather_async(const Tensor& in, Tensor& out) override {
    all_gather(in, out);
    return std::make_unique<DoneWork>();
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override {
    return std::make_unique<SingleCommunicator>();
  }
};

}  // namespace

std::unique_ptr<Communicator> make_single_communicator() {
  return std::make_unique<SingleCommunicator>();
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"}) {
    if (std::getenv(v)) return true;
  }
  return false;
}

namespace {
// The launcher's rank and size (Open MPI, then PMI: MPICH, Slurm's srun), for errors raised before
// MPI is initialised; {0, 1} outside a launcher.
std::pair<int, int> launcher_rank_and_size() {
  for (auto [r, n] : {std::pair{"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"},
                      std::pair{"PMI_RANK", "PMI_SIZE"}}) {
    const char *rv = std::getenv(r), *nv = std::getenv(n);
    if (rv && nv) return {std::atoi(rv), std::atoi(nv)};
  }
  return {0, 1};
}
}  // namespace

int report_fatal_error(const char* prog, const char* what) {
  std::fflush(stdout);
  auto [rank, size] = job_rank_and_size();
  const bool mpi_up = size > 1;
  if (!mpi_up) std::tie(rank, size) = launcher_rank_and_size();
  if (size > 1) {
    std::fprintf(stderr, "%s: error on rank %d of %d: %s\n", prog, rank, size, what);
    std::fflush(stderr);
    // MPI_Abort: mpirun kills every rank of the job (SIGTERM, then SIGKILL), so no rank is left
    // waiting in a collective for this one. Before MPI_Init, the non-zero exit code does it:
    // mpirun aborts the job when a rank exits non-zero.
    if (mpi_up) abort_job(1);
    return 1;
  }
  std::fprintf(stderr, "%s: error: %s\n", prog, what);
  return 1;
}

MpiCudaAware decide_mpi_cuda_aware(const MpiCudaSupport& lib, const char* env_value) {
  using A = MpiCudaSupport::Answer;
  const std::string env = env_value ? env_value : "";
  const std::string why = lib.detail.empty() ? std::string("no detail") : lib.detail;
  FTUNE_CHECK(env.empty() || env == "0" || env == "1", "[parallel] FTUNE_MPI_CUDA_AWARE=", env,
              ": expected 0 (stage GPU tensors through host memory) or 1 (the MPI library is "
              "CUDA-aware: pass device pointers)");
  if (env == "0") return {false, "GPU tensors staged through host memory (FTUNE_MPI_CUDA_AWARE=0; "
                                 "the library: " + why + ")"};
  if (env == "1") {
    FTUNE_CHECK(lib.answer != A::no, "[parallel] FTUNE_MPI_CUDA_AWARE=1, but this MPI library is "
                "not CUDA-aware (", why, "): it would read device pointers as host memory. Unset "
                "it (or set 0) to stage GPU tensors through host memory, or use a CUDA-aware MPI "
                "build");
    return {true, std::string("CUDA-aware: GPU tensors go to MPI as device pointers "
                              "(FTUNE_MPI_CUDA_AWARE=1; the library: ") + why + ")"};
  }
  if (lib.answer == A::yes)
    return {true, "CUDA-aware: GPU tensors go to MPI as device pointers (" + why + ")"};
  return {false, "GPU tensors staged through host memory (" + why +
                     (lib.answer == A::unknown ? "; set FTUNE_MPI_CUDA_AWARE=1 if it is CUDA-aware"
                                               : "") +
                     ")"};
}

#ifndef FTUNE_HAVE_MPI
bool mpi_support() { return false; }
MpiCudaSupport mpi_library_cuda_support() {
  return {MpiCudaSupport::Answer::unknown, "this build has no MPI"};
}
MpiCudaAware mpi_cuda_aware() {
  return decide_mpi_cuda_aware(mpi_library_cuda_support(), std::getenv("FTUNE_MPI_CUDA_AWARE"));
}
void abort_job(int) {}
void finalize_mpi() {}
std::pair<int, int> job_rank_and_size() { return {0, 1}; }
std::unique_ptr<Communicator> make_world_communicator(const std::string& backend) {
#ifdef FTUNE_HAVE_NCCL
  // Without MPI, nccl is a one-rank NCCL communicator (the launcher check below still applies).
  const bool nccl = backend == "nccl";
#else
  const bool nccl = false;
#endif
  FTUNE_CHECK(backend == "auto" || backend == "single" || nccl, "[parallel] backend '", backend,
              "': this build has no ", backend == "nccl" ? "NCCL" : "MPI",
              " (rebuild with FTUNE_MPI=ON", backend == "nccl" ? ", FTUNE_CUDA=ON and NCCL" : "",
              ")");
  FTUNE_CHECK(!(launched_by_mpi() && std::getenv("OMPI_COMM_WORLD_SIZE") &&
                std::atoi(std::getenv("OMPI_COMM_WORLD_SIZE")) > 1),
              "[parallel] launched by mpirun with several ranks, but this build has no MPI: "
              "every rank would train alone (rebuild with FTUNE_MPI=ON)");
#ifdef FTUNE_HAVE_NCCL
  if (nccl) return make_nccl_communicator(make_single_communicator(),
                                          cuda::select_device_for_local_rank());
#endif
  return make_single_communicator();
}
#endif

void set_comm_stats_enabled(bool on) { g_stats_on = on; }
bool comm_stats_enabled() { return g_stats_on; }
CommStats comm_stats() { return g_stats; }
void reset_comm_stats() { g_stats = CommStats{}; }
void comm_stats_add(double seconds, int64_t bytes, bool collective) {
  if (!g_stats_on) return;
  g_stats.seconds += seconds;
  g_stats.bytes += bytes;
  if (collective) ++g_stats.calls;
}

ProcessGrid make_grid(std::shared_ptr<Communicator> world, int tp) {
  FTUNE_CHECK(world != nullptr, "[parallel] make_grid: no world communicator");
  const int n = world->size();
  FTUNE_CHECK(tp >= 1 && n % tp == 0, "[parallel] parallel.tp = ", tp,
              " does not divide the number of ranks (", n,
              "): launch a multiple of tp ranks (mpirun -np k*", tp, ")");
  ProcessGrid g;
  g.tp = tp;
  g.dp = n / tp;
  g.tp_rank = world->rank() % tp;
  g.dp_rank = world->rank() / tp;
  g.world = world;
  g.tp_group = world->split(g.dp_rank, g.tp_rank);  // the tp ranks of one replica
  g.dp_group = world->split(g.tp_rank, g.dp_rank);  // the same shard across replicas
  return g;
}

}  // namespace ftune::parallel
