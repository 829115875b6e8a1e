// Shared checks for op implementations.
#pragma once
#include <string>

#include "core/ops.h"
#include "core/profiler.h"

namespace ftune::ops::detail {

// Throws naming the op when t is undefined.
void check_defined(const char* op, const Tensor& t, const char* what);
// Every defined tensor must be on one device; CPU-only ops also call require_cpu.
void check_same_device(const char* op, std::initializer_list<const Tensor*> ts);
void check_same_dtype(const char* op, std::initializer_list<const Tensor*> ts);
void check_float(const char* op, const Tensor& t, const char* what);
void check_index(const char* op, const Tensor& t, const char* what);  // i32 or i64
// Ops whose CUDA twin does not exist yet throw "[op] has no GPU implementation".
void require_cpu(const char* op, std::initializer_list<const Tensor*> ts);
// The kernel twin for a device: FTUNE_KERNEL(x.device(), rms_norm_forward)(args...) calls
// kernels::cuda::rms_norm_forward for a GPU tensor and kernels::cpu::rms_norm_forward otherwise.
// The two share one signature (kernels/<family>.h declares both). Without CUDA a GPU tensor
// cannot exist, so the CPU kernel is the only choice.
#ifdef FTUNE_HAVE_CUDA
#define FTUNE_KERNEL(dev, name) ((dev).is_cuda() ? &::ftune::kernels::cuda::name : &::ftune::kernels::cpu::name)
#else
#define FTUNE_KERNEL(dev, name) (&::ftune::kernels::cpu::name)
#endif
Shape broadcast_shapes(const char* op, const Shape& a, const Shape& b);
int64_t wrap_dim(const char* op, int64_t d, int64_t nd);
// A tensor's data, or nullptr for an undefined (optional) one.
template <class T>
T* ptr_or_null(const Tensor& t) {
  return t.defined() ? t.data<T>() : nullptr;
}
// Contiguous input for a kernel (no autograd record).
inline Tensor contig(const Tensor& t) { return t.is_contiguous() ? t.detach() : t.detach().contiguous(); }

}  // namespace ftune::ops::detail
