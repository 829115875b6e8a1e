#include "core/autograd.h"

#include <atomic>
#include <queue>
#include <unordered_map>
#include <unordered_set>

#include "core/ops.h"
#include "core/profiler.h"

namespace ftune {

namespace {
thread_local bool g_grad_enabled = true;
std::atomic<uint64_t> g_seq{0};
}  // namespace

bool grad_enabled() { return g_grad_enabled; }
void set_grad_enabled(bool on) { g_grad_enabled = on; }

bool needs_record(std::initializer_list<const Tensor*> inputs) {
  if (!g_grad_enabled) return false;
  for (const Tensor* t : inputs)
    if (t && t->defined() && t->requires_grad()) return true;
  return false;
}

bool needs_record(const std::vector<Tensor>& inputs) {
  if (!g_grad_enabled) return false;
  for (const Tensor& t : inputs)
    if (t.defined() && t.requires_grad()) return true;
  return false;
}

void record(const char* name, Tensor& out, const std::vector<Tensor>& inputs, BackwardFn fn) {
  if (!needs_record(inputs)) return;
  auto node = std::make_shared<Node>();
  node->name = name;
  node->seq = g_seq++;
  node->out_shape = out.shape();
  node->out_dtype = out.dtype();
  if (profiler::hooks_on()) node->prof_label = profiler::current_label();
  node->edges.resize(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Tensor& t = inputs[i];
    if (!t.defined() || !t.requires_grad()) continue;
    if (t.grad_fn())
      node->edges[i].node = t.grad_fn();
    else
      node->edges[i].leaf = t.impl_ptr();
  }
  node->backward = std::move(fn);
  auto note = [&](const Tensor& t) {
    if (t.defined()) node->versions.emplace_back(t.impl()->storage, t.impl()->storage->version);
  };
  for (const Tensor& t : inputs) note(t);
  note(out);
  out.impl()->grad_fn = std::move(node);
  out.impl()->requires_grad = true;
}

namespace {

// The node whose backward runs on this thread, with the engine's summed gradients, for
// accumulation_target; `handed` records what it gave out (per input, allocated on first use).
// Saved and restored around each backward: activation checkpointing runs a whole backward
// inside one.
struct BackwardCtx {
  const Node* node = nullptr;
  std::unordered_map<Node*, Tensor>* grads = nullptr;
  std::unordered_map<TensorImpl*, Tensor>* leaf_grads = nullptr;  // this pass's sums per leaf
  std::vector<const TensorImpl*> handed;
};
thread_local BackwardCtx* g_ctx = nullptr;

struct CtxScope {
  BackwardCtx* prev;
  explicit CtxScope(BackwardCtx* c) : prev(g_ctx) { g_ctx = c; }
  ~CtxScope() { g_ctx = prev; }
};

// A summed gradient nothing else references (no other handle, no view of its storage).
bool exclusive(const Tensor& t) {
  return t.defined() && t.impl_ptr().use_count() == 1 && t.impl()->storage.use_count() == 1 &&
         t.is_contiguous();
}

// Sum of two gradients, never in place: a backward may hand the same tensor to two inputs.
Tensor add_grads(const Tensor& a, const Tensor& b) {
  profiler::OpScope prof("autograd accumulate");
  return ops::add(a, b);
}

void check_grad(const char* what, const std::string& name, const Tensor& g, const Shape& shape,
                DType dtype) {
  FTUNE_CHECK(g.shape() == shape, "[autograd] backward of ", what, " '", name, "' produced grad ",
              shape_str(g.shape()), " for an input of shape ", shape_str(shape));
  FTUNE_CHECK(g.dtype() == dtype, "[autograd] backward of ", what, " '", name, "' produced a ",
              g.desc(), " grad for a ", dtype_name(dtype), " input");
}

void accumulate_leaf(TensorImpl* leaf, Tensor g) {
  profiler::OpScope prof("autograd accumulate");
  if (g.dtype() != leaf->dtype) g = g.to(leaf->dtype);
  if (!leaf->grad) {
    // Own the buffer: steal it when this is the only handle to it (the common case: a backward
    // made it fresh), else copy, since a backward may return one tensor for several inputs.
    bool exclusive = g.impl_ptr().use_count() == 1 && g.impl()->storage.use_count() == 1 &&
                     g.is_contiguous() && g.offset() == 0;
    leaf->grad = exclusive ? g.impl_ptr() : g.clone().impl_ptr();
    leaf->grad->grad_fn.reset();
    leaf->grad->requires_grad = false;
  } else {
    Tensor acc(leaf->grad);
    ops::add_(acc, g);
  }
}

// Moves the finished gradient of a leaf out of the pass's table into .grad and fires its hooks.
void finish_leaf(TensorImpl* leaf, std::unordered_map<TensorImpl*, Tensor>& leaf_grads) {
  auto it = leaf_grads.find(leaf);
  if (it == leaf_grads.end()) return;
  Tensor g = std::move(it->second);
  leaf_grads.erase(it);
  accumulate_leaf(leaf, std::move(g));
  // By index over the count at entry: a hook may register more hooks (a lazily built reducer).
  const size_t nh = leaf->ready_hooks.size();
  for (size_t i = 0; i < nh; ++i) {
    GradHook h = leaf->ready_hooks[i];
    h(Tensor(leaf->grad));
  }
}

}  // namespace

Tensor accumulation_target(size_t input) {
  BackwardCtx* c = g_ctx;
  if (!c || input >= c->node->edges.size()) return Tensor();
  const auto& edges = c->node->edges;
  Tensor* sum = nullptr;
  if (Node* p = edges[input].node.get()) {
    for (size_t j = 0; j < edges.size(); ++j)  // an input twice: both shares to sum
      if (j != input && edges[j].node.get() == p) return Tensor();
    auto it = c->grads->find(p);
    if (it != c->grads->end()) sum = &it->second;
  } else if (TensorImpl* leaf = edges[input].leaf.get(); leaf && c->leaf_grads) {
    for (size_t j = 0; j < edges.size(); ++j)
      if (j != input && edges[j].leaf.get() == leaf) return Tensor();
    auto it = c->leaf_grads->find(leaf);
    if (it != c->leaf_grads->end()) sum = &it->second;
  }
  if (!sum || !exclusive(*sum)) return Tensor();
  if (c->handed.empty()) c->handed.assign(edges.size(), nullptr);
  c->handed[input] = sum->impl();
  return *sum;
}

void run_backward(const Tensor& root, const Tensor& grad_in, bool retain_graph) {
  FTUNE_CHECK(root.defined(), "[autograd] backward() of an undefined tensor");
  FTUNE_CHECK(root.requires_grad(), "[autograd] backward() of a tensor that does not require grad");
  NoGradGuard no_grad;
  Tensor grad = grad_in;
  if (!grad.defined()) grad = Tensor::ones(root.shape(), root.dtype(), root.device());
  FTUNE_CHECK(grad.shape() == root.shape(), "[autograd] backward(): grad ", shape_str(grad.shape()),
              " does not match output ", shape_str(root.shape()));

  if (!root.grad_fn()) {  // a leaf: d root / d root
    accumulate_leaf(root.impl(), grad);
    const size_t nh = root.impl()->ready_hooks.size();
    for (size_t i = 0; i < nh; ++i) {
      GradHook h = root.impl()->ready_hooks[i];
      h(root.grad());
    }
    return;
  }

  // Pass 1: count consumers of each node and contributions to each leaf.
  std::unordered_map<Node*, int> deps;
  std::unordered_map<TensorImpl*, int> leaf_uses;
  std::vector<Node*> stack{root.grad_fn().get()};
  std::unordered_set<Node*> seen{root.grad_fn().get()};
  while (!stack.empty()) {
    Node* n = stack.back();
    stack.pop_back();
    FTUNE_CHECK(n->backward != nullptr, "[autograd] backward through '", n->name,
                "' a second time: its saved tensors were freed (pass retain_graph=true)");
    for (auto& e : n->edges) {
      if (e.node) {
        ++deps[e.node.get()];
        if (seen.insert(e.node.get()).second) stack.push_back(e.node.get());
      } else if (e.leaf) {
        ++leaf_uses[e.leaf.get()];
      }
    }
  }

  // Pass 2: newest node first among those whose gradient is complete.
  auto cmp = [](Node* a, Node* b) { return a->seq < b->seq; };
  std::priority_queue<Node*, std::vector<Node*>, decltype(cmp)> ready(cmp);
  std::unordered_map<Node*, Tensor> grads;
  std::unordered_map<TensorImpl*, Tensor> leaf_grads;
  grads[root.grad_fn().get()] = grad;
  ready.push(root.grad_fn().get());
  std::vector<std::shared_ptr<Node>> keep{root.grad_fn()};  // keep nodes alive while releasing

  while (!ready.empty()) {
    Node* n = ready.top();
    ready.pop();
    Tensor g = std::move(grads[n]);
    grads.erase(n);
    for (const auto& [weak, version] : n->versions) {
      auto st = weak.lock();
      FTUNE_CHECK(!st || st->version == version, "[autograd] a tensor used by '", n->name,
                  "' was modified in place after the op ran (version ", version, " -> ",
                  st ? st->version : version, "); its backward would be wrong. Clone the tensor "
                  "before writing to it, or write under NoGradGuard before using it.");
    }
    std::vector<bool> need(n->edges.size());
    for (size_t i = 0; i < n->edges.size(); ++i) need[i] = n->edges[i].active();
    // The sums an input's backward may add into (accumulation_target, worked out on request).
    BackwardCtx ctx;
    ctx.node = n;
    ctx.grads = &grads;
    ctx.leaf_grads = &leaf_grads;
    std::vector<Tensor> in_grads;
    {
      CtxScope cs(&ctx);
      profiler::BackwardScope prof(n->name, n->prof_label);
      in_grads = n->backward(g, need);
    }
    FTUNE_CHECK(in_grads.size() == n->edges.size(), "[autograd] backward of '", n->name, "' returned ",
                in_grads.size(), " grads for ", n->edges.size(), " inputs");
    for (size_t i = 0; i < n->edges.size(); ++i) {
      auto& e = n->edges[i];
      if (!e.active()) continue;
      Tensor gi = std::move(in_grads[i]);
      if (e.node) {
        if (gi.defined()) {
          check_grad("op", n->name, gi, e.node->out_shape, e.node->out_dtype);
          auto it = grads.find(e.node.get());
          if (it == grads.end() || !it->second.defined())
            grads[e.node.get()] = std::move(gi);
          else if (!ctx.handed.empty() && ctx.handed[i] && gi.impl() == ctx.handed[i])
            ;  // the backward added its share into the sum in place (accumulation_target)
          else
            it->second = add_grads(it->second, gi);
        }
        keep.push_back(e.node);
        if (--deps[e.node.get()] == 0) {
          if (grads[e.node.get()].defined()) {
            ready.push(e.node.get());
          } else {
            // No gradient reached it; its inputs still count down through an empty pass.
            grads.erase(e.node.get());
            std::vector<Node*> st{e.node.get()};
            while (!st.empty()) {
              Node* m = st.back();
              st.pop_back();
              for (auto& me : m->edges) {
                if (me.node) {
                  keep.push_back(me.node);
                  if (--deps[me.node.get()] == 0) {
                    if (grads.count(me.node.get()) && grads[me.node.get()].defined())
                      ready.push(me.node.get());
                    else
                      st.push_back(me.node.get());
                  }
                } else if (me.leaf) {
                  TensorImpl* leaf = me.leaf.get();
                  if (--leaf_uses[leaf] == 0) finish_leaf(leaf, leaf_grads);
                }
              }
            }
          }
        }
      } else {
        TensorImpl* leaf = e.leaf.get();
        if (gi.defined()) {
          check_grad("op", n->name, gi, leaf->shape, leaf->dtype);
          auto it = leaf_grads.find(leaf);
          if (it == leaf_grads.end())
            leaf_grads.emplace(leaf, std::move(gi));
          else if (!ctx.handed.empty() && ctx.handed[i] && gi.impl() == ctx.handed[i])
            gi = Tensor();  // added into the pass's sum in place (accumulation_target); this
                            // handle goes, so the store below may take the sum without a copy
          else
            it->second = add_grads(it->second, gi);
        }
        if (--leaf_uses[leaf] == 0) finish_leaf(leaf, leaf_grads);
      }
    }
    if (!retain_graph) n->release();
  }
  if (!retain_graph)
    for (auto& n : keep) n->release();
}

Tensor checkpoint(std::function<Tensor(const Tensor&)> f, const Tensor& x,
                  const std::vector<Tensor>& params) {
  std::vector<Tensor> inputs{x};
  inputs.insert(inputs.end(), params.begin(), params.end());
  if (!needs_record(inputs)) return f(x);
  Tensor out;
  {
    NoGradGuard ng;
    out = f(x.detach());
  }
  Tensor saved = x.detach();
  record("checkpoint", out, inputs,
         [f = std::move(f), saved, n = inputs.size()](const Tensor& g, const std::vector<bool>& need) {
           std::vector<Tensor> grads(n);
           Tensor xi = saved.detach();
           if (need[0]) xi.set_requires_grad(true);
           Tensor y;
           {
             const bool prev = grad_enabled();
             set_grad_enabled(true);
             try {
               y = f(xi);
             } catch (...) {
               set_grad_enabled(prev);
               throw;
             }
             set_grad_enabled(prev);
           }
           if (y.requires_grad()) run_backward(y, g, false);  // params accumulate here
           if (need[0]) grads[0] = xi.grad();
           return grads;
         });
  return out;
}

void Tensor::backward(const Tensor& grad, bool retain_graph) const {
  run_backward(*this, grad, retain_graph);
}

}  // namespace ftune
