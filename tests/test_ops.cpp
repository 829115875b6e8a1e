// Drives modes (a) and (b) of the op-test table for every registered case.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "tests/op_table.h"

namespace ftune::test {
namespace {

// |x - ref| <= atol + rtol*|ref| elementwise; reports the worst element.
::testing::AssertionResult close(const Tensor& got, const Tensor& ref, double atol, double rtol) {
  if (got.shape() != ref.shape())
    return ::testing::AssertionFailure() << "shape " << shape_str(got.shape()) << " vs reference "
                                         << shape_str(ref.shape());
  auto g = got.to_vector<double>();
  auto r = ref.to_vector<double>();
  double worst = 0;
  size_t wi = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    double err = std::fabs(g[i] - r[i]) - (atol + rtol * std::fabs(r[i]));
    if (std::isnan(g[i]) != std::isnan(r[i])) err = INFINITY;
    if (err > worst || (i == 0 && err > 0)) {
      worst = err;
      wi = i;
    }
  }
  if (worst > 0)
    return ::testing::AssertionFailure() << "element " << wi << ": got " << g[wi] << ", reference " << r[wi]
                                         << " (atol " << atol << ", rtol " << rtol << ")";
  return ::testing::AssertionSuccess();
}

void check_reference(const OpCase& c, DType dt) {
  ASSERT_TRUE(c.reference) << "no reference";
  auto xs = make_inputs(c, dt, 1234, false);
  auto x64 = make_inputs(c, DType::f64, 1234, false);
  Tensor got = c.run(xs);
  Tensor ref = c.reference(x64);
  ASSERT_EQ(got.dtype(), dt);
  if (dt == DType::f32)
    EXPECT_TRUE(close(got, ref, c.atol, c.rtol));
  else
    EXPECT_TRUE(close(got, ref, c.atol64, c.rtol64));
}

// Central differences in f64 on loss = sum(out * w), w random.
void check_gradients(const OpCase& c) {
  auto xs = make_inputs(c, DType::f64, 99, true);
  Tensor out = c.run(xs);
  ASSERT_TRUE(out.requires_grad()) << "output does not require grad";
  Generator g(7);
  Tensor w = randn(out.shape(), g, 0.0, 1.0, DType::f64);
  Tensor loss = ops::sum(ops::mul(out, w));
  loss.backward();
  auto eval = [&]() {
    NoGradGuard ng;
    return ops::sum(ops::mul(c.run(xs), w)).item();
  };
  int checked = 0;
  for (size_t i = 0; i < xs.size(); ++i) {
    if (!c.inputs[i].grad || !is_floating(xs[i].dtype())) continue;
    Tensor grad = xs[i].grad();
    ASSERT_TRUE(grad.defined()) << "no gradient for input " << c.inputs[i].name;
    auto ga = grad.to_vector<double>();
    double* p = xs[i].data<double>();
    int64_t n = xs[i].numel();
    int64_t probes = std::min<int64_t>(n, c.grad_elems);
    for (int64_t j = 0; j < probes; ++j) {
      int64_t e = probes == n ? j : (j * 7919) % n;  // spread over the tensor
      double orig = p[e];
      p[e] = orig + c.fd_eps;
      double fp = eval();
      p[e] = orig - c.fd_eps;
      double fm = eval();
      p[e] = orig;
      double num = (fp - fm) / (2 * c.fd_eps);
      EXPECT_LE(std::fabs(num - ga[e]), c.grad_atol + c.grad_rtol * std::fabs(num))
          << "input " << c.inputs[i].name << " element " << e << ": analytic " << ga[e] << ", numeric " << num;
      ++checked;
    }
  }
  EXPECT_GT(checked, 0) << "gradient check probed nothing";
}

// The f32 backward against the f64 backward of the same op on the same inputs: catches f32-only
// paths (fast exp, gemv, chunked loops) that the f64 gradient check never runs. The error of each
// element is taken relative to max(|g64|, 1e-3 * max|g64|), so near-zero entries of a large
// gradient are judged against its scale.
void check_f32_gradients(const OpCase& c) {
  auto x32 = make_inputs(c, DType::f32, 555, true);
  auto x64 = make_inputs(c, DType::f64, 555, true);
  Tensor o32 = c.run(x32), o64 = c.run(x64);
  Generator g(8);
  Tensor w = randn(o64.shape(), g, 0.0, 1.0, DType::f64);
  o32.backward(w.to(DType::f32));
  o64.backward(w);
  for (size_t i = 0; i < x32.size(); ++i) {
    if (!c.inputs[i].grad || !is_floating(x32[i].dtype())) continue;
    ASSERT_TRUE(x32[i].grad().defined()) << "no f32 gradient for " << c.inputs[i].name;
    auto a = x32[i].grad().to_vector<double>(), b = x64[i].grad().to_vector<double>();
    double mx = 0;
    for (double v : b) mx = std::max(mx, std::fabs(v));
    double worst = 0;
    size_t wi = 0;
    for (size_t j = 0; j < a.size(); ++j) {
      double e = std::fabs(a[j] - b[j]) / std::max({std::fabs(b[j]), 1e-3 * mx, 1e-30});
      if (std::isnan(a[j]) != std::isnan(b[j])) e = INFINITY;
      if (e > worst) worst = e, wi = j;
    }
    EXPECT_LE(worst, c.grad_rtol32) << "input " << c.inputs[i].name << " element " << wi << ": f32 "
                                    << a[wi] << ", f64 " << b[wi];
  }
}

class OpTest : public ::testing::Test {
 public:
  OpTest(const OpCase* c, int mode) : c_(c), mode_(mode) {}
  void TestBody() override {
    if (mode_ == 0) check_reference(*c_, DType::f32);
    if (mode_ == 1) check_reference(*c_, DType::f64);
    if (mode_ == 2) check_gradients(*c_);
    if (mode_ == 3) check_f32_gradients(*c_);
  }

 private:
  const OpCase* c_;
  int mode_;
};

}  // namespace

void register_op_tests() {
  for (const OpCase& c : op_table()) {
    if (c.bench) continue;
    const std::string name = test_id(c);
    const OpCase* cp = &c;
    if (c.reference) {
      ::testing::RegisterTest("OpReference", (name + "_f32").c_str(), nullptr, nullptr, __FILE__, __LINE__,
                              [cp]() -> ::testing::Test* { return new OpTest(cp, 0); });
      ::testing::RegisterTest("OpReference", (name + "_f64").c_str(), nullptr, nullptr, __FILE__, __LINE__,
                              [cp]() -> ::testing::Test* { return new OpTest(cp, 1); });
    }
    if (c.gradcheck) {
      ::testing::RegisterTest("OpGradcheck", name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                              [cp]() -> ::testing::Test* { return new OpTest(cp, 2); });
      ::testing::RegisterTest("OpGradF32", name.c_str(), nullptr, nullptr, __FILE__, __LINE__,
                              [cp]() -> ::testing::Test* { return new OpTest(cp, 3); });
    }
  }
}

}  // namespace ftune::test

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  ftune::test::register_op_tests();
  return RUN_ALL_TESTS();
}
