// Autoregressive generation with a KV cache, for a batch of prompts of different lengths.
//
// The prompts are left-padded into one [B, L] batch (pad_token_id in the pad slots, which the
// cache excludes from attention; positions count from each row's first real token, as
// transformers' position_ids = cumsum(attention_mask) - 1 do), run through the model once
// (prefill), then one token per row per step is chosen by sample_tokens (models/sampling.h) from
// the last position's logits and fed back through the cache.
//
// Output: per prompt the new ids only (not the prompt). A row stops after it emits one of
// stop_token_ids, which is INCLUDED as its last id (transformers' generate also returns the eos;
// it then pads the row, which is left out here), or after max_new_tokens ids. Finished rows are fed
// pad_token_id until every row is done; generation ends as soon as all rows are finished.
//
// Determinism: row r draws its uniform at step t (t-th new token, from 0) as
// philox_uniform(seed, stream_offset + r, t). Its tokens depend only on its own prompt, the
// options and its stream, so generating a prompt alone with stream_offset = r reproduces row r of
// a batch (up to the float rounding that padding may change in the logits), and results do not
// depend on the thread count.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "models/sampling.h"
#include "models/transformer.h"

namespace ftune {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  double temperature = 0.0;  // 0: greedy (transformers' do_sample=False)
  int64_t top_k = 0;         // 0: off
  double top_p = 1.0;        // 1: off
  uint64_t seed = 0;
  uint64_t stream_offset = 0;           // row r samples from Philox stream stream_offset + r
  std::vector<int32_t> stop_token_ids;  // eos ids; empty: stop only at max_new_tokens
  int32_t pad_token_id = 0;             // fills the left padding and the finished rows' inputs

  SamplingOptions sampling() const { return {temperature, top_k, top_p, seed}; }
};

// Called for each chosen token of a running row (the stop token included), in row order within a
// step, before the next step runs. `row` indexes the prompts.
using TokenCallback = std::function<void(int64_t row, int32_t token)>;

// prompts: non-empty id lists, each id in [0, vocab). Runs under NoGradGuard and in eval mode
// (the model's training flag is restored). Throws ftune::Error "[generate] ..." on bad input,
// including a prompt length + max_new_tokens beyond the model's max_seq_len().
std::vector<std::vector<int32_t>> generate(Transformer& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt,
                                           const TokenCallback& on_token = {});

}  // namespace ftune
