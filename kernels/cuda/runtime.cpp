// The CUDA runtime side of core/allocator.h: a caching device allocator (size-class reuse, stats,
// empty_cache) and host<->device copies. Compiled only with FTUNE_CUDA.
#include <cuda_runtime.h>

#include <atomic>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/allocator.h"
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

struct DevicePool {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // class -> block
  std::unordered_map<void*, size_t> live;   // block -> class
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
  pl.stats.current_bytes -= int64_t(it->second);
  pl.free_blocks.emplace(it->second, p);
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
  void* p = nullptr;
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    auto it = pl.free_blocks.find(cls);
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
      err = cudaMalloc(&p, cls);
    }
    if (err != cudaSuccess)
      FTUNE_THROW("[cuda_alloc] cudaMalloc of ", cls, " bytes on cuda:", dev, ": ", cudaGetErrorString(err));
    std::lock_guard<std::mutex> lk(pl.mu);
    pl.stats.reserved_bytes += int64_t(cls);
  }
  {
    std::lock_guard<std::mutex> lk(pl.mu);
    pl.live[p] = cls;
    pl.stats.current_bytes += int64_t(cls);
    pl.stats.peak_bytes = std::max(pl.stats.peak_bytes, pl.stats.current_bytes);
    ++pl.stats.num_allocs;
  }
  if (g_poison) CUDA_CHECK(cudaMemset(p, 0xFF, cls));
  return std::shared_ptr<void>(p, [dev](void* q) { release(dev, q); });
}

AllocatorStats cuda_allocator_stats(int dev) {
  DevicePool& pl = pool(dev);
  std::lock_guard<std::mutex> lk(pl.mu);
  return pl.stats;
}

void cuda_empty_cache() {
  int n = cuda_device_count();
  for (int d = 0; d < n; ++d) {
    DevicePool& pl = pool(d);
    std::lock_guard<std::mutex> lk(pl.mu);
    cudaSetDevice(d);
    for (auto& kv : pl.free_blocks) {
      cudaFree(kv.second);
      pl.stats.reserved_bytes -= int64_t(kv.first);
    }
    pl.free_blocks.clear();
  }
}

void cuda_memcpy_h2d(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}

void cuda_memcpy_d2h(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}

void cuda_memcpy_d2d(void* dst, const void* src, size_t bytes, int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToDevice));
}

void cuda_set_alloc_poison(bool on) { g_poison = on; }

void cuda_synchronize(int dev) {
  CUDA_CHECK(cudaSetDevice(dev));
  CUDA_CHECK(cudaDeviceSynchronize());
}

}  // namespace ftune
