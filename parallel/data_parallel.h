// Data parallelism (DESIGN.md "Parallel"): the gradient reducer that overlaps communication with
// backward, and ZeRO-1's sharded AdamW.
//
// GradReducer, like torch DDP's Reducer: the trainable parameters are assigned to buckets of about
// `bucket_mb` MB in REVERSE parameter order (the order their gradients become ready in backward).
// A ready hook on each parameter counts the bucket's ready gradients; a complete bucket is
// flattened into one contiguous buffer and its collective started right away (all_reduce SUM, or
// reduce_scatter SUM for ZeRO-1), while backward goes on producing the next gradients.
//
// Ordering (MPI requires every rank to issue the collectives in the same order): buckets are
// launched strictly in bucket index order, a bucket only once every earlier bucket is launched.
// A bucket that becomes complete early waits for its predecessors; finish() launches whatever is
// left (missing gradients as zeros). The sequence of collectives is therefore 0, 1, ..., n-1 on
// every rank, whatever the order in which hooks fire or whether a parameter got a gradient.
//
// The sum (not the mean) is reduced: the trainer divides the loss by the GLOBAL target-token
// count, so the summed gradient is exactly the single-process gradient of the global batch.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "core/optim.h"
#include "core/tensor.h"
#include "parallel/communicator.h"

namespace ftune::parallel {

struct ReducerOptions {
  double bucket_mb = 25.0;  // target bucket size (a parameter larger than this is a bucket alone)
  bool shard = false;       // ZeRO-1: reduce_scatter each bucket instead of all_reduce
};

// One bucket: whole parameters, consecutive in the reversed order, flattened.
struct Bucket {
  std::vector<size_t> params;    // indices into the reducer's parameter list
  std::vector<int64_t> offsets;  // element offset of each in the flat buffer
  int64_t numel = 0;             // elements of the parameters
  int64_t padded = 0;            // numel rounded up to a multiple of the communicator size
  int64_t shard = 0;             // padded / size: each rank's part (shard mode)
};

class GradReducer {
 public:
  // `params`: the trainable parameters in model order (contiguous, same dtype and device, each
  // requiring grad). Registers the ready hooks (they outlive nothing: after the reducer is gone
  // they do nothing).
  GradReducer(std::vector<Tensor> params, std::shared_ptr<Communicator> comm,
              ReducerOptions opt = {});
  ~GradReducer();
  GradReducer(const GradReducer&) = delete;
  GradReducer& operator=(const GradReducer&) = delete;

  // false for the non-final micro-batches of gradient accumulation: hooks do nothing, gradients
  // accumulate locally. true (the default) before the final micro-batch's backward.
  void set_sync(bool sync);
  bool sync() const;

  // After the final micro-batch's backward, on every rank: launches the buckets not launched yet,
  // agrees across ranks on which parameters got a gradient, waits for everything and writes the
  // result. Plain: each defined .grad holds the sum over ranks (a parameter no rank touched keeps
  // an undefined grad, as in one process). shard: the .grads are dropped and grad_shard(b) holds
  // this rank's part of bucket b's summed gradient.
  void finish();
  // Forgets the reduced state (ShardedAdamW::zero_grad calls it).
  void reset();

  const std::vector<Tensor>& params() const;
  const std::vector<Bucket>& buckets() const;
  size_t num_buckets() const { return buckets().size(); }
  const Communicator& comm() const;
  std::shared_ptr<Communicator> comm_ptr() const;
  bool sharded() const;

  // After finish(): whether any rank had a gradient for parameter i; whether finish() ran since
  // the last reset().
  bool grad_defined(size_t i) const;
  bool reduced() const;
  // shard mode, after finish(): this rank's [shard] part of bucket b's summed gradient.
  Tensor& grad_shard(size_t b);

  // Instrumentation of the last synced backward pass (tests, benchmarks): for each launch, in
  // order, the number of ready hooks seen when it was launched (launched from finish(): -1), and
  // the number of hooks in the pass.
  const std::vector<int64_t>& launch_hook_counts() const;
  int64_t hooks_in_pass() const;

