#include <cmath>

#include "core/ops/common.h"
#include "kernels/elementwise.h"

namespace ftune::ops {

using namespace detail;

namespace {

Tensor reduce_sum_dim(const Tensor& a, int64_t d, bool keepdim) {
  Tensor c = contig(a);
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= a.shape()[i];
  for (int64_t i = d + 1; i < a.dim(); ++i) inner *= a.shape()[i];
  Shape os = a.shape();
  os[d] = 1;
  Tensor out = Tensor::empty(os, a.dtype(), a.device());
  FTUNE_KERNEL(a.device(), sum_dim)(c, outer, a.shape()[d], inner, out);
  if (!keepdim) {
    os.erase(os.begin() + d);
    out = out.view(os);
  }
  return out;
}

// g broadcast to shape, materialized: the gradient of a sum. On the GPU a copy kernel does it
// (x * 1 is exact), since Tensor::contiguous has no strided GPU copy.
Tensor expand_dense(const Tensor& g, const Shape& shape) {
  if (!g.device().is_cuda()) return g.expand(shape).contiguous();
  Tensor out = Tensor::empty(shape, g.dtype(), g.device());
  FTUNE_KERNEL(g.device(), unary)(kernels::UnaryOp::mul_scalar, g.detach().expand(shape), out, 1.0);
  return out;
}

}  // namespace

Tensor sum(const Tensor& a) {
  profiler::OpScope prof("sum");
  check_defined("sum", a, "input");
  check_float("sum", a, "input");
  Tensor c = contig(a).view({1, a.numel(), 1});
  Tensor out = Tensor::empty({1, 1}, a.dtype(), a.device());
  FTUNE_KERNEL(a.device(), sum_dim)(c, 1, a.numel(), 1, out);
  out = out.view({});
  Shape in_shape = a.shape();
  record("sum", out, {a}, [in_shape](const Tensor& g, const std::vector<bool>&) {
    return std::vector<Tensor>{expand_dense(g, in_shape)};
  });
  return out;
}

Tensor sum(const Tensor& a, int64_t dim, bool keepdim) {
  profiler::OpScope prof("sum");
  check_defined("sum", a, "input");
  check_float("sum", a, "input");
  int64_t d = wrap_dim("sum", dim, a.dim());
  Tensor out = reduce_sum_dim(a, d, keepdim);
  Shape in_shape = a.shape();
  record("sum_dim", out, {a}, [in_shape, d, keepdim](const Tensor& g, const std::vector<bool>&) {
    Tensor gg = keepdim ? g : g.unsqueeze(d);
    return std::vector<Tensor>{expand_dense(gg, in_shape)};
  });
  return out;
}

Tensor mean(const Tensor& a) {
  profiler::OpScope prof("mean");
  return mul_scalar(sum(a), 1.0 / double(std::max<int64_t>(a.numel(), 1)));
}

Tensor mean(const Tensor& a, int64_t dim, bool keepdim) {
  profiler::OpScope prof("mean");
  int64_t d = wrap_dim("mean", dim, a.dim());
  return mul_scalar(sum(a, d, keepdim), 1.0 / double(std::max<int64_t>(a.shape()[d], 1)));
}

Tensor amax(const Tensor& a, int64_t dim, bool keepdim) {
  profiler::OpScope prof("amax");
  check_float("amax", a, "input");
  int64_t d = wrap_dim("amax", dim, a.dim());
  FTUNE_CHECK(a.shape()[d] > 0, "[amax] empty dim ", d, " of ", a.desc());
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= a.shape()[i];
  for (int64_t i = d + 1; i < a.dim(); ++i) inner *= a.shape()[i];
  Shape os = a.shape();
  os[d] = 1;
  Tensor out = Tensor::empty(os, a.dtype(), a.device());
  FTUNE_KERNEL(a.device(), amax_dim)(contig(a), outer, a.shape()[d], inner, out, nullptr);
  if (!keepdim) {
    os.erase(os.begin() + d);
    out = out.view(os);
  }
  return out;
}

Tensor argmax(const Tensor& a, int64_t dim) {
  profiler::OpScope prof("argmax");
  check_float("argmax", a, "input");
  int64_t d = wrap_dim("argmax", dim, a.dim());
  FTUNE_CHECK(a.shape()[d] > 0, "[argmax] empty dim ", d, " of ", a.desc());
  int64_t outer = 1, inner = 1;
  for (int64_t i = 0; i < d; ++i) outer *= a.shape()[i];
  for (int64_t i = d + 1; i < a.dim(); ++i) inner *= a.shape()[i];
  Shape os = a.shape();
  os[d] = 1;
  Tensor out = Tensor::empty(os, a.dtype(), a.device());
  Tensor idx = Tensor::empty(os, DType::i64, a.device());
  FTUNE_KERNEL(a.device(), amax_dim)(contig(a), outer, a.shape()[d], inner, out, &idx);
  os.erase(os.begin() + d);
  return idx.view(os);
}

Tensor sum_to(const Tensor& a, const Shape& shape) {
  profiler::OpScope prof("sum_to");
  if (a.shape() == shape) return a;
  FTUNE_CHECK(a.dim() >= int64_t(shape.size()), "[sum_to] cannot reduce ", a.desc(), " to ", shape_str(shape));
  Tensor r = a;
  int64_t lead = a.dim() - int64_t(shape.size());
  for (int64_t i = 0; i < lead; ++i) r = sum(r, 0, false);
  for (int64_t i = 0; i < int64_t(shape.size()); ++i) {
    if (shape[i] == 1 && r.shape()[i] != 1) r = sum(r, i, true);
  }
  FTUNE_CHECK(r.shape() == shape, "[sum_to] cannot reduce ", a.desc(), " to ", shape_str(shape));
  return r;
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  FTUNE_CHECK(a.shape() == b.shape(), "[max_abs_diff] shapes ", a.desc(), " vs ", b.desc());
  auto va = a.to_vector<double>();
  auto vb = b.to_vector<double>();
  double m = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    double d = std::fabs(va[i] - vb[i]);
    if (std::isnan(d)) return INFINITY;
    m = std::max(m, d);
  }
  return m;
}

}  // namespace ftune::ops
