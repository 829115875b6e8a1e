// LayerNorm and RMSNorm over the last dim, with hand-written backward kernels.
// x, y, dy, dx are [N, D] contiguous; weight, bias, dweight, dbias are [D] (x's dtype); mean and
// rstd are [N] f64, saved by the forward for the backward. Row statistics accumulate in f64.
#pragma once

#include "core/tensor.h"

namespace ftune::kernels::cpu {

// y = (x - mean) * rstd * weight + bias, with the biased variance; bias may be undefined.
void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps,
                        Tensor& y, Tensor& mean, Tensor& rstd);
// Writes each of dx, dweight, dbias that is defined (an undefined one is not computed).
void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, Tensor& dx, Tensor& dweight,
                         Tensor& dbias);

// y = weight * (x * rstd), rstd = 1 / sqrt(mean(x^2) + eps) (HF LlamaRMSNorm).
void rms_norm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
void rms_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd,
                       Tensor& dx, Tensor& dweight);

}  // namespace ftune::kernels::cpu