 private:
  struct State;
  std::shared_ptr<State> s_;
};

// AdamW for ZeRO-1: every rank keeps the AdamW state (exp_avg, exp_avg_sq) of its 1/dp shard of
// each bucket only, updates that shard of the parameters from the reducer's gradient shard, then
// all-gathers the updated parameters (in their dtype). Numerically optim::AdamW (torch's AdamW),
// element for element: the same fused kernels (optim::adamw_update_pieces), per-parameter step
// counts, lr and weight decay of the parameter's group. Parameters are f32, bf16 or f16, on the
// CPU or a GPU (all on one device; state and buffers live there too). A 16-bit parameter's f32
// master is kept for this rank's shard only, taken from the parameter at its first update (as
// optim::AdamW does); the update writes the rounded master into the shard of the parameter. The
// gradient shard has the bucket's dtype, the parameters' (what GradReducer reduces: MPI sums
// 16-bit buckets in f32 and rounds the sum back, NCCL sums them natively), as plain DP's gradients.
class ShardedAdamW {
 public:
  // `groups` hold exactly the reducer's parameters (any order); the reducer must be sharded.
  ShardedAdamW(std::vector<optim::ParamGroup> groups, optim::AdamWOptions opt,
               GradReducer& reducer);

  // Collective (all_gather of the parameters). grad_scale: as optim::AdamW::step's (the clipping
  // coefficient, applied inside the update).
  void step(double grad_scale = 1.0);
  void zero_grad();  // drops the gradients and the reduced shards
  double lr() const { return lr_; }
  void set_lr(double lr) { lr_ = lr; }
  int64_t step_count() const { return step_; }

  // Collective: the global squared L2 norm of the summed gradient (sum over the shards).
  double grad_sum_squares();
  // torch's clip_grad_norm_ over the global gradient; returns the norm before clipping.
  double clip_grad_norm(double max_norm);
  // Collective: grad_sum_squares split in two, {parameters with select[i], the others} (i: the
  // reducer's index). Tensor parallel + ZeRO-1 needs it: the squares of tp-split parameters are
  // then summed over tp as well, those of replicated ones are not.
  std::pair<double, double> grad_sum_squares_split(const std::vector<bool>& select);
  // Multiplies this rank's gradient shards by `coef` (clipping with a norm found elsewhere).
  void scale_grads(double coef);

  // Collective: the full-shape state, named as optim::AdamW names it, ".master" of 16-bit
  // parameters included (so a checkpoint does not depend on dp or zero); every rank gets all of
  // it, in host memory.
  optim::OptimizerState export_state();
  // Takes this rank's shard of a full-shape state (checks names and shapes first). As
  // optim::AdamW: a 16-bit parameter is set from the state's ".master" (the whole parameter, on
  // every rank); without one (an f32 run's state) its master is taken from the parameter at its
  // next update; an f32 parameter ignores ".master".
  void import_state(const optim::OptimizerState& state);

  // This rank's own part of the state, without communication (a sharded checkpoint writes each
  // rank's part into the one file): export_state's tensors in its order, "<param>.exp_avg",
  // ".exp_avg_sq" and (16-bit parameters) ".master" as 1-D f32 host tensors holding the elements
  // [flat_offset, flat_offset + numel) of the parameter (row-major; empty where this rank's shard
  // misses the parameter), ".step" whole.
  struct LocalState {
    optim::OptimizerState state;
    std::vector<int64_t> flat_offset;  // per tensor of state; -1: the tensor is whole
  };
  LocalState export_local_state() const;
  // The inverse, without communication: `state` holds, as export_local_state names and shapes
  // them, this rank's flat pieces of ".exp_avg", ".exp_avg_sq" (and optionally ".master") and every
  // ".step" (a resume reads only its shard from a checkpoint: load_checkpoint_sharded with flat
  // slices). Checks names and sizes first (a bad state changes nothing).
  void import_local_state(const optim::OptimizerState& state);

 private:
  struct Slot {  // one parameter
    std::string name;
    size_t param = 0;  // reducer index
    size_t bucket = 0;
    int64_t offset = 0;  // in the bucket's flat buffer
    double lr_scale = 1.0, weight_decay = 0.0;
    int64_t step = 0;
    bool has_master = false;  // 16-bit: the master (of every rank's shard) is taken
  };
  struct Span {  // the part of a parameter in this rank's shard of its bucket
    int64_t in_param = 0, in_shard = 0, count = 0;
  };
  Span span_of(const Slot& s) const;
  GradReducer& red_;
  optim::AdamWOptions opt_;
  double lr_;
  int64_t step_ = 0;
  std::vector<Slot> slots_;    // by reducer index
  // Per bucket, f32 [shard] on the parameters' device; master_ only for 16-bit buckets.
  std::vector<Tensor> m_, v_, master_;
};

}  // namespace ftune::parallel
