// Next-token sampling (models/sampling.h): greedy tie-breaking, the warpers against an independent
// transcription of transformers' TemperatureLogitsWarper / TopKLogitsWarper / TopPLogitsWarper,
// empirical frequencies, excluded tokens, determinism and bad input.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include "core/error.h"
#include "core/rng.h"
#include "models/sampling.h"

namespace ftune {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

std::vector<float> random_logits(int64_t v, uint32_t seed, float scale = 2.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<float> x(static_cast<size_t>(v));
  for (auto& e : x) e = nd(rng);
  return x;
}

// transformers' warpers, written out the way the Python does them (f64, full sorts):
// scores / T; scores < topk(scores, k)[-1] -> -inf; ascending sort, cumsum(softmax) <= 1 - top_p
// removed except the last (most probable) one; then softmax.
std::vector<double> hf_reference(const std::vector<float>& logits, double t, int64_t k, double p) {
  const size_t v = logits.size();
  std::vector<double> s(v);
  for (size_t i = 0; i < v; ++i) s[i] = double(logits[i]) / t;
  const double ninf = -std::numeric_limits<double>::infinity();
  if (k > 0) {
    std::vector<double> sorted = s;
    std::sort(sorted.begin(), sorted.end(), std::greater<double>());
    const double kth = sorted[size_t(std::min<int64_t>(k, int64_t(v)) - 1)];
    for (auto& e : s)
      if (e < kth) e = ninf;
  }
  auto softmax = [&](const std::vector<double>& z) {
    double m = *std::max_element(z.begin(), z.end()), tot = 0;
    std::vector<double> o(z.size());
    for (size_t i = 0; i < z.size(); ++i) tot += (o[i] = z[i] == ninf ? 0.0 : std::exp(z[i] - m));
    for (auto& e : o) e /= tot;
    return o;
  };
  if (p < 1.0) {
    std::vector<double> pr = softmax(s);
    std::vector<size_t> asc(v);
    std::iota(asc.begin(), asc.end(), size_t(0));
    // ascending by probability; among equals the higher id ranks lower (ftune's tie rule)
    std::sort(asc.begin(), asc.end(),
              [&](size_t a, size_t b) { return pr[a] < pr[b] || (pr[a] == pr[b] && a > b); });
    double cum = 0;
    for (size_t j = 0; j + 1 < v; ++j) {
      cum += pr[asc[j]];
      if (cum <= 1.0 - p) s[asc[j]] = ninf;
    }
  }
  return softmax(s);
}

TEST(Sampling, GreedyTiesGoToTheLowestId) {
  SamplingOptions g;  // temperature 0
  std::vector<float> x = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f};
  EXPECT_EQ(sample_row(x.data(), 5, g, 0.99f), 1);
  std::vector<float> all_same(7, 0.5f);
  EXPECT_EQ(sample_row(all_same.data(), 7, g, 0.5f), 0);
  std::vector<float> all_ninf(4, -kInf);
  EXPECT_EQ(sample_row(all_ninf.data(), 4, g, 0.5f), 0);  // torch.argmax gives 0 too
  std::vector<float> inf_wins = {1.0f, kInf, kInf, 0.0f};
  EXPECT_EQ(sample_row(inf_wins.data(), 4, g, 0.5f), 1);
  std::vector<float> last = {-1.0f, -1.0f, 0.0f};
  EXPECT_EQ(sample_row(last.data(), 3, g, 0.5f), 2);
}

TEST(Sampling, TopKOneAndTinyTopPAreGreedy) {
  for (uint32_t seed = 0; seed < 50; ++seed) {
    auto x = random_logits(300, seed);
    const int32_t best = int32_t(std::max_element(x.begin(), x.end()) - x.begin());
    for (double t : {0.1, 1.0, 5.0}) {
      for (float u : {0.0f, 0.3f, 0.999999f}) {
        SamplingOptions k1{t, 1, 1.0, 0};
        EXPECT_EQ(sample_row(x.data(), 300, k1, u), best);
        SamplingOptions p0{t, 0, 1e-9, 0};
        EXPECT_EQ(sample_row(x.data(), 300, p0, u), best);
        SamplingOptions pz{t, 0, 0.0, 0};  // top_p 0 still keeps one token
        EXPECT_EQ(sample_row(x.data(), 300, pz, u), best);
      }
    }
  }
}

