// The MPI backend of parallel/communicator.h. CPU tensors go to MPI as they are; CUDA tensors go
// as device pointers where the library is CUDA-aware (mpi_cuda_aware()), else they are staged
// through host copies; bf16/f16 are reduced in f32.
#include "parallel/communicator.h"

#ifdef FTUNE_HAVE_MPI
#include <mpi.h>
// Open MPI's extensions: MPIX_CUDA_AWARE_SUPPORT and MPIX_Query_cuda_support().
#if defined(OPEN_MPI) && __has_include(<mpi-ext.h>)
#include <mpi-ext.h>
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/ops.h"
#include "parallel/nccl/nccl_communicator.h"

namespace ftune::parallel {

namespace {

bool g_we_initialised = false;

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  FTUNE_THROW("[parallel] MPI ", what, " failed: ", std::string(msg, size_t(len)));
}

void ensure_mpi() {
  static std::once_flag once;
  std::call_once(once, [] {
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
      // Open MPI's non-blocking all-reduce (coll/libnbc) picks a binomial tree (reduce to one
      // rank, then broadcast the whole buffer) below 4 ranks or for in-place buffers, i.e. for
      // every call here: 2-3x slower than its ring on gradient buckets (bench/results/
      // cpu_scaling.md). Ask for the ring unless the user set the parameter; other MPIs ignore it.
      setenv("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "1", /*overwrite=*/0);
      int provided = 0;
      // FUNNELED: only the main thread calls MPI (OpenMP threads never do).
      check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided),
                "MPI_Init_thread");
      g_we_initialised = true;
      std::atexit(finalize_mpi);
    }
    // Errors come back as codes and are thrown as ftune::Error with the reason; main() then
    // aborts the job (abort_job), so no rank is left waiting.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  });
}

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    case DType::b8:
      return MPI_UINT8_T;
    default:
      return MPI_DATATYPE_NULL;
  }
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::sum:
    case ReduceOp::avg:
      return MPI_SUM;
    case ReduceOp::max:
      return MPI_MAX;
    case ReduceOp::min:
      return MPI_MIN;
  }
  return MPI_SUM;
}

// Adds the wall time of its scope to CommStats when accounting is on (reads no clock when off).
class CommTimer {
 public:
  explicit CommTimer(int64_t bytes = 0, bool collective = false)
      : on_(comm_stats_enabled()), bytes_(bytes), collective_(collective) {
    if (on_) t0_ = std::chrono::steady_clock::now();
  }
  ~CommTimer() {
    if (on_)
      comm_stats_add(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(),
                     bytes_, collective_);
  }
  CommTimer(const CommTimer&) = delete;
  CommTimer& operator=(const CommTimer&) = delete;

 private:
  bool on_;
  int64_t bytes_;
  bool collective_;
  std::chrono::steady_clock::time_point t0_;
};

int64_t nbytes(const Tensor& t) { return t.numel() * int64_t(dtype_size(t.dtype())); }

bool is_16bit(DType t) { return t == DType::bf16 || t == DType::f16; }

// What MPI sees for one user tensor: the tensor itself (native dtype, on the CPU or, with
// CUDA-aware MPI, on its GPU) or an f32/host copy, written back into the user's tensor by
// finish().
struct Staged {
  Tensor user;  // the caller's tensor
  Tensor wire;  // what goes to MPI (may be `user`)
  bool write_back = false;

