// The CUDA runtime: core/allocator.h's caching device allocator (size-class reuse, per-stream
// pools, stats, empty_cache), host<->device copies through pinned staging, and core/cuda_runtime.h
// (device selection, streams, events, the current stream). Compiled only with FTUNE_CUDA.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/error.h"

#define CUDA_CHECK(expr)                                                                      \
  do {                                                                                        \
    cudaError_t err_ = (expr);                                                                \
    if (err_ != cudaSuccess) FTUNE_THROW("[cuda] ", #expr, ": ", cudaGetErrorString(err_)); \
  } while (0)

namespace ftune {

namespace {

// Blocks are rounded up to a size class (512 B granularity below 1 MiB, 2 MiB above) and kept in
// a per-device free list on release; a later request of the same class reuses one.
size_t size_class(size_t n) {
  if (n < (size_t(1) << 20)) return std::max<size_t>(512, (n + 511) & ~size_t(511));
  return (n + (size_t(2) << 20) - 1) & ~((size_t(2) << 20) - 1);
}

// A freed block goes back to the pool of the stream it was allocated on, and is reused only by
// allocations on that stream: work queued on that stream that still reads it runs first, so no
// event is needed (the PyTorch rule; a block used on another stream must be kept alive by its user).
struct Block {
  void* p;
  size_t cls;
  void* stream;
};
struct DevicePool {
  std::mutex mu;
  std::multimap<std::pair<void*, size_t>, void*> free_blocks;  // (stream, class) -> block
  std::unordered_map<void*, Block> live;
  AllocatorStats stats;
};

std::atomic<bool> g_poison{false};

DevicePool& pool(int dev) {
  // Never destroyed: tensors freed during static teardown still return their blocks here.
  static auto* pools = new std::vector<std::unique_ptr<DevicePool>>(64);
  static auto* mu = new std::mutex;
  std::lock_guard<std::mutex> lk(*mu);
  FTUNE_CHECK(dev >= 0 && dev < 64, "[cuda] bad device index ", dev);
  if (!(*pools)[dev]) (*pools)[dev] = std::make_unique<DevicePool>();
  return *(*pools)[dev];
}

void release(int dev, void* p) {
  DevicePool& pl = pool(dev);
  std::lock_guard<std::mutex> lk(pl.mu);
  auto it = pl.live.find(p);
  if (it == pl.live.end()) return;
  pl.stats.current_bytes -= int64_t(it->second.cls);
  pl.free_blocks.emplace(std::make_pair(it->second.stream, it->second.cls), p);
  pl.live.erase(it);
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

bool cuda_available() { return cuda_device_count() > 0; }

std::shared_ptr<void> cuda_alloc(size_t bytes, int dev) {
  FTUNE_CHECK(cuda_available(), "[cuda_alloc] no GPU is present (CUDA found no device)");
  CUDA_CHECK(cudaSetDevice(dev));
  size_t cls = size_class(std::max<size_t>(bytes, 1));
  DevicePool& pl = pool(dev);
  void* stream = cuda::current_stream();
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    auto it = pl.free_blocks.find(std::make_pair(stream, cls));
    if (it != pl.free_blocks.end()) {
      p = it->second;
      pl.free_blocks.erase(it);
      ++pl.stats.cache_hits;
    }
  }
  if (!p) {
    cudaError_t err = cudaMalloc(&p, cls);
    if (err == cudaErrorMemoryAllocation) {  // free the cache and try once more
      cudaGetLastError();
      cuda_empty_cache();
      CUDA_CHECK(cudaSetDevice(dev));
      err = cudaMalloc(&p, cls);
    }
    if (err == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      size_t free_b = 0, total_b = 0;
      const bool known = cudaMemGetInfo(&free_b, &total_b) == cudaSuccess;
      cudaGetLastError();
      AllocatorStats st;
      {
        std::lock_guard<std::mutex> lk(pl.mu);
        st = pl.stats;
      }
      FTUNE_THROW("[cuda_alloc] ", cuda_oom_message(bytes, dev, st, known ? int64_t(free_b) : -1,
                                                     known ? int64_t(total_b) : -1));
    }
    if (err != cudaSuccess)
      FTUNE_THROW("[cuda_alloc] cudaMalloc of ", cls, " bytes on cuda:", dev, ": ", cudaGetErrorString(err));
    std::lock_guard<std::mutex> lk(pl.mu);
    pl.stats.reserved_bytes += int64_t(cls);
  }
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    pl.live[p] = Block{p, cls, stream};
    pl.stats.current_bytes += int64_t(cls);
    pl.stats.peak_bytes = std::max(pl.stats.peak_bytes, pl.stats.current_bytes);
    ++pl.stats.num_allocs;
  }
  // On the allocating stream: ordered before the kernels that will write the block.
  if (g_poison) CUDA_CHECK(cudaMemsetAsync(p, 0xFF, cls, static_cast<cudaStream_t>(stream)));
  return std::shared_ptr<void>(p, [dev](void* q) { release(dev, q); });
}

AllocatorStats cuda_allocator_stats(int dev) {
  DevicePool& pl = pool(dev);
  std::lock_guard<std::mutex> lk(pl.mu);
  return pl.stats;
}

void cuda_empty_cache() {
  // Only devices this process allocated on (no new contexts), and the caller's device is kept.
  int prev = 0;
  if (cudaGetDevice(&prev) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  int n = cuda_device_count();
  for (int d = 0; d < n && d < 64; ++d) {
    DevicePool& pl = pool(d);
    std::lock_guard<std::mutex> lk(pl.mu);
    if (pl.free_blocks.empty()) continue;
    cudaSetDevice(d);
    cudaDeviceSynchronize();  // a freed block may still be read by queued work
    for (auto& kv : pl.free_blocks) {
      cudaFree(kv.second);
      pl.stats.reserved_bytes -= int64_t(kv.first.second);
    }
    pl.free_blocks.clear();
  }
  cudaSetDevice(prev);
}

namespace {

// Pageable host memory is copied through two pinned 8 MiB staging buffers per thread, so the
// memcpy into one overlaps the DMA out of the other (cudaMemcpy from pageable memory stages
// through a single driver buffer and serializes). Small copies go direct.
constexpr size_t kStage = size_t(8) << 20;
struct Staging {
  void* buf[2] = {nullptr, nullptr};
  cudaEvent_t done[2] = {nullptr, nullptr};
  int dev = -1;
  ~Staging() {
    for (int i = 0; i < 2; ++i) {
      if (buf[i]) cudaFreeHost(buf[i]);
      if (done[i]) cudaEventDestroy(done[i]);
    }
  }
};
Staging& staging(int dev) {
  thread_local Staging st;
  if (!st.buf[0]) {
    for (int i = 0; i < 2; ++i) {
      CUDA_CHECK(cudaMallocHost(&st.buf[i], kStage));
      CUDA_CHECK(cudaEventCreateWithFlags(&st.done[i], cudaEventDisableTiming));
    }
  }
  st.dev = dev;
  return st;
}

}  // namespace

void cuda_memcpy_h2d(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  cudaStream_t s = static_cast<cudaStream_t>(cuda::current_stream());
  if (bytes < (size_t(1) << 20)) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    // From pageable memory the driver stages src before the call returns, so the caller may free
    // or reuse it and no sync is needed (PyTorch's non_blocking H2D copies from pageable memory
    // rely on the same): small uploads inside a step (positions, attention tile tables) then do
    // not drain the stream. From page-locked memory the DMA reads src later, so wait for it. (On
    // HMM/ATS systems, where the GPU can read pageable memory, this has not been checked.)
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, src) != cudaSuccess) {
      (void)cudaGetLastError();  // older drivers: unknown host pointer; be safe
      attr.type = cudaMemoryTypeHost;
    }
    if (attr.type != cudaMemoryTypeUnregistered) CUDA_CHECK(cudaStreamSynchronize(s));
    return;
  }
  Staging& st = staging(dev);
  size_t off = 0;
  for (int i = 0; off < bytes; i ^= 1) {
    size_t n = std::min(kStage, bytes - off);
    CUDA_CHECK(cudaEventSynchronize(st.done[i]));  // the DMA out of this buffer has finished
    std::memcpy(st.buf[i], static_cast<const char*>(src) + off, n);
    CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst) + off, st.buf[i], n, cudaMemcpyHostToDevice, s));
    CUDA_CHECK(cudaEventRecord(st.done[i], s));
    off += n;
  }
  CUDA_CHECK(cudaStreamSynchronize(s));
}

