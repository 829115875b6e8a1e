// A small Llama-style decoder built from core/ops.h for the step profiler's tests (tests/core on
// the CPU, tests/cuda on a GPU): one training step whose op calls are known by construction.
#pragma once
#include <algorithm>
#include <functional>
#include <map>
#include <string>
#include <unordered_set>
#include <vector>

#include "core/autograd.h"
#include "core/ops.h"
#include "core/optim.h"
#include "core/profiler.h"
#include "core/rng.h"

namespace ftune::test {

struct ToyConfig {
  int64_t layers = 2, d = 16, heads = 2, kv_heads = 1, ffn = 32, vocab = 40, batch = 2, seq = 8;
  int64_t head_dim() const { return d / heads; }
};

struct ToyModel {
  ToyConfig c;
  Tensor embed, final_norm, lm_head;
  struct Layer {
    Tensor attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down;
  };
  std::vector<Layer> layers;
  std::vector<Tensor> params;
  Tensor ids, targets, positions;

  ToyModel(const ToyConfig& cfg, uint64_t seed, Device dev, DType dt = DType::f32) : c(cfg) {
    Generator g(seed);
    auto p = [&](Shape s, bool ones = false) {
      Tensor t = ones ? Tensor::ones(s) : randn(s, g, 0.0, 0.1);
      t = t.to(dt).to(dev);
      t.set_requires_grad(true);
      params.push_back(t);
      return t;
    };
    const int64_t kv = c.kv_heads * c.head_dim();
    embed = p({c.vocab, c.d});
    for (int64_t l = 0; l < c.layers; ++l) {
      Layer L;
      L.attn_norm = p({c.d}, true);
      L.wq = p({c.d, c.d});
      L.wk = p({kv, c.d});
      L.wv = p({kv, c.d});
      L.wo = p({c.d, c.d});
      L.mlp_norm = p({c.d}, true);
      L.w_gate = p({c.ffn, c.d});
      L.w_up = p({c.ffn, c.d});
      L.w_down = p({c.d, c.ffn});
      layers.push_back(L);
    }
    final_norm = p({c.d}, true);
    lm_head = p({c.vocab, c.d});
    ids = randint({c.batch, c.seq}, g, 0, c.vocab, DType::i64).to(dev);
    targets = randint({c.batch * c.seq}, g, 0, c.vocab, DType::i64).to(dev);
    positions = Tensor::arange(c.seq, DType::i64).to(dev);
  }

  Tensor forward() const {
    const int64_t B = c.batch, T = c.seq, H = c.heads, Hkv = c.kv_heads, hd = c.head_dim();
    Tensor x = ops::embedding(embed, ids);
    for (const Layer& L : layers) {
      Tensor h = ops::rms_norm(x, L.attn_norm, 1e-5);
      Tensor q = ops::linear(h, L.wq).view({B, T, H, hd});
      Tensor k = ops::linear(h, L.wk).view({B, T, Hkv, hd});
      Tensor v = ops::linear(h, L.wv).view({B, T, Hkv, hd});
      q = ops::rope(q, positions, 10000.0);
      k = ops::rope(k, positions, 10000.0);
      Tensor a = ops::attention(q, k, v).reshape({B, T, c.d});
      x = ops::add(x, ops::linear(a, L.wo));
      h = ops::rms_norm(x, L.mlp_norm, 1e-5);
      Tensor s = ops::swiglu(ops::linear(h, L.w_gate), ops::linear(h, L.w_up));
      x = ops::add(x, ops::linear(s, L.w_down));
    }
    x = ops::rms_norm(x, final_norm, 1e-5);
    Tensor logits = ops::linear(x, lm_head);
    return ops::cross_entropy(logits.view({B * T, c.vocab}), targets);
  }

