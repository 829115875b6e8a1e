#include <cmath>

#include "core/ops/common.h"
#include "kernels/lora.h"

namespace ftune::ops {

using namespace detail;

namespace {

// The GPU kernels take f32, bf16 and f16 (the CPU ones f32 and f64).
template <class F>
void dispatch_gpu_float(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::f32: f.template operator()<float>(); return;
    case DType::bf16: f.template operator()<bf16>(); return;
    case DType::f16: f.template operator()<f16>(); return;
    default: FTUNE_THROW("[", op, "] the GPU computes in f32, bf16 or f16, got ", dtype_name(t));
  }
}
}  // namespace

// W and b are frozen: they are not inputs of the recorded node, so they never get a gradient,
// even when they require grad (the base weights of a LoRA model are frozen by construction).
Tensor lora_linear(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& lora_a,
                   const Tensor& lora_b, double scale, double dropout, uint64_t seed,
                   int64_t in_offset, int64_t in_full) {
  const char* op = "lora_linear";
  check_defined(op, x, "x");
  check_defined(op, w, "weight");
  profiler::OpScope prof(op, w.shape());
  check_defined(op, lora_a, "lora_a");
  check_defined(op, lora_b, "lora_b");
  check_same_device(op, {&x, &w, &b, &lora_a, &lora_b});
  check_same_dtype(op, {&x, &w, &b, &lora_a, &lora_b});
  check_float(op, x, "x");
#ifndef FTUNE_HAVE_CUDA
  require_cpu(op, {&x, &w, &b, &lora_a, &lora_b});
#endif
  const bool gpu = x.device().is_cuda();
  FTUNE_CHECK(w.dim() == 2 && x.dim() >= 1 && x.size(-1) == w.size(1), "[lora_linear] x ", x.desc(),
              " does not match weight ", w.desc(), " (expected weight [out, ", x.size(-1), "])");
  const int64_t in = w.size(1), outf = w.size(0);
  FTUNE_CHECK(lora_a.dim() == 2 && lora_a.size(1) == in && lora_a.size(0) >= 1,
              "[lora_linear] lora_a ", lora_a.desc(), " must be [r, ", in, "] for weight ",
              w.desc());
  const int64_t r = lora_a.size(0);
  FTUNE_CHECK(lora_b.dim() == 2 && lora_b.size(0) == outf && lora_b.size(1) == r,
              "[lora_linear] lora_b ", lora_b.desc(), " must be [", outf, ", ", r, "] for weight ",
              w.desc(), " and lora_a ", lora_a.desc());
  FTUNE_CHECK(!b.defined() || (b.dim() == 1 && b.size(0) == outf), "[lora_linear] bias ", b.desc(),
              " for weight ", w.desc());
  FTUNE_CHECK(dropout >= 0.0 && dropout < 1.0, "[lora_linear] dropout must be in [0, 1), got ",
              dropout);
  FTUNE_CHECK(std::isfinite(scale), "[lora_linear] scale must be finite, got ", scale);

  FTUNE_CHECK(in_full == 0 || (in_offset >= 0 && in_offset + in <= in_full),
              "[lora_linear] input features [", in_offset, ", ", in_offset + in,
              ") do not fit in_full ", in_full);
  const kernels::LoraDims d{shape_numel(Shape(x.shape().begin(), x.shape().end() - 1)),
                            in, outf, r, in_offset, in_full};
  Tensor x2 = contig(x), w2 = contig(w), a2 = contig(lora_a), b2 = contig(lora_b);
  Tensor bias2 = b.defined() ? contig(b) : Tensor();
  Shape out_shape = x.shape();
  out_shape.back() = outf;
  Tensor y = Tensor::empty(out_shape, x.dtype(), x.device());
  Tensor u = Tensor::empty({d.m, r}, x.dtype(), x.device());
  // drop(x) for the CPU kernel (the GPU's fused kernels draw the mask as they read x; where they
  // do not apply, the GPU kernel takes a scratch of its own).
  Tensor xd = dropout > 0 && !gpu ? Tensor::empty({d.m, in}, x.dtype(), x.device()) : Tensor();
  if (gpu) {
#ifdef FTUNE_HAVE_CUDA
    dispatch_gpu_float(x.dtype(), op, [&]<class T>() {
      kernels::cuda::lora_forward<T>(d, x2.data<T>(), w2.data<T>(), ptr_or_null<T>(bias2),
                                     a2.data<T>(), b2.data<T>(), float(scale), dropout, seed,
                                     ptr_or_null<T>(xd), u.data<T>(), y.data<T>());
    });
#endif
  } else {
    dispatch_float(x.dtype(), op, [&]<class T>() {
      kernels::cpu::lora_forward<T>(d, x2.data<T>(), w2.data<T>(), ptr_or_null<T>(bias2),
                                    a2.data<T>(), b2.data<T>(), T(scale), dropout, seed,
                                    ptr_or_null<T>(xd), u.data<T>(), y.data<T>());
    });
  }
  if (!needs_record({&x, &lora_a, &lora_b})) return y;

  // Save only what the requested gradients use: x for dA, W and A for dx, B for dx and dA,
  // u [M, r] for dB. The dropout mask is regenerated from the seed.
  const bool gx = x.requires_grad(), ga = lora_a.requires_grad(), gb = lora_b.requires_grad();
  Tensor xs = ga ? x2 : Tensor(), ws = gx ? w2 : Tensor(), as = gx ? a2 : Tensor();
  Tensor bs = gx || ga ? b2 : Tensor(), us = gb ? u : Tensor();
  Shape xshape = x.shape();
  record(op, y, {x, lora_a, lora_b},
         [d, xs, ws, as, bs, us, xshape, scale, dropout, seed, gpu](
             const Tensor& g, const std::vector<bool>& need) {
           Tensor gc = contig(g);
           const DType dt = gc.dtype();
           const Device dev = gc.device();
           Tensor dx = need[0] ? Tensor::empty(xshape, dt, dev) : Tensor();
           Tensor da = need[1] ? Tensor::empty({d.r, d.in}, dt, dev) : Tensor();
           Tensor db = need[2] ? Tensor::empty({d.out, d.r}, dt, dev) : Tensor();
           Tensor du = need[0] || need[1] ? Tensor::empty({d.m, d.r}, dt, dev) : Tensor();
           // The CPU's drop(x) for dA, then du A before its masked add into dx (the GPU needs
           // none: see the forward).
           Tensor scratch = dropout > 0 && !gpu && (need[0] || need[1])
                                ? Tensor::empty({d.m, d.in}, dt, dev)
                                : Tensor();
           if (gpu) {  // the GPU redraws the mask in each pass: no keep bytes
#ifdef FTUNE_HAVE_CUDA
             dispatch_gpu_float(dt, "lora_linear_backward", [&]<class T>() {
               kernels::cuda::lora_backward<T>(
                   d, gc.data<T>(), ptr_or_null<T>(xs), ptr_or_null<T>(ws), ptr_or_null<T>(as),
                   ptr_or_null<T>(bs), ptr_or_null<T>(us), float(scale), dropout, seed,
                   ptr_or_null<T>(du), ptr_or_null<T>(scratch), nullptr, ptr_or_null<T>(dx),
                   ptr_or_null<T>(da), ptr_or_null<T>(db));
             });
#endif
             return std::vector<Tensor>{dx, da, db};
           }
           Tensor keep = dropout > 0 && need[0] && need[1]
                             ? Tensor::empty({d.m, d.in}, DType::b8, dev)
                             : Tensor();
           dispatch_float(dt, "lora_linear_backward", [&]<class T>() {
             kernels::cpu::lora_backward<T>(
                 d, gc.data<T>(), ptr_or_null<T>(xs), ptr_or_null<T>(ws), ptr_or_null<T>(as),
                 ptr_or_null<T>(bs), ptr_or_null<T>(us), T(scale), dropout, seed,
                 ptr_or_null<T>(du), ptr_or_null<T>(scratch),
                 keep.defined() ? static_cast<uint8_t*>(keep.raw_data()) : nullptr,
                 ptr_or_null<T>(dx), ptr_or_null<T>(da), ptr_or_null<T>(db));
           });
           return std::vector<Tensor>{dx, da, db};
         });
  return y;
}

}  // namespace ftune::ops
