// Edge cases of the softmax / loss family (the op table covers values and gradients): bad input,
// large and -inf logits, chunk-size independence of the kernels, jsd endpoints, and that the fused
// cross-entropy never allocates an [N, V] temporary.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "core/allocator.h"
#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"
#include "kernels/cpu/vec_math.h"
#include "kernels/loss.h"

using namespace ftune;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

Tensor i64(std::vector<int64_t> v) { return Tensor::from_vector(v, {int64_t(v.size())}); }

// Expects fn to throw ftune::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, std::vector<std::string> parts) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << parts[0];
  } catch (const Error& e) {
    std::string msg = e.what();
    for (auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

bool all_finite(const Tensor& t) {
  for (double x : t.to_vector<double>())
    if (!std::isfinite(x)) return false;
  return true;
}

// f64 log-softmax of one row, stable.
std::vector<double> log_softmax_row(const std::vector<double>& x, int64_t off, int64_t v) {
  double m = -kInf;
  for (int64_t j = 0; j < v; ++j) m = std::max(m, x[off + j]);
  double s = 0;
  for (int64_t j = 0; j < v; ++j) s += std::exp(x[off + j] - m);
  std::vector<double> out(static_cast<size_t>(v));
  for (int64_t j = 0; j < v; ++j) out[j] = x[off + j] - m - std::log(s);
  return out;
}

// Peak bytes allocated while fn runs, above the level when it started. The allocator keeps one
// global high-water mark, so the current level is first lifted to it with untouched ballast
// (a large aligned_alloc is only address space until written).
int64_t peak_growth(const std::function<void()>& fn) {
  AllocatorStats s0 = cpu_allocator_stats();
  Tensor ballast;
  if (s0.peak_bytes > s0.current_bytes)
    ballast = Tensor::empty({s0.peak_bytes - s0.current_bytes}, DType::b8);
  int64_t base = cpu_allocator_stats().current_bytes;
  fn();
  return cpu_allocator_stats().peak_bytes - base;
}

}  // namespace

TEST(Loss, FastExpIsAccurate) {
  using kernels::cpu::fast_exp;
  double worst = 0;
  for (int64_t i = 0; i <= 2000000; ++i) {
    float x = float(-87.3 + (87.3 + 88.0) * double(i) / 2000000.0);
    double ref = std::exp(double(x));
    worst = std::max(worst, std::fabs(double(fast_exp(x)) - ref) / ref);
  }
  EXPECT_LT(worst, 2e-7) << worst;  // about one float ulp (7.8e-8 measured)
  RecordProperty("fast_exp_max_rel_err", std::to_string(worst));
  EXPECT_EQ(fast_exp(0.0f), 1.0f);
  EXPECT_EQ(fast_exp(-100.0f), 0.0f);
  EXPECT_EQ(fast_exp(-INFINITY), 0.0f);
  EXPECT_EQ(fast_exp(100.0f), INFINITY);
  EXPECT_TRUE(std::isnan(fast_exp(NAN)));
}

TEST(Loss, BadInputThrows) {
  Generator g(1);
  Tensor x = randn({4, 37}, g);
  expect_error([&] { ops::cross_entropy(x, Tensor::zeros({4})); },
               {"[cross_entropy]", "i32 or i64"});
  expect_error([&] { ops::cross_entropy(x, i64({0, 37, 1, 2})); },
               {"[cross_entropy]", "target 37", "row 1", "[0, 37)"});
  expect_error([&] { ops::cross_entropy(x, i64({0, 1, 2, -5})); },
               {"[cross_entropy]", "target -5", "row 3"});
  expect_error([&] { ops::cross_entropy(x, i64({0, 1, -100, 2}), 3); },
               {"[cross_entropy]", "target -100", "row 2", "ignore_index (3)"});
  expect_error([&] { ops::cross_entropy(x, i64({0, 1, 2})); }, {"[cross_entropy]", "targets"});
  expect_error([&] { ops::cross_entropy(x.view({2, 2, 37}), i64({0, 1, 2, 3}).view({4, 1})); },
               {"[cross_entropy]", "[2, 2]"});
  expect_error([&] { ops::cross_entropy(x.to(DType::i64), i64({0, 1, 2, 3})); },
               {"[cross_entropy]", "logits"});
  expect_error([&] { ops::cross_entropy(Tensor::zeros({4, 0}), i64({0, 0, 0, 0})); },
               {"[cross_entropy]", "empty vocabulary"});
  expect_error([&] { ops::token_logprobs(x, i64({0, 1, 99, 2})); },
               {"[token_logprobs]", "target 99", "row 2"});
  expect_error([&] { ops::entropy(Tensor::scalar(1.0)); }, {"[entropy]"});
  expect_error([&] { ops::softmax(Tensor::scalar(1.0)); }, {"[softmax]"});
  expect_error([&] { ops::log_softmax(x.to(DType::i32)); }, {"[log_softmax]"});
  Tensor t = randn({4, 37}, g);
  expect_error([&] { ops::kl_div(x, randn({4, 36}, g), ops::KLKind::forward); },
               {"[kl_div]", "differ in shape"});
  expect_error([&] { ops::kl_div(x, t.to(DType::f64), ops::KLKind::forward); },
               {"[kl_div]", "dtype"});
  for (double temp : {0.0, -1.0, std::nan("")})
    expect_error([&] { ops::kl_div(x, t, ops::KLKind::reverse, 0.5, temp); },
                 {"[kl_div]", "temperature"});
  for (double beta : {-0.1, 1.5})
    expect_error([&] { ops::kl_div(x, t, ops::KLKind::jsd, beta); }, {"[kl_div]", "beta"});
}

TEST(Loss, AllIgnoredMeanIsZeroWithZeroGradient) {
  Generator g(2);
  Tensor x = randn({3, 11}, g, 0.0, 3.0).set_requires_grad(true);
  Tensor loss = ops::cross_entropy(x, i64({-100, -100, -100}));
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  for (double d : x.grad().to_vector<double>()) EXPECT_EQ(d, 0.0);
}

TEST(Loss, NonContiguousLogits) {
  Generator g(3);
  Tensor x = randn({37, 6}, g, 0.0, 3.0).transpose(0, 1);  // a [6, 37] strided view
  Tensor y = randn({37, 6}, g, 0.0, 3.0).transpose(0, 1);
  Tensor t = i64({1, 2, 3, -100, 36, 0});
  auto none = ops::Reduction::none;
  EXPECT_EQ(ops::max_abs_diff(ops::cross_entropy(x, t, -100, none),
                              ops::cross_entropy(x.contiguous(), t, -100, none)),
            0.0);
  EXPECT_EQ(ops::max_abs_diff(ops::kl_div(x, y, ops::KLKind::jsd),
                              ops::kl_div(x.contiguous(), y.contiguous(), ops::KLKind::jsd)),
            0.0);
  EXPECT_EQ(ops::max_abs_diff(ops::softmax(x), ops::softmax(x.contiguous())), 0.0);
}

// Logits around +-1e4: a naive exp overflows, and a float lse rounds to 1e-3; the results must be
// finite and match an f64 evaluation of the same float inputs.
TEST(Loss, LargeLogitsAreStable) {
  const int64_t n = 6, v = 300;
  Generator g(4);
  Tensor base = randn({n, v}, g, 0.0, 3.0);
  std::vector<float> xv = base.to_vector<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < v; ++j) xv[i * v + j] += (i % 2 ? -1e4f : 1e4f);
  Tensor x = Tensor::from_vector(xv, {n, v}).set_requires_grad(true);
  Tensor t = i64({0, 17, 299, -100, 5, 150});
  std::vector<double> xd(xv.begin(), xv.end());
  auto tv = t.to_vector<int64_t>();

  Tensor nll = ops::cross_entropy(x, t, -100, ops::Reduction::none);
  ops::sum(nll).backward();
  ASSERT_TRUE(all_finite(nll));
  ASSERT_TRUE(all_finite(x.grad()));
  auto nv = nll.to_vector<double>();
  auto gv = x.grad().to_vector<double>();
  for (int64_t i = 0; i < n; ++i) {
    auto lp = log_softmax_row(xd, i * v, v);
    EXPECT_NEAR(nv[i], tv[i] < 0 ? 0.0 : -lp[tv[i]], 1e-5) << "row " << i;
    for (int64_t j = 0; j < v; ++j) {
      double ref = tv[i] < 0 ? 0.0 : std::exp(lp[j]) - (j == tv[i] ? 1.0 : 0.0);
      EXPECT_NEAR(gv[i * v + j], ref, 1e-6) << "row " << i << " col " << j;
    }
  }

  Tensor lsm = ops::log_softmax(x.detach());
  Tensor sm = ops::softmax(x.detach());
  Tensor h = ops::entropy(x.detach());
  Tensor tl = ops::token_logprobs(x.detach(), t);
  ASSERT_TRUE(all_finite(lsm) && all_finite(sm) && all_finite(h) && all_finite(tl));
  auto lsv = lsm.to_vector<double>(), smv = sm.to_vector<double>(), hv = h.to_vector<double>();
  for (int64_t i = 0; i < n; ++i) {
    auto lp = log_softmax_row(xd, i * v, v);
    double href = 0;
    for (int64_t j = 0; j < v; ++j) {
      EXPECT_NEAR(lsv[i * v + j], lp[j], 2e-5 * std::max(1.0, std::fabs(lp[j])));
      EXPECT_NEAR(smv[i * v + j], std::exp(lp[j]), 1e-6);
      href -= std::exp(lp[j]) * lp[j];
    }
    EXPECT_NEAR(hv[i], href, 1e-5);
  }

  // Teacher = student shifted by a constant (same distribution) plus small noise.
  Tensor noise = randn({n, v}, g, 0.0, 0.1);
  Tensor teacher = ops::add_scalar(ops::add(x.detach(), noise), 5.0);
  for (auto kind : {ops::KLKind::forward, ops::KLKind::reverse, ops::KLKind::jsd}) {
    Tensor s = x.detach().set_requires_grad(true), tt = teacher.detach().set_requires_grad(true);
    Tensor d = ops::kl_div(s, tt, kind, 0.5, 2.0);
    ops::sum(d).backward();
    ASSERT_TRUE(all_finite(d) && all_finite(s.grad()) && all_finite(tt.grad()));
    // The same divergence from the logits minus their row means (what a stable kernel sees).
    Tensor sc = ops::sub(s.detach(), ops::mean(s.detach(), -1, true));
    Tensor tc = ops::sub(tt.detach(), ops::mean(tt.detach(), -1, true));
    EXPECT_LT(ops::max_abs_diff(d, ops::kl_div(sc, tc, kind, 0.5, 2.0)), 1e-5);
  }
}

