// nn ops: embedding, layer_norm, rms_norm, rope, gelu, silu, swiglu. Each is one op with a
// hand-written backward kernel (kernels/{embedding,norm,rope,activation}.h).
#include <cmath>

#include "core/ops/common.h"
#include "kernels/activation.h"
#include "kernels/embedding.h"
#include "kernels/norm.h"
#include "kernels/rope.h"

namespace ftune::ops {

using namespace detail;

namespace {

// Multi-index of flat position p in shape s, as "[i, j, k]".
std::string index_str(const Shape& s, int64_t p) {
  Shape idx(s.size());
  for (size_t d = s.size(); d-- > 0;) {
    idx[d] = p % s[d];
    p /= s[d];
  }
  return shape_str(idx);
}

int64_t id_at(const Tensor& ids, int64_t p) {
  return ids.dtype() == DType::i32 ? int64_t(ids.data<int32_t>()[p]) : ids.data<int64_t>()[p];
}

// Checks shared by layer_norm and rms_norm: x [..., D] float, weight (and bias) [D] of x's dtype.
void check_norm(const char* op, const Tensor& x, const Tensor& weight, const Tensor& bias,
                double eps) {
  check_defined(op, x, "x");
  check_defined(op, weight, "weight");
  check_same_device(op, {&x, &weight, &bias});
  check_float(op, x, "x");
  check_same_dtype(op, {&x, &weight, &bias});
  FTUNE_CHECK(x.dim() >= 1, "[", op, "] x must have at least 1 dim, got ", x.desc());
  const int64_t D = x.size(-1);
  FTUNE_CHECK(weight.shape() == Shape{D}, "[", op, "] weight must be [", D, "] (the last dim of x ",
              x.desc(), "), got ", weight.desc());
  FTUNE_CHECK(!bias.defined() || bias.shape() == Shape{D}, "[", op, "] bias must be [", D,
              "] (the last dim of x ", x.desc(), "), got ", bias.desc());
  FTUNE_CHECK(std::isfinite(eps) && eps >= 0.0, "[", op, "] eps must be finite and >= 0, got ",
              eps);
}

// The saved row statistics: f64 on the CPU, f32 on the GPU (kernels/norm.h).
DType norm_stats_dtype(const Tensor& x) { return x.device().is_cuda() ? DType::f32 : DType::f64; }

// One-input elementwise activation: forward kernel, and a backward from the saved input.
using ActFwd = void (*)(const Tensor&, Tensor&);
using ActBwd = void (*)(const Tensor&, const Tensor&, Tensor&);

Tensor activation(const char* op, const Tensor& x, ActFwd fwd, ActBwd bwd) {
  profiler::OpScope prof(op);
  check_defined(op, x, "x");
  check_float(op, x, "x");
  Tensor xc = contig(x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  fwd(xc, out);
  if (!needs_record({&x})) return out;
  record(op, out, {x}, [xc, bwd](const Tensor& g, const std::vector<bool>&) {
    Tensor dx = Tensor::empty(xc.shape(), xc.dtype(), xc.device());
    bwd(xc, contig(g), dx);
    return std::vector<Tensor>{dx};
  });
  return out;
}

}  // namespace

Tensor embedding(const Tensor& weight, const Tensor& ids) {
  profiler::OpScope prof("embedding");
  check_defined("embedding", weight, "weight");
  check_defined("embedding", ids, "ids");
  check_same_device("embedding", {&weight, &ids});
  check_float("embedding", weight, "weight");
  check_index("embedding", ids, "ids");
  FTUNE_CHECK(weight.dim() == 2, "[embedding] weight must be [V, D], got ", weight.desc());
  const int64_t V = weight.size(0), D = weight.size(1);
  Tensor w = contig(weight), idc = contig(ids);
  const int64_t bad = FTUNE_KERNEL(idc.device(), first_bad_id)(idc, V);
  FTUNE_CHECK(bad < 0, "[embedding] id ", bad < 0 ? 0 : id_at(idc.to(Device::cpu()), bad), " at position ",
              index_str(ids.shape(), bad < 0 ? 0 : bad), " of ids ", ids.desc(),
              " is out of range [0, ", V, ") for weight ", weight.desc());
  Shape os = ids.shape();
  os.push_back(D);
  Tensor out = Tensor::empty(os, weight.dtype(), weight.device());
  FTUNE_KERNEL(w.device(), embedding_forward)(w, idc, out);
  if (!needs_record({&weight})) return out;
  Shape ws = weight.shape();
  record("embedding", out, {weight, ids},
         [idc, ws](const Tensor& g, const std::vector<bool>& need) {
           Tensor dw;
           if (need[0]) {
             // A tied embedding: the LM head's gradient of the same weight is this pass's sum
             // so far (its backward runs first); the rows are added into it, with no [V, D]
             // zero fill and no engine sum.
             dw = accumulation_target(0);
             const bool add = dw.defined();
             if (!add) dw = Tensor::empty(ws, g.dtype(), g.device());
             FTUNE_KERNEL(g.device(), embedding_backward)(contig(g), idc, dw, add);
           }
           return std::vector<Tensor>{dw, Tensor()};
         });
  return out;
}

namespace {
// A norm's dx buffer: the residual stream's gradient summed so far when the engine offers it
// (accumulation_target; acc is set and the kernel adds into it: the block's x + f(norm(x)) needs
// no separate pass summing the two [tokens, hidden] gradients), else a fresh tensor.
Tensor norm_dx(bool need, const Tensor& xc, bool& acc) {
  acc = false;
  if (!need) return Tensor();
  Tensor t = accumulation_target(0);
  if (t.defined() && t.shape() == xc.shape() && t.dtype() == xc.dtype() &&
      t.device() == xc.device() && t.is_contiguous()) {
    acc = true;
    return t;
  }
  return Tensor::empty(xc.shape(), xc.dtype(), xc.device());
}
}  // namespace

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  profiler::OpScope prof("layer_norm");
  check_norm("layer_norm", x, weight, bias, eps);
  const int64_t D = x.size(-1), N = x.numel() / std::max<int64_t>(D, 1);
  Tensor xc = contig(x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor mean = Tensor::empty({N}, norm_stats_dtype(x), x.device());
  Tensor rstd = Tensor::empty({N}, norm_stats_dtype(x), x.device());
  Tensor wc = contig(weight);
  FTUNE_KERNEL(x.device(), layer_norm_forward)(xc, wc, bias.defined() ? contig(bias) : Tensor(),
                                               eps, out, mean, rstd);
  if (!needs_record({&x, &weight, &bias})) return out;
  bool has_bias = bias.defined();
  record("layer_norm", out, {x, weight, bias},
         [xc, wc, mean, rstd, has_bias](const Tensor& g, const std::vector<bool>& need) {
           Tensor dw, db;
           bool acc = false;
           Tensor dx = norm_dx(need[0], xc, acc);
           if (need[1]) dw = Tensor::empty(wc.shape(), wc.dtype(), wc.device());
           if (has_bias && need[2]) db = Tensor::empty(wc.shape(), wc.dtype(), wc.device());
           FTUNE_KERNEL(xc.device(), layer_norm_backward)(contig(g), xc, wc, mean, rstd, dx, dw,
                                                          db, acc);
           return std::vector<Tensor>{dx, dw, db};
         });
  return out;
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  profiler::OpScope prof("rms_norm");
  check_norm("rms_norm", x, weight, Tensor(), eps);
  const int64_t D = x.size(-1), N = x.numel() / std::max<int64_t>(D, 1);
  Tensor xc = contig(x);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  Tensor rstd = Tensor::empty({N}, norm_stats_dtype(x), x.device());
  Tensor wc = contig(weight);
  FTUNE_KERNEL(x.device(), rms_norm_forward)(xc, wc, eps, out, rstd);
  if (!needs_record({&x, &weight})) return out;
  record("rms_norm", out, {x, weight},
         [xc, wc, rstd](const Tensor& g, const std::vector<bool>& need) {
           Tensor dw;
           bool acc = false;
           Tensor dx = norm_dx(need[0], xc, acc);
           if (need[1]) dw = Tensor::empty(wc.shape(), wc.dtype(), wc.device());
           FTUNE_KERNEL(xc.device(), rms_norm_backward)(contig(g), xc, wc, rstd, dx, dw, acc);
           return std::vector<Tensor>{dx, dw};
         });
  return out;
}

Tensor rope(const Tensor& x, const Tensor& positions, double theta) {
  profiler::OpScope prof("rope");
  check_defined("rope", x, "x");
  check_defined("rope", positions, "positions");
  check_same_device("rope", {&x, &positions});
  check_float("rope", x, "x");
  check_index("rope", positions, "positions");
  FTUNE_CHECK(x.dim() == 4, "[rope] x must be [B, T, H, D], got ", x.desc());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(3);
  FTUNE_CHECK(D % 2 == 0, "[rope] head_dim D must be even, got x ", x.desc());
  const bool pos_ok = positions.shape() == Shape{T} || positions.shape() == Shape{B, T};
  FTUNE_CHECK(pos_ok, "[rope] positions must be [", T, "] or [", B, ", ", T, "] for x ", x.desc(),
              ", got ", positions.desc());
  FTUNE_CHECK(std::isfinite(theta) && theta > 0.0, "[rope] theta must be finite and > 0, got ",
              theta);
  Tensor pc = contig(positions);
  Tensor out = Tensor::empty(x.shape(), x.dtype(), x.device());
  FTUNE_KERNEL(x.device(), rope)(contig(x), pc, theta, false, out);
  if (!needs_record({&x})) return out;
  // A rotation: the backward is the inverse rotation of dy; positions get no gradient.
  record("rope", out, {x}, [pc, theta](const Tensor& g, const std::vector<bool>&) {
    Tensor gc = contig(g);
    Tensor dx = Tensor::empty(gc.shape(), gc.dtype(), gc.device());
    FTUNE_KERNEL(gc.device(), rope)(gc, pc, theta, true, dx);
    return std::vector<Tensor>{dx};
  });
  return out;
}

Tensor gelu(const Tensor& x) {
  return activation("gelu", x, FTUNE_KERNEL(x.device(), gelu_forward),
                    FTUNE_KERNEL(x.device(), gelu_backward));
}

Tensor silu(const Tensor& x) {
  return activation("silu", x, FTUNE_KERNEL(x.device(), silu_forward),
                    FTUNE_KERNEL(x.device(), silu_backward));
}

Tensor swiglu(const Tensor& gate, const Tensor& up) {
  profiler::OpScope prof("swiglu");
  check_defined("swiglu", gate, "gate");
  check_defined("swiglu", up, "up");
  check_same_device("swiglu", {&gate, &up});
  check_float("swiglu", gate, "gate");
  check_same_dtype("swiglu", {&gate, &up});
  FTUNE_CHECK(gate.shape() == up.shape(), "[swiglu] gate ", gate.desc(), " and up ", up.desc(),
              " must have the same shape");
  Tensor gc = contig(gate), uc = contig(up);
  Tensor out = Tensor::empty(gate.shape(), gate.dtype(), gate.device());
  FTUNE_KERNEL(gc.device(), swiglu_forward)(gc, uc, out);
  if (!needs_record({&gate, &up})) return out;
  record("swiglu", out, {gate, up}, [gc, uc](const Tensor& g, const std::vector<bool>& need) {
    Tensor dg, du;
    if (need[0]) dg = Tensor::empty(gc.shape(), gc.dtype(), gc.device());
    if (need[1]) du = Tensor::empty(uc.shape(), uc.dtype(), uc.device());
    FTUNE_KERNEL(gc.device(), swiglu_backward)(gc, uc, contig(g), dg, du);
    return std::vector<Tensor>{dg, du};
  });
  return out;
}

}  // namespace ftune::ops
