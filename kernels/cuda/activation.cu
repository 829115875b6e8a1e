// CUDA twins of kernels/activation.h: one pass over contiguous buffers with 16-byte vectors
// (kernels/cuda/map.cuh), the math of the CPU kernels in f32.
#include <cmath>

#include "kernels/activation.h"
#include "kernels/cuda/common.cuh"
#include "kernels/cuda/map.cuh"

namespace ftune::kernels::cuda {

namespace {

constexpr float kGeluA = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluB = 0.044715f;

// s = sigmoid(z) and sc = 1 - s from e = exp(-|z|): neither cancels in the tails (1 - s computed
// as such would lose its relative precision when s -> 1). A NaN z gives NaN, which propagates.
__device__ __forceinline__ void sigmoid2(float z, float& s, float& sc) {
  const float e = expf(-fabsf(z));
  const float inv = 1.f / (1.f + e);
  const float a = inv, b = e * inv;
  s = z < 0.f ? b : a;
  sc = z < 0.f ? a : b;
}

__device__ __forceinline__ float sigmoid(float z) {
  float s, sc;
  sigmoid2(z, s, sc);
  return s;
}

// gelu_tanh(x) = x * sigmoid(2u), u = a (x + b x^3).
__device__ __forceinline__ float gelu_arg(float x) { return 2.f * kGeluA * (x + kGeluB * x * x * x); }

struct GeluF {
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = x[0] * sigmoid(gelu_arg(x[0])); }
};
struct GeluGradF {  // x, dy
  __device__ void operator()(const float (&in)[2], float (&y)[1]) const {
    // Past |x| = 10 the derivative is 0 or 1; the clamp keeps x^2 finite (NaN passes through).
    const float v = fabsf(in[0]) > 10.f ? copysignf(10.f, in[0]) : in[0];
    float s, sc;
    sigmoid2(gelu_arg(v), s, sc);
    const float du2 = 2.f * kGeluA * (1.f + 3.f * kGeluB * v * v);
    y[0] = in[1] * (s + v * s * sc * du2);
  }
};
struct SiluF {
  __device__ void operator()(const float (&x)[1], float (&y)[1]) const { y[0] = x[0] * sigmoid(x[0]); }
};
struct SiluGradF {  // x, dy
  __device__ void operator()(const float (&in)[2], float (&y)[1]) const {
    float s, sc;
    sigmoid2(in[0], s, sc);
    y[0] = in[1] * s * (1.f + in[0] * sc);
  }
};
struct SwigluF {  // gate, up
  __device__ void operator()(const float (&in)[2], float (&y)[1]) const {
    y[0] = in[0] * sigmoid(in[0]) * in[1];
  }
};
struct SwigluGradF {  // gate, up, dy -> dgate, dup
  __device__ void operator()(const float (&in)[3], float (&y)[2]) const {
    const float g = in[0];
    float s, sc;
    sigmoid2(g, s, sc);
    y[0] = in[2] * in[1] * s * (1.f + g * sc);
    y[1] = in[2] * g * s;
  }
};
struct SwigluGateGradF {
  __device__ void operator()(const float (&in)[3], float (&y)[1]) const {
    float s, sc;
    sigmoid2(in[0], s, sc);
    y[0] = in[2] * in[1] * s * (1.f + in[0] * sc);
  }
};
struct SwigluUpGradF {  // gate, dy
  __device__ void operator()(const float (&in)[2], float (&y)[1]) const { y[0] = in[1] * in[0] * sigmoid(in[0]); }
};

// Every tensor on the GPU, contiguous, with like's shape and dtype.
void check_like(const char* op, const Tensor& t, const Tensor& like, const char* what) {
  check_cuda(op, t, what);
  FTUNE_CHECK(t.dtype() == like.dtype() && t.shape() == like.shape() && t.device() == like.device(), "[", op,
              "] ", what, " ", t.desc(), " must match ", like.desc());
}

template <class T>
const T* cp(const Tensor& t) {
  return static_cast<const T*>(t.raw_data());
}
template <class T>
T* mp(Tensor& t) {
  return static_cast<T*>(t.raw_data());
}

// y = F(x) or dx = F(x, dy): the one-input activations.
template <class Fwd>
void act_forward(const char* op, const Tensor& x, Tensor& y) {
  check_cuda(op, x, "x");
  check_like(op, y, x, "y");
  kernels::cuda::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_map<T, 1, 1>(op, Ptrs<T, 1>{{cp<T>(x)}}, OutPtrs<T, 1>{{mp<T>(y)}}, x.numel(), Fwd{});
  });
}
template <class Bwd>
void act_backward(const char* op, const Tensor& x, const Tensor& dy, Tensor& dx) {
  check_cuda(op, x, "x");
  check_like(op, dy, x, "dy");
  check_like(op, dx, x, "dx");
  kernels::cuda::dispatch_float(x.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_map<T, 2, 1>(op, Ptrs<T, 2>{{cp<T>(x), cp<T>(dy)}}, OutPtrs<T, 1>{{mp<T>(dx)}}, x.numel(), Bwd{});
  });
}

}  // namespace

void gelu_forward(const Tensor& x, Tensor& y) { act_forward<GeluF>("gelu", x, y); }
void gelu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) { act_backward<GeluGradF>("gelu_backward", x, dy, dx); }
void silu_forward(const Tensor& x, Tensor& y) { act_forward<SiluF>("silu", x, y); }
void silu_backward(const Tensor& x, const Tensor& dy, Tensor& dx) { act_backward<SiluGradF>("silu_backward", x, dy, dx); }

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& y) {
  const char* op = "swiglu";
  check_cuda(op, gate, "gate");
  check_like(op, up, gate, "up");
  check_like(op, y, gate, "y");
  kernels::cuda::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    launch_map<T, 2, 1>(op, Ptrs<T, 2>{{cp<T>(gate), cp<T>(up)}}, OutPtrs<T, 1>{{mp<T>(y)}}, gate.numel(),
                        SwigluF{});
  });
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dy, Tensor& dgate, Tensor& dup) {
  const char* op = "swiglu_backward";
  check_cuda(op, gate, "gate");
  check_like(op, up, gate, "up");
  check_like(op, dy, gate, "dy");
  if (dgate.defined()) check_like(op, dgate, gate, "dgate");
  if (dup.defined()) check_like(op, dup, gate, "dup");
  const int64_t n = gate.numel();
  kernels::cuda::dispatch_float(gate.dtype(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if (dgate.defined() && dup.defined())
      launch_map<T, 3, 2>(op, Ptrs<T, 3>{{cp<T>(gate), cp<T>(up), cp<T>(dy)}},
                          OutPtrs<T, 2>{{mp<T>(dgate), mp<T>(dup)}}, n, SwigluGradF{});
    else if (dgate.defined())
      launch_map<T, 3, 1>(op, Ptrs<T, 3>{{cp<T>(gate), cp<T>(up), cp<T>(dy)}}, OutPtrs<T, 1>{{mp<T>(dgate)}}, n,
                          SwigluGateGradF{});
    else if (dup.defined())
      launch_map<T, 2, 1>(op, Ptrs<T, 2>{{cp<T>(gate), cp<T>(dy)}}, OutPtrs<T, 1>{{mp<T>(dup)}}, n,
                          SwigluUpGradF{});
  });
}

}  // namespace ftune::kernels::cuda
