// Next-token selection from logits, with transformers' logits-warper semantics:
//   temperature -> top_k -> top_p, then one draw from the softmax of what is left.
// - temperature 0 is greedy: argmax, ties to the lowest id (as torch.argmax). Else the logits are
//   divided by it (any temperature > 0; small ones approach greedy, with ties shared evenly).
// - top_k > 0 keeps the tokens whose logit is >= the k-th largest (ties at the k-th value are all
//   kept, as TopKLogitsWarper's `scores < topk[-1]` test does); 0 turns it off.
// - top_p in [0, 1] keeps the smallest set of most probable tokens whose probability (renormalized
//   after top_k) sums to >= top_p, at least one token (TopPLogitsWarper with min_tokens_to_keep 1:
//   a token is dropped when the tokens ranked above it already reach top_p); 1 turns it off.
//   Tokens rank by logit descending (the probability order), equal logits by lower id.
// The draw is an inverse CDF over the kept tokens in id order with one uniform u =
// philox_uniform(seed, stream, step) per row, so a row's token depends only on its own logits, the
// seed, its stream and the step: not on the thread count or on the other rows of the batch. The
// probabilities are computed in f64.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "core/tensor.h"

namespace ftune {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy; must be >= 0
  int64_t top_k = 0;         // 0: off; must be >= 0
  double top_p = 1.0;        // 1: off; must be in [0, 1]
  uint64_t seed = 0;

  bool greedy() const { return temperature == 0.0; }
  void validate() const;  // throws ftune::Error "[sample] ..." for out-of-range values
};

// logits float [B, V] (any float dtype or device; read as f32 on the CPU) -> one token per row.
// Row r draws philox_uniform(opt.seed, streams[r], step); empty streams means stream r for row r.
// Throws on NaN logits, and (when sampling) on +inf logits or a row that is entirely -inf.
std::vector<int32_t> sample_tokens(const Tensor& logits, const SamplingOptions& opt, uint64_t step,
                                   std::span<const uint64_t> streams = {});

// One row: logits[0..V) and the uniform u in [0, 1). Greedy ignores u.
int32_t sample_row(const float* logits, int64_t vocab, const SamplingOptions& opt, float u);

// The distribution sample_row draws from (after temperature, top_k and top_p), [V] summing to 1;
// greedy gives a one-hot vector. For tests and for callers that want the probabilities.
std::vector<double> sampling_distribution(const float* logits, int64_t vocab,
                                          const SamplingOptions& opt);

}  // namespace ftune
