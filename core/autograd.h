// Reverse-mode autograd over a recorded graph. Each differentiable op makes one Node holding a
// backward closure that keeps only what backward needs; leaves accumulate into .grad().
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace ftune {

// grads[i] for input i; an undefined Tensor where need[i] is false or the input gets no gradient.
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_out, const std::vector<bool>& need)>;

class Node {
 public:
  struct Edge {
    std::shared_ptr<Node> node;        // producer of the input, or
    std::shared_ptr<TensorImpl> leaf;  // the leaf that accumulates (requires_grad, no grad_fn)
    bool active() const { return node || leaf; }
  };
  std::string name;
  uint64_t seq = 0;  // creation order: backward runs newest first
  std::vector<Edge> edges;
  BackwardFn backward;
  // Storage versions of the inputs and the output when the op ran: a backward over storage
  // written in place since then would compute with changed values, so it is refused.
  std::vector<std::pair<std::weak_ptr<Storage>, uint64_t>> versions;
  Shape out_shape;
  DType out_dtype = DType::f32;
  uint32_t prof_label = 0;  // profiler: the forward op that made the node (core/profiler.h)
  void release() {
    backward = nullptr;
    edges.clear();
    versions.clear();
  }
};

bool grad_enabled();
void set_grad_enabled(bool on);

// Disables recording in a scope (evaluation, optimizer steps, backward itself).
class NoGradGuard {
 public:
  NoGradGuard() : prev_(grad_enabled()) { set_grad_enabled(false); }
  ~NoGradGuard() { set_grad_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// True when recording is on and any input requires grad.
bool needs_record(std::initializer_list<const Tensor*> inputs);
bool needs_record(const std::vector<Tensor>& inputs);

// Attaches a Node to out when needs_record(inputs): out becomes a non-leaf requiring grad.
void record(const char* name, Tensor& out, const std::vector<Tensor>& inputs, BackwardFn fn);

// Activation checkpointing: y = f(x), run without recording; the backward runs f again with
// recording on and backpropagates through that graph. Only x (and the outputs) stay alive between
// forward and backward: the activations inside f are recomputed. params are the leaves f reads
// (a block's weights); their gradients are accumulated into .grad() by the inner backward (hooks
// fire there), and they make the op record even when x needs no gradient (a frozen embedding
// under LoRA). f must be deterministic (seeded dropout is: masks come from the step's seed).
Tensor checkpoint(std::function<Tensor(const Tensor&)> f, const Tensor& x,
                  const std::vector<Tensor>& params);

// Inside a node's backward: the gradient already summed for its input `input` by that input's
// other consumers, when the backward may add its own share into it in place (the engine holds the
// only reference to it, contiguous; not for a producer or leaf that is two of the node's inputs);
// an undefined Tensor otherwise, and outside a backward. A leaf's sum is this backward pass's
// (the gradient it will add to .grad), not .grad itself. A backward that adds into it must return
// that very tensor (not a view or a copy) as input `input`'s gradient: the engine then sums
// nothing; anything else returned is summed as usual. Users: linear's dX GEMM (beta = 1: q/k/v or
// gate/up reaching their shared input), the norms' dx (the residual stream's gradient: x feeds
// both norm(x) and x + f(norm(x))), slice (the q | k | v split of a fused projection adds each
// range into the whole) and embedding (a tied embedding's rows added into the LM head's
// gradient of the same weight, a leaf's sum or, when the weight reaches both through an op, that
// op's): no separate passes adding [tokens, hidden] or [vocab, hidden] tensors. Whether a sum
// exists yet depends on the order the consumers run.
Tensor accumulation_target(size_t input);

// Runs backward from root; grad defaults to ones (a scalar loss gets 1).
void run_backward(const Tensor& root, const Tensor& grad, bool retain_graph);

}  // namespace ftune