// Masked vocabulary entries (-inf logits) carry probability 0: no NaN from 0 * log 0.
TEST(Loss, NegativeInfinityLogitsAreMasked) {
  const int64_t n = 3, v = 9;
  Generator g(5);
  std::vector<double> sv = randn({n, v}, g, 0.0, 2.0).to_vector<double>();
  std::vector<double> tv = randn({n, v}, g, 0.0, 2.0).to_vector<double>();
  for (int64_t i = 0; i < n; ++i) sv[i * v + 2] = tv[i * v + 2] = -kInf;  // masked in both
  sv[0 * v + 4] = -kInf;  // student only: forward KL is infinite there only if the teacher has mass
  tv[1 * v + 6] = -kInf;  // teacher only
  Tensor s = Tensor::from_vector(sv, {n, v}).set_requires_grad(true);
  Tensor t = Tensor::from_vector(tv, {n, v}).set_requires_grad(true);

  Tensor sm = ops::softmax(s.detach());
  EXPECT_EQ(sm.to_vector<double>()[2], 0.0);
  Tensor ce = ops::cross_entropy(s, i64({0, 1, 3}));
  Tensor h = ops::entropy(s);
  ops::add(ce, ops::sum(h)).backward();
  ASSERT_TRUE(all_finite(ce) && all_finite(h) && all_finite(s.grad()));
  EXPECT_EQ(s.grad().to_vector<double>()[2], 0.0);
  // Entropy over the unmasked entries only.
  for (int64_t i = 0; i < n; ++i) {
    std::vector<double> row;
    for (int64_t j = 0; j < v; ++j)
      if (std::isfinite(sv[i * v + j])) row.push_back(sv[i * v + j]);
    auto lp = log_softmax_row(row, 0, int64_t(row.size()));
    double href = 0;
    for (double l : lp) href -= std::exp(l) * l;
    EXPECT_NEAR(h.to_vector<double>()[i], href, 1e-12);
  }

  // Reverse KL(Q || P) and forward KL(P || Q) are finite on rows where the support allows it.
  for (auto kind : {ops::KLKind::forward, ops::KLKind::reverse, ops::KLKind::jsd}) {
    Tensor ss = s.detach().set_requires_grad(true), ttt = t.detach().set_requires_grad(true);
    Tensor d = ops::kl_div(ss, ttt, kind, 0.3, 1.5);
    ops::sum(ops::mul(d, Tensor::from_vector(std::vector<double>{0, 0, 1}, {3}))).backward();
    auto dv = d.to_vector<double>();
    // Row 0: student masks an entry the teacher keeps (forward KL = inf, reverse finite);
    // row 1: teacher masks one the student keeps (reverse KL = inf); row 2: same support.
    if (kind == ops::KLKind::forward) EXPECT_EQ(dv[0], kInf);
    if (kind == ops::KLKind::reverse) EXPECT_EQ(dv[1], kInf);
    EXPECT_TRUE(std::isfinite(dv[2]));
    if (kind == ops::KLKind::jsd) ASSERT_TRUE(all_finite(d));  // M covers both supports
    auto gs = ss.grad().to_vector<double>(), gt = ttt.grad().to_vector<double>();
    for (int64_t j = 0; j < v; ++j)  // row 2 gradients (rows 0, 1 weighted 0)
      EXPECT_TRUE(std::isfinite(gs[2 * v + j]) && std::isfinite(gt[2 * v + j]));
    EXPECT_EQ(gs[2 * v + 2], 0.0);
    EXPECT_EQ(gt[2 * v + 2], 0.0);
  }
}

