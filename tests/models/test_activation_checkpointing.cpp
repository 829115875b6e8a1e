// Activation checkpointing (Transformer::set_activation_checkpointing): the recomputed backward
// gives the same loss and the same gradients as the stored one, for full fine-tuning, for LoRA
// with dropout (the masks are seeded, so the recompute draws the same ones) and for packed
// sequences; and it keeps fewer tensors alive.
#include <gtest/gtest.h>

#include <set>

#include "core/autograd.h"
#include "core/ops.h"
#include "models/lora.h"
#include "tests/models/model_test_util.h"

namespace ftune::test {
namespace {

struct Grads {
  double loss = 0;
  std::vector<std::pair<std::string, std::vector<float>>> g;
};

Grads run(const std::string& family, bool ckpt, bool lora, bool packed) {
  auto m = Transformer::from_pretrained(fixture_dir(family));
  if (lora) {
    LoraOptions o;
    o.r = 4;
    o.dropout = 0.2;
    o.target_modules = {"all-linear"};
    o.seed = 3;
    apply_lora(*m, o);
    // lora_B starts at zero: give it values so the adapters change the output and every gradient.
    Generator g(5);
    for (auto& [n, t] : m->named_parameters())
      if (n.find("lora_B") != std::string::npos) t.copy_(randn(t.shape(), g, 0.0, 0.05));
    set_lora_dropout_seed(*m, 77);
  }
  m->train();
  m->set_activation_checkpointing(ckpt);
  Expected e = load_expected(family);
  ForwardOptions fo;
  Tensor ids = e.ids;
  if (packed) {  // two sequences of lengths 5 and T-5 in each row
    const int64_t B = ids.size(0), T = ids.size(1);
    std::vector<int32_t> cu;
    std::vector<int32_t> pos;
    for (int64_t b = 0; b < B; ++b) {
      cu.push_back(int32_t(b * T));
      cu.push_back(int32_t(b * T + 5));
      for (int64_t t = 0; t < T; ++t) pos.push_back(int32_t(t < 5 ? t : t - 5));
    }
    cu.push_back(int32_t(B * T));
    fo.cu_seqlens = Tensor::from_vector(cu, {int64_t(cu.size())});
    fo.positions = Tensor::from_vector(pos, {B, T});
  }
  Tensor loss = lm_loss(m->forward(ids, fo), ids);
  loss.backward();
  Grads out;
  out.loss = loss.item();
  for (auto& [n, t] : m->named_parameters()) {
    if (!t.requires_grad()) continue;
    EXPECT_TRUE(t.grad().defined()) << n << (ckpt ? " (checkpointed)" : "");
    if (t.grad().defined()) out.g.emplace_back(n, t.grad().to_vector<float>());
  }
  return out;
}

void expect_same(const Grads& a, const Grads& b) {
  EXPECT_EQ(a.loss, b.loss);
  ASSERT_EQ(a.g.size(), b.g.size());
  for (size_t i = 0; i < a.g.size(); ++i) {
    ASSERT_EQ(a.g[i].first, b.g[i].first);
    // The same kernels on the same inputs: the recompute is bitwise the stored forward.
    EXPECT_EQ(a.g[i].second, b.g[i].second) << a.g[i].first;
  }
}

TEST(ActivationCheckpointing, FullFineTuningGradientsAreUnchanged) {
  for (const char* f : {"llama", "gpt2"}) {
    SCOPED_TRACE(f);
    expect_same(run(f, false, false, false), run(f, true, false, false));
  }
}

TEST(ActivationCheckpointing, LoraWithDropoutGradientsAreUnchanged) {
  Grads a = run("llama", false, true, false), b = run("llama", true, true, false);
  EXPECT_GT(a.g.size(), 0u);
  expect_same(a, b);
}

TEST(ActivationCheckpointing, PackedSequencesGradientsAreUnchanged) {
  expect_same(run("qwen2", false, false, true), run("qwen2", true, false, true));
}

// Nodes of the recorded graph by name, and their total.
std::pair<int, int> count_nodes(const Tensor& root, const std::string& name) {
  std::vector<Node*> st{root.grad_fn().get()};
  std::set<Node*> seen{st[0]};
  int named = 0;
  while (!st.empty()) {
    Node* n = st.back();
    st.pop_back();
    named += n->name == name;
    for (auto& e : n->edges)
      if (e.node && seen.insert(e.node.get()).second) st.push_back(e.node.get());
  }
  return {named, int(seen.size())};
}

TEST(ActivationCheckpointing, EachBlockIsOneRecordedNode) {
  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  m->train();
  Expected e = load_expected("llama");
  auto [c0, n0] = count_nodes(m->forward(e.ids), "checkpoint");
  m->set_activation_checkpointing(true);
  auto [c1, n1] = count_nodes(m->forward(e.ids), "checkpoint");
  EXPECT_EQ(c0, 0);
  EXPECT_EQ(c1, m->config().num_hidden_layers);
  EXPECT_LT(n1, n0 / 2) << "the blocks' inner ops are not kept in the graph";
}

TEST(ActivationCheckpointing, OffInEvalAndUnderNoGrad) {
  auto m = Transformer::from_pretrained(fixture_dir("llama"));
  m->set_activation_checkpointing(true);
  EXPECT_TRUE(m->activation_checkpointing());
  Expected e = load_expected("llama");
  NoGradGuard ng;
  Tensor logits = m->forward(e.ids);
  EXPECT_FALSE(logits.requires_grad());
  EXPECT_LT(ops::max_abs_diff(logits, e.logits), 1e-4);
}

}  // namespace
}  // namespace ftune::test