TEST(Sampling, TopKKeepsTiesAtTheKthValueLikeTransformers) {
  std::vector<float> x = {0.0f, 2.0f, 1.0f, 2.0f, 1.0f, -1.0f};
  SamplingOptions k1{1.0, 1, 1.0, 0};
  auto d = sampling_distribution(x.data(), 6, k1);
  EXPECT_DOUBLE_EQ(d[1], 0.5);
  EXPECT_DOUBLE_EQ(d[3], 0.5);
  SamplingOptions k3{1.0, 3, 1.0, 0};  // the 3rd largest is 1.0, held by two tokens
  d = sampling_distribution(x.data(), 6, k3);
  EXPECT_EQ(d[0], 0.0);
  EXPECT_EQ(d[5], 0.0);
  EXPECT_GT(d[2], 0.0);
  EXPECT_GT(d[4], 0.0);
  auto ref = hf_reference(x, 1.0, 3, 1.0);
  for (size_t i = 0; i < 6; ++i) EXPECT_NEAR(d[i], ref[i], 1e-15) << i;
}

TEST(Sampling, DistributionMatchesTheTransformersWarpers) {
  std::mt19937 rng(7);
  int checked = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t v = 1 + int64_t(rng() % 200);
    auto x = random_logits(v, uint32_t(trial), 0.5f + float(rng() % 40) / 10.0f);
    if (trial % 5 == 0 && v > 1) x[rng() % size_t(v)] = -kInf;  // masked tokens are never drawn
    if (trial % 7 == 0) x[rng() % size_t(v)] = x[rng() % size_t(v)];  // ties
    const double t = std::array<double, 4>{0.3, 0.7, 1.0, 2.5}[rng() % 4];
    const int64_t k = std::array<int64_t, 5>{0, 1, 5, 50, 1000}[rng() % 5];
    const double p = std::array<double, 6>{1.0, 0.95, 0.9, 0.5, 0.1, 0.0}[rng() % 6];
    SamplingOptions opt{t, k, p, 0};
    auto d = sampling_distribution(x.data(), v, opt);
    auto ref = hf_reference(x, t, k, p);
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) {
      sum += d[size_t(i)];
      ASSERT_NEAR(d[size_t(i)], ref[size_t(i)], 1e-12)
          << "trial " << trial << " token " << i << " v " << v << " t " << t << " k " << k << " p "
          << p;
      if (ref[size_t(i)] == 0.0) ASSERT_EQ(d[size_t(i)], 0.0);
    }
    EXPECT_NEAR(sum, 1.0, 1e-12);
    ++checked;
  }
  EXPECT_EQ(checked, 400);
}

// The top_p prefix search sorts a growing prefix (64, 256, ...): a flat distribution needs many
// tokens, a peaked one few.
TEST(Sampling, TopPOnLargeFlatAndPeakedVocabularies) {
  for (float scale : {0.01f, 0.5f, 8.0f}) {
    auto x = random_logits(5000, 3, scale);
    for (double p : {0.999, 0.9, 0.3}) {
      SamplingOptions opt{1.0, 0, p, 0};
      auto d = sampling_distribution(x.data(), 5000, opt);
      auto ref = hf_reference(x, 1.0, 0, p);
      int64_t kept = 0;
      for (size_t i = 0; i < 5000; ++i) {
        ASSERT_NEAR(d[i], ref[i], 1e-12) << "scale " << scale << " p " << p << " token " << i;
        kept += d[i] > 0;
      }
      if (scale == 0.01f && p == 0.999) EXPECT_GT(kept, 4000);
    }
  }
}

