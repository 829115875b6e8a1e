// Rotary position embedding, HF rotate-half convention. x and out are [B, T, H, D] contiguous
// (D even); positions (i32|i64) are [B, T] or [T] (shared by the batch), contiguous.
// For i < D/2, angle = pos * theta^(-2i/D) (in f64) and
//   out[i]       = x[i] * cos - x[i + D/2] * sin
//   out[i + D/2] = x[i + D/2] * cos + x[i] * sin
#pragma once

#include "core/tensor.h"

namespace ftune::kernels::cpu {

// inverse applies the transposed rotation (sin -> -sin): the backward, dx = R^T dy.
void rope(const Tensor& x, const Tensor& positions, double theta, bool inverse, Tensor& out);

}  // namespace ftune::kernels::cpu

// The GPU twin: f32/bf16/f16 x; angles in f64, cos/sin rounded to f32, the rotation in f32.
namespace ftune::kernels::cuda {

void rope(const Tensor& x, const Tensor& positions, double theta, bool inverse, Tensor& out);

}  // namespace ftune::kernels::cuda
