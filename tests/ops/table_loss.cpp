// Op-table cases for softmax, log_softmax, cross_entropy, token_logprobs, entropy and kl_div. The
// references build each row's softmax explicitly in f64 and apply the textbook formulas. Logits
// are N(0, 3^2) so the distributions are far from uniform; the "chunks" cases have V = 5000, two
// chunks of the kernels' 4096, with row maxima placed in either chunk.
#include <algorithm>
#include <cmath>

#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;
constexpr int64_t kIgnore = -100;

// Rows of a logits tensor as f64, and its explicit softmax (at a temperature).
struct Mat {
  int64_t n = 0, v = 0;
  std::vector<double> a;
  const double* row(int64_t i) const { return a.data() + i * v; }
};

Mat mat(const Tensor& x) {
  Mat m;
  m.v = x.size(-1);
  m.n = x.numel() / m.v;
  m.a = x.to_vector<double>();
  return m;
}

std::vector<double> softmax_row(const double* x, int64_t v, double temp = 1.0) {
  double mx = *std::max_element(x, x + v);
  std::vector<double> p(static_cast<size_t>(v));
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += (p[j] = std::exp((x[j] - mx) / temp));
  for (auto& e : p) e /= s;
  return p;
}

Shape lead_of(const Tensor& x) { return Shape(x.shape().begin(), x.shape().end() - 1); }

Tensor per_row(const Tensor& x, const std::vector<double>& vals) {
  return Tensor::from_vector(vals, lead_of(x));
}

std::vector<int64_t> targets_of(const Tensor& t) { return t.to_vector<int64_t>(); }

InputSpec logits_spec(const std::string& name, Shape shape) {
  InputSpec s{name, std::move(shape)};
  s.scale = 3.0;
  return s;
}

InputSpec targets_spec(std::vector<int64_t> t, Shape shape, bool i32 = false) {
  InputSpec s{"targets", shape, Fill::fixed};
  s.grad = false;
  s.make = [t, shape, i32]() {
    if (!i32) return Tensor::from_vector(t, shape);
    return Tensor::from_vector(std::vector<int32_t>(t.begin(), t.end()), shape);
  };
  return s;
}

// [n, v] logits N(0, 3^2) whose row i has its maximum, by 2, at column peak[i] (two-chunk cases).
InputSpec peaked_logits(const std::string& name, int64_t n, int64_t v, std::vector<int64_t> peak,
                        uint64_t seed) {
  InputSpec s{name, {n, v}, Fill::fixed};
  s.make = [n, v, peak, seed]() {
    Generator g(seed);
    Tensor x = randn({n, v}, g, 0.0, 3.0, DType::f64);
    double* p = x.data<double>();
    for (int64_t i = 0; i < n && i < int64_t(peak.size()); ++i)
      p[i * v + peak[i]] = *std::max_element(p + i * v, p + (i + 1) * v) + 2.0;
    return x;
  };
  return s;
}

// -log p(target) per row; ignored rows are absent from `counted`.
std::vector<double> ref_nll(const Mat& x, const std::vector<int64_t>& t, int64_t ignore,
                            int64_t* counted) {
  std::vector<double> out(size_t(x.n), 0.0);
  *counted = 0;
  for (int64_t i = 0; i < x.n; ++i) {
    if (t[i] == ignore) continue;
    auto p = softmax_row(x.row(i), x.v);
    out[i] = -std::log(p[t[i]]);
    ++*counted;
  }
  return out;
}

Tensor ref_cross_entropy(const V& in, int64_t ignore, ops::Reduction red) {
  Mat x = mat(in[0]);
  int64_t counted = 0;
  auto nll = ref_nll(x, targets_of(in[1]), ignore, &counted);
  if (red == ops::Reduction::none) return per_row(in[0], nll);
  double s = 0;
  for (double e : nll) s += e;
  if (red == ops::Reduction::mean) s = counted ? s / double(counted) : 0.0;
  return Tensor::from_vector(std::vector<double>{s}, {});
}

// KL(a || b) = sum a log(a / b) with 0 log 0 = 0.
double kl(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t j = 0; j < a.size(); ++j)
    if (a[j] > 0) s += a[j] * std::log(a[j] / b[j]);
  return s;
}

