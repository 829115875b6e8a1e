// Without FTUNE_CUDA every device entry point throws; the real ones are in kernels/cuda/runtime.cpp.
#ifndef FTUNE_HAVE_CUDA
#include "core/allocator.h"
#include "core/error.h"

namespace ftune {

namespace {
[[noreturn]] void no_gpu(const char* what) {
  FTUNE_THROW("[", what, "] has no GPU implementation: ftune was built without CUDA (FTUNE_CUDA=OFF)");
}
}  // namespace

bool cuda_available() { return false; }
int cuda_device_count() { return 0; }
std::shared_ptr<void> cuda_alloc(size_t, int) { no_gpu("cuda_alloc"); }
AllocatorStats cuda_allocator_stats(int) { return {}; }
void cuda_empty_cache() {}
void cuda_memcpy_h2d(void*, const void*, size_t, int) { no_gpu("cuda_memcpy"); }
void cuda_memcpy_d2h(void*, const void*, size_t, int) { no_gpu("cuda_memcpy"); }
void cuda_memcpy_d2d(void*, const void*, size_t, int) { no_gpu("cuda_memcpy"); }
void cuda_synchronize(int) {}
void cuda_set_alloc_poison(bool) {}

}  // namespace ftune
#endif