  static Staged in(const Tensor& t, const char* what, bool cuda_aware) {
    FTUNE_CHECK(t.defined() && t.is_contiguous(), "[parallel] ", what,
                ": the tensor must be defined and contiguous, got ",
                t.defined() ? t.desc() : std::string("undefined"));
    Staged s;
    s.user = t;
    s.wire = t;
    if (t.device().is_cuda() && cuda_aware) {
      // Device pointers to MPI; 16-bit floats are widened on the GPU. MPI reads and writes the
      // buffer outside the stream order: the kernels that wrote it (and the cast) must be done.
      if (is_16bit(t.dtype())) s.wire = s.wire.to(DType::f32);
      cuda::set_device(t.device().index);
      cuda::stream_synchronize(cuda::current_stream());
    } else {
      // Host staging: the device-to-host copy runs on the current stream and waits for it, so
      // the copy holds what the earlier kernels wrote. 16-bit floats cross the bus as they are.
      if (!t.device().is_cpu()) s.wire = s.wire.to(Device::cpu());
      if (is_16bit(t.dtype())) s.wire = s.wire.to(DType::f32);
    }
    FTUNE_CHECK(mpi_type(s.wire.dtype()) != MPI_DATATYPE_NULL, "[parallel] ", what, ": dtype ",
                dtype_name(t.dtype()), " is not supported");
    s.write_back = !s.wire.same(t);
    return s;
  }
  void finish(int size, ReduceOp op) {
    if (op == ReduceOp::avg) {
      FTUNE_CHECK(is_floating(wire.dtype()), "[parallel] avg of a non-float tensor");
      ops::mul_(wire, 1.0 / double(size));
    }
    if (write_back) user.copy_(wire);
  }
};

class MpiWork : public Work {
 public:
  MpiWork(MPI_Request req, Staged out, int size, ReduceOp op, bool reduce)
      : req_(req), out_(std::move(out)), size_(size), op_(op), reduce_(reduce) {}
  ~MpiWork() override {
    if (!finished_) {
      try {
        wait();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "ftune: error: %s\n", e.what());
      }
    }
  }
  void wait() override {
    if (finished_) return;
    finished_ = true;
    CommTimer timer;
    check_mpi(MPI_Wait(&req_, MPI_STATUS_IGNORE), "MPI_Wait");
    out_.finish(size_, reduce_ ? op_ : ReduceOp::sum);
  }
  bool done() override {
    if (finished_) return true;
    CommTimer timer;
    int flag = 0;
    check_mpi(MPI_Test(&req_, &flag, MPI_STATUS_IGNORE), "MPI_Test");
    if (flag) {
      finished_ = true;
      out_.finish(size_, reduce_ ? op_ : ReduceOp::sum);
    }
    return flag != 0;
  }

 private:
  MPI_Request req_;
  Staged out_;
  int size_;
  ReduceOp op_;
  bool reduce_;
  bool finished_ = false;
  Tensor keep_;  // an input kept alive while the collective runs
 public:
  void keep(Tensor t) { keep_ = std::move(t); }
};