  // The forward op calls of one step by label, from the structure above.
  std::map<std::string, int64_t> expected_forward_calls() const {
    const int64_t L = c.layers, kv = c.kv_heads * c.head_dim();
    auto lin = [](int64_t o, int64_t i) {
      return "linear [" + std::to_string(o) + "," + std::to_string(i) + "]";
    };
    std::map<std::string, int64_t> m;
    m["embedding"] = 1;
    m["rms_norm"] = 2 * L + 1;
    m[lin(c.d, c.d)] += 2 * L;  // q, o
    m[lin(kv, c.d)] += 2 * L;   // k, v
    m[lin(c.ffn, c.d)] += 2 * L;
    m[lin(c.d, c.ffn)] += L;
    m[lin(c.vocab, c.d)] += 1;
    m["rope"] = 2 * L;
    m["attention"] = L;
    m["add"] = 2 * L;
    m["swiglu"] = L;
    m["cross_entropy"] = 1;
    return m;
  }
};

// The autograd graph below root, counted without running it: nodes by name, and how many times
// the engine sums gradients ("autograd accumulate": once per extra consumer of a node or leaf,
// once per leaf that receives a gradient). Some backwards add their share into the sum so far
// (accumulation_target): linear's and the norms' input, slice's (the q | k | v split), and
// embedding's weight (a tied embedding after the LM head: a leaf's sum, or a node's when the
// weight reaches both through an op). The
// consumers of a node are taken newest first, the order the engine runs them in: the first forms
// the sum, each later one costs an engine sum unless it adds into it. accumulation_target's
// refusals (a shared sum, one producer as two inputs, a checkpointed block's inner graph) are not
// modelled: the graphs these tests build have none.
struct GraphCount {
  std::map<std::string, int64_t> nodes;
  int64_t accumulations = 0;
};
inline bool adds_into_the_sum(const std::string& name, size_t input) {
  return input == 0 && (name == "linear" || name == "rms_norm" || name == "layer_norm" ||
                        name == "slice" || name == "embedding");
}
// The same for a leaf's sum: embedding's weight (a tied embedding after the LM head).
inline bool adds_into_the_leaf_sum(const std::string& name, size_t input) {
  return input == 0 && name == "embedding";
}
inline GraphCount count_graph(const Tensor& root) {
  GraphCount gc;
  // Per producer: its consumers' (creation order, whether that consumer adds into the sum).
  std::map<const Node*, std::vector<std::pair<uint64_t, bool>>> consumers;
  std::map<const TensorImpl*, std::vector<std::pair<uint64_t, bool>>> leaf_consumers;
  std::vector<const Node*> stack{root.grad_fn().get()};
  std::unordered_set<const Node*> seen{root.grad_fn().get()};
  while (!stack.empty()) {
    const Node* n = stack.back();
    stack.pop_back();
    ++gc.nodes[n->name];
    for (size_t i = 0; i < n->edges.size(); ++i) {
      const auto& e = n->edges[i];
      if (e.node) {
        consumers[e.node.get()].emplace_back(n->seq, adds_into_the_sum(n->name, i));
        if (seen.insert(e.node.get()).second) stack.push_back(e.node.get());
      } else if (e.leaf) {
        leaf_consumers[e.leaf.get()].emplace_back(n->seq, adds_into_the_leaf_sum(n->name, i));
      }
    }
  }
  for (auto& [n, cs] : consumers) {
    std::sort(cs.begin(), cs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    for (size_t i = 1; i < cs.size(); ++i) gc.accumulations += cs[i].second ? 0 : 1;
  }
  for (auto& [l, cs] : leaf_consumers) {  // the final store, and the sums of later consumers
    std::sort(cs.begin(), cs.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    gc.accumulations += 1;
    for (size_t i = 1; i < cs.size(); ++i) gc.accumulations += cs[i].second ? 0 : 1;
  }
  return gc;
}

// The engine's gradient sums ("autograd accumulate" calls, leaves' stores included) in the
// backward of the scalar forward() returns, counted by the profiler on the CPU.
inline double backward_sums(const std::function<Tensor()>& forward) {
  profiler::reset();
  profiler::begin_step(Device::cpu());
  profiler::phase("forward");
  Tensor l = forward();
  profiler::phase("backward");
  l.backward();
  profiler::end_step();
  double n = 0;
  for (const auto& row : profiler::report().rows)
    if (row.phase == "backward" && row.label == "autograd accumulate") n = row.calls;
  profiler::reset();
  return n;
}

// One step (forward, backward, AdamW) with the profiler's phases; returns the loss tensor.
inline Tensor profiled_step(const ToyModel& m, optim::AdamW& opt, Device dev, bool hooks,
                            GraphCount* graph = nullptr) {
  profiler::begin_step(dev, hooks);
  profiler::phase("forward");
  Tensor loss = m.forward();
  if (graph) *graph = count_graph(loss);
  profiler::phase("backward");
  loss.backward();
  profiler::phase("optimizer");
  opt.step();
  opt.zero_grad();
  profiler::end_step();
  return loss;
}

// AdamW over a ToyModel's parameters (lr 1e-2), for the profiler tests' optimizer phase.
inline optim::AdamW make_opt(const ToyModel& m) {
  optim::ParamGroup g;
  for (size_t i = 0; i < m.params.size(); ++i)
    g.params.emplace_back("p" + std::to_string(i), m.params[i]);
  optim::AdamWOptions o;
  o.lr = 1e-2;
  return optim::AdamW({g}, o);
}

// The report's row for (phase, label), or nullptr.
inline const profiler::Row* find_row(const profiler::Report& r, const std::string& phase,
                                     const std::string& label) {
  for (const auto& row : r.rows)
    if (row.phase == phase && row.label == label) return &row;
  return nullptr;
}

}  // namespace ftune::test