// The kernels give the same answer for any chunk size: chunk 7 on V = 50 moves the running max
// (and rescales the sums) many times, in particular on the increasing row.
TEST(Loss, KernelsIndependentOfChunkSize) {
  namespace kc = kernels::cpu;
  const int64_t n = 4, v = 50;
  Generator g(6);
  auto run = [&]<class T>(int64_t chunk) {
    std::vector<T> s = randn({n, v}, g, 0.0, 3.0, dtype_of<T>::value).template to_vector<T>();
    std::vector<T> t = randn({n, v}, g, 0.0, 3.0, dtype_of<T>::value).template to_vector<T>();
    for (int64_t j = 0; j < v; ++j) s[j] = t[j] = T(0.3 * double(j));  // row 0 increases
    std::vector<int64_t> tgt{49, 3, -100, 20};
    std::vector<T> out;
    std::vector<T> stat(2 * n), nll(n), h(n), kl(n), kst(6 * n);
    kc::nll_forward<T>(s.data(), tgt.data(), n, v, -100, stat.data(), nll.data(), chunk);
    out.insert(out.end(), nll.begin(), nll.end());
    kc::entropy_forward<T>(s.data(), n, v, stat.data(), h.data(), chunk);
    out.insert(out.end(), h.begin(), h.end());
    kc::row_stats<T>(s.data(), n, v, stat.data(), chunk);
    for (int64_t i = 0; i < n; ++i) out.push_back(stat[2 * i] + stat[2 * i + 1]);  // lse
    for (auto kind : {kernels::Divergence::forward, kernels::Divergence::reverse,
                      kernels::Divergence::jsd}) {
      kc::kl_forward<T>(s.data(), t.data(), n, v, kind, 0.3, 0.5, kl.data(), kst.data(), chunk);
      out.insert(out.end(), kl.begin(), kl.end());
    }
    return out;
  };
  g = Generator(6);
  auto f7 = run.template operator()<float>(7);
  g = Generator(6);
  auto fd = run.template operator()<float>(kernels::kLossChunk);
  g = Generator(6);
  auto d7 = run.template operator()<double>(7);
  g = Generator(6);
  auto dd = run.template operator()<double>(kernels::kLossChunk);
  ASSERT_EQ(f7.size(), dd.size());
  for (size_t i = 0; i < f7.size(); ++i) {
    EXPECT_NEAR(d7[i], dd[i], 1e-12 * std::max(1.0, std::fabs(dd[i]))) << "value " << i;
    EXPECT_NEAR(f7[i], dd[i], 1e-5 * std::max(1.0, std::fabs(dd[i]))) << "value " << i;
    EXPECT_NEAR(fd[i], dd[i], 1e-5 * std::max(1.0, std::fabs(dd[i]))) << "value " << i;
  }
}

