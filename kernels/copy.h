// Fill and dtype conversion of contiguous buffers on the device (the CPU side is in core/tensor.cpp).
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace ftune::kernels::cuda {

// dst[i] = value for n elements of dtype dt.
void fill(void* dst, DType dt, int64_t n, double value, int device);
// dst[i] = convert(src[i]) for n elements; floats go through f32 (f64 through f64).
void cast(const void* src, DType src_dt, void* dst, DType dst_dt, int64_t n, int device);

}  // namespace ftune::kernels::cuda
