// LayerNorm and RMSNorm over the last dim, with hand-written backward kernels, and the fused
// residual add + norm forward of a pre-norm transformer block.
// x, y, dy, dx are [N, D] contiguous; weight, bias, dweight, dbias are [D] (x's dtype); mean and
// rstd are [N], saved by the forward for the backward: f64 on the CPU (row statistics accumulate
// in f64), f32 on the GPU (statistics in f32; 16-byte loads; dweight/dbias summed over rows
// deterministically, without atomics).
#pragma once

#include "core/tensor.h"

namespace ftune::kernels::cpu {

// y = (x - mean) * rstd * weight + bias, with the biased variance; bias may be undefined.
void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        Tensor& y, Tensor& mean, Tensor& rstd);
// Writes each of dx, dweight, dbias that is defined (an undefined one is not computed). With
// accumulate_dx, dx holds a gradient summed so far (the residual stream's) and the input gradient
// is added into it, with the roundings of the engine's sum of the two (bit for bit).
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                         Tensor& dbias, bool accumulate_dx = false);

// y = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) (HF LlamaRMSNorm).
void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
void rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                       Tensor& dx, Tensor& dweight, bool accumulate_dx = false);

// h = x + residual (rounded to x's dtype, written to h_out: the next block's residual), then
// y = norm(h) with its statistics, in one pass on the GPU. h_out may be residual itself (in place).
// The backward is the plain norm backward on h (and dh flows to both x and residual).
void rms_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                               double eps, Tensor& y, Tensor& h_out, Tensor& rstd);
void layer_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                 const Tensor& bias, double eps, Tensor& y, Tensor& h_out,
                                 Tensor& mean, Tensor& rstd);

}  // namespace ftune::kernels::cpu

namespace ftune::kernels::cuda {  // the GPU twins (kernels/cuda/norm.cu); mean and rstd are f32

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        Tensor& y, Tensor& mean, Tensor& rstd);
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                         Tensor& dbias, bool accumulate_dx = false);
void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
void rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                       Tensor& dx, Tensor& dweight, bool accumulate_dx = false);
void rms_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                               double eps, Tensor& y, Tensor& h_out, Tensor& rstd);
void layer_norm_residual_forward(const Tensor& x, const Tensor& residual, const Tensor& weight,
                                 const Tensor& bias, double eps, Tensor& y, Tensor& h_out,
                                 Tensor& mean, Tensor& rstd);

}  // namespace ftune::kernels::cuda