Tensor ref_kl_div(const V& in, ops::KLKind kind, double beta, double temp) {
  Mat s = mat(in[0]), t = mat(in[1]);
  std::vector<double> out(static_cast<size_t>(s.n));
  for (int64_t i = 0; i < s.n; ++i) {
    auto q = softmax_row(s.row(i), s.v, temp);                                 // student
    auto p = softmax_row(t.row(i), t.v, temp);                                 // teacher
    if (kind == ops::KLKind::jsd && beta == 0.0) kind = ops::KLKind::forward;  // TRL endpoints
    if (kind == ops::KLKind::jsd && beta == 1.0) kind = ops::KLKind::reverse;
    if (kind == ops::KLKind::forward) {
      out[i] = kl(p, q);
    } else if (kind == ops::KLKind::reverse) {
      out[i] = kl(q, p);
    } else {
      std::vector<double> m(p.size());
      for (size_t j = 0; j < m.size(); ++j) m[j] = beta * p[j] + (1 - beta) * q[j];
      out[i] = beta * kl(p, m) + (1 - beta) * kl(q, m);
    }
  }
  return per_row(in[0], out);
}

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;

  // ---- softmax, log_softmax
  for (bool log : {false, true}) {
    OpCase c;
    c.op = log ? "log_softmax" : "softmax";
    c.variant = "3d_2x3x17";
    c.inputs = {logits_spec("x", {2, 3, 17})};
    c.grad_elems = 1000;
    c.run = [log](const V& v) { return log ? ops::log_softmax(v[0]) : ops::softmax(v[0]); };
    c.reference = [log](const V& v) {
      Mat x = mat(v[0]);
      std::vector<double> out;
      for (int64_t i = 0; i < x.n; ++i)
        for (double p : softmax_row(x.row(i), x.v)) out.push_back(log ? std::log(p) : p);
      return Tensor::from_vector(out, v[0].shape());
    };
    cs.push_back(c);
    c.variant = "chunks_2x5000";
    c.inputs = {peaked_logits("x", 2, 5000, {4500, 7}, 11)};
    c.grad_elems = 40;
    // sum(w * log_softmax) adds 10^4 terms of size ~20: its f64 rounding (~1e-11) over 2 fd_eps
    // swamps a 1e-6 step, so step 1e-4 (truncation ~1e-8 here).
    if (log) c.fd_eps = 1e-4;
    cs.push_back(c);
  }

  // ---- cross_entropy
  auto ce = [&](const std::string& variant, InputSpec logits, InputSpec targets, int64_t ignore,
                ops::Reduction red) {
    OpCase c;
    c.op = "cross_entropy";
    c.variant = variant;
    c.inputs = {std::move(logits), std::move(targets)};
    c.grad_elems = 1000;
    c.run = [ignore, red](const V& v) { return ops::cross_entropy(v[0], v[1], ignore, red); };
    c.reference = [ignore, red](const V& v) { return ref_cross_entropy(v, ignore, red); };
    cs.push_back(c);
  };
  std::vector<int64_t> t6{3, kIgnore, 36, 0, kIgnore, 17};
  ce("mean_ignored_6x37", logits_spec("logits", {6, 37}), targets_spec(t6, {6}), kIgnore,
     ops::Reduction::mean);
  ce("sum_ignored_6x37", logits_spec("logits", {6, 37}), targets_spec(t6, {6}), kIgnore,
     ops::Reduction::sum);
  ce("none_ignored_6x37", logits_spec("logits", {6, 37}), targets_spec(t6, {6}), kIgnore,
     ops::Reduction::none);
  ce("mean_3d_i32_2x3x37", logits_spec("logits", {2, 3, 37}),
     targets_spec({5, 36, kIgnore, 0, 12, 30}, {2, 3}, true), kIgnore, ops::Reduction::mean);
  ce("none_3d_flat_targets_2x3x37", logits_spec("logits", {2, 3, 37}),
     targets_spec({5, 36, kIgnore, 0, 12, 30}, {6}), kIgnore, ops::Reduction::none);
  ce("mean_all_ignored_4x37", logits_spec("logits", {4, 37}),
     targets_spec({kIgnore, kIgnore, kIgnore, kIgnore}, {4}), kIgnore, ops::Reduction::mean);
  ce("sum_all_ignored_4x37", logits_spec("logits", {4, 37}),
     targets_spec({kIgnore, kIgnore, kIgnore, kIgnore}, {4}), kIgnore, ops::Reduction::sum);
  ce("ignore_index_2_mean_4x37", logits_spec("logits", {4, 37}), targets_spec({2, 5, 2, 0}, {4}), 2,
     ops::Reduction::mean);
  ce("chunks_mean_4x5000", peaked_logits("logits", 4, 5000, {4500, 3, 4095, 4096}, 21),
     targets_spec({4500, 4100, kIgnore, 17}, {4}), kIgnore, ops::Reduction::mean);
  cs.back().grad_elems = 40;
  ce("chunks_none_4x5000", peaked_logits("logits", 4, 5000, {4999, 0, 2000, 4096}, 22),
     targets_spec({4999, 4100, 7, kIgnore}, {4}), kIgnore, ops::Reduction::none);
  cs.back().grad_elems = 40;

  // ---- token_logprobs
  {
    OpCase c;
    c.op = "token_logprobs";
    c.variant = "ignored_5x29";
    c.inputs = {logits_spec("logits", {5, 29}), targets_spec({0, kIgnore, 28, 13, kIgnore}, {5})};
    c.grad_elems = 1000;
    c.run = [](const V& v) { return ops::token_logprobs(v[0], v[1]); };
    c.reference = [](const V& v) {
      Mat x = mat(v[0]);
      int64_t counted = 0;
      auto nll = ref_nll(x, targets_of(v[1]), kIgnore, &counted);
      for (auto& e : nll) e = -e;
      return per_row(v[0], nll);
    };
    cs.push_back(c);
    c.variant = "3d_i32_2x2x29";
    c.inputs = {logits_spec("logits", {2, 2, 29}), targets_spec({4, 9, kIgnore, 28}, {2, 2}, true)};
    cs.push_back(c);
  }

  // ---- entropy
  {
    OpCase c;
    c.op = "entropy";
    c.variant = "3d_2x3x23";
    c.inputs = {logits_spec("logits", {2, 3, 23})};
    c.grad_elems = 1000;
    c.run = [](const V& v) { return ops::entropy(v[0]); };
    c.reference = [](const V& v) {
      Mat x = mat(v[0]);
      std::vector<double> h(size_t(x.n), 0.0);
      for (int64_t i = 0; i < x.n; ++i)
        for (double p : softmax_row(x.row(i), x.v)) h[i] -= p * std::log(p);
      return per_row(v[0], h);
    };
    cs.push_back(c);
    c.variant = "chunks_3x5000";
    c.inputs = {peaked_logits("logits", 3, 5000, {4500, 100, 4096}, 31)};
    c.grad_elems = 40;
    cs.push_back(c);
  }

  // ---- kl_div: student is input 0, teacher input 1; both gradchecked.
  auto kd = [&](const std::string& name, ops::KLKind kind, double beta, double temp,
                std::vector<InputSpec> in) {
    OpCase c;
    c.op = "kl_div";
    c.variant = name;
    c.inputs = std::move(in);
    c.grad_elems = 200;
    c.run = [kind, beta, temp](const V& v) { return ops::kl_div(v[0], v[1], kind, beta, temp); };
    c.reference = [kind, beta, temp](const V& v) { return ref_kl_div(v, kind, beta, temp); };
    cs.push_back(c);
  };
  auto small = [] {
    return std::vector<InputSpec>{logits_spec("student", {4, 31}), logits_spec("teacher", {4, 31})};
  };
  kd("forward_t1", ops::KLKind::forward, 0.5, 1.0, small());
  kd("forward_t2", ops::KLKind::forward, 0.5, 2.0, small());
  kd("reverse_t1", ops::KLKind::reverse, 0.5, 1.0, small());
  kd("reverse_t2", ops::KLKind::reverse, 0.5, 2.0, small());
  kd("jsd_b0.5_t1", ops::KLKind::jsd, 0.5, 1.0, small());
  kd("jsd_b0.5_t2", ops::KLKind::jsd, 0.5, 2.0, small());
  kd("jsd_b0.1_t1", ops::KLKind::jsd, 0.1, 1.0, small());
  kd("jsd_b0.9_t2", ops::KLKind::jsd, 0.9, 2.0, small());
  kd("jsd_b0_is_forward_t2", ops::KLKind::jsd, 0.0, 2.0, small());
  kd("jsd_b1_is_reverse_t1", ops::KLKind::jsd, 1.0, 1.0, small());
  kd("forward_3d_t1", ops::KLKind::forward, 0.5, 1.0,
     {logits_spec("student", {2, 3, 19}), logits_spec("teacher", {2, 3, 19})});
  for (auto [name, kind] :
       {std::pair{"forward", ops::KLKind::forward}, std::pair{"reverse", ops::KLKind::reverse},
        std::pair{"jsd_b0.5", ops::KLKind::jsd}}) {
    kd(std::string(name) + "_chunks_t2_3x5000", kind, 0.5, 2.0,
       {peaked_logits("student", 3, 5000, {4500, 10, 4096}, 41),
        peaked_logits("teacher", 3, 5000, {20, 4999, 4096}, 42)});
    cs.back().grad_elems = 40;
  }

  // ---- timing cases (bench_ops)
  auto bench_ce = [&](int64_t n, int64_t v) {
    OpCase c;
    c.op = "cross_entropy";
    c.variant = "bench_" + std::to_string(n) + "x" + std::to_string(v);
    InputSpec t{"targets", {n}, Fill::index};
    t.grad = false;
    t.hi = double(v);
    c.inputs = {InputSpec{"logits", {n, v}}, t};
    c.run = [](const V& x) { return ops::cross_entropy(x[0], x[1]); };
    c.bench = true;
    cs.push_back(c);
  };
  bench_ce(2048, 32000);
  bench_ce(512, 128256);
  for (auto [name, kind] :
       {std::pair{"forward", ops::KLKind::forward}, std::pair{"jsd", ops::KLKind::jsd}}) {
    OpCase c;
    c.op = "kl_div";
    c.variant = std::string("bench_") + name + "_512x32000";
    c.inputs = {InputSpec{"student", {512, 32000}}, InputSpec{"teacher", {512, 32000}}};
    c.run = [kind](const V& x) { return ops::kl_div(x[0], x[1], kind, 0.5, 1.0); };
    c.bench = true;
    cs.push_back(c);
  }
  return cs;
}

OpTableEntry entry(cases());

}  // namespace
}  // namespace ftune::test