// TRL's convention: jsd at beta 0 / 1 is forward / reverse KL, with finite gradients; just inside
// the endpoints the mixture formula itself is close to 0.
TEST(Loss, JsdEndpoints) {
  Generator g(7);
  Tensor s = randn({5, 21}, g, 0.0, 3.0), t = randn({5, 21}, g, 0.0, 3.0);
  EXPECT_EQ(ops::max_abs_diff(ops::kl_div(s, t, ops::KLKind::jsd, 0.0, 2.0),
                              ops::kl_div(s, t, ops::KLKind::forward, 0.5, 2.0)),
            0.0);
  EXPECT_EQ(ops::max_abs_diff(ops::kl_div(s, t, ops::KLKind::jsd, 1.0, 2.0),
                              ops::kl_div(s, t, ops::KLKind::reverse, 0.5, 2.0)),
            0.0);
  for (double beta : {0.0, 1e-9, 1.0 - 1e-9, 1.0}) {
    Tensor ss = s.detach().set_requires_grad(true), tt = t.detach().set_requires_grad(true);
    Tensor d = ops::kl_div(ss, tt, ops::KLKind::jsd, beta);
    ops::sum(d).backward();
    EXPECT_TRUE(all_finite(d) && all_finite(ss.grad()) && all_finite(tt.grad())) << beta;
    if (beta > 0 && beta < 1)
      for (double x : d.to_vector<double>()) EXPECT_LT(x, 1e-6) << beta;
  }
}

