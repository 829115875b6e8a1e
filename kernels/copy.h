// Fill and dtype conversion of contiguous buffers on the device (the CPU side is in core/tensor.cpp).
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace ftune::kernels::cuda {

// dst[i] = value for n elements of dtype dt.
void fill(void* dst, DType dt, int64_t n, double value, int device);
// dst[i] = convert(src[i]) for n elements; floats go through f32 (f64 through f64).
void cast(const void* src, DType src_dt, void* dst, DType dst_dt, int64_t n, int device);

// Strided copy with conversion on one device: dst[idx] = convert(src[idx]) for every index of
// shape (ndim <= 8; strides in elements, any sign-free layout, broadcast src strides 0 allowed).
void strided_copy(const void* src, DType src_dt, const int64_t* src_strides, void* dst, DType dst_dt,
                  const int64_t* dst_strides, const int64_t* shape, int ndim, int device);

}  // namespace ftune::kernels::cuda
