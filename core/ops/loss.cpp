// softmax, log_softmax, cross_entropy, token_logprobs, entropy, kl_div. The losses are fused: the
// forward saves the logits and per-row statistics (kernels/loss.h), never probabilities; the
// backward recomputes the probabilities in the same pass that writes the gradient.
#include "kernels/loss.h"

#include <cmath>
#include <limits>

#include "core/ops/common.h"

namespace ftune::ops {

using namespace detail;

namespace {

// A float tensor viewed as rows over its last dim: x is [N, V], `lead` the shape before V.
struct Rows {
  int64_t n = 0, v = 0;
  Shape lead;
};

Rows rows_of(const char* op, const Tensor& x, const char* what) {
  FTUNE_CHECK(x.dim() >= 1, "[", op, "] ", what, " needs at least 1 dim (the vocabulary), got ",
              x.desc());
  Rows r;
  r.v = x.size(-1);
  r.lead.assign(x.shape().begin(), x.shape().end() - 1);
  r.n = shape_numel(r.lead);
  return r;
}

void check_logits(const char* op, const Tensor& x, const char* what) {
  check_defined(op, x, what);
  check_float(op, x, what);
}

// GPU kernels (kernels::cuda, f32/bf16/f16 logits) keep everything per row in f32: the upstream
// gradient of a per-row output goes to them as contiguous f32.
Tensor f32_rows(const Tensor& g) { return contig(g).to(DType::f32).contiguous(); }

// Targets as contiguous i64 [N], each in [0, V) or ignore_index; counts the rows not ignored.
Tensor check_targets(const char* op, const Tensor& targets, const Rows& r, int64_t ignore,
                     int64_t* counted) {
  check_defined(op, targets, "targets");
  check_index(op, targets, "targets");
  FTUNE_CHECK(r.v > 0, "[", op, "] logits have an empty vocabulary (last dim 0)");
  FTUNE_CHECK(targets.shape() == r.lead || (targets.dim() == 1 && targets.numel() == r.n), "[", op,
              "] targets ", targets.desc(), " do not match logits rows ", shape_str(r.lead),
              " (expected shape ", shape_str(r.lead), " or [", r.n, "])");
  Tensor t = targets.dtype() == DType::i64 ? contig(targets) : contig(targets).to(DType::i64);
  t = t.view({r.n});
  // GPU targets are checked on a host copy ([N] ids: small next to the [N, V] logits).
  Tensor host = t.device().is_cuda() ? t.to(Device::cpu()) : t;
  const int64_t* p = host.data<int64_t>();
  int64_t c = 0;
  for (int64_t i = 0; i < r.n; ++i) {
    if (p[i] == ignore) continue;
    FTUNE_CHECK(p[i] >= 0 && p[i] < r.v, "[", op, "] target ", p[i], " at row ", i,
                " is out of range [0, ", r.v, ") and is not ignore_index (", ignore, ")");
    ++c;
  }
  *counted = c;
  return t;
}

Tensor logits_2d(const Tensor& x, const Rows& r) { return contig(x).view({r.n, r.v}); }

// Softmax and log_softmax share everything but the formula.
Tensor softmax_impl(const char* op, const Tensor& x, bool log) {
  profiler::OpScope prof(op);
  check_logits(op, x, "input");
  Rows r = rows_of(op, x, "input");
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  if (x.numel() == 0) return out;
  Tensor xc = logits_2d(x, r);
  if (x.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
    kernels::cuda::softmax_forward(xc.raw_data(), xc.dtype(), r.n, r.v, log, out.raw_data());
#endif
  } else {
    dispatch_float(x.dtype(), op, [&]<class T>() {
      kernels::cpu::softmax_forward<T>(xc.data<T>(), r.n, r.v, log, out.data<T>());
    });
  }
  Tensor y = out.detach();
  record(op, out, {x}, [y, r, log, op](const Tensor& g, const std::vector<bool>&) {
    Tensor gc = contig(g);
    Tensor dx = Tensor::empty(y.shape(), y.dtype(), y.device());
    if (y.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
      Tensor gt = gc.dtype() == y.dtype() ? gc : gc.to(y.dtype());
      kernels::cuda::softmax_backward(y.raw_data(), gt.raw_data(), y.dtype(), r.n, r.v, log,
                                      dx.raw_data());
#endif
      return std::vector<Tensor>{dx};
    }
    dispatch_float(y.dtype(), op, [&]<class T>() {
      kernels::cpu::softmax_backward<T>(y.data<T>(), gc.data<T>(), r.n, r.v, log, dx.data<T>());
    });
    return std::vector<Tensor>{dx};
  });
  return out;
}

// Fused NLL of targets, shared by cross_entropy and token_logprobs: nll [N] and stat [N, 2].
struct Nll {
  Tensor x, tgt, stat, nll;
  int64_t counted = 0;
};

// On the GPU, nll holds gpu_sign * nll in gpu_dt (f32 for a reduction; the logits dtype when it
// is the op's output) and stat is f32.
Nll nll_impl(const char* op, const Tensor& logits, const Tensor& targets, int64_t ignore,
             const Rows& r, DType gpu_dt = DType::f32, float gpu_sign = 1.0f) {
  check_same_device(op, {&logits, &targets});
  Nll f;
  f.tgt = check_targets(op, targets, r, ignore, &f.counted);
  f.x = logits_2d(logits, r);
  if (logits.device().is_cuda()) {  // stat and nll in f32
    f.stat = Tensor::empty({r.n, 2}, DType::f32, logits.device());
    f.nll = Tensor::empty({r.n}, gpu_dt, logits.device());
#ifdef FTUNE_HAVE_CUDA
    kernels::cuda::nll_forward(f.x.raw_data(), f.x.dtype(), f.tgt.data<int64_t>(), r.n, r.v, ignore,
                               f.stat.data<float>(), f.nll.raw_data(), gpu_dt, gpu_sign);
#endif
    return f;
  }
  f.stat = Tensor::empty({r.n, 2}, logits.dtype(), logits.device());
  f.nll = Tensor::empty({r.n}, logits.dtype(), logits.device());
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    kernels::cpu::nll_forward<T>(f.x.data<T>(), f.tgt.data<int64_t>(), r.n, r.v, ignore,
                                 f.stat.data<T>(), f.nll.data<T>());
  });
  return f;
}