// The fused forward never materialises probabilities: peak allocation while it runs stays far
// below one [N, V] float tensor, and the backward allocates about one (the gradient).
TEST(Loss, CrossEntropyDoesNotAllocateNxV) {
  const int64_t n = 64, v = 200000;
  const int64_t nv_bytes = n * v * 4;
  Generator g(8);
  Tensor x = randn({n, v}, g, 0.0, 2.0).set_requires_grad(true);
  Tensor t = randint({n}, g, 0, v);
  Tensor loss;
  int64_t fwd = peak_growth([&] { loss = ops::cross_entropy(x, t); });
  EXPECT_LT(fwd, nv_bytes) << "forward peak growth " << fwd << " bytes";
  // The op's backward alone (run_backward may also copy the gradient into the leaf's .grad).
  std::vector<Tensor> grads;
  int64_t bwd = peak_growth([&] { grads = loss.grad_fn()->backward(Tensor::scalar(1.0), {true}); });
  EXPECT_LT(bwd, nv_bytes + nv_bytes / 8) << "backward peak growth " << bwd << " bytes";
  ASSERT_EQ(grads.size(), 1u);
  ASSERT_EQ(grads[0].shape(), x.shape());
  std::printf("[ cross_entropy N=%lld V=%lld: forward peak +%lld B, backward peak +%lld B ]\n",
              (long long)n, (long long)v, (long long)fwd, (long long)bwd);

  // The other fused forwards, without recording; softmax shows the measure sees an [N, V] output.
  Tensor y = randn({n, v}, g, 0.0, 2.0);
  NoGradGuard ng;
  EXPECT_GE(peak_growth([&] { ops::softmax(x); }), nv_bytes);
  EXPECT_LT(peak_growth([&] { ops::token_logprobs(x, t); }), nv_bytes);
  EXPECT_LT(peak_growth([&] { ops::entropy(x); }), nv_bytes);
  EXPECT_LT(peak_growth([&] { ops::kl_div(x, y, ops::KLKind::jsd); }), nv_bytes);
}

