// Op-level step profiler: where the time of one training step goes, per op label.
//
// A profiled step runs between begin_step() and end_step() on one thread. Inside it every
// outermost op call (the public ops of core/ops.h, Tensor copies and fills, the optimizer) and
// every autograd backward node is one timed interval, keyed by (phase, label):
//   - forward ops: the op's name, with the weight's shape for GEMMs ("linear [896,4864]");
//   - backward nodes: "bwd " + the label of the forward op that made the node, plus the node's
//     own name in parentheses when it differs (a composite op's inner node); "bwd (name)" for a
//     node made outside any hooked op. A checkpoint node is transparent: its recompute and inner
//     backward are timed op by op (forward labels inside the backward phase are the recompute).
//   - "autograd accumulate": the engine summing gradients of tensors used more than once.
// Ops called inside another op (linear's matmul, a backward closure's ops) belong to the outer
// interval, so intervals never overlap and their sum is at most the step's time.
//
// Timing: host wall time inside the interval always; on a GPU step also GPU time, from a pair of
// CUDA events recorded on ftune::cuda::current_stream() around it (no synchronize per op: all
// events are resolved once in end_step()). An interval's GPU time is the time the stream spent
// between its two events, idle gaps inside the op (the host still launching) included; the gaps
// between ops are the step's GPU time minus the attributed sum.
//
// Host issue time: the wall time from begin_step() until end_step() is called, before it waits
// for the GPU. When it is close to the step's wall time the host, not the GPU, sets the pace
// (launch-bound), unless a synchronizing call inside the step (a loss read, clip_grad_norm's
// norm) made it wait.
//
// Off (outside a profiled step, or a step begun with op_hooks = false) every hook is one relaxed
// atomic load. Profiling changes no numerics: it only adds events and timers.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

#include "core/device.h"

namespace ftune::profiler {

namespace detail {
inline std::atomic<bool> g_hooks{false};
bool enter(const char* op, const std::vector<int64_t>* shape);
bool enter_backward(const std::string& node_name, uint32_t stamp);
void leave();
}  // namespace detail

// True while op hooks record (inside a profiled step with op_hooks on).
inline bool hooks_on() { return detail::g_hooks.load(std::memory_order_relaxed); }

// Times one op call (outermost only). op must be a string that outlives the step (a literal).
class OpScope {
 public:
  explicit OpScope(const char* op) {
    if (hooks_on()) active_ = detail::enter(op, nullptr);
  }
  // The label gets the shape: "linear [151936,896]" (GEMMs: tells lm_head from the MLP).
  OpScope(const char* op, const std::vector<int64_t>& shape) {
    if (hooks_on()) active_ = detail::enter(op, &shape);
  }
  ~OpScope() {
    if (active_) detail::leave();
  }
  OpScope(const OpScope&) = delete;
  OpScope& operator=(const OpScope&) = delete;

 private:
  bool active_ = false;
};

// Times one backward node (core/autograd.cpp): stamp is the node's Node::prof_label.
class BackwardScope {
 public:
  BackwardScope(const std::string& node_name, uint32_t stamp) {
    if (hooks_on()) active_ = detail::enter_backward(node_name, stamp);
  }
  ~BackwardScope() {
    if (active_) detail::leave();
  }
  BackwardScope(const BackwardScope&) = delete;
  BackwardScope& operator=(const BackwardScope&) = delete;

 private:
  bool active_ = false;
};

// The label id of the op interval open on this thread (0: none). record() stamps new nodes
// with it, so their backward is labelled by the forward op that made them.
uint32_t current_label();

// ---- a profiled step ---------------------------------------------------------------------------
// Starts a step on this thread. dev: where the step runs (a CUDA device adds GPU events).
// op_hooks = false times only the step and its phases (the undisturbed host issue time).
void begin_step(Device dev, bool op_hooks = true);
// Starts a named phase of the step ("forward", "backward", "optimizer"); labels are kept per phase.
// name must outlive the step (a literal). Ignored outside a step.
void phase(const char* name);
// Ends the step: notes the host issue time, waits for the GPU, resolves the events and adds the
// step to the totals. Returns the step's wall time in ms.
double end_step();
bool in_step();
// Abandons the step in progress on this thread without adding it (after an exception inside it).
void cancel_step();
// Forgets every step so far (labels stay interned).
void reset();

struct Row {
  std::string phase, label;
  double calls = 0;    // per step
  double host_ms = 0;  // per step: wall time inside the intervals
  double gpu_ms = 0;   // per step: GPU time between the events (0 on the CPU)
};
struct PhaseRow {
  std::string name;
  double issue_ms = 0, gpu_ms = 0;              // per hooked step
  double clean_issue_ms = 0, clean_gpu_ms = 0;  // per step without op hooks
};
struct Report {
  bool gpu = false;
  int steps = 0;        // steps with op hooks
  int clean_steps = 0;  // steps without (op_hooks = false)
  // Per step, means over the hooked steps: wall (begin_step to after the final wait), host issue
  // (begin_step to end_step's call), GPU (first to last event), and the attributed sums.
  double wall_ms = 0, issue_ms = 0, gpu_ms = 0, attributed_host_ms = 0, attributed_gpu_ms = 0;
  int64_t intervals = 0;  // timed intervals per step
  double clean_wall_ms = 0, clean_issue_ms = 0, clean_gpu_ms = 0;
  std::vector<PhaseRow> phases;  // in first-seen order
  std::vector<Row> rows;         // by time, largest first (GPU time on a GPU step, else host)
};
Report report();
// A plain-text table (max_rows 0: all rows; the rest is summed into one line).
std::string format_table(const Report& r, size_t max_rows = 0);
std::string to_json(const Report& r);

}  // namespace ftune::profiler