// d(scale * g_i * nll_i)/dlogits for every row, g broadcast when g_stride is 0.
Tensor nll_grad(const char* op, const Nll& f, const Rows& r, const Shape& shape, int64_t ignore,
                const Tensor& g, int64_t g_stride, double scale) {
  Tensor dx = Tensor::empty({r.n, r.v}, f.x.dtype(), f.x.device());
  if (f.x.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
    Tensor g32 = f32_rows(g);
    kernels::cuda::nll_backward(f.x.raw_data(), f.x.dtype(), f.tgt.data<int64_t>(),
                                f.stat.data<float>(), g32.data<float>(), g_stride, float(scale),
                                r.n, r.v, ignore, dx.raw_data());
#endif
    return dx.view(shape);
  }
  Tensor gc = contig(g);
  dispatch_float(f.x.dtype(), op, [&]<class T>() {
    kernels::cpu::nll_backward<T>(f.x.data<T>(), f.tgt.data<int64_t>(), f.stat.data<T>(),
                                  gc.data<T>(), g_stride, T(scale), r.n, r.v, ignore, dx.data<T>());
  });
  return dx.view(shape);
}

kernels::Divergence divergence_of(KLKind k) {
  switch (k) {
    case KLKind::forward:
      return kernels::Divergence::forward;
    case KLKind::reverse:
      return kernels::Divergence::reverse;
    case KLKind::jsd:
      return kernels::Divergence::jsd;
  }
  FTUNE_THROW("[kl_div] bad KLKind");
}

}  // namespace

Tensor softmax(const Tensor& x) { return softmax_impl("softmax", x, false); }
Tensor log_softmax(const Tensor& x) { return softmax_impl("log_softmax", x, true); }

Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                     Reduction reduction) {
  const char* op = "cross_entropy";
  profiler::OpScope prof(op);
  check_logits(op, logits, "logits");
  Rows r = rows_of(op, logits, "logits");
  const bool gpu = logits.device().is_cuda();
  Nll f = nll_impl(op, logits, targets, ignore_index, r,
                   reduction == Reduction::none ? logits.dtype() : DType::f32);
  Tensor out;
  if (gpu && reduction != Reduction::none) {  // summed on the device in a fixed order
    double scale = 1.0;
    if (reduction == Reduction::mean) scale = f.counted > 0 ? 1.0 / double(f.counted) : 0.0;
    // f32 whatever the logits' dtype: a summed loss over many tokens overflows f16 and loses
    // the bits of a bf16 (DESIGN: losses and reductions in f32).
    out = Tensor::empty({}, DType::f32, logits.device());
#ifdef FTUNE_HAVE_CUDA
    kernels::cuda::sum_scaled(f.nll.data<float>(), r.n, scale, out.raw_data(), out.dtype());
#endif
  } else if (reduction == Reduction::none) {
    out = f.nll.view(r.lead);
  } else {
    double s = 0.0;
    dispatch_float(logits.dtype(), op, [&]<class T>() {
      const T* p = f.nll.data<T>();
      for (int64_t i = 0; i < r.n; ++i) s += double(p[i]);
    });
    // mean over the counted rows; with none counted the loss is 0 (and so is its gradient).
    if (reduction == Reduction::mean) s = f.counted > 0 ? s / double(f.counted) : 0.0;
    out = Tensor::scalar(s, logits.dtype(), logits.device());
  }
  f.nll = Tensor();  // backward needs only logits, targets and the row statistics
  Shape shape = logits.shape();
  record(op, out, {logits},
         [f, r, shape, ignore_index, reduction](const Tensor& g, const std::vector<bool>&) {
           double scale = 1.0;
           if (reduction == Reduction::mean) scale = f.counted > 0 ? 1.0 / double(f.counted) : 0.0;
           int64_t g_stride = reduction == Reduction::none ? 1 : 0;
           return std::vector<Tensor>{
               nll_grad("cross_entropy", f, r, shape, ignore_index, g, g_stride, scale)};
         });
  return out;
}

