// nn::Embedding, nn::LayerNorm, nn::RMSNorm: parameters, init, and forward through their ops
// (checked against the op and against the defining property of its output).
#include <gtest/gtest.h>

#include <cmath>

#include "core/nn.h"

using namespace ftune;
using namespace ftune::nn;

namespace {

std::vector<std::string> names_of(const Module& m) {
  std::vector<std::string> out;
  for (const auto& [n, t] : m.named_parameters()) out.push_back(n);
  return out;
}

double sample_std(const std::vector<double>& v) {
  double mean = 0, var = 0;
  for (double x : v) mean += x / double(v.size());
  for (double x : v) var += (x - mean) * (x - mean) / double(v.size());
  return std::sqrt(var);
}

}  // namespace

TEST(Embedding, InitAndForwardGathersRows) {
  Generator gen(1);
  Embedding e(1000, 64, gen);
  EXPECT_EQ(names_of(e), (std::vector<std::string>{"weight"}));
  EXPECT_TRUE(e.weight().requires_grad());
  EXPECT_NEAR(sample_std(e.weight().to_vector<double>()), 1.0, 0.02);  // torch's N(0, 1)
  Embedding small(1000, 64, gen, 0.02);
  EXPECT_NEAR(sample_std(small.weight().to_vector<double>()), 0.02, 0.0004);  // HF's range

  Tensor ids = Tensor::from_vector(std::vector<int64_t>{3, 999, 0, 3, 41, 7}, {2, 3});
  Tensor y = e.forward(ids);
  ASSERT_EQ(y.shape(), (Shape{2, 3, 64}));
  EXPECT_EQ(ops::max_abs_diff(y, ops::embedding(e.weight(), ids)), 0.0);
  auto w = e.weight().to_vector<double>();
  auto yv = y.to_vector<double>();
  const std::vector<int64_t> rows = {3, 999, 0, 3, 41, 7};
  for (size_t t = 0; t < rows.size(); ++t)
    for (int64_t d = 0; d < 64; ++d)
      ASSERT_EQ(yv[t * 64 + d], w[rows[t] * 64 + d]) << t << " " << d;
  ops::sum(y).backward();
  EXPECT_EQ(e.weight().grad().to_vector<double>()[3 * 64], 2.0);  // row 3 used twice
}

TEST(LayerNorm, InitAndForward) {
  LayerNorm ln(32);
  EXPECT_EQ(names_of(ln), (std::vector<std::string>{"weight", "bias"}));
  EXPECT_EQ(ln.weight().to_vector<double>(), std::vector<double>(32, 1.0));
  EXPECT_EQ(ln.bias().to_vector<double>(), std::vector<double>(32, 0.0));
  EXPECT_EQ(ln.eps(), 1e-5);
  EXPECT_EQ(names_of(LayerNorm(32, 1e-5, false)), (std::vector<std::string>{"weight"}));

  Generator gen(2);
  Tensor x = randn({3, 5, 32}, gen, 2.0, 3.0);
  Tensor y = ln.forward(x);
  EXPECT_EQ(ops::max_abs_diff(y, ops::layer_norm(x, ln.weight(), ln.bias(), 1e-5)), 0.0);
  auto v = y.to_vector<double>();
  for (int r = 0; r < 15; ++r) {  // weight 1, bias 0: each row has mean 0 and variance ~1
    double mean = 0, var = 0;
    for (int d = 0; d < 32; ++d) mean += v[r * 32 + d] / 32;
    for (int d = 0; d < 32; ++d) var += (v[r * 32 + d] - mean) * (v[r * 32 + d] - mean) / 32;
    EXPECT_NEAR(mean, 0.0, 1e-5);
    EXPECT_NEAR(var, 1.0, 1e-3);  // eps 1e-5 against a row variance of ~9
  }
}

TEST(RMSNorm, InitAndForward) {
  RMSNorm n(16);
  EXPECT_EQ(names_of(n), (std::vector<std::string>{"weight"}));
  EXPECT_EQ(n.weight().to_vector<double>(), std::vector<double>(16, 1.0));
  EXPECT_EQ(n.eps(), 1e-6);
  Generator gen(3);
  Tensor x = randn({4, 16}, gen, 0.0, 5.0);
  Tensor y = n.forward(x);
  EXPECT_EQ(ops::max_abs_diff(y, ops::rms_norm(x, n.weight(), 1e-6)), 0.0);
  auto v = y.to_vector<double>();
  for (int r = 0; r < 4; ++r) {  // weight 1: each row has root-mean-square 1
    double ms = 0;
    for (int d = 0; d < 16; ++d) ms += v[r * 16 + d] * v[r * 16 + d] / 16;
    EXPECT_NEAR(std::sqrt(ms), 1.0, 1e-5);
  }
  ops::sum(y).backward();
  EXPECT_TRUE(n.weight().grad().defined());
}
