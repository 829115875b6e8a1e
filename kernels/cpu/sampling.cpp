// CPU next-token selection (kernels/sampling.h), moved here from models/sampling.cpp so that the
// CUDA twin's tests (which link ftune_core only) can use it as the reference.
#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"

namespace ftune::kernels::cpu {

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

// The k-th largest logit. x is [vocab], 0 < k < vocab. Small k: one pass with a min-heap of the k
// largest so far (most values lose the comparison with its top); large k: nth_element on a copy.
float kth_largest(const float* x, int64_t vocab, int64_t k) {
  std::vector<float> h;
  if (k <= 1024) {
    h.assign(x, x + k);
    std::make_heap(h.begin(), h.end(), std::greater<float>());
    for (int64_t i = k; i < vocab; ++i) {
      if (x[i] > h.front()) {
        std::pop_heap(h.begin(), h.end(), std::greater<float>());
        h.back() = x[i];
        std::push_heap(h.begin(), h.end(), std::greater<float>());
      }
    }
    return h.front();
  }
  h.assign(x, x + vocab);
  std::nth_element(h.begin(), h.begin() + (k - 1), h.end(), std::greater<float>());
  return h[size_t(k - 1)];
}

// A candidate of top_p. Ranked by logit descending, then id: the probability order (exp is
// monotone), with equal logits (hence equal probabilities) broken by the lower id.
struct Cand {
  float x;
  uint32_t id;
  double p;
};

bool by_rank(const Cand& a, const Cand& b) { return a.x > b.x || (a.x == b.x && a.id < b.id); }

// The number K of top-ranked candidates whose probabilities first sum to >= target (K >= 1; all
// when they never do). A weighted quickselect: each round partitions the open range at its middle
// rank and keeps the half holding the boundary, O(n) instead of a sort. c is reordered so that
// c[0, K) are the top K.
size_t top_p_count(std::vector<Cand>& c, double target) {
  size_t lo = 0, hi = c.size();
  double above = 0.0;  // the mass of ranks [0, lo)
  for (;;) {
    if (hi - lo <= 64) {
      std::sort(c.begin() + ptrdiff_t(lo), c.begin() + ptrdiff_t(hi), by_rank);
      for (size_t i = lo; i < hi; ++i) {
        above += c[i].p;
        if (above >= target) return i + 1;
      }
      return hi;  // all of them (hi == n), or the rounding of a block sum below
    }
    const size_t mid = lo + (hi - lo) / 2;
    std::nth_element(c.begin() + ptrdiff_t(lo), c.begin() + ptrdiff_t(mid),
                     c.begin() + ptrdiff_t(hi), by_rank);
    double upper = 0.0;
    for (size_t i = lo; i < mid; ++i) upper += c[i].p;
    if (above + upper >= target) {
      hi = mid;  // ranks [0, mid) already reach the target
    } else {
      above += upper + c[mid].p;
      if (above >= target) return mid + 1;
      lo = mid + 1;
    }
  }
}

// top_p on p[0, vocab) (unnormalized, 0 = excluded; their sum `total`): zeroes every token ranked
// below the smallest top set whose mass reaches top_p * total. z_i = (x_i - max) / T = log p_i.
// Only the SET matters (the draw runs in id order), so the ranks are bucketed by z (a histogram
// of 1024 buckets): buckets above the one where the mass crosses the target are kept whole, those
// below dropped, and only the crossing bucket is ranked exactly.
// n counts the tokens with p > 0 and zmin <= their smallest z.
void apply_top_p(const float* x, int64_t vocab, double mx, double inv_t, double top_p, double total,
                 int64_t n, double zmin, std::vector<double>& p) {
  constexpr int kBuckets = 1024;
  const double target = top_p * total;
  // Tokens below tau hold at most n * tau = (1 - top_p) * total together, so the boundary is at
  // or above it: log(tau) bounds the histogram's range.
  const double tau = (1.0 - top_p) * total / double(n);
  const double zlo = tau > 0.0 ? std::max(zmin, std::log(tau)) : zmin;
  const double scale = zlo < 0.0 ? double(kBuckets) / -zlo : 0.0;
  auto bucket = [&](int64_t i) {
    const double z = (double(x[i]) - mx) * inv_t;
    if (z < zlo) return kBuckets;  // below the range: never kept
    return std::min(kBuckets - 1, int(-z * scale));
  };
  std::vector<double> mass(kBuckets + 1, 0.0);
  for (int64_t i = 0; i < vocab; ++i)
    if (p[size_t(i)] != 0.0) mass[size_t(bucket(i))] += p[size_t(i)];
  int cross = kBuckets - 1;
  double above = 0.0;  // the mass of the buckets before `cross`
  for (int b = 0; b < kBuckets; ++b) {
    if (above + mass[size_t(b)] >= target) {
      cross = b;
      break;
    }
    above += mass[size_t(b)];
  }
  if (cross == kBuckets - 1 && above + mass[kBuckets - 1] < target) {  // rounding: keep all
    above = 0.0;
    for (int b = 0; b < kBuckets - 1; ++b) above += mass[size_t(b)];
  }
  thread_local std::vector<Cand> cand;
  cand.clear();
  for (int64_t i = 0; i < vocab; ++i) {
    if (p[size_t(i)] == 0.0) continue;
    const int b = bucket(i);
    if (b == cross)
      cand.push_back({x[i], uint32_t(i), p[size_t(i)]});
    else if (b > cross)
      p[size_t(i)] = 0.0;
  }
  const size_t keep = top_p_count(cand, target - above);
  for (size_t j = keep; j < cand.size(); ++j) p[cand[j].id] = 0.0;
}

// Fills p[0, vocab) with the unnormalized probabilities sample_row draws from (0 for excluded
// tokens) and returns their sum, added in id order. x is [vocab]; temperature > 0.
double warp_impl(const float* x, int64_t vocab, const SampleParams& opt, std::vector<double>& p) {
  float mx = -kInf;
  for (int64_t i = 0; i < vocab; ++i) {
    FTUNE_CHECK(!std::isnan(x[i]), "[sample] NaN logit at token ", i);
    FTUNE_CHECK(x[i] != kInf, "[sample] +inf logit at token ", i,
                " (the softmax is undefined; use temperature 0 for greedy)");
    mx = std::max(mx, x[i]);
  }
  FTUNE_CHECK(mx > -kInf, "[sample] every logit of the row is -inf: nothing to sample");

  // top_k: a threshold on the raw logits (dividing by a positive temperature keeps the order).
  const float thr = opt.top_k > 0 && opt.top_k < vocab ? kth_largest(x, vocab, opt.top_k) : -kInf;
  const double inv_t = 1.0 / opt.temperature;
  p.resize(size_t(vocab));
  double total = 0.0;
  int64_t n = 0;
  float xmin = mx;
  for (int64_t i = 0; i < vocab; ++i) {  // -inf logits give exp(-inf) = 0
    const double q = x[i] >= thr ? std::exp((double(x[i]) - double(mx)) * inv_t) : 0.0;
    p[size_t(i)] = q;
    total += q;
    if (q > 0.0) {
      ++n;
      xmin = std::min(xmin, x[i]);
    }
  }
  if (opt.top_p >= 1.0) return total;
  apply_top_p(x, vocab, double(mx), inv_t, opt.top_p, total, n, (double(xmin) - double(mx)) * inv_t,
              p);
  total = 0.0;
  for (double q : p) total += q;
  return total;
}

}  // namespace

int32_t argmax(const float* x, int64_t vocab) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  return argmax_row(x, vocab);
}

double sample_weights(const float* x, int64_t vocab, const SampleParams& p, std::vector<double>& w) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  FTUNE_CHECK(p.temperature > 0.0, "[sample] sample_weights needs temperature > 0");
  return warp_impl(x, vocab, p, w);
}

int32_t sample_row(const float* logits, int64_t vocab, const SampleParams& p, float u) {
  FTUNE_CHECK(vocab > 0, "[sample] empty vocabulary");
  if (p.temperature == 0.0) return argmax_row(logits, vocab);
  thread_local std::vector<double> w;  // [vocab], reused across calls
  const double target = double(u) * warp_impl(logits, vocab, p, w);
  double cum = 0.0;
  int64_t last = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    if (w[size_t(i)] == 0.0) continue;  // an excluded token can never be drawn
    cum += w[size_t(i)];
    if (cum > target) return int32_t(i);
    last = i;
  }
  return int32_t(last);  // u * total rounded up to the total
}

}  // namespace ftune::kernels::cpu