Tensor token_logprobs(const Tensor& logits, const Tensor& targets, int64_t ignore_index) {
  const char* op = "token_logprobs";
  profiler::OpScope prof(op);
  check_logits(op, logits, "logits");
  Rows r = rows_of(op, logits, "logits");
  // On the GPU the log-probs come out in f32 (RL ratios exp(logp - logp_old) need the bits).
  Nll f = nll_impl(op, logits, targets, ignore_index, r, DType::f32, -1.0f);
  Tensor out;
  if (logits.device().is_cuda()) {
    out = f.nll.view(r.lead);  // the kernel wrote -nll (ignored rows 0)
  } else {
    out = Tensor::empty(r.lead, logits.dtype(), logits.device());
    dispatch_float(logits.dtype(), op, [&]<class T>() {
      const T* p = f.nll.data<T>();
      T* o = out.data<T>();
      for (int64_t i = 0; i < r.n; ++i) o[i] = p[i] == T(0) ? T(0) : -p[i];  // ignored rows: +0
    });
  }
  f.nll = Tensor();
  Shape shape = logits.shape();
  record(op, out, {logits}, [f, r, shape, ignore_index](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{nll_grad("token_logprobs", f, r, shape, ignore_index, g, 1, -1.0)};
  });
  return out;
}

Tensor entropy(const Tensor& logits) {
  const char* op = "entropy";
  profiler::OpScope prof(op);
  check_logits(op, logits, "logits");
  Rows r = rows_of(op, logits, "logits");
  FTUNE_CHECK(r.v > 0, "[", op, "] logits have an empty vocabulary (last dim 0)");
  Tensor x = logits_2d(logits, r);
  const bool gpu = logits.device().is_cuda();
  const DType sdt = gpu ? DType::f32 : logits.dtype();  // GPU: stat and h in f32
  Tensor stat = Tensor::empty({r.n, 2}, sdt, logits.device());
  Tensor h = Tensor::empty({r.n}, sdt, logits.device());
  if (gpu) {
#ifdef FTUNE_HAVE_CUDA
    kernels::cuda::entropy_forward(x.raw_data(), x.dtype(), r.n, r.v, stat.data<float>(),
                                   h.data<float>());
#endif
  } else {
    dispatch_float(logits.dtype(), op, [&]<class T>() {
      kernels::cpu::entropy_forward<T>(x.data<T>(), r.n, r.v, stat.data<T>(), h.data<T>());
    });
  }
  // h stays private to the backward (a copy, or the cast to the logits dtype)
  Tensor out = (h.dtype() == logits.dtype() ? h.clone() : h.to(logits.dtype())).view(r.lead);
  Shape shape = logits.shape();
  record(op, out, {logits}, [x, stat, h, r, shape](const Tensor& g, const std::vector<bool>&) {
    Tensor dx = Tensor::empty({r.n, r.v}, x.dtype(), x.device());
    if (x.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
      Tensor g32 = f32_rows(g);
      kernels::cuda::entropy_backward(x.raw_data(), x.dtype(), stat.data<float>(), h.data<float>(),
                                      g32.data<float>(), r.n, r.v, dx.raw_data());
#endif
      return std::vector<Tensor>{dx.view(shape)};
    }
    Tensor gc = contig(g);
    dispatch_float(x.dtype(), "entropy", [&]<class T>() {
      kernels::cpu::entropy_backward<T>(x.data<T>(), stat.data<T>(), h.data<T>(), gc.data<T>(), r.n,
                                        r.v, dx.data<T>());
    });
    return std::vector<Tensor>{dx.view(shape)};
  });
  return out;
}