// linear_cross_entropy against cross_entropy(linear(h, w)) in f64: loss and both gradients, over
// chunk sizes that do and do not divide the rows (1, 7, all), mean and sum, ignored rows, a
// leading batch dim, an upstream gradient other than 1 (the backward's scaling), and only one
// of the inputs needing a gradient.
TEST(LinearCrossEntropy, MatchesTheComposition) {
  Generator g(11);
  const int64_t B = 3, T = 5, d = 6, V = 13;
  Tensor h0 = randn({B, T, d}, g, 0.0, 1.0).to(DType::f64);
  Tensor w0 = randn({V, d}, g, 0.0, 1.0).to(DType::f64);
  std::vector<int64_t> tv;
  for (int64_t i = 0; i < B * T; ++i) tv.push_back(i % 4 == 3 ? -100 : (i * 5) % V);
  Tensor t = i64(tv);
  for (auto red : {ops::Reduction::mean, ops::Reduction::sum})
    for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(7), B * T})
      for (double upstream : {1.0, 0.37}) {
        SCOPED_TRACE("chunk " + std::to_string(chunk) + " upstream " + std::to_string(upstream) +
                     (red == ops::Reduction::sum ? " sum" : " mean"));
        Tensor h1 = h0.clone().set_requires_grad(true), w1 = w0.clone().set_requires_grad(true);
        Tensor ref = ops::cross_entropy(ops::linear(h1, w1).view({B * T, V}), t, -100, red);
        ops::mul_scalar(ref, upstream).backward();
        Tensor h2 = h0.clone().set_requires_grad(true), w2 = w0.clone().set_requires_grad(true);
        Tensor got = ops::linear_cross_entropy(h2, w2, t, -100, red, chunk);
        ops::mul_scalar(got, upstream).backward();
        EXPECT_NEAR(got.item(), ref.item(), 1e-12 * std::max(1.0, std::abs(ref.item())));
        EXPECT_LT(ops::max_abs_diff(h2.grad(), h1.grad()), 1e-12);
        EXPECT_LT(ops::max_abs_diff(w2.grad(), w1.grad()), 1e-12);
        EXPECT_EQ(h2.grad().shape(), h0.shape());
      }
  // Only the weight, then only the hidden states, need a gradient.
  Tensor wa = w0.clone().set_requires_grad(true);
  ops::linear_cross_entropy(h0, wa, t, -100, ops::Reduction::sum, 4).backward();
  Tensor wb = w0.clone().set_requires_grad(true);
  ops::cross_entropy(ops::linear(h0, wb).view({B * T, V}), t, -100, ops::Reduction::sum).backward();
  EXPECT_LT(ops::max_abs_diff(wa.grad(), wb.grad()), 1e-12);
  Tensor ha = h0.clone().set_requires_grad(true);
  ops::linear_cross_entropy(ha, w0, t, -100, ops::Reduction::sum, 4).backward();
  Tensor hb = h0.clone().set_requires_grad(true);
  ops::cross_entropy(ops::linear(hb, w0).view({B * T, V}), t, -100, ops::Reduction::sum).backward();
  EXPECT_LT(ops::max_abs_diff(ha.grad(), hb.grad()), 1e-12);
  // No gradient at all (evaluation): the loss alone.
  EXPECT_NEAR(ops::linear_cross_entropy(h0, w0, t, -100, ops::Reduction::mean, 2).item(),
              ops::cross_entropy(ops::linear(h0, w0).view({B * T, V}), t).item(), 1e-12);
}

