// Elementwise activations with their backward kernels. Every tensor is contiguous, one shape and
// one dtype. gelu is the tanh approximation (HF "gelu_new" / "gelu_pytorch_tanh"):
//   gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
// silu(x) = x * sigmoid(x); swiglu(gate, up) = silu(gate) * up.
#pragma once

#include "core/tensor.h"

namespace ftune::kernels::cpu {

void gelu_forward(const Tensor& x, Tensor& y);
void gelu_backward(const Tensor& x, const Tensor& dy, Tensor& dx);
void silu_forward(const Tensor& x, Tensor& y);
void silu_backward(const Tensor& x, const Tensor& dy, Tensor& dx);
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y);
// Writes each of dgate, dup that is defined.
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dy, Tensor& dgate,
                     Tensor& dup);

}  // namespace ftune::kernels::cpu

// The GPU twins (f32/bf16/f16, math in f32, 16-byte vector loads when the buffers are aligned).
namespace ftune::kernels::cuda {

void gelu_forward(const Tensor& x, Tensor& y);
void gelu_backward(const Tensor& x, const Tensor& dy, Tensor& dx);
void silu_forward(const Tensor& x, Tensor& y);
void silu_backward(const Tensor& x, const Tensor& dy, Tensor& dx);
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dy, Tensor& dgate,
                     Tensor& dup);

}  // namespace ftune::kernels::cuda