Tensor kl_div(const Tensor& student_logits, const Tensor& teacher_logits, KLKind kind, double beta,
              double temperature) {
  const char* op = "kl_div";
  profiler::OpScope prof(op);
  check_logits(op, student_logits, "student_logits");
  check_logits(op, teacher_logits, "teacher_logits");
  check_same_device(op, {&student_logits, &teacher_logits});
  check_same_dtype(op, {&student_logits, &teacher_logits});
  FTUNE_CHECK(student_logits.shape() == teacher_logits.shape(), "[", op, "] student logits ",
              student_logits.desc(), " and teacher logits ", teacher_logits.desc(),
              " differ in shape");
  FTUNE_CHECK(std::isfinite(temperature) && temperature > 0.0, "[", op,
              "] temperature must be finite and > 0, got ", temperature);
  Rows r = rows_of(op, student_logits, "student_logits");
  FTUNE_CHECK(r.v > 0, "[", op, "] logits have an empty vocabulary (last dim 0)");
  if (kind == KLKind::jsd) {
    FTUNE_CHECK(beta >= 0.0 && beta <= 1.0, "[", op, "] jsd beta must be in [0, 1], got ", beta);
    // The endpoints follow TRL's generalized JSD: beta 0 is forward KL, beta 1 reverse KL (the
    // mixture formula itself would give 0 there).
    if (beta == 0.0) kind = KLKind::forward;
    if (beta == 1.0) kind = KLKind::reverse;
  }
  const kernels::Divergence div = divergence_of(kind);
  const double inv_temp = 1.0 / temperature;
  Tensor s = logits_2d(student_logits, r), t = logits_2d(teacher_logits, r);
  const bool gpu = s.device().is_cuda();
  Tensor stats = Tensor::empty({r.n, 6}, gpu ? DType::f32 : s.dtype(), s.device());
  Tensor out;
  if (gpu) {  // stats and the divergence in f32, the output in the logits dtype
    Tensor o32 = Tensor::empty(r.lead, DType::f32, s.device());
#ifdef FTUNE_HAVE_CUDA
    kernels::cuda::kl_forward(s.raw_data(), t.raw_data(), s.dtype(), r.n, r.v, div, beta, inv_temp,
                              o32.data<float>(), stats.data<float>());
#endif
    out = o32.dtype() == s.dtype() ? o32 : o32.to(s.dtype());
  } else {
    out = Tensor::empty(r.lead, s.dtype(), s.device());
    dispatch_float(s.dtype(), op, [&]<class T>() {
      kernels::cpu::kl_forward<T>(s.data<T>(), t.data<T>(), r.n, r.v, div, beta, inv_temp,
                                  out.data<T>(), stats.data<T>());
    });
  }
  Shape shape = student_logits.shape();
  record(
      op, out, {student_logits, teacher_logits},
      [s, t, stats, r, shape, div, beta, inv_temp](const Tensor& g, const std::vector<bool>& need) {
        Tensor ds, dt;
        if (need[0]) ds = Tensor::empty({r.n, r.v}, s.dtype(), s.device());
        if (need[1]) dt = Tensor::empty({r.n, r.v}, s.dtype(), s.device());
        if (s.device().is_cuda()) {
#ifdef FTUNE_HAVE_CUDA
          Tensor g32 = f32_rows(g);
          kernels::cuda::kl_backward(s.raw_data(), t.raw_data(), s.dtype(), stats.data<float>(),
                                     g32.data<float>(), r.n, r.v, div, beta, inv_temp,
                                     ds.defined() ? ds.raw_data() : nullptr,
                                     dt.defined() ? dt.raw_data() : nullptr);
#endif
          return std::vector<Tensor>{ds.defined() ? ds.view(shape) : ds,
                                     dt.defined() ? dt.view(shape) : dt};
        }
        Tensor gc = contig(g);
        dispatch_float(s.dtype(), "kl_div", [&]<class T>() {
          kernels::cpu::kl_backward<T>(s.data<T>(), t.data<T>(), stats.data<T>(), gc.data<T>(), r.n,
                                       r.v, div, beta, inv_temp,
                                       ds.defined() ? ds.data<T>() : nullptr,
                                       dt.defined() ? dt.data<T>() : nullptr);
        });
        return std::vector<Tensor>{ds.defined() ? ds.view(shape) : ds,
                                   dt.defined() ? dt.view(shape) : dt};
      });
  return out;
}

}  // namespace ftune::ops
