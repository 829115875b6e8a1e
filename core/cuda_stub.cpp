// Without FTUNE_CUDA every device entry point throws; the real ones are in kernels/cuda/runtime.cpp.
#ifndef FTUNE_HAVE_CUDA
#include "core/allocator.h"
#include "core/cuda_runtime.h"
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

namespace cuda {
int local_rank_from_env() { return 0; }
int select_device_for_local_rank() { no_gpu("cuda::select_device"); }
void set_device(int) { no_gpu("cuda::set_device"); }
int current_device() { return 0; }
std::string device_name(int) { return "none"; }
int device_sm_count(int) { return 0; }
int64_t device_total_memory(int) { return 0; }
Stream::Stream(int) { no_gpu("cuda::Stream"); }
Stream::~Stream() {}
void Stream::synchronize() const {}
Event::Event(bool) { no_gpu("cuda::Event"); }
Event::~Event() {}
void Event::record(StreamHandle) {}
void Event::synchronize() const {}
bool Event::query() const { return true; }
void Event::wait_on(StreamHandle) const {}
float Event::elapsed_ms(const Event&) const { return 0; }
StreamHandle current_stream() { return nullptr; }
void set_current_stream(StreamHandle) {}
void stream_synchronize(StreamHandle) {}
void set_allow_tf32(bool) {}
bool allow_tf32() { return false; }
void set_gemm_autotune(bool) {}
bool gemm_autotune() { return false; }
void set_deterministic(bool) {}
bool deterministic() { return true; }
}  // namespace cuda

}  // namespace ftune
#endif