// Evaluation's token accuracy by chunks: each row's argmax over the vocabulary is argmax of the
// whole logits (ignored rows too), with or without a gradient being formed, and the loss is
// unchanged by asking for it. Near-ties broken by the last bits: checked in f64.
TEST(LinearCrossEntropy, ArgmaxOfEachRowByChunks) {
  Generator g(14);
  const int64_t B = 3, T = 7, d = 6, V = 29;
  Tensor h0 = randn({B, T, d}, g, 0.0, 1.0).to(DType::f64);
  Tensor w0 = randn({V, d}, g, 0.0, 1.0).to(DType::f64);
  std::vector<int64_t> tv;
  for (int64_t i = 0; i < B * T; ++i) tv.push_back(i % 5 == 2 ? -100 : (i * 3) % V);
  Tensor t = i64(tv);
  const std::vector<int64_t> want =
      ops::argmax(ops::linear(h0, w0).view({B * T, V}), -1).to_vector<int64_t>();
  for (int64_t chunk : {int64_t(0), int64_t(1), int64_t(4), B * T})
    for (bool grad : {false, true}) {
      SCOPED_TRACE("chunk " + std::to_string(chunk) + (grad ? " with gradient" : ""));
      Tensor h = h0.clone().set_requires_grad(grad);
      Tensor am;
      Tensor loss = ops::linear_cross_entropy(h, w0, t, -100, ops::Reduction::sum, chunk, &am);
      EXPECT_EQ(am.dtype(), DType::i64);
      EXPECT_EQ(am.shape(), (Shape{B * T}));
      EXPECT_EQ(am.to_vector<int64_t>(), want);
      EXPECT_NEAR(loss.item(),
                  ops::linear_cross_entropy(h0, w0, t, -100, ops::Reduction::sum, chunk).item(),
                  1e-12 * std::abs(loss.item()));
      if (grad) loss.backward();
    }
}

// A tied LM head: the weight is also the embedding the hidden states came from, and two
// micro-batches accumulate (upstream gradients 0.25 and 1.25): the weight's gradient sums both
// uses, as through the composition.
TEST(LinearCrossEntropy, TiedWeightAndAccumulatedMicroBatches) {
  Generator g(15);
  const int64_t N = 9, d = 5, V = 11;
  Tensor w0 = randn({V, d}, g, 0.0, 1.0).to(DType::f64);
  Tensor p0 = randn({d, d}, g, 0.0, 0.5).to(DType::f64);  // a layer between embedding and head
  std::vector<int64_t> ids_v, tv;
  for (int64_t i = 0; i < N; ++i) {
    ids_v.push_back((i * 3) % V);
    tv.push_back(i == 4 ? -100 : (i * 7 + 1) % V);
  }
  Tensor ids = i64(ids_v), t = i64(tv);
  auto run = [&](bool fused) {
    Tensor w = w0.clone().set_requires_grad(true), p = p0.clone().set_requires_grad(true);
    for (double up : {0.25, 1.25}) {
      Tensor h = ops::matmul(ops::embedding(w, ids), p);
      Tensor loss = fused ? ops::linear_cross_entropy(h, w, t, -100, ops::Reduction::sum, 4)
                          : ops::cross_entropy(ops::linear(h, w), t, -100, ops::Reduction::sum);
      ops::mul_scalar(loss, up).backward();
    }
    return std::make_pair(w.grad(), p.grad());
  };
  auto a = run(true), b = run(false);
  EXPECT_LT(ops::max_abs_diff(a.first, b.first), 1e-12);
  EXPECT_LT(ops::max_abs_diff(a.second, b.second), 1e-12);
}

