// Op-table cases for elementwise ops, reductions, matmul and linear.
#include <cmath>

#include "tests/op_table.h"

namespace ftune::test {
namespace {

using V = std::vector<Tensor>;

// A naive f64 matmul for references: a [B, m, k] (or [m, k]) @ b [k, n] or [B, k, n].
Tensor naive_matmul(const Tensor& a, const Tensor& b) {
  auto va = a.to_vector<double>(), vb = b.to_vector<double>();
  int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  int64_t batch = a.numel() / (m * k);
  bool shared = b.dim() == 2;
  std::vector<double> out(size_t(batch * m * n), 0.0);
  for (int64_t t = 0; t < batch; ++t)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        double s = 0;
        for (int64_t p = 0; p < k; ++p) s += va[(t * m + i) * k + p] * vb[(shared ? 0 : t * k * n) + p * n + j];
        out[(t * m + i) * n + j] = s;
      }
  Shape os(a.shape().begin(), a.shape().end() - 1);
  os.push_back(n);
  return Tensor::from_vector(out, os);
}

// Elementwise reference through f64 scalars.
template <class F>
Tensor map2(const Tensor& a, const Tensor& b, F f) {
  Shape s = a.shape().size() >= b.shape().size() ? a.shape() : b.shape();
  Tensor ae = a.detach().expand(s).contiguous(), be = b.detach().expand(s).contiguous();
  auto va = ae.to_vector<double>(), vb = be.to_vector<double>();
  for (size_t i = 0; i < va.size(); ++i) va[i] = f(va[i], vb[i]);
  return Tensor::from_vector(va, s);
}

template <class F>
Tensor map1(const Tensor& a, F f) {
  auto va = a.to_vector<double>();
  for (auto& x : va) x = f(x);
  return Tensor::from_vector(va, a.shape());
}

OpCase unary_case(const std::string& name, std::function<Tensor(const Tensor&)> op, std::function<double(double)> ref,
                  Fill fill = Fill::normal, double lo = -1, double hi = 1) {
  OpCase c;
  c.op = name;
  c.variant = "4x33";
  InputSpec x{"x", {4, 33}, fill};
  x.lo = lo;
  x.hi = hi;
  c.inputs = {x};
  c.run = [op](const V& v) { return op(v[0]); };
  c.reference = [ref](const V& v) { return map1(v[0], ref); };
  return c;
}

std::vector<OpCase> cases() {
  std::vector<OpCase> cs;
  auto bin = [&](const std::string& name, std::function<Tensor(const Tensor&, const Tensor&)> op,
                 std::function<double(double, double)> ref, Shape sa, Shape sb, const std::string& variant,
                 bool positive_b = false) {
    OpCase c;
    c.op = name;
    c.variant = variant;
    InputSpec b{"b", sb, positive_b ? Fill::uniform : Fill::normal};
    b.lo = 0.5;
    b.hi = 2.0;
    c.inputs = {{"a", sa}, b};
    c.run = [op](const V& v) { return op(v[0], v[1]); };
    c.reference = [ref](const V& v) { return map2(v[0], v[1], ref); };
    cs.push_back(c);
  };
  bin("add", ops::add, [](double x, double y) { return x + y; }, {3, 5, 7}, {3, 5, 7}, "same");
  bin("add", ops::add, [](double x, double y) { return x + y; }, {3, 5, 7}, {7}, "broadcast_row");
  bin("add", ops::add, [](double x, double y) { return x + y; }, {3, 5, 7}, {3, 1, 7}, "broadcast_mid");
  bin("sub", ops::sub, [](double x, double y) { return x - y; }, {4, 6}, {4, 1}, "broadcast_col");
  bin("mul", ops::mul, [](double x, double y) { return x * y; }, {3, 5, 7}, {5, 7}, "broadcast");
  bin("div", ops::div, [](double x, double y) { return x / y; }, {4, 6}, {4, 6}, "same", true);

  cs.push_back(unary_case("neg", ops::neg, [](double x) { return -x; }));
  cs.push_back(unary_case("exp", ops::exp, [](double x) { return std::exp(x); }));
  cs.push_back(unary_case("log", ops::log, [](double x) { return std::log(x); }, Fill::uniform, 0.5, 3.0));
  cs.push_back(unary_case("sqrt", ops::sqrt, [](double x) { return std::sqrt(x); }, Fill::uniform, 0.5, 3.0));
  cs.push_back(unary_case("tanh", ops::tanh, [](double x) { return std::tanh(x); }));
  cs.push_back(unary_case("sigmoid", ops::sigmoid, [](double x) { return 1 / (1 + std::exp(-x)); }));
  cs.push_back(unary_case("relu", ops::relu, [](double x) { return x > 0 ? x : 0; }, Fill::uniform, 0.1, 1.0));
  cs.push_back(unary_case("square", ops::square, [](double x) { return x * x; }));
  cs.push_back(unary_case("mul_scalar", [](const Tensor& x) { return ops::mul_scalar(x, -2.5); },
                          [](double x) { return -2.5 * x; }));

  {
    OpCase c;
    c.op = "sum";
    c.variant = "dim1";
    c.inputs = {{"x", {3, 9, 5}}};
    c.run = [](const V& v) { return ops::sum(v[0], 1); };
    c.reference = [](const V& v) {
      auto x = v[0].to_vector<double>();
      std::vector<double> o(15, 0.0);
      for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 9; ++j)
          for (int k = 0; k < 5; ++k) o[i * 5 + k] += x[(i * 9 + j) * 5 + k];
      return Tensor::from_vector(o, {3, 5});
    };
    cs.push_back(c);
    c.variant = "all";
    c.run = [](const V& v) { return ops::sum(v[0]); };
    c.reference = [](const V& v) {
      double s = 0;
      for (double x : v[0].to_vector<double>()) s += x;
      return Tensor::from_vector(std::vector<double>{s}, {});
    };
    cs.push_back(c);
    c.op = "mean";
    c.variant = "last";
    c.run = [](const V& v) { return ops::mean(v[0], -1, true); };
    c.reference = [](const V& v) {
      auto x = v[0].to_vector<double>();
      std::vector<double> o(27, 0.0);
      for (int r = 0; r < 27; ++r)
        for (int k = 0; k < 5; ++k) o[r] += x[r * 5 + k] / 5.0;
      return Tensor::from_vector(o, {3, 9, 1});
    };
    cs.push_back(c);
  }
  {
    OpCase c;
    c.op = "matmul";
    c.variant = "2d";
    c.inputs = {{"a", {7, 5}}, {"b", {5, 6}}};
    c.run = [](const V& v) { return ops::matmul(v[0], v[1]); };
    c.reference = [](const V& v) { return naive_matmul(v[0], v[1]); };
    cs.push_back(c);
    c.variant = "batched";
    c.inputs = {{"a", {2, 3, 4, 5}}, {"b", {2, 3, 5, 6}}};
    c.reference = [](const V& v) { return naive_matmul(v[0].reshape({6, 4, 5}), v[1].reshape({6, 5, 6})).reshape({2, 3, 4, 6}); };
    cs.push_back(c);
    c.variant = "batched_shared_b";
    c.inputs = {{"a", {3, 4, 5}}, {"b", {5, 6}}};
    c.reference = [](const V& v) { return naive_matmul(v[0], v[1]); };
    cs.push_back(c);
    c.variant = "transposed_view";
    c.inputs = {{"a", {5, 7}}, {"b", {6, 5}}};
    c.run = [](const V& v) { return ops::matmul(v[0].transpose(0, 1), v[1].transpose(0, 1)); };
    c.reference = [](const V& v) {
      return naive_matmul(v[0].transpose(0, 1).contiguous(), v[1].transpose(0, 1).contiguous());
    };
    cs.push_back(c);
    c.variant = "single_row";  // m == 1 takes the gemv path
    c.inputs = {{"a", {1, 5}}, {"b", {5, 6}}};
    c.run = [](const V& v) { return ops::matmul(v[0], v[1]); };
    c.reference = [](const V& v) { return naive_matmul(v[0], v[1]); };
    cs.push_back(c);
    c.variant = "inner_dim_1";  // backward a^T g has one row: gemv with a strided x
    c.inputs = {{"a", {4, 1}}, {"b", {1, 3}}};
    cs.push_back(c);
    c.variant = "bench_512";
    c.inputs = {{"a", {512, 512}}, {"b", {512, 512}}};
    c.run = [](const V& v) { return ops::matmul(v[0], v[1]); };
    c.bench = true;
    c.flops = [] { return 2.0 * 512 * 512 * 512; };
    cs.push_back(c);
  }
  {
    OpCase c;
    c.op = "linear";
    c.variant = "bias";
    c.inputs = {{"x", {2, 3, 8}}, {"w", {5, 8}}, {"b", {5}}};
    c.run = [](const V& v) { return ops::linear(v[0], v[1], v[2]); };
    c.reference = [](const V& v) {
      return ops::add(naive_matmul(v[0], v[1].transpose(0, 1).contiguous()), v[2]);
    };
    cs.push_back(c);
    c.variant = "single_row";
    c.inputs = {{"x", {1, 8}}, {"w", {5, 8}}, {"b", {5}}};
    cs.push_back(c);
    c.variant = "nobias";
    c.inputs = {{"x", {6, 8}}, {"w", {5, 8}}};
    c.run = [](const V& v) { return ops::linear(v[0], v[1]); };
    c.reference = [](const V& v) { return naive_matmul(v[0], v[1].transpose(0, 1).contiguous()); };
    cs.push_back(c);
    c.variant = "bench_2048x1024x1024";
    c.inputs = {{"x", {2048, 1024}}, {"w", {1024, 1024}}, {"b", {1024}}};
    c.run = [](const V& v) { return ops::linear(v[0], v[1], v[2]); };
    c.bench = true;
    c.flops = [] { return 2.0 * 2048 * 1024 * 1024; };
    cs.push_back(c);
  }
  {
    OpCase c;
    c.op = "cat";
    c.variant = "dim1";
    c.inputs = {{"a", {2, 3, 4}}, {"b", {2, 5, 4}}};
    c.run = [](const V& v) { return ops::cat({v[0], v[1]}, 1); };
    c.reference = [](const V& v) {
      auto a = v[0].to_vector<double>(), b = v[1].to_vector<double>();
      std::vector<double> o;
      for (int i = 0; i < 2; ++i) {
        o.insert(o.end(), a.begin() + i * 12, a.begin() + (i + 1) * 12);
        o.insert(o.end(), b.begin() + i * 20, b.begin() + (i + 1) * 20);
      }
      return Tensor::from_vector(o, {2, 8, 4});
    };
    cs.push_back(c);
  }
  return cs;
}

OpTableEntry entry(cases());

}  // namespace
}  // namespace ftune::test
