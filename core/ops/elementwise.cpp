#include "core/ops/common.h"
#include "kernels/elementwise.h"

namespace ftune::ops {

using namespace detail;
using kernels::BinaryOp;
using kernels::UnaryOp;

namespace {

const char* binary_name(BinaryOp op) {
  switch (op) {
    case BinaryOp::add: return "add";
    case BinaryOp::sub: return "sub";
    case BinaryOp::mul: return "mul";
    case BinaryOp::div: return "div";
  }
  return "?";
}

Tensor binary_fwd(BinaryOp op, const Tensor& a, const Tensor& b) {
  const char* name = binary_name(op);
  check_defined(name, a, "a");
  check_defined(name, b, "b");
  check_same_device(name, {&a, &b});
  check_same_dtype(name, {&a, &b});
  check_float(name, a, "a");
  Shape out_shape = broadcast_shapes(name, a.shape(), b.shape());
  Tensor out = Tensor::empty(out_shape, a.dtype(), a.device());
  FTUNE_KERNEL(a.device(), binary)(op, a.detach().expand(out_shape), b.detach().expand(out_shape), out);
  return out;
}

Tensor binary(BinaryOp op, const Tensor& a, const Tensor& b) {
  profiler::OpScope prof(binary_name(op));
  Tensor out = binary_fwd(op, a, b);
  if (!needs_record({&a, &b})) return out;
  Shape sa = a.shape(), sb = b.shape();
  // Save only what the gradient formula reads.
  Tensor sa_t = (op == BinaryOp::mul || op == BinaryOp::div) && b.requires_grad() ? a.detach() : Tensor();
  Tensor sb_t = (op == BinaryOp::mul || op == BinaryOp::div) ? b.detach() : Tensor();
  record(binary_name(op), out, {a, b},
         [op, sa, sb, sa_t, sb_t](const Tensor& g, const std::vector<bool>& need) {
           Tensor ga, gb;
           switch (op) {
             case BinaryOp::add:
               if (need[0]) ga = sum_to(g, sa);
               if (need[1]) gb = sum_to(g, sb);
               break;
             case BinaryOp::sub:
               if (need[0]) ga = sum_to(g, sa);
               if (need[1]) gb = sum_to(neg(g), sb);
               break;
             case BinaryOp::mul:
               if (need[0]) ga = sum_to(mul(g, sb_t), sa);
               if (need[1]) gb = sum_to(mul(g, sa_t), sb);
               break;
             case BinaryOp::div:
               if (need[0]) ga = sum_to(div(g, sb_t), sa);
               if (need[1]) gb = sum_to(neg(div(mul(g, sa_t), mul(sb_t, sb_t))), sb);
               break;
           }
           return std::vector<Tensor>{ga, gb};
         });
  return out;
}

const char* unary_name(UnaryOp op) {
  switch (op) {
    case UnaryOp::neg: return "neg";
    case UnaryOp::exp: return "exp";
    case UnaryOp::log: return "log";
    case UnaryOp::sqrt: return "sqrt";
    case UnaryOp::tanh: return "tanh";
    case UnaryOp::sigmoid: return "sigmoid";
    case UnaryOp::relu: return "relu";
    case UnaryOp::square: return "square";
    case UnaryOp::add_scalar: return "add_scalar";
    case UnaryOp::mul_scalar: return "mul_scalar";
  }
  return "?";
}

Tensor unary(UnaryOp op, const Tensor& a, double s = 0.0) {
  const char* name = unary_name(op);
  profiler::OpScope prof(name);
  check_defined(name, a, "input");
  check_float(name, a, "input");
  Tensor out = Tensor::empty(a.shape(), a.dtype(), a.device());
  FTUNE_KERNEL(a.device(), unary)(op, a.detach(), out, s);
  if (!needs_record({&a})) return out;
  bool needs_x = op == UnaryOp::log || op == UnaryOp::relu || op == UnaryOp::square;
  bool needs_y = op == UnaryOp::exp || op == UnaryOp::sqrt || op == UnaryOp::tanh || op == UnaryOp::sigmoid;
  Tensor x = needs_x ? contig(a) : Tensor();
  Tensor y = needs_y ? out.detach() : Tensor();
  record(name, out, {a}, [op, x, y, s](const Tensor& g, const std::vector<bool>&) {
    Tensor gc = contig(g);
    Tensor dx = Tensor::empty(gc.shape(), gc.dtype(), gc.device());
    FTUNE_KERNEL(gc.device(), unary_backward)(op, x.defined() ? x : gc, y.defined() ? y : gc, gc, dx, s);
    return std::vector<Tensor>{dx};
  });
  return out;
}

}  // namespace

Tensor add(const Tensor& a, const Tensor& b) { return binary(BinaryOp::add, a, b); }
Tensor sub(const Tensor& a, const Tensor& b) { return binary(BinaryOp::sub, a, b); }
Tensor mul(const Tensor& a, const Tensor& b) { return binary(BinaryOp::mul, a, b); }
Tensor div(const Tensor& a, const Tensor& b) { return binary(BinaryOp::div, a, b); }
Tensor add_scalar(const Tensor& a, double s) { return unary(UnaryOp::add_scalar, a, s); }
Tensor mul_scalar(const Tensor& a, double s) { return unary(UnaryOp::mul_scalar, a, s); }
Tensor neg(const Tensor& a) { return unary(UnaryOp::neg, a); }
Tensor exp(const Tensor& a) { return unary(UnaryOp::exp, a); }
Tensor log(const Tensor& a) { return unary(UnaryOp::log, a); }
Tensor sqrt(const Tensor& a) { return unary(UnaryOp::sqrt, a); }
Tensor tanh(const Tensor& a) { return unary(UnaryOp::tanh, a); }
Tensor sigmoid(const Tensor& a) { return unary(UnaryOp::sigmoid, a); }
Tensor relu(const Tensor& a) { return unary(UnaryOp::relu, a); }
Tensor square(const Tensor& a) { return unary(UnaryOp::square, a); }

Tensor where_mask(const Tensor& mask, const Tensor& a, double fill) {
  profiler::OpScope prof("where_mask");
  FTUNE_CHECK(mask.dtype() == DType::b8, "[where_mask] mask must be bool, got ", mask.desc());
  FTUNE_CHECK(mask.shape() == a.shape(), "[where_mask] mask ", mask.desc(), " vs input ", a.desc());
  check_same_device("where_mask", {&mask, &a});
  Tensor m = mask.to(a.dtype());  // 1/0 in a's dtype
  Tensor keep = mul(a, m);
  Tensor fillt = mul_scalar(add_scalar(neg(m), 1.0), fill);
  return add(keep, fillt);
}

void add_(Tensor& a, const Tensor& b, double alpha) {
  profiler::OpScope prof("add_");
  FTUNE_CHECK(a.shape() == b.shape(), "[add_] shape mismatch: ", a.desc(), " += ", b.desc());
  check_same_device("add_", {&a, &b});
  Tensor bb = b.dtype() == a.dtype() ? contig(b) : b.detach().to(a.dtype()).contiguous();
  if (!a.is_contiguous()) {
    // A strided destination (a slice of a wider tensor): the kernels walk a's strides, with
    // the same arithmetic. Not a view whose elements share addresses (a stride 0 over a dim > 1,
    // as expand makes): each would get another sum.
    for (int64_t d = 0; d < a.dim(); ++d)
      FTUNE_CHECK(a.strides()[size_t(d)] != 0 || a.shape()[size_t(d)] <= 1,
                  "[add_] destination ", a.desc(), " repeats elements (stride 0 in dim ", d, ")");
  }
  a.bump_version();
  FTUNE_KERNEL(a.device(), axpy)(a, bb, alpha);
}

void mul_(Tensor& a, double s) {
  profiler::OpScope prof("mul_");
  FTUNE_CHECK(a.is_contiguous(), "[mul_] destination must be contiguous: ", a.desc());
  a.bump_version();
  FTUNE_KERNEL(a.device(), scale_)(a, s);
}

Tensor cast(const Tensor& a, DType dt) {
  profiler::OpScope prof("cast");
  check_defined("cast", a, "input");
  if (a.dtype() == dt) return a;
  Tensor out = Tensor::empty(a.shape(), dt, a.device());
  out.copy_(a);
  if (is_floating(dt) && is_floating(a.dtype())) {
    DType src = a.dtype();
    record("cast", out, {a}, [src](const Tensor& g, const std::vector<bool>&) {
      return std::vector<Tensor>{cast(g, src)};
    });
  }
  return out;
}

}  // namespace ftune::ops