// Where thousands of candidates share one histogram bucket the crossing bucket is ranked by the
// quickselect: many equal logits, and a tight crowd far below one outlier.
TEST(Sampling, TopPWithCrowdedBuckets) {
  std::vector<float> equal(3000);
  for (size_t i = 0; i < equal.size(); ++i) equal[i] = float(i % 3);
  std::vector<float> crowd = random_logits(5000, 17, 0.001f);
  crowd[1234] = 5.0f;
  for (const auto* x : {&equal, &crowd}) {
    for (double p : {0.02, 0.2, 0.5, 0.9, 0.999}) {
      SamplingOptions opt{1.0, 0, p, 0};
      auto d = sampling_distribution(x->data(), int64_t(x->size()), opt);
      auto ref = hf_reference(*x, 1.0, 0, p);
      for (size_t i = 0; i < x->size(); ++i)
        ASSERT_NEAR(d[i], ref[i], 1e-12) << "p " << p << " token " << i;
    }
  }
  // ten equal logits: top_p 0.35 keeps the four lowest ids
  std::vector<float> ten(10, 1.0f);
  auto d = sampling_distribution(ten.data(), 10, SamplingOptions{1.0, 0, 0.35, 0});
  for (size_t i = 0; i < 10; ++i) EXPECT_EQ(d[i], i < 4 ? 0.25 : 0.0) << i;
}

// Chi-square of n draws against the expected distribution, over the tokens that can be drawn.
double chi_square(const std::vector<int64_t>& counts, const std::vector<double>& expected,
                  int64_t n) {
  double chi2 = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    if (expected[i] == 0.0) continue;
    const double e = expected[i] * double(n);
    chi2 += (double(counts[i]) - e) * (double(counts[i]) - e) / e;
  }
  return chi2;
}

TEST(Sampling, EmpiricalFrequenciesMatchTheSoftmax) {
  const int64_t v = 10, n = 40000;
  auto x = random_logits(v, 11, 1.0f);
  struct Case {
    double t;
    int64_t k;
    double p;
  };
  for (Case c : {Case{1.0, 0, 1.0}, Case{0.6, 0, 1.0}, Case{1.7, 4, 1.0}, Case{1.0, 0, 0.8},
                 Case{0.8, 6, 0.7}}) {
    SamplingOptions opt{c.t, c.k, c.p, 1234};
    auto expected = hf_reference(x, c.t, c.k, c.p);
    std::vector<int64_t> counts(size_t(v), 0);
    // every draw through sample_tokens: the stream varies over rows, the index over steps
    Tensor lg = Tensor::from_vector(std::vector<float>(x), {1, v});
    for (int64_t i = 0; i < n; ++i) {
      std::vector<uint64_t> stream = {uint64_t(i % 97)};
      int32_t tok = sample_tokens(lg, opt, uint64_t(i / 97), stream)[0];
      ASSERT_GE(tok, 0);
      ASSERT_LT(tok, v);
      ASSERT_GT(expected[size_t(tok)], 0.0) << "drew excluded token " << tok;
      ++counts[size_t(tok)];
    }
    int64_t df = -1;
    for (double e : expected) df += e > 0;
    // The 1e-6 tail of chi-square with <= 9 degrees of freedom is below 45: a wrong temperature
    // or cut gives thousands here.
    EXPECT_LT(chi_square(counts, expected, n), 45.0)
        << "t " << c.t << " k " << c.k << " p " << c.p << " df " << df;
  }
}

