#include "models/generate.h"

#include <algorithm>

#include "core/autograd.h"
#include "core/error.h"

namespace ftune {

namespace {

// Eval mode for the duration of a call; the caller's flag comes back even on a throw.
class EvalGuard {
 public:
  explicit EvalGuard(nn::Module& m) : m_(m), was_training_(m.is_training()) { m_.eval(); }
  ~EvalGuard() { m_.train(was_training_); }
  EvalGuard(const EvalGuard&) = delete;
  EvalGuard& operator=(const EvalGuard&) = delete;

 private:
  nn::Module& m_;
  bool was_training_;
};

// The LM head's weight [V, hidden] (the embedding when tied), found by its HF module name.
Tensor lm_head_weight(Transformer& model) {
  for (auto& [name, m] : model.named_modules())
    if (name == "lm_head") return m->parameter("weight");
  FTUNE_THROW("[generate] the model has no lm_head module");
}

// The logits of the last position only, [B, V]: forward() would project every prompt position
// onto the vocabulary, T times the work of the one row sampling needs.
Tensor last_logits(Transformer& model, const Tensor& head, const Tensor& ids,
                   const ForwardOptions& fwd) {
  Tensor h = model.hidden_states(ids, fwd);  // [B, T, hidden]
  const int64_t t = h.size(1);
  return ops::linear(h.slice(1, t - 1, t).squeeze(1).contiguous(), head);
}

}  // namespace

std::vector<std::vector<int32_t>> generate(Transformer& model,
                                           const std::vector<std::vector<int32_t>>& prompts,
                                           const GenerateOptions& opt,
                                           const TokenCallback& on_token) {
  const ModelConfig& cfg = model.config();
  const SamplingOptions sopt = opt.sampling();
  sopt.validate();
  FTUNE_CHECK(opt.max_new_tokens >= 0, "[generate] max_new_tokens must be >= 0, got ",
              opt.max_new_tokens);
  const int64_t vocab = cfg.vocab_size;
  FTUNE_CHECK(opt.pad_token_id >= 0 && opt.pad_token_id < vocab, "[generate] pad_token_id ",
              opt.pad_token_id, " is outside the vocabulary [0, ", vocab, ")");
  const int64_t batch = int64_t(prompts.size());
  int64_t longest = 0;
  for (int64_t r = 0; r < batch; ++r) {
    const auto& p = prompts[size_t(r)];
    FTUNE_CHECK(!p.empty(), "[generate] prompt ", r,
                " is empty (it needs at least one token, "
                "e.g. bos)");
    for (size_t i = 0; i < p.size(); ++i)
      FTUNE_CHECK(p[i] >= 0 && p[i] < vocab, "[generate] prompt ", r, " token ", i, " has id ",
                  p[i], ", outside the vocabulary [0, ", vocab, ")");
    longest = std::max(longest, int64_t(p.size()));
  }
  const size_t nb = prompts.size();
  std::vector<std::vector<int32_t>> out(nb);
  if (batch == 0 || opt.max_new_tokens == 0) return out;
  // The last new token is never fed back, so the cache needs one slot less than the total.
  const int64_t slots = longest + opt.max_new_tokens - 1;
  FTUNE_CHECK(slots <= cfg.max_seq_len(), "[generate] the longest prompt (", longest,
              " tokens) plus max_new_tokens ", opt.max_new_tokens, " - 1 = ", slots,
              " exceeds the model's maximum sequence length ", cfg.max_seq_len());

  NoGradGuard no_grad;
  EvalGuard eval(model);

  std::vector<int64_t> pad(nb);
  std::vector<int64_t> ids(nb * size_t(longest)), pos(nb * size_t(longest));
  for (int64_t r = 0; r < batch; ++r) {
    const auto& p = prompts[size_t(r)];
    pad[size_t(r)] = longest - int64_t(p.size());
    for (int64_t s = 0; s < longest; ++s) {
      const int64_t k = s - pad[size_t(r)];
      ids[size_t(r * longest + s)] = k < 0 ? opt.pad_token_id : p[size_t(k)];
      pos[size_t(r * longest + s)] = std::max<int64_t>(k, 0);  // pad slots are never attended
    }
  }
  KVCache cache = model.make_cache(batch, slots, pad);
  ForwardOptions fwd;
  fwd.cache = &cache;
  fwd.positions = Tensor::from_vector(pos, {batch, longest});
  const Tensor head = lm_head_weight(model);
  Tensor logits = last_logits(model, head, Tensor::from_vector(ids, {batch, longest}), fwd);

  std::vector<uint64_t> streams(nb);
  for (int64_t r = 0; r < batch; ++r) streams[size_t(r)] = opt.stream_offset + uint64_t(r);
  std::vector<char> finished(nb, 0);
  int64_t running = batch;
  std::vector<int64_t> next(nb), next_pos(nb);
  for (int64_t step = 0; step < opt.max_new_tokens; ++step) {
    const std::vector<int32_t> tok = sample_tokens(logits, sopt, uint64_t(step), streams);
    for (int64_t r = 0; r < batch; ++r) {
      if (finished[size_t(r)]) {
        next[size_t(r)] = opt.pad_token_id;
        continue;
      }
      const int32_t t = tok[size_t(r)];
      out[size_t(r)].push_back(t);
      next[size_t(r)] = t;
      if (std::find(opt.stop_token_ids.begin(), opt.stop_token_ids.end(), t) !=
          opt.stop_token_ids.end()) {
        finished[size_t(r)] = 1;
        --running;
      }
      if (on_token) on_token(r, t);
    }
    if (running == 0 || step + 1 == opt.max_new_tokens) break;
    for (int64_t r = 0; r < batch; ++r) next_pos[size_t(r)] = cache.length - pad[size_t(r)];
    fwd.positions = Tensor::from_vector(next_pos, {batch, 1});
    logits = last_logits(model, head, Tensor::from_vector(next, {batch, 1}), fwd);
  }
  return out;
}

}  // namespace ftune
