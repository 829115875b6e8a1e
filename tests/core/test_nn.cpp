// nn::Module (naming, order, tying, freezing, train/eval) and nn::Linear.
#include <gtest/gtest.h>

#include <cmath>

#include "core/nn.h"

using namespace ftune;
using namespace ftune::nn;

namespace {

struct Block : Module {
  std::shared_ptr<Linear> q_proj, o_proj;
  explicit Block(Generator& gen) {
    q_proj = register_module("q_proj", std::make_shared<Linear>(4, 6, true, gen));
    o_proj = register_module("o_proj", std::make_shared<Linear>(6, 4, false, gen));
  }
  Tensor forward(const Tensor& x) const { return o_proj->forward(q_proj->forward(x)); }
};

struct Toy : Module {
  Tensor scale;
  std::shared_ptr<ModuleList> layers;
  std::shared_ptr<Linear> lm_head;
  Toy(Generator& gen, int n) {
    scale = Tensor::ones({4}).set_requires_grad(true);
    register_parameter("scale", &scale);
    layers = register_module("layers", std::make_shared<ModuleList>());
    for (int i = 0; i < n; ++i) layers->push_back(std::make_shared<Block>(gen));
    lm_head = register_module("lm_head", std::make_shared<Linear>(4, 3, false, gen));
  }
  Tensor forward(const Tensor& x) const {
    Tensor h = ops::mul(x, scale);
    for (size_t i = 0; i < layers->size(); ++i) h = layers->at<Block>(i)->forward(h);
    return lm_head->forward(h);
  }
};

std::vector<std::string> names_of(const NamedTensors& ps) {
  std::vector<std::string> out;
  for (const auto& [n, t] : ps) out.push_back(n);
  return out;
}

}  // namespace

TEST(Module, DottedNamesInRegistrationOrder) {
  Generator gen(0);
  Toy toy(gen, 2);
  const std::vector<std::string> want = {"scale",
                                         "layers.0.q_proj.weight",
                                         "layers.0.q_proj.bias",
                                         "layers.0.o_proj.weight",
                                         "layers.1.q_proj.weight",
                                         "layers.1.q_proj.bias",
                                         "layers.1.o_proj.weight",
                                         "lm_head.weight"};
  NamedTensors ps = toy.named_parameters();
  EXPECT_EQ(names_of(ps), want);
  std::vector<Tensor> flat = toy.parameters();
  ASSERT_EQ(flat.size(), ps.size());
  for (size_t i = 0; i < ps.size(); ++i) EXPECT_TRUE(flat[i].same(ps[i].second)) << want[i];
  // Handles share the module's tensors.
  EXPECT_TRUE(toy.parameter("layers.1.q_proj.bias").same(toy.layers->at<Block>(1)->q_proj->bias()));
  EXPECT_TRUE(toy.parameter("lm_head.weight").same(toy.lm_head->weight()));
  EXPECT_THROW(toy.parameter("layers.2.q_proj.bias"), Error);
  EXPECT_EQ(toy.num_parameters(), 4 + 2 * (24 + 6 + 24) + 12);

  std::vector<std::string> mods;
  for (auto& [n, m] : toy.named_modules()) mods.push_back(n);
  EXPECT_EQ(mods, (std::vector<std::string>{"", "layers", "layers.0", "layers.0.q_proj",
                                            "layers.0.o_proj", "layers.1", "layers.1.q_proj",
                                            "layers.1.o_proj", "lm_head"}));
  EXPECT_EQ(toy.named_children().size(), 2u);
  EXPECT_EQ(toy.layers->size(), 2u);
  EXPECT_EQ(toy.layers->at<Linear>(0), nullptr);  // a Block, not a Linear
}

TEST(Module, TiedWeightsAreListedOnce) {
  struct Tied : Module {
    std::shared_ptr<Linear> embed_tokens, lm_head;
    explicit Tied(Generator& gen) {
      embed_tokens = register_module("embed_tokens", std::make_shared<Linear>(4, 3, false, gen));
      lm_head = register_module("lm_head", std::make_shared<Linear>(4, 3, false, gen));
    }
  };
  Generator gen(0);
  Tied m(gen);
  EXPECT_EQ(names_of(m.named_parameters()),
            (std::vector<std::string>{"embed_tokens.weight", "lm_head.weight"}));
  m.lm_head->weight() = m.embed_tokens->weight();  // tie: the registry follows the member
  EXPECT_EQ(names_of(m.named_parameters()), (std::vector<std::string>{"embed_tokens.weight"}));
  EXPECT_EQ(m.num_parameters(), 12);
  // Both uses accumulate into the one tensor.
  Tensor x = randn({2, 4}, gen);
  ops::sum(ops::add(m.embed_tokens->forward(x), m.lm_head->forward(x))).backward();
  Tensor g = m.parameter("embed_tokens.weight").grad();
  ASSERT_TRUE(g.defined());
  Tensor once = ops::sum(x, 0).unsqueeze(0).expand({3, 4});
  EXPECT_LT(ops::max_abs_diff(g, ops::mul_scalar(once, 2.0)), 1e-6);
}

