// The NCCL backend (parallel/nccl/nccl_communicator.h). Compiled only with FTUNE_HAVE_NCCL (the
// layer's glob picks this file up; CMake excludes it otherwise and the guard keeps it empty).
#include "parallel/nccl/nccl_communicator.h"

#ifdef FTUNE_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <utility>

#include "core/cuda_runtime.h"
#include "core/error.h"

namespace ftune::parallel {

namespace {

// Names the failing call, NCCL's reason (and its last error message, which says more) and rank.
#define NCCL_CHECK(call, rank)                                                                   \
  do {                                                                                           \
    ncclResult_t rc_ = (call);                                                                   \
    if (rc_ != ncclSuccess && rc_ != ncclInProgress)                                             \
      FTUNE_THROW("[parallel] NCCL ", #call, " failed on rank ", (rank), ": ",                   \
                  ncclGetErrorString(rc_), " (", ncclGetLastError(nullptr), ")");                \
  } while (0)

#define NCCL_CUDA_CHECK(call)                                                                    \
  do {                                                                                           \
    cudaError_t e_ = (call);                                                                     \
    if (e_ != cudaSuccess)                                                                       \
      FTUNE_THROW("[parallel] nccl backend: ", #call, " failed: ", cudaGetErrorString(e_));      \
  } while (0)

ncclDataType_t nccl_type(DType t, const char* what) {
  switch (t) {
    case DType::f32: return ncclFloat32;
    case DType::f64: return ncclFloat64;
    case DType::f16: return ncclFloat16;
    case DType::bf16: return ncclBfloat16;
    case DType::i32: return ncclInt32;
    case DType::i64: return ncclInt64;
    default: break;
  }
  FTUNE_THROW("[parallel] ", what, ": dtype ", dtype_name(t),
              " is not supported by the nccl backend (f32, f64, bf16, f16, i32, i64)");
}

ncclRedOp_t nccl_op(ReduceOp op, DType t, const char* what) {
  switch (op) {
    case ReduceOp::sum: return ncclSum;
    case ReduceOp::max: return ncclMax;
    case ReduceOp::min: return ncclMin;
    case ReduceOp::avg:
      FTUNE_CHECK(is_floating(t), "[parallel] ", what, ": avg of a non-float tensor (",
                  dtype_name(t), ")");
      return ncclAvg;
  }
  return ncclSum;
}

cudaStream_t as_stream(cuda::StreamHandle s) { return static_cast<cudaStream_t>(s); }

// What NCCL sees for one user tensor: the tensor itself (on the communicator's device) or a
// device copy of a CPU tensor, written back by finish().
struct Staged {
  Tensor user, wire;
  bool write_back = false;
};

// State shared by a communicator and its pending works: the comm, its stream, its device.
struct Core {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int device = 0, rank = 0, size = 1;
  ~Core() {
    // No throwing here: a destroyed communicator after a failure must not take the process down
    // a second way. Pending works hold a shared_ptr to this, so nothing is in flight.
    if (stream) {
      cudaStreamSynchronize(stream);
      cudaStreamDestroy(stream);
    }
    if (comm) ncclCommDestroy(comm);
  }
};

class NcclWork : public Work {
 public:
  NcclWork(std::shared_ptr<Core> core, cudaEvent_t done, std::vector<Staged> outs,
           std::vector<Tensor> keep)
      : core_(std::move(core)), done_(done), outs_(std::move(outs)), keep_(std::move(keep)) {}
  ~NcclWork() override {
    if (!finished_) {
      try {
        wait();
      } catch (const std::exception& e) {
        std::fprintf(stderr, "ftune: error: %s\n", e.what());
      }
    }
    if (done_) cudaEventDestroy(done_);
  }
  // The caller's stream waits for the collective; CPU outputs are copied back (host waits).
  void wait() override {
    if (finished_) return;
    finished_ = true;
    NCCL_CUDA_CHECK(cudaSetDevice(core_->device));
    NCCL_CUDA_CHECK(cudaStreamWaitEvent(as_stream(cuda::current_stream()), done_, 0));
    for (Staged& s : outs_)
      if (s.write_back) s.user.copy_(s.wire);  // d2h on the current stream, synchronised
  }
  bool done() override {
    if (finished_) return true;
    cudaError_t e = cudaEventQuery(done_);
    if (e == cudaErrorNotReady) return false;
    NCCL_CUDA_CHECK(e);
    // Async NCCL errors (a peer died) surface here rather than as a hang in wait().
    ncclResult_t async_rc = ncclSuccess;
    NCCL_CHECK(ncclCommGetAsyncError(core_->comm, &async_rc), core_->rank);
    NCCL_CHECK(async_rc, core_->rank);
    return true;
  }

 private:
  std::shared_ptr<Core> core_;
  cudaEvent_t done_ = nullptr;
  std::vector<Staged> outs_;
  std::vector<Tensor> keep_;  // inputs (and staged copies) alive until the collective completes
  bool finished_ = false;
};

class NcclCommunicator : public Communicator {
 public:
  NcclCommunicator(std::shared_ptr<Communicator> bootstrap, std::shared_ptr<Core> core)
      : boot_(std::move(bootstrap)), core_(std::move(core)) {}

  int rank() const override { return core_->rank; }
  int size() const override { return core_->size; }
  std::string backend() const override { return "nccl"; }
  void* native_handle() override { return core_->comm; }

  void all_reduce(Tensor& t, ReduceOp op) override { all_reduce_async(t, op)->wait(); }
  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op) override {
    const char* what = "all_reduce";
    Staged s = stage(t, what);
    const ncclDataType_t ty = nccl_type(t.dtype(), what);
    const ncclRedOp_t rop = nccl_op(op, t.dtype(), what);
    cudaEvent_t ev = begin();
    NCCL_CHECK(ncclAllReduce(s.wire.raw_data(), s.wire.raw_data(), size_t(t.numel()), ty, rop,
                             core_->comm, core_->stream),
               core_->rank);
    t.bump_version();
    return end(ev, {s}, {});
  }

  void broadcast(Tensor& t, int root) override {
    FTUNE_CHECK(root >= 0 && root < size(), "[parallel] broadcast: root ", root, " of ", size(),
                " ranks");
    const char* what = "broadcast";
    Staged s = stage(t, what);
    const ncclDataType_t ty = nccl_type(t.dtype(), what);
    cudaEvent_t ev = begin();
    NCCL_CHECK(ncclBroadcast(s.wire.raw_data(), s.wire.raw_data(), size_t(t.numel()), ty, root,
                             core_->comm, core_->stream),
               core_->rank);
    t.bump_version();
    end(ev, {s}, {})->wait();
  }

  void reduce_scatter(const Tensor& in, Tensor& out, ReduceOp op) override {
    reduce_scatter_async(in, out, op)->wait();
  }
  std::unique_ptr<Work> reduce_scatter_async(const Tensor& in, Tensor& out, ReduceOp op) override {
    const char* what = "reduce_scatter";
    FTUNE_CHECK(in.numel() == out.numel() * size() && in.dtype() == out.dtype(), "[parallel] ",
                what, ": in ", in.desc(), " must have ", size(), " times the elements of out ",
                out.desc(), ", same dtype");
    Staged si = stage(in, what), so = stage(out, what);
    const ncclDataType_t ty = nccl_type(out.dtype(), what);
    const ncclRedOp_t rop = nccl_op(op, out.dtype(), what);
    cudaEvent_t ev = begin();
    NCCL_CHECK(ncclReduceScatter(si.wire.raw_data(), so.wire.raw_data(), size_t(out.numel()), ty,
                                 rop, core_->comm, core_->stream),
               core_->rank);
    out.bump_version();
    return end(ev, {so}, {si.user, si.wire});
  }

  void all_gather(const Tensor& in, Tensor& out) override { all_gather_async(in, out)->wait(); }
  std::unique_ptr<Work> all_gather_async(const Tensor& in, Tensor& out) override {
    const char* what = "all_gather";
    FTUNE_CHECK(out.numel() == in.numel() * size() && in.dtype() == out.dtype(), "[parallel] ",
                what, ": out ", out.desc(), " must have ", size(), " times the elements of in ",
                in.desc(), ", same dtype");
    Staged si = stage(in, what), so = stage(out, what);
    const ncclDataType_t ty = nccl_type(in.dtype(), what);
    cudaEvent_t ev = begin();
    NCCL_CHECK(ncclAllGather(si.wire.raw_data(), so.wire.raw_data(), size_t(in.numel()), ty,
                             core_->comm, core_->stream),
               core_->rank);
    out.bump_version();
    return end(ev, {so}, {si.user, si.wire});
  }

  // One-element all-reduce, then the host waits for it: every rank has reached this point.
  void barrier() override {
    Tensor one = Tensor::zeros({1}, DType::f32, Device::cuda(core_->device));
    all_reduce(one, ReduceOp::sum);
    NCCL_CUDA_CHECK(cudaStreamSynchronize(core_->stream));
  }

  // Splits the bootstrap (MPI_Comm_split order: color, then key) and makes the NCCL comm of the
  // new group: ncclCommSplit (NCCL >= 2.18, no new bootstrap round), else a fresh unique id over
  // the split bootstrap.
  std::unique_ptr<Communicator> split(int color, int key) override {
    FTUNE_CHECK(color >= 0, "[parallel] split: color ", color, " (must be >= 0)");
    std::shared_ptr<Communicator> sub_boot = boot_->split(color, key);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
    NCCL_CUDA_CHECK(cudaSetDevice(core_->device));
    // The new comm's work is ordered after everything queued on this one.
    NCCL_CUDA_CHECK(cudaStreamSynchronize(core_->stream));
    ncclComm_t sub = nullptr;
    NCCL_CHECK(ncclCommSplit(core_->comm, color, key, &sub, nullptr), core_->rank);
    auto c = make_core(sub, core_->device);
    FTUNE_CHECK(c->rank == sub_boot->rank() && c->size == sub_boot->size(),
                "[parallel] split: NCCL group rank ", c->rank, " of ", c->size,
                " differs from the bootstrap's ", sub_boot->rank(), " of ", sub_boot->size());
    return std::make_unique<NcclCommunicator>(std::move(sub_boot), std::move(c));
#else
    return make_nccl_communicator(std::move(sub_boot), core_->device);
#endif
  }

  static std::shared_ptr<Core> make_core(ncclComm_t comm, int device) {
    auto c = std::make_shared<Core>();
    c->comm = comm;
    c->device = device;
    NCCL_CHECK(ncclCommUserRank(comm, &c->rank), -1);
    NCCL_CHECK(ncclCommCount(comm, &c->size), c->rank);
    NCCL_CUDA_CHECK(cudaSetDevice(device));
    NCCL_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    return c;
  }

 private:
  // The tensor NCCL reads and writes: `t` itself when on this device, a device copy of a CPU
  // tensor (copied back by the work's wait).
  Staged stage(const Tensor& t, const char* what) {
    FTUNE_CHECK(t.defined() && t.is_contiguous(), "[parallel] ", what,
                ": the tensor must be defined and contiguous, got ",
                t.defined() ? t.desc() : std::string("undefined"));
    Staged s;
    s.user = t;
    s.wire = t;
    if (t.device().is_cpu()) {
      NCCL_CUDA_CHECK(cudaSetDevice(core_->device));
      s.wire = t.to(Device::cuda(core_->device));  // h2d on the current stream, synchronised
      s.write_back = true;
    } else {
      FTUNE_CHECK(t.device() == Device::cuda(core_->device), "[parallel] ", what, ": tensor ",
                  t.desc(), " is on ", t.device().str(), " but this nccl communicator is on cuda:",
                  core_->device);
    }
    return s;
  }
  // The NCCL stream waits for the caller's stream (inputs written there are ready).
  cudaEvent_t begin() {
    NCCL_CUDA_CHECK(cudaSetDevice(core_->device));
    cudaEvent_t ready = nullptr, done = nullptr;
    NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    NCCL_CUDA_CHECK(cudaEventRecord(ready, as_stream(cuda::current_stream())));
    NCCL_CUDA_CHECK(cudaStreamWaitEvent(core_->stream, ready, 0));
    NCCL_CUDA_CHECK(cudaEventDestroy(ready));  // released once the wait is satisfied
    NCCL_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    return done;
  }
  std::unique_ptr<Work> end(cudaEvent_t done, std::vector<Staged> outs, std::vector<Tensor> keep) {
    NCCL_CUDA_CHECK(cudaEventRecord(done, core_->stream));
    for (const Staged& s : outs) keep.push_back(s.wire);
    return std::make_unique<NcclWork>(core_, done, std::move(outs), std::move(keep));
  }

  std::shared_ptr<Communicator> boot_;
  std::shared_ptr<Core> core_;
};

}  // namespace

std::unique_ptr<Communicator> make_nccl_communicator(std::shared_ptr<Communicator> bootstrap,
                                                     int device) {
  FTUNE_CHECK(bootstrap, "[parallel] make_nccl_communicator: no bootstrap communicator");
  const int rank = bootstrap->rank(), size = bootstrap->size();
  NCCL_CUDA_CHECK(cudaSetDevice(device));
  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank == 0) NCCL_CHECK(ncclGetUniqueId(&id), rank);
  // The id travels as a CPU tensor of bytes over the bootstrap (i64 words: every backend has it).
  static_assert(sizeof(ncclUniqueId) % sizeof(int64_t) == 0);
  Tensor buf = Tensor::zeros({int64_t(sizeof(id) / sizeof(int64_t))}, DType::i64);
  std::memcpy(buf.raw_data(), &id, sizeof(id));
  bootstrap->broadcast(buf, 0);
  std::memcpy(&id, buf.raw_data(), sizeof(id));
  ncclComm_t comm = nullptr;
  NCCL_CHECK(ncclCommInitRank(&comm, size, id, rank), rank);
  return std::make_unique<NcclCommunicator>(std::move(bootstrap),
                                            NcclCommunicator::make_core(comm, device));
}

int nccl_version() {
  int v = 0;
  NCCL_CHECK(ncclGetVersion(&v), -1);
  return v;
}

}  // namespace ftune::parallel
#endif  // FTUNE_HAVE_NCCL