void cuda_memcpy_d2h(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  cudaStream_t s = static_cast<cudaStream_t>(cuda::current_stream());
  if (bytes < (size_t(1) << 20)) {
    CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
    CUDA_CHECK(cudaStreamSynchronize(s));
    return;
  }
  Staging& st = staging(dev);
  // Queue chunk k+1's DMA before copying chunk k out of its pinned buffer.
  size_t off = 0, prev_off = 0, prev_n = 0;
  int prev = -1;
  for (int i = 0; off < bytes || prev >= 0; i ^= 1) {
    size_t n = off < bytes ? std::min(kStage, bytes - off) : 0;
    if (n) {
      CUDA_CHECK(cudaMemcpyAsync(st.buf[i], static_cast<const char*>(src) + off, n, cudaMemcpyDeviceToHost, s));
      CUDA_CHECK(cudaEventRecord(st.done[i], s));
    }
    if (prev >= 0) {
      CUDA_CHECK(cudaEventSynchronize(st.done[prev]));
      std::memcpy(static_cast<char*>(dst) + prev_off, st.buf[prev], prev_n);
    }
    prev = n ? i : -1;
    prev_off = off;
    prev_n = n;
    off += n;
  }
}

void cuda_memcpy_d2d(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  cudaStream_t s = static_cast<cudaStream_t>(cuda::current_stream());
  CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, s));
}