TEST(Module, FreezingStopsGradientsOfFrozenParameters) {
  Generator gen(1);
  Toy toy(gen, 2);
  toy.requires_grad_(false);
  toy.layers->at<Block>(1)->requires_grad_(true);
  EXPECT_EQ(toy.num_parameters(true), 24 + 6 + 24);
  Tensor x = randn({5, 4}, gen);
  ops::sum(toy.forward(x)).backward();
  for (const auto& [n, p] : toy.named_parameters()) {
    const bool trainable = n.rfind("layers.1.", 0) == 0;
    EXPECT_EQ(p.requires_grad(), trainable) << n;
    EXPECT_EQ(p.grad().defined(), trainable) << n;
  }
  toy.zero_grad();
  for (const auto& [n, p] : toy.named_parameters()) EXPECT_FALSE(p.grad().defined()) << n;
}

TEST(Module, TrainEvalIsRecursive) {
  Generator gen(2);
  Toy toy(gen, 2);
  EXPECT_TRUE(toy.is_training());
  toy.eval();
  for (auto& [n, m] : toy.named_modules()) EXPECT_FALSE(m->is_training()) << n;
  toy.layers->train();
  EXPECT_FALSE(toy.is_training());
  EXPECT_TRUE(toy.layers->at<Block>(0)->q_proj->is_training());
}

TEST(Module, BadRegistrationsThrow) {
  struct Bad : Module {
    Tensor a, b;
    explicit Bad(int which) {
      register_parameter("a", &a);
      if (which == 0) register_parameter("a", &b);
      if (which == 1) register_parameter("x.y", &b);
      if (which == 2) register_module("a", std::make_shared<Module>());
      if (which == 3) register_module("m", std::shared_ptr<Module>());
    }
  };
  for (int i = 0; i < 4; ++i) EXPECT_THROW(Bad{i}, Error) << i;
}

TEST(Linear, ForwardEqualsOpsLinear) {
  Generator gen(3);
  Linear l(7, 5, true, gen);
  Tensor x = randn({2, 3, 7}, gen);
  EXPECT_EQ(ops::max_abs_diff(l.forward(x), ops::linear(x, l.weight(), l.bias())), 0.0);
  Linear nb(7, 5, false, gen);
  EXPECT_FALSE(nb.bias().defined());
  EXPECT_EQ(names_of(nb.named_parameters()), (std::vector<std::string>{"weight"}));
  EXPECT_EQ(ops::max_abs_diff(nb.forward(x), ops::linear(x, nb.weight())), 0.0);
  ops::sum(l.forward(x)).backward();
  EXPECT_EQ(l.weight().grad().shape(), (Shape{5, 7}));
  EXPECT_EQ(l.bias().grad().shape(), (Shape{5}));
}

TEST(Linear, InitLikeTorch) {
  // kaiming_uniform(a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), variance bound^2 / 3; bias alike.
  Generator gen(4);
  const int64_t in = 256, out = 512;
  Linear l(in, out, true, gen);
  const double bound = 1.0 / 16.0;
  EXPECT_EQ(l.weight().shape(), (Shape{out, in}));
  EXPECT_TRUE(l.weight().requires_grad());
  auto w = l.weight().to_vector<double>();
  double mean = 0, var = 0, lo = 1, hi = -1;
  for (double v : w) {
    mean += v / double(w.size());
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  for (double v : w) var += (v - mean) * (v - mean) / double(w.size());
  EXPECT_GE(lo, -bound);
  EXPECT_LT(hi, bound);
  EXPECT_GT(hi - lo, 1.99 * bound);  // fills the range
  EXPECT_NEAR(mean, 0.0, 0.001);
  EXPECT_NEAR(var, bound * bound / 3, 0.02 * bound * bound / 3);
  for (double v : l.bias().to_vector<double>()) {
    EXPECT_GE(v, -bound);
    EXPECT_LT(v, bound);
  }
  // Seeded: same generator state, same weights; another seed, other weights.
  Generator g1(9), g2(9), g3(10);
  Linear a(8, 4, true, g1), b(8, 4, true, g2), c(8, 4, true, g3);
  EXPECT_EQ(ops::max_abs_diff(a.weight(), b.weight()), 0.0);
  EXPECT_EQ(ops::max_abs_diff(a.bias(), b.bias()), 0.0);
  EXPECT_GT(ops::max_abs_diff(a.weight(), c.weight()), 0.0);
  EXPECT_EQ(Linear(8, 4, false, g3, DType::bf16).weight().dtype(), DType::bf16);
}