TEST(LinearCrossEntropy, AllIgnoredAndEmpty) {
  Generator g(12);
  Tensor h = randn({4, 3}, g, 0.0, 1.0).set_requires_grad(true);
  Tensor w = randn({5, 3}, g, 0.0, 1.0).set_requires_grad(true);
  Tensor loss = ops::linear_cross_entropy(h, w, i64({-100, -100, -100, -100}), -100,
                                          ops::Reduction::mean, 3);
  EXPECT_EQ(loss.item(), 0.0);
  loss.backward();
  for (double x : h.grad().to_vector<double>()) EXPECT_EQ(x, 0.0);
  for (double x : w.grad().to_vector<double>()) EXPECT_EQ(x, 0.0);
  Tensor he = Tensor::zeros({0, 3}, DType::f32).set_requires_grad(true);
  Tensor we = randn({5, 3}, g, 0.0, 1.0).set_requires_grad(true);
  Tensor le = ops::linear_cross_entropy(he, we, Tensor::zeros({0}, DType::i64), -100,
                                        ops::Reduction::sum);
  EXPECT_EQ(le.item(), 0.0);
  le.backward();
  for (double x : we.grad().to_vector<double>()) EXPECT_EQ(x, 0.0);
}

// The logits are never whole: with 4-row chunks of a [64, V] problem the peak stays near one
// chunk's logits and gradient, far below the [64, V] logits the composition allocates.
TEST(LinearCrossEntropy, NeverAllocatesTheWholeLogits) {
  Generator g(13);
  const int64_t N = 64, d = 8, V = 4096;
  Tensor h = randn({N, d}, g, 0.0, 1.0).set_requires_grad(true);
  Tensor w = randn({V, d}, g, 0.0, 1.0).set_requires_grad(true);
  std::vector<int64_t> tv(N);
  for (int64_t i = 0; i < N; ++i) tv[i] = (i * 37) % V;
  Tensor t = i64(tv);
  const int64_t logits_bytes = N * V * 4;
  const int64_t grown = peak_growth([&] {
    ops::linear_cross_entropy(h, w, t, -100, ops::Reduction::mean, 4).backward();
  });
  // dW [V, d] (and its handover) plus a few 4-row chunks: well under the whole logits.
  EXPECT_LT(grown, logits_bytes / 2) << grown << " bytes";
}

TEST(LinearCrossEntropy, BadInputThrows) {
  Generator g(14);
  Tensor h = randn({4, 3}, g, 0.0, 1.0), w = randn({5, 3}, g, 0.0, 1.0);
  Tensor t = i64({0, 1, 2, 3});
  expect_error([&] { ops::linear_cross_entropy(h, randn({5, 4}, g, 0.0, 1.0), t); },
               {"[linear_cross_entropy]", "weight"});
  expect_error([&] { ops::linear_cross_entropy(h, w, i64({0, 1, 9, 3})); },
               {"[linear_cross_entropy]", "target 9", "out of range"});
  expect_error([&] { ops::linear_cross_entropy(h, w, t, -100, ops::Reduction::none); },
               {"[linear_cross_entropy]", "reduction none"});
  expect_error([&] { ops::linear_cross_entropy(h, w.to(DType::f64), t); },
               {"[linear_cross_entropy]", "dtype"});
  Tensor hr = h.clone().set_requires_grad(true);
  Tensor loss = ops::linear_cross_entropy(hr, w, t);
  loss.backward(Tensor(), /*retain_graph=*/true);
  expect_error([&] { loss.backward(); }, {"[linear_cross_entropy]", "retain_graph"});
}