void cuda_set_alloc_poison(bool on) { g_poison = on; }

namespace cuda {

namespace {
thread_local StreamHandle t_stream = nullptr;
std::atomic<bool> g_tf32{false};
std::atomic<bool> g_deterministic{true};
std::atomic<bool> g_gemm_autotune{[] {
  const char* e = std::getenv("FTUNE_GEMM_AUTOTUNE");
  return e != nullptr && std::string(e) == "1";
}()};
}  // namespace

int local_rank_from_env() {
  for (const char* k : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "LOCAL_RANK"})
    if (const char* v = std::getenv(k)) return std::atoi(v);
  return 0;
}

int select_device_for_local_rank() {
  int n = cuda_device_count();
  FTUNE_CHECK(n > 0, "[cuda] no GPU is present (CUDA found no device)");
  int dev = local_rank_from_env() % n;
  set_device(dev);
  return dev;
}

void set_device(int dev) { CUDA_CHECK(cudaSetDevice(dev)); }
int current_device() {
  int d = 0;
  CUDA_CHECK(cudaGetDevice(&d));
  return d;
}
std::string device_name(int dev) {
  cudaDeviceProp p;
  CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return p.name;
}
int device_sm_count(int dev) {
  static std::atomic<int> cached[64] = {};
  if (dev >= 0 && dev < 64 && cached[dev] > 0) return cached[dev];
  int n = 0;
  CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cached[dev] = n;
  return n;
}
int64_t device_total_memory(int dev) {
  cudaDeviceProp p;
  CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  return int64_t(p.totalGlobalMem);
}

Stream::Stream(int dev) : dev_(dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  cudaStream_t s;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  h_ = s;
}
Stream::~Stream() {
  if (h_) cudaStreamDestroy(static_cast<cudaStream_t>(h_));
}
void Stream::synchronize() const { CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(h_))); }

Event::Event(bool timing) {
  cudaEvent_t e;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming));
  h_ = e;
}
Event::~Event() {
  if (h_) cudaEventDestroy(static_cast<cudaEvent_t>(h_));
}
void Event::record(StreamHandle s) {
  CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(h_), static_cast<cudaStream_t>(s)));
}
void Event::synchronize() const { CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(h_))); }
bool Event::query() const {
  cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(h_));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  CUDA_CHECK(e);
  return true;
}
void Event::wait_on(StreamHandle s) const {
  CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(s), static_cast<cudaEvent_t>(h_), 0));
}
float Event::elapsed_ms(const Event& end) const {
  float ms = 0;
  CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(h_), static_cast<cudaEvent_t>(end.h_)));
  return ms;
}

StreamHandle current_stream() { return t_stream; }
void set_current_stream(StreamHandle s) { t_stream = s; }
void stream_synchronize(StreamHandle s) { CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s))); }
void set_allow_tf32(bool on) { g_tf32 = on; }
bool allow_tf32() { return g_tf32; }
void set_gemm_autotune(bool on) { g_gemm_autotune = on; }
bool gemm_autotune() { return g_gemm_autotune; }
void set_deterministic(bool on) { g_deterministic = on; }
bool deterministic() { return g_deterministic; }

}  // namespace cuda

void cuda_synchronize(int dev) {  // the whole device, every stream
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace ftune
