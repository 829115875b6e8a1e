// Allocators: 64-byte aligned host memory, and (behind FTUNE_CUDA) a caching device allocator.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/device.h"

namespace ftune {

struct AllocatorStats {
  int64_t current_bytes = 0;  // bytes handed out and not yet freed
  int64_t peak_bytes = 0;
  int64_t reserved_bytes = 0;  // bytes held from the system, cached blocks included
  int64_t num_allocs = 0;
  int64_t cache_hits = 0;
};

// A block of memory with its deleter; Storage keeps one.
using DataPtr = std::unique_ptr<void, void (*)(void*)>;

// 64-byte aligned host memory. Blocks of 256 KiB and more are cached on release and reused by
// size class (FTUNE_CPU_CACHE_MB caps the cache, default 4096; 0 disables it).
DataPtr cpu_alloc(size_t bytes);
AllocatorStats cpu_allocator_stats();
void cpu_empty_cache();  // returns cached blocks to the system

// Device side (core/cuda_runtime.cpp). Without CUDA these throw "has no GPU implementation".
bool cuda_available();  // built with CUDA and at least one device present
int cuda_device_count();
std::shared_ptr<void> cuda_alloc(size_t bytes, int device);
AllocatorStats cuda_allocator_stats(int device = 0);
void cuda_empty_cache();
void cuda_memcpy_h2d(void* dst, const void* src, size_t bytes, int device);
void cuda_memcpy_d2h(void* dst, const void* src, size_t bytes, int device);
void cuda_memcpy_d2d(void* dst, const void* src, size_t bytes, int device);
void cuda_synchronize(int device = 0);
// The error text of a device allocation that failed for lack of memory (after the cache was
// freed): what was asked, what ftune's tensors hold (and held at most), the device's free and
// total bytes (negative: unknown), and the recipe keys that lower the peak.
std::string cuda_oom_message(size_t bytes, int device, const AllocatorStats& stats,
                             int64_t free_bytes, int64_t total_bytes);
// Tests: fill every new device allocation with 0xFF bytes (NaN for floats) so a kernel that leaves
// part of its output unwritten fails its comparison instead of passing on stale zeros.
void cuda_set_alloc_poison(bool on);

}  // namespace ftune