class MpiCommunicator : public Communicator {
 public:
  // cuda_aware: mpi_cuda_aware().aware, decided by the caller before it made `comm` (so a throw
  // leaks no communicator).
  MpiCommunicator(MPI_Comm comm, bool owned, bool cuda_aware)
      : comm_(comm), owned_(owned), cuda_aware_(cuda_aware) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
  }
  ~MpiCommunicator() override {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (owned_ && !finalized) MPI_Comm_free(&comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend() const override { return "mpi"; }

  void all_reduce(Tensor& t, ReduceOp op) override { all_reduce_async(t, op)->wait(); }
  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op) override {
    CommTimer timer(nbytes(t), true);
    // Reductions are staged through the host even with CUDA-aware MPI: Open MPI's non-blocking
    // reductions (libnbc) apply the op with CPU code, which cannot read device memory (its
    // CUDA-aware coll component covers the blocking ones only, by staging itself).
    Staged s = Staged::in(t, "all_reduce", false);
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, s.wire.raw_data(), int_count(s.wire.numel()),
                             mpi_type(s.wire.dtype()), mpi_op(op), comm_, &req),
              "MPI_Iallreduce");
    t.bump_version();
    return std::make_unique<MpiWork>(req, std::move(s), size_, op, true);
  }
  void broadcast(Tensor& t, int root) override {
    FTUNE_CHECK(root >= 0 && root < size_, "[parallel] broadcast: root ", root, " of ", size_,
                " ranks");
    CommTimer timer(nbytes(t), true);
    Staged s = Staged::in(t, "broadcast", cuda_aware_);
    check_mpi(MPI_Bcast(s.wire.raw_data(), int_count(s.wire.numel()), mpi_type(s.wire.dtype()),
                        root, comm_),
              "MPI_Bcast");
    s.finish(size_, ReduceOp::sum);
    t.bump_version();
  }
  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    reduce_scatter_async(in, out, op)->wait();
  }
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, Tensor& out, ReduceOp op) override {
    FTUNE_CHECK(in.numel() == out.numel() * size_ && in.dtype() == out.dtype(),
                "[parallel] reduce_scatter: in ", in.desc(), " must have ", size_,
                " times the elements of out ", out.desc(), ", same dtype");
    CommTimer timer(nbytes(in), true);
    Staged si = Staged::in(in, "reduce_scatter", false),  // staged: see all_reduce_async
           so = Staged::in(out, "reduce_scatter", false);
    MPI_Request req;
    check_mpi(MPI_Ireduce_scatter_block(si.wire.raw_data(), so.wire.raw_data(),
                                        int_count(so.wire.numel()), mpi_type(so.wire.dtype()),
                                        mpi_op(op), comm_, &req),
              "MPI_Ireduce_scatter_block");
    out.bump_version();
    auto w = std::make_unique<MpiWork>(req, std::move(so), size_, op, true);
    w->keep(si.wire);
    return w;
  }
  void all_gather(const Tensor& in, Tensor& out) override { all_gather_async(in, out)->wait(); }
  std::unique_ptr<Work> all_gather_async(const Tensor& in, Tensor& out) override {
    FTUNE_CHECK(out.numel() == in.numel() * size_ && in.dtype() == out.dtype(),
                "[parallel] all_gather: out ", out.desc(), " must have ", size_,
                " times the elements of in ", in.desc(), ", same dtype");
    CommTimer timer(nbytes(in), true);
    Staged si = Staged::in(in, "all_gather", cuda_aware_),
           so = Staged::in(out, "all_gather", cuda_aware_);
    MPI_Request req = MPI_REQUEST_NULL;
    if (!si.wire.device().is_cpu() || !so.wire.device().is_cpu()) {
      // Device pointers: CUDA-aware Open MPI supports them in blocking collectives only, so this
      // one completes here (the Work is done at once).
      check_mpi(MPI_Allgather(si.wire.raw_data(), int_count(si.wire.numel()),
                              mpi_type(si.wire.dtype()), so.wire.raw_data(),
                              int_count(si.wire.numel()), mpi_type(so.wire.dtype()), comm_),
                "MPI_Allgather");
    } else {
      check_mpi(MPI_Iallgather(si.wire.raw_data(), int_count(si.wire.numel()),
                               mpi_type(si.wire.dtype()), so.wire.raw_data(),
                               int_count(si.wire.numel()), mpi_type(so.wire.dtype()), comm_,
                               &req),
                "MPI_Iallgather");
    }
    out.bump_version();
    auto w = std::make_unique<MpiWork>(req, std::move(so), size_, ReduceOp::sum, false);
    w->keep(si.wire);
    return w;
  }
  void barrier() override {
    CommTimer timer;
    check_mpi(MPI_Barrier(comm_), "MPI_Barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    const bool cuda_aware = mpi_cuda_aware().aware;
    MPI_Comm sub;
    check_mpi(MPI_Comm_split(comm_, color, key, &sub), "MPI_Comm_split");
    return std::make_unique<MpiCommunicator>(sub, true, cuda_aware);
  }
  void* native_handle() override { return &comm_; }
  bool cuda_aware() const override { return cuda_aware_; }

 private:
  static int int_count(int64_t n) {
    FTUNE_CHECK(n <= INT32_MAX, "[parallel] ", n,
                " elements in one collective: more than MPI's int count (split the tensor)");
    return int(n);
  }
  MPI_Comm comm_;
  bool owned_;
  bool cuda_aware_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool mpi_support() { return true; }

MpiCudaSupport mpi_library_cuda_support() {
  ensure_mpi();  // Open MPI sets its run-time answer while it initialises
  static const MpiCudaSupport lib = [] {
    MpiCudaSupport s;
#if defined(OPEN_MPI) && defined(MPIX_CUDA_AWARE_SUPPORT)
    // Both must say yes: the build (compile time) and this run (run time: the library may be
    // built CUDA-aware but started without it, e.g. with --mca opal_cuda_support 0).
    const bool built = MPIX_CUDA_AWARE_SUPPORT;
    const int runtime = MPIX_Query_cuda_support();
    s.answer = built && runtime == 1 ? MpiCudaSupport::Answer::yes : MpiCudaSupport::Answer::no;
    s.detail = "Open MPI " + std::to_string(OMPI_MAJOR_VERSION) + "." +
               std::to_string(OMPI_MINOR_VERSION) + "." + std::to_string(OMPI_RELEASE_VERSION) +
               ": MPIX_CUDA_AWARE_SUPPORT " + std::to_string(int(built)) +
               (built ? "" : " (built without CUDA)") + ", MPIX_Query_cuda_support() = " +
               std::to_string(runtime);
#elif defined(OPEN_MPI)
    s.detail = "Open MPI " + std::to_string(OMPI_MAJOR_VERSION) + "." +
               std::to_string(OMPI_MINOR_VERSION) +
               " without the cuda extension (no MPIX_CUDA_AWARE_SUPPORT in mpi-ext.h): unknown";
#else
    s.detail = "this MPI library has no CUDA-awareness query (only Open MPI's is used): unknown";
#endif
    return s;
  }();
  return lib;
}

MpiCudaAware mpi_cuda_aware() {
  return decide_mpi_cuda_aware(mpi_library_cuda_support(), std::getenv("FTUNE_MPI_CUDA_AWARE"));
}

void finalize_mpi() {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (inited && !finalized && g_we_initialised) MPI_Finalize();
}

std::pair<int, int> job_rank_and_size() {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (!inited || finalized) return {0, 1};
  int r = 0, n = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return {r, n};
}

void abort_job(int code) {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (inited && !finalized) MPI_Abort(MPI_COMM_WORLD, code);
}

std::unique_ptr<Communicator> make_world_communicator(const std::string& backend) {
  FTUNE_CHECK(backend == "auto" || backend == "single" || backend == "mpi" || backend == "nccl",
              "[parallel] backend '", backend, "' is not one of auto, single, mpi, nccl");
  if (backend == "single") return make_single_communicator();
  if (backend == "nccl") {
#ifdef FTUNE_HAVE_NCCL
    // The MPI world bootstraps NCCL under a launcher; one process alone needs no MPI.
    const int dev = cuda::select_device_for_local_rank();
    if (!launched_by_mpi()) return make_nccl_communicator(make_single_communicator(), dev);
    ensure_mpi();
    return make_nccl_communicator(
        std::make_shared<MpiCommunicator>(MPI_COMM_WORLD, false, mpi_cuda_aware().aware), dev);
#else
    FTUNE_THROW("[parallel] backend 'nccl': this build has no NCCL (it needs FTUNE_CUDA=ON and "
                "NCCL found at configure time)");
#endif
  }
  if (backend == "auto" && !launched_by_mpi()) return make_single_communicator();
  ensure_mpi();
  int size = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  if (backend == "auto" && size == 1) return make_single_communicator();
  return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD, false, mpi_cuda_aware().aware);
}

}  // namespace ftune::parallel
#endif  // FTUNE_HAVE_MPI
