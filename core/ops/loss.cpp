// softmax, log_softmax, cross_entropy, token_logprobs, entropy, kl_div. The losses are fused: the
// forward saves the logits and per-row statistics (kernels/loss.h), never probabilities; the
// backward recomputes the probabilities in the same pass that writes the gradient.
#include "kernels/loss.h"

#include <cmath>
#include <limits>

#include "core/autograd.h"
#include "core/ops/common.h"
#include "kernels/matmul.h"

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
// The per-row nll of logits [r.n, r.v] against already checked i64 targets [r.n].
Nll nll_rows(const char* op, const Tensor& logits, const Tensor& tgt, int64_t ignore,
             const Rows& r, DType gpu_dt = DType::f32, float gpu_sign = 1.0f) {
  Nll f;
  f.tgt = tgt;
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

Nll nll_impl(const char* op, const Tensor& logits, const Tensor& targets, int64_t ignore,
             const Rows& r, DType gpu_dt = DType::f32, float gpu_sign = 1.0f) {
  check_same_device(op, {&logits, &targets});
  int64_t counted = 0;
  Tensor tgt = check_targets(op, targets, r, ignore, &counted);
  Nll f = nll_rows(op, logits, tgt, ignore, r, gpu_dt, gpu_sign);
  f.counted = counted;
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

namespace {

Rows shard_rows(const char* op, const Tensor& logits, const Tensor& local_targets) {
  check_logits(op, logits, "logits");
  check_defined(op, local_targets, "local_targets");
  check_same_device(op, {&logits, &local_targets});
  FTUNE_CHECK(logits.dim() == 2 && logits.is_contiguous(), "[", op,
              "] logits must be a contiguous [N, V_r] shard, got ", logits.desc());
  FTUNE_CHECK(local_targets.dtype() == DType::i64 && local_targets.dim() == 1 &&
                  local_targets.is_contiguous() && local_targets.size(0) == logits.size(0),
              "[", op, "] local_targets must be contiguous i64 [", logits.size(0), "], got ",
              local_targets.desc());
  return rows_of(op, logits, "logits");
}

}  // namespace

ShardNll cross_entropy_shard_forward(const Tensor& logits, const Tensor& local_targets,
                                     int64_t ignore_index) {
  const char* op = "cross_entropy_shard_forward";
  profiler::OpScope prof(op);
  Rows r = shard_rows(op, logits, local_targets);
  FTUNE_CHECK(r.v > 0, "[", op, "] empty vocabulary shard (the caller skips it)");
  NoGradGuard no_grad;
  Nll f = nll_rows(op, logits.detach(), local_targets, ignore_index, r);
  return {f.stat, f.nll};
}

Tensor cross_entropy_shard_backward(const Tensor& logits, const Tensor& local_targets,
                                    const Tensor& stat, const Tensor& g, int64_t g_stride,
                                    double scale, int64_t ignore_index) {
  const char* op = "cross_entropy_shard_backward";
  profiler::OpScope prof(op);
  Rows r = shard_rows(op, logits, local_targets);
  const DType sdt = logits.device().is_cuda() ? DType::f32 : logits.dtype();
  FTUNE_CHECK(stat.defined() && stat.shape() == Shape({r.n, 2}) && stat.dtype() == sdt &&
                  stat.is_contiguous() && stat.device() == logits.device(),
              "[", op, "] stat must be contiguous ", dtype_name(sdt), " [", r.n, ", 2] on ",
              logits.device().str(), ", got ", stat.defined() ? stat.desc() : "undefined");
  FTUNE_CHECK(g.defined() && (g_stride == 0 ? g.numel() == 1 : g_stride == 1 && g.numel() == r.n),
              "[", op, "] g must be a scalar (g_stride 0) or [", r.n, "] (g_stride 1), got ",
              g.defined() ? g.desc() : "undefined", " with g_stride ", g_stride);
  check_same_device(op, {&logits, &g});
  NoGradGuard no_grad;
  Nll f;
  f.x = logits.detach();
  f.tgt = local_targets;
  f.stat = stat;
  // The CPU kernel takes g in the logits' dtype, the GPU one converts it to f32 itself.
  Tensor gg = logits.device().is_cuda() ? g.detach() : g.detach().to(logits.dtype());
  return nll_grad(op, f, r, {r.n, r.v}, ignore_index, gg, g_stride, scale);
}

Tensor linear_cross_entropy(const Tensor& h, const Tensor& w, const Tensor& targets,
                            int64_t ignore_index, Reduction reduction, int64_t chunk_rows,
                            Tensor* argmax) {
  const char* op = "linear_cross_entropy";
  profiler::OpScope prof(op);
  check_logits(op, h, "hidden");
  check_logits(op, w, "weight");
  check_same_device(op, {&h, &w, &targets});
  FTUNE_CHECK(h.dtype() == w.dtype(), "[", op, "] hidden ", h.desc(), " and weight ", w.desc(),
              " differ in dtype");
  FTUNE_CHECK(w.dim() == 2 && h.size(-1) == w.size(1), "[", op, "] weight ", w.desc(),
              " must be [vocab, ", h.size(-1), "] for hidden ", h.desc());
  FTUNE_CHECK(reduction != Reduction::none, "[", op, "] reduction none is not supported (per-row "
              "losses need no fusion): use cross_entropy(linear(h, w), targets, ...)");
  FTUNE_CHECK(chunk_rows >= 0, "[", op, "] chunk_rows must be >= 0 (0: auto), got ", chunk_rows);
  const DType dt = h.dtype();  // f32 or f64 on the CPU (check_logits), f32/bf16/f16 on a GPU
  const Device dev = h.device();
  const bool gpu = dev.is_cuda();
  const int64_t d = w.size(1), V = w.size(0);
  Rows r;
  r.v = V;
  r.lead.assign(h.shape().begin(), h.shape().end() - 1);
  r.n = shape_numel(r.lead);
  int64_t counted = 0;
  Tensor tgt = check_targets(op, targets, r, ignore_index, &counted);  // checked once, i64 [N]
  const bool need_h = grad_enabled() && h.requires_grad();
  const bool need_w = grad_enabled() && w.requires_grad();
  const double scale =
      reduction == Reduction::mean ? (counted > 0 ? 1.0 / double(counted) : 0.0) : 1.0;
  // Rows per chunk: about 1 GiB of logits (and as much again for their gradient) at a time. Each
  // chunk after the first costs dW's accumulation, a read and a write of the [V, d] f32 sum (1.1
  // GB at Qwen2.5-0.5B's shapes), so the chunks are large: the saving is the logits beyond 1 GiB.
  int64_t chunk = chunk_rows > 0 ? chunk_rows
                                 : std::max<int64_t>(1, (int64_t(1) << 30) /
                                                            std::max<int64_t>(1, V * int64_t(dtype_size(dt))));
  chunk = std::min(chunk, std::max<int64_t>(1, r.n));

  Tensor out, dh, dw;
  {
    NoGradGuard ng;
    Tensor h2 = contig(h).view({r.n, d});
    Tensor wc = contig(w);
    if (need_h) dh = Tensor::empty({r.n, d}, dt, dev);
    // dW over the chunks: accumulated by the GEMM (beta 1), in f32 for 16-bit weights.
    const DType acc_dt = gpu && dt != DType::f32 && dt != DType::f64 ? DType::f32 : dt;
    Tensor acc;
    if (need_w) acc = r.n > 0 ? Tensor::empty({V, d}, acc_dt, dev) : Tensor::zeros({V, d}, acc_dt, dev);
    Tensor nll_all = gpu ? Tensor::empty({std::max<int64_t>(1, r.n)}, DType::f32, dev) : Tensor();
    double cpu_sum = 0.0;
    // c[c_off...] [m, n] = op(a) [m, k] b [k, n] + beta c, row-major, on h's device (a, b of dt;
    // c of dt, or f32 on the GPU).
    auto gemm_into = [&](bool ta, int64_t m, int64_t n, int64_t k, const Tensor& a, int64_t lda,
                         const Tensor& b, int64_t ldb, Tensor& c, int64_t c_off, int64_t ldc,
                         float beta) {
      if (gpu) {
#ifdef FTUNE_HAVE_CUDA
        kernels::cuda::GemmArgs g;
        g.trans_a = ta;
        g.m = m;
        g.n = n;
        g.k = k;
        g.ab_dtype = dt;
        g.c_dtype = c.dtype();
        g.a = a.raw_data();
        g.lda = lda;
        g.b = b.raw_data();
        g.ldb = ldb;
        g.c = static_cast<char*>(c.raw_data()) + c_off * int64_t(dtype_size(c.dtype()));
        g.ldc = ldc;
        g.beta = beta;
        kernels::cuda::gemm(g);
#endif
        return;
      }
      dispatch_float(dt, op, [&]<class T>() {
        if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>)
          kernels::cpu::gemm<T>(ta, false, m, n, k, T(1), a.data<T>(), lda, b.data<T>(), ldb,
                                T(beta), c.data<T>() + c_off, ldc);
      });
    };
    const Tensor one = Tensor::scalar(1.0, gpu ? DType::f32 : dt, dev);  // dlogits of the sum
    if (argmax) *argmax = Tensor::empty({r.n}, DType::i64, dev);
    for (int64_t c0 = 0; c0 < r.n; c0 += chunk) {
      const int64_t rows = std::min(chunk, r.n - c0);
      Tensor hc = h2.slice(0, c0, c0 + rows);
      Rows rc;
      rc.n = rows;
      rc.v = V;
      rc.lead = {rows};
      Tensor logits = linear(hc, wc);
      if (argmax) argmax->slice(0, c0, c0 + rows).copy_(ops::argmax(logits, -1));
      const Tensor tc = tgt.slice(0, c0, c0 + rows);
      Tensor dl;  // d loss / d logits of the chunk [rows, V]
      if (gpu && (need_h || need_w)) {
        // Loss and gradient in one kernel, each row's logits read once from memory.
        dl = Tensor::empty({rows, V}, dt, dev);
#ifdef FTUNE_HAVE_CUDA
        kernels::cuda::nll_fused(logits.raw_data(), dt, tc.data<int64_t>(), rows, V, ignore_index,
                                 float(scale), nll_all.data<float>() + c0, dl.raw_data());
#endif
        logits = Tensor();
      } else {
        Nll f = nll_rows(op, logits, tc, ignore_index, rc);
        logits = Tensor();
        if (gpu) {
          nll_all.slice(0, c0, c0 + rows).copy_(f.nll);
        } else {
          dispatch_float(dt, op, [&]<class T>() {
            const T* p = f.nll.data<T>();
            for (int64_t i = 0; i < rows; ++i) cpu_sum += double(p[i]);
          });
        }
        if (need_h || need_w) dl = nll_grad(op, f, rc, {rows, V}, ignore_index, one, 0, scale);
      }
      if (!need_h && !need_w) continue;
      if (need_h)  // dh[c0 : c0 + rows] = dl [rows, V] W [V, d], written in place
        gemm_into(false, rows, d, V, dl, V, wc, d, dh, c0 * d, d, 0.f);
      if (need_w)  // dW [V, d] (+)= dl^T [V, rows] hc [rows, d]
        gemm_into(true, V, d, rows, dl, V, hc, d, acc, 0, d, c0 == 0 ? 0.f : 1.f);
    }
    if (need_w) dw = acc_dt == dt ? acc : acc.to(dt);
    if (gpu) {
      out = Tensor::empty({}, DType::f32, dev);
#ifdef FTUNE_HAVE_CUDA
      kernels::cuda::sum_scaled(nll_all.data<float>(), r.n, scale, out.raw_data(), out.dtype());
#endif
    } else {
      out = Tensor::scalar(cpu_sum * scale, dt, dev);
    }
  }
  // The gradients were formed with the forward (for an upstream gradient of 1); the backward
  // scales them by the upstream scalar. They are handed over once: no retain_graph.
  auto state = std::make_shared<std::pair<Tensor, Tensor>>(dh, dw);
  const Shape h_shape = h.shape();
  record(op, out, {h, w}, [state, h_shape](const Tensor& g, const std::vector<bool>& needs) {
    FTUNE_CHECK(state->first.defined() || state->second.defined() || !(needs[0] || needs[1]),
                "[linear_cross_entropy] its backward ran twice (retain_graph is not supported: "
                "the gradients are formed in the forward)");
    const double gs = g.item();
    auto scaled = [gs](Tensor t) { return !t.defined() || gs == 1.0 ? t : mul_scalar(t, gs); };
    Tensor gh = needs[0] && state->first.defined() ? scaled(state->first).view(h_shape) : Tensor();
    Tensor gw = needs[1] ? scaled(state->second) : Tensor();
    *state = {};
    return std::vector<Tensor>{gh, gw};
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
