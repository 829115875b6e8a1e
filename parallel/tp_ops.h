// Megatron-style tensor parallelism: the conjugate autograd ops that move activations in and out
// of a tensor-parallel region, vocab-parallel embedding and cross-entropy, and the shard layout
// of a split parameter (see docs/distributed.md, "Tensor parallel").
//
// Every op here is a collective over `tp`: all ranks of the group call it in the same order with
// tensors of the same shape (the local shards may differ in their split dim only). Backward runs
// the conjugate collective, so the graphs of the tp ranks must match op for op (they do when
// every rank runs the same model code). CPU or GPU tensors (the MPI backend stages GPU ones
// through the host unless it is CUDA-aware; NCCL takes them as they are).
#pragma once
#include <cstdint>
#include <memory>

#include "core/ops.h"
#include "parallel/communicator.h"

namespace ftune::parallel {

// Forward identity; backward all-reduces (sums) the gradient over tp. Placed where a replicated
// tensor enters a column-parallel layer: each rank's partial gradient becomes the full one.
Tensor copy_to_tp(const Tensor& x, const std::shared_ptr<Communicator>& tp);
// Forward all-reduce (sum) over tp; backward identity. Closes a row-parallel layer.
Tensor reduce_from_tp(const Tensor& x, const std::shared_ptr<Communicator>& tp);
// Forward: the local shards [..., n_r] concatenated along the last dim over the ranks
// [..., sum n_r] (shards may differ in size: vocab shards do); backward: this rank's slice.
Tensor gather_last_dim(const Tensor& x, const std::shared_ptr<Communicator>& tp);
// Forward: this rank's slice of the last dim (split as shard_range does); backward: all-gather.
Tensor scatter_last_dim(const Tensor& x, const std::shared_ptr<Communicator>& tp);

// How a dim of `full` elements is split over `parts` ranks: rank r holds [offset, offset + size).
// Chunks of ceil(full / parts); the last ranks may hold fewer (vocab sizes need not divide).
struct Range {
  int64_t offset = 0, size = 0;
};
Range shard_range(int64_t full, int parts, int rank);

// Where a parameter's local tensor sits in the full-shape one. dim -1: replicated (every tp rank
// holds the whole tensor). Otherwise the full tensor's dim `dim` (of full_size elements) is made
// of `blocks` equal blocks (3 for GPT-2's fused [q | k | v] c_attn, else 1) and this rank holds
// [b * full_size / blocks + offset, ... + size) of every block b, concatenated in block order.
struct ShardInfo {
  int dim = -1;
  int64_t full_size = 0;
  int64_t offset = 0;
  int64_t size = 0;
  int blocks = 1;
  bool replicated() const { return dim < 0; }
};
// This rank's slice of a full-shape tensor (a contiguous copy; the tensor itself when
// replicated). Throws when `full` does not have the full shape along info.dim.
Tensor shard_slice(const Tensor& full, const ShardInfo& info);
// The full-shape tensor from every rank's local shard (collective over tp; every rank gets it).
// A replicated tensor is returned as is. Not differentiable (checkpoints and export).
Tensor gather_shards(const Tensor& local, const ShardInfo& info,
                     const std::shared_ptr<Communicator>& tp);

// Vocab-parallel embedding: `weight_shard` holds the rows [vocab_offset, vocab_offset + V_r) of
// the full table; ids outside give zeros, and the sum over tp is the full lookup.
Tensor vocab_parallel_embedding(const Tensor& weight_shard, const Tensor& ids, int64_t vocab_offset,
                                const std::shared_ptr<Communicator>& tp);

// Cross-entropy over logits split along the vocabulary: logits_shard [N, V_r] (leading dims
// flatten into N) holds columns [sum_{q<r} V_q, ... + V_r) of the full [N, V] logits, rank after
// rank. targets [N] (i32|i64, the same on every rank) index the full vocabulary. Each rank runs
// the loss kernels on its shard (ops::cross_entropy_shard_forward: per row the shard's max and
// log-sum-exp, and the nll where it holds the target) and one all_gather of those 3 numbers per
// row (after a one-number all_gather of the shard sizes, unless vocab_size gives them) gives every
// rank the whole rows' statistics, combined in f64; no logits are gathered. Same value and semantics as
// ops::cross_entropy on the full logits (ignore_index rows skipped, mean over counted rows, 0
// when none; on the GPU a reduced loss is f32, per-row ones in the logits' dtype). The backward
// needs no communication: softmax - onehot on the local shard, one kernel pass.
// vocab_size: the full vocabulary when the shards are shard_range's split of it (the model's
// layout; this rank's shard is checked against it), which spares the all_gather of the shard
// sizes; 0: any split, the sizes gathered.
Tensor vocab_parallel_cross_entropy(const Tensor& logits_shard, const Tensor& targets,
                                    const std::shared_ptr<Communicator>& tp,
                                    int64_t ignore_index = -100,
                                    ops::Reduction reduction = ops::Reduction::mean,
                                    int64_t vocab_size = 0);

}  // namespace ftune::parallel
