#include "models/sampling.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <numeric>

#include "core/autograd.h"
#include "core/error.h"
#include "core/rng.h"

namespace ftune {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

int32_t argmax_row(const float* x, int64_t vocab) {
  int64_t best = 0;
  float best_v = x[0];
  for (int64_t i = 0; i < vocab; ++i) {
    FTUNE_CHECK(!std::isnan(x[i]), "[sample] NaN logit at token ", i);
    if (x[i] > best_v) {  // strict: the first maximum wins
      best_v = x[i];
      best = i;
    }
  }
  return int32_t(best);
}

// The tokens sample_row may draw and their unnormalized probabilities, in id order.
// x is [vocab]; temperature > 0.
void kept_tokens(const float* x, int64_t vocab, const SamplingOptions& opt,
                 std::vector<int32_t>& ids, std::vector<double>& p) {
  float mx = -kInf;
  for (int64_t i = 0; i < vocab; ++i) {
    FTUNE_CHECK(!std::isnan(x[i]), "[sample] NaN logit at token ", i);
    FTUNE_CHECK(x[i] != kInf, "[sample] +inf logit at token ", i,
                " (the softmax is undefined; use temperature 0 for greedy)");
    mx = std::max(mx, x[i]);
  }
  FTUNE_CHECK(mx > -kInf, "[sample] every logit of the row is -inf: nothing to sample");

  // top_k: a threshold on the raw logits (dividing by a positive temperature keeps the order).
  float thr = -kInf;
  if (opt.top_k > 0 && opt.top_k < vocab) {
    std::vector<float> tmp(x, x + vocab);
    std::nth_element(tmp.begin(), tmp.begin() + (opt.top_k - 1), tmp.end(), std::greater<float>());
    thr = tmp[size_t(opt.top_k - 1)];
  }

  const double inv_t = 1.0 / opt.temperature;
  ids.clear();
  p.clear();
  for (int64_t i = 0; i < vocab; ++i) {
    if (x[i] < thr || x[i] == -kInf) continue;
    double q = std::exp((double(x[i]) - double(mx)) * inv_t);
    if (q > 0.0) {  // an underflowed probability can never be drawn
      ids.push_back(int32_t(i));
      p.push_back(q);
    }
  }

  if (opt.top_p >= 1.0 || ids.size() <= 1) return;
  // top_p: keep rank i while the ranks above it sum to < top_p. Rank by probability descending,
  // then id; only a prefix of the ranking is needed, so sort a growing prefix (usually tiny).
  const double target = opt.top_p * std::accumulate(p.begin(), p.end(), 0.0);
  std::vector<uint32_t> idx(ids.size());
  std::iota(idx.begin(), idx.end(), 0u);
  auto by_rank = [&](uint32_t a, uint32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); };
  const size_t n = idx.size();
  size_t m = std::min<size_t>(n, 64), keep = n;
  for (;;) {
    std::partial_sort(idx.begin(), idx.begin() + ptrdiff_t(m), idx.end(), by_rank);
    double above = 0.0;
    size_t i = 0;
    for (; i < m; ++i) {
      if (i > 0 && above >= target) break;
      above += p[idx[i]];
    }
    if (i < m || m == n) {
      keep = i;
      break;
    }
    m = std::min(n, m * 4);
  }
  idx.resize(keep);
  std::sort(idx.begin(), idx.end());  // back to id order (ids is ascending)
  std::vector<int32_t> kid(keep);
  std::vector<double> kp(keep);
  for (size_t j = 0; j < keep; ++j) {
    kid[j] = ids[idx[j]];
    kp[j] = p[idx[j]];
  }
  ids.swap(kid);
  p.swap(kp);
}

}  // namespace

void SamplingOptions::validate() const {
  FTUNE_CHECK(std::isfinite(temperature) && temperature >= 0.0,
              "[sample] temperature must be >= 0 (0 is greedy), got ", temperature);
  FTUNE_CHECK(top_k >= 0, "[sample] top_k must be >= 0 (0 is off), got ", top_k);
  FTUNE_CHECK(top_p >= 0.0 && top_p <= 1.0, "[sample] top_p must be in [0, 1] (1 is off), got ",
              top_p);
}

int32_t sample_row(const float* logits, int64_t vocab, const SamplingOptions& opt, float u) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  opt.validate();
  if (opt.greedy()) return argmax_row(logits, vocab);
  std::vector<int32_t> ids;
  std::vector<double> p;
  kept_tokens(logits, vocab, opt, ids, p);
  const double target = double(u) * std::accumulate(p.begin(), p.end(), 0.0);
  double cum = 0.0;
  for (size_t i = 0; i < ids.size(); ++i) {
    cum += p[i];
    if (cum > target) return ids[i];  // a zero-width token can never satisfy this first
  }
  return ids.back();  // u * total rounded up to the total
}

std::vector<double> sampling_distribution(const float* logits, int64_t vocab,
                                          const SamplingOptions& opt) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  opt.validate();
  std::vector<double> out(size_t(vocab), 0.0);
  if (opt.greedy()) {
    out[size_t(argmax_row(logits, vocab))] = 1.0;
    return out;
  }
  std::vector<int32_t> ids;
  std::vector<double> p;
  kept_tokens(logits, vocab, opt, ids, p);
  const double total = std::accumulate(p.begin(), p.end(), 0.0);
  for (size_t i = 0; i < ids.size(); ++i) out[size_t(ids[i])] = p[i] / total;
  return out;
}

std::vector<int32_t> sample_tokens(const Tensor& logits, const SamplingOptions& opt, uint64_t step,
                                   std::span<const uint64_t> streams) {
  FTUNE_CHECK(logits.defined(), "[sample] logits are undefined");
  FTUNE_CHECK(logits.dim() == 2, "[sample] logits must be [B, V], got ", logits.desc());
  FTUNE_CHECK(is_floating(logits.dtype()), "[sample] logits must be a float dtype, got ",
              logits.desc());
  opt.validate();
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary: ", logits.desc());
  FTUNE_CHECK(streams.empty() || int64_t(streams.size()) == batch, "[sample] ", streams.size(),
              " streams for ", batch, " rows");
  Tensor x;
  {
    NoGradGuard ng;
    x = logits.detach().to(Device::cpu()).to(DType::f32).contiguous();
  }
  const float* data = x.data<float>();
  std::vector<int32_t> out(static_cast<size_t>(batch));
  std::exception_ptr err;
  int64_t err_row = batch;  // report the lowest failing row, whatever the thread schedule
#pragma omp parallel for schedule(static) if (batch > 1 && !opt.greedy())
  for (int64_t r = 0; r < batch; ++r) {
    try {
      const uint64_t stream = streams.empty() ? uint64_t(r) : streams[size_t(r)];
      const float u = opt.greedy() ? 0.0f : philox_uniform(opt.seed, stream, step);
      out[size_t(r)] = sample_row(data + r * vocab, vocab, opt, u);
    } catch (const std::exception& e) {
#pragma omp critical(ftune_sample_error)
      if (r < err_row) {
        err_row = r;
        err = std::make_exception_ptr(Error(str_cat(e.what(), " (row ", r, ")")));
      }
    }
  }
  if (err) std::rethrow_exception(err);
  return out;
}

}  // namespace ftune
