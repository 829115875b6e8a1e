// The CUDA runtime seen from host code that does not include CUDA headers: device selection,
// streams, events and the thread's current stream. Kernels launch on current_stream(). Without
// FTUNE_CUDA every function here throws "has no GPU implementation" (core/cuda_stub.cpp), except
// the queries, which answer "no GPU".
#pragma once
#include <cstdint>
#include <string>

namespace ftune::cuda {

using StreamHandle = void*;  // a cudaStream_t
using EventHandle = void*;   // a cudaEvent_t

// Picks this process's GPU from its local rank (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
// MPI_LOCALRANKID or LOCAL_RANK; 0 when none is set): device = local_rank % device_count. Sets it
// current for the calling thread and returns it. Throws when no GPU is present.
int select_device_for_local_rank();
int local_rank_from_env();  // the rank above, or 0
void set_device(int dev);
int current_device();
std::string device_name(int dev = 0);
int device_sm_count(int dev = 0);
int64_t device_total_memory(int dev = 0);

// A stream owned by this object (non-blocking with respect to the legacy default stream).
class Stream {
 public:
  explicit Stream(int dev = 0);
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  StreamHandle handle() const { return h_; }
  int device() const { return dev_; }
  void synchronize() const;

 private:
  StreamHandle h_ = nullptr;
  int dev_ = 0;
};

class Event {
 public:
  explicit Event(bool timing = true);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(StreamHandle s);
  void synchronize() const;
  bool query() const;                    // true when the recorded work has finished
  void wait_on(StreamHandle s) const;    // stream s waits for this event (no host block)
  float elapsed_ms(const Event& end) const;  // both recorded with timing on
  EventHandle handle() const { return h_; }

 private:
  EventHandle h_ = nullptr;
};

// The stream kernels of this thread launch on (nullptr: the legacy default stream, which
// synchronizes with blocking streams but not with cuda::Stream's non-blocking ones).
StreamHandle current_stream();
void set_current_stream(StreamHandle s);
void stream_synchronize(StreamHandle s);

// Sets the current stream for a scope and restores the previous one.
class StreamGuard {
 public:
  explicit StreamGuard(StreamHandle s) : prev_(current_stream()) { set_current_stream(s); }
  ~StreamGuard() { set_current_stream(prev_); }
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  StreamHandle prev_;
};

// Whether f32 GEMMs may use TF32 tensor cores (recipe: `tf32: true`). Off by default.
void set_allow_tf32(bool on);
bool allow_tf32();
// GEMM autotuning (recipe: `gemm_autotune: true`; FTUNE_GEMM_AUTOTUNE=1 sets the default): each
// GEMM shape's algorithm is the fastest of cuBLASLt's top heuristic candidates, timed once at its
// first use, instead of the heuristic's first pick. Off by default: the pick can change between
// runs, and with it the last bits of the results (split-K and tile orders).
void set_gemm_autotune(bool on);
bool gemm_autotune();
// Deterministic mode: kernels avoid float atomics whose order varies (embedding backward, ...).
// On by default.
void set_deterministic(bool on);
bool deterministic();

}  // namespace ftune::cuda