TEST(Sampling, ExcludedTokensAreNeverDrawn) {
  for (uint32_t seed = 0; seed < 20; ++seed) {
    auto x = random_logits(64, 100 + seed, 3.0f);
    x[5] = -kInf;
    for (auto [k, p] : {std::pair<int64_t, double>{8, 1.0}, {0, 0.6}, {20, 0.9}}) {
      SamplingOptions opt{1.3, k, p, seed};
      auto ref = hf_reference(x, 1.3, k, p);
      std::set<int32_t> allowed;
      for (size_t i = 0; i < ref.size(); ++i)
        if (ref[i] > 0) allowed.insert(int32_t(i));
      // the extreme uniforms: 0 and the largest 24-bit value below 1
      for (float u : {0.0f, 1.0f - 1.0f / 16777216.0f}) {
        EXPECT_TRUE(allowed.count(sample_row(x.data(), 64, opt, u)));
      }
      for (uint64_t step = 0; step < 500; ++step) {
        float u = philox_uniform(seed, 0, step);
        int32_t tok = sample_row(x.data(), 64, opt, u);
        ASSERT_TRUE(allowed.count(tok)) << "token " << tok << " k " << k << " p " << p;
      }
    }
  }
}

TEST(Sampling, SmallTemperaturesApproachGreedy) {
  auto x = random_logits(1000, 5);
  const int32_t best = int32_t(std::max_element(x.begin(), x.end()) - x.begin());
  for (double t : {1e-3, 1e-8, 1e-30, 1e-300}) {
    SamplingOptions opt{t, 0, 1.0, 0};
    for (uint64_t step = 0; step < 50; ++step)
      EXPECT_EQ(sample_row(x.data(), 1000, opt, philox_uniform(0, 0, step)), best) << t;
  }
  // tied maxima share the mass evenly instead of collapsing onto one of them
  std::vector<float> tie = {0.0f, 3.0f, 1.0f, 3.0f};
  SamplingOptions cold{1e-6, 0, 1.0, 0};
  auto d = sampling_distribution(tie.data(), 4, cold);
  EXPECT_DOUBLE_EQ(d[1], 0.5);
  EXPECT_DOUBLE_EQ(d[3], 0.5);
  EXPECT_EQ(sample_row(tie.data(), 4, cold, 0.25f), 1);
  EXPECT_EQ(sample_row(tie.data(), 4, cold, 0.75f), 3);
}

TEST(Sampling, RowsAreIndependentOfTheBatchAndOfThreads) {
  const int64_t b = 6, v = 500;
  std::vector<float> all;
  for (int64_t r = 0; r < b; ++r) {
    auto x = random_logits(v, uint32_t(40 + r));
    all.insert(all.end(), x.begin(), x.end());
  }
  Tensor lg = Tensor::from_vector(all, {b, v});
  SamplingOptions opt{0.9, 40, 0.95, 77};
  const int saved = omp_get_max_threads();
  for (uint64_t step : {0ull, 1ull, 12345ull}) {
    omp_set_num_threads(1);
    auto one = sample_tokens(lg, opt, step);
    omp_set_num_threads(2);
    auto two = sample_tokens(lg, opt, step);
    EXPECT_EQ(one, two);
    for (int64_t r = 0; r < b; ++r) {
      // row r alone, on stream r, gives the same token
      uint64_t stream = uint64_t(r);
      auto alone = sample_tokens(lg.slice(0, r, r + 1), opt, step, {&stream, 1});
      EXPECT_EQ(alone[0], one[size_t(r)]) << "row " << r << " step " << step;
      EXPECT_EQ(one[size_t(r)],
                sample_row(all.data() + r * v, v, opt, philox_uniform(77, uint64_t(r), step)));
    }
  }
  omp_set_num_threads(saved);
  // explicit streams reorder the draws with the rows
  std::vector<uint64_t> streams = {5, 4, 3, 2, 1, 0};
  auto rev = sample_tokens(lg, opt, 3, streams);
  for (int64_t r = 0; r < b; ++r)
    EXPECT_EQ(rev[size_t(r)],
              sample_row(all.data() + r * v, v, opt, philox_uniform(77, uint64_t(5 - r), 3)));
}

TEST(Sampling, SeedsAndStepsChangeTheDraws) {
  auto x = random_logits(50, 9, 0.2f);  // nearly flat: draws spread out
  Tensor lg = Tensor::from_vector(x, {1, 50});
  std::set<int32_t> seen_seed, seen_step;
  for (uint64_t s = 0; s < 40; ++s) {
    seen_seed.insert(sample_tokens(lg, SamplingOptions{1.0, 0, 1.0, s}, 0)[0]);
    seen_step.insert(sample_tokens(lg, SamplingOptions{1.0, 0, 1.0, 0}, s)[0]);
  }
  EXPECT_GT(seen_seed.size(), 10u);
  EXPECT_GT(seen_step.size(), 10u);
  // and the same inputs give the same token
  EXPECT_EQ(sample_tokens(lg, SamplingOptions{1.0, 0, 1.0, 3}, 8),
            sample_tokens(lg, SamplingOptions{1.0, 0, 1.0, 3}, 8));
}

TEST(Sampling, OtherFloatDtypesAndStridedLogits) {
  auto x = random_logits(2 * 30, 21);
  Tensor lg = Tensor::from_vector(x, {2, 30});
  SamplingOptions opt{1.0, 10, 0.9, 4};
  auto ref = sample_tokens(lg, opt, 2);
  EXPECT_EQ(sample_tokens(lg.to(DType::f64), opt, 2), ref);  // f32 values survive f64 exactly
  // a non-contiguous view: [30, 2] transposed
  Tensor t = lg.transpose(0, 1).contiguous().transpose(0, 1);
  ASSERT_FALSE(t.is_contiguous());
  EXPECT_EQ(sample_tokens(t, opt, 2), ref);
}

TEST(Sampling, BadInputThrows) {
  std::vector<float> x = {0.0f, 1.0f, 2.0f};
  EXPECT_THROW(sample_row(x.data(), 3, SamplingOptions{-1.0, 0, 1.0, 0}, 0.5f), Error);
  EXPECT_THROW((SamplingOptions{1.0, -1, 1.0, 0}.validate()), Error);
  EXPECT_THROW((SamplingOptions{1.0, 0, 1.5, 0}.validate()), Error);
  EXPECT_THROW((SamplingOptions{1.0, 0, -0.1, 0}.validate()), Error);
  EXPECT_THROW((SamplingOptions{std::nan(""), 0, 1.0, 0}.validate()), Error);
  EXPECT_THROW((SamplingOptions{1.0, 0, std::nan(""), 0}.validate()), Error);
  std::vector<float> nan = {0.0f, std::nanf(""), 1.0f};
  EXPECT_THROW(sample_row(nan.data(), 3, SamplingOptions{}, 0.5f), Error);
  EXPECT_THROW(sample_row(nan.data(), 3, SamplingOptions{1.0, 0, 1.0, 0}, 0.5f), Error);
  std::vector<float> pinf = {0.0f, kInf, 1.0f};
  EXPECT_THROW(sample_row(pinf.data(), 3, SamplingOptions{1.0, 0, 1.0, 0}, 0.5f), Error);
  std::vector<float> ninf(3, -kInf);
  EXPECT_THROW(sample_row(ninf.data(), 3, SamplingOptions{1.0, 0, 1.0, 0}, 0.5f), Error);

  Tensor lg = Tensor::from_vector(x, {3});
  EXPECT_THROW(sample_tokens(lg, SamplingOptions{}, 0), Error);  // not [B, V]
  EXPECT_THROW(sample_tokens(Tensor::zeros({2, 3}, DType::i64), SamplingOptions{}, 0), Error);
  EXPECT_THROW(sample_tokens(Tensor::zeros({2, 0}), SamplingOptions{}, 0), Error);
  std::vector<uint64_t> streams = {0, 1, 2};
  EXPECT_THROW(sample_tokens(Tensor::zeros({2, 3}), SamplingOptions{}, 0, streams), Error);
  // the failing row is named
  Tensor bad = Tensor::from_vector(std::vector<float>{0, 1, 2, 0, std::nanf(""), 1}, {2, 3});
  try {
    sample_tokens(bad, SamplingOptions{1.0, 0, 1.0, 0}, 0);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("(row 1)"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("NaN"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ftune
