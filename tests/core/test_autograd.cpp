#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "core/ops.h"
#include "core/autograd.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "tests/profiler_model.h"

using namespace ftune;

namespace {
Tensor vec(std::vector<double> v) { return Tensor::from_vector(v, {int64_t(v.size())}); }
}  // namespace

TEST(Autograd, SharedSubgraphAccumulatesBothPaths) {
  // y = sum(h * h + h), h = 3x: dy/dx = 3 * (2h + 1)
  Tensor x = vec({1.0, -2.0}).set_requires_grad(true);
  Tensor h = ops::mul_scalar(x, 3.0);
  Tensor y = ops::sum(ops::add(ops::mul(h, h), h));
  y.backward();
  auto g = x.grad().to_vector<double>();
  EXPECT_DOUBLE_EQ(g[0], 3.0 * (2 * 3.0 + 1));
  EXPECT_DOUBLE_EQ(g[1], 3.0 * (2 * -6.0 + 1));
}

TEST(Autograd, SameTensorTwiceAsInput) {
  Tensor x = vec({2.0, 5.0}).set_requires_grad(true);
  ops::sum(ops::mul(x, x)).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{4.0, 10.0}));
}

TEST(Autograd, AccumulatesAcrossBackwardCallsUntilZeroed) {
  Tensor x = vec({1.0, 2.0}).set_requires_grad(true);
  for (int i = 0; i < 3; ++i) ops::sum(ops::mul_scalar(x, 2.0)).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{6.0, 6.0}));
  x.zero_grad();
  ops::sum(x).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{1.0, 1.0}));
}

TEST(Autograd, GradientIsNotAliasedWithOtherGradients) {
  // add's backward hands the same tensor to both inputs; accumulating into one must not change the other.
  Tensor a = vec({1.0}).set_requires_grad(true);
  Tensor b = vec({1.0}).set_requires_grad(true);
  ops::sum(ops::add(a, b)).backward();
  ops::sum(ops::mul_scalar(a, 5.0)).backward();
  EXPECT_DOUBLE_EQ(a.grad().item(), 6.0);
  EXPECT_DOUBLE_EQ(b.grad().item(), 1.0);
}

TEST(Autograd, ReadyHooksFireOncePerPassWithCompleteGradient) {
  Tensor w1 = vec({1.0, 1.0}).set_requires_grad(true);
  Tensor w2 = vec({2.0, 2.0}).set_requires_grad(true);
  std::vector<std::string> order;
  std::vector<double> seen;
  w1.add_ready_hook([&](const Tensor& g) {
    order.push_back("w1");
    seen.push_back(g.to_vector<double>()[0]);
  });
  w2.add_ready_hook([&](const Tensor& g) { order.push_back("w2"); });
  // w1 is used twice (early and late); its hook must fire after both contributions.
  Tensor h = ops::mul(w1, w2);     // layer 1
  Tensor o = ops::mul(h, w1);      // layer 2 uses w1 again
  ops::sum(o).backward();          // d/dw1 = 2*w1*w2 = 4
  ASSERT_EQ(order.size(), 2u);
  EXPECT_DOUBLE_EQ(seen[0], 4.0);
  // Reverse order of use: w2 (only in layer 1) completes after layer 2's w1 contribution,
  // and w1 completes last-used-first... both fire exactly once.
  EXPECT_EQ(std::count(order.begin(), order.end(), "w1"), 1);
  EXPECT_EQ(std::count(order.begin(), order.end(), "w2"), 1);
}

TEST(Autograd, HooksFireInReverseLayerOrder) {
  // A 3-layer chain: the last layer's parameter is ready first (what the DP reducer relies on).
  std::vector<Tensor> ws;
  std::vector<int> order;
  for (int i = 0; i < 3; ++i) {
    ws.push_back(vec({0.5, 0.5}).set_requires_grad(true));
    ws.back().add_ready_hook([&order, i](const Tensor&) { order.push_back(i); });
  }
  Tensor h = vec({1.0, 2.0});
  for (auto& w : ws) h = ops::tanh(ops::mul(h, w));
  ops::sum(h).backward();
  EXPECT_EQ(order, (std::vector<int>{2, 1, 0}));
}

TEST(Autograd, NoGradRecordsNothing) {
  Tensor x = vec({1.0}).set_requires_grad(true);
  {
    NoGradGuard ng;
    Tensor y = ops::mul_scalar(x, 2.0);
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
  }
  EXPECT_TRUE(grad_enabled());
  Tensor y = ops::mul_scalar(x, 2.0);
  EXPECT_TRUE(y.requires_grad());
}

TEST(Autograd, DetachStopsGradient) {
  Tensor x = vec({3.0}).set_requires_grad(true);
  Tensor y = ops::add(ops::mul(x.detach(), x), x);  // d/dx = x + 1 with the detached factor constant
  ops::sum(y).backward();
  EXPECT_DOUBLE_EQ(x.grad().item(), 4.0);
}

TEST(Autograd, SecondBackwardWithoutRetainThrows) {
  Tensor x = vec({1.0}).set_requires_grad(true);
  Tensor y = ops::sum(ops::exp(x));
  y.backward(Tensor(), /*retain_graph=*/true);
  y.backward();
  EXPECT_NEAR(x.grad().item(), 2 * std::exp(1.0), 1e-12);
  EXPECT_THROW(y.backward(), Error);
}

TEST(Autograd, ViewsAreDifferentiable) {
  Tensor x = Tensor::from_vector(std::vector<double>{1, 2, 3, 4, 5, 6}, {2, 3}).set_requires_grad(true);
  Tensor y = x.transpose(0, 1).reshape({6}).slice(0, 1, 4);  // elements x[1,0], x[0,1], x[1,1]
  ops::sum(ops::mul(y, vec({10, 20, 30}))).backward();
  EXPECT_EQ(x.grad().to_vector<double>(), (std::vector<double>{0, 20, 0, 10, 30, 0}));
}

TEST(Autograd, UnusedBranchGetsNoGradient) {
  Tensor a = vec({1.0}).set_requires_grad(true);
  Tensor b = vec({1.0}).set_requires_grad(true);
  Tensor unused = ops::exp(b);
  ops::sum(ops::mul_scalar(a, 2.0)).backward();
  EXPECT_TRUE(a.grad().defined());
  EXPECT_FALSE(b.grad().defined());
}

TEST(Autograd, ReadyHookMayRegisterAnotherHook) {
  Tensor x = vec({1.0, 2.0}).set_requires_grad(true);
  int first = 0, second = 0;
  x.add_ready_hook([&](const Tensor&) {
    ++first;
    if (first == 1) x.add_ready_hook([&](const Tensor&) { ++second; });  // a lazily built reducer
  });
  ops::sum(ops::mul(x, x)).backward();
  EXPECT_EQ(first, 1);
  EXPECT_EQ(second, 0);  // registered during the pass: runs from the next one
  ops::sum(ops::mul(x, x)).backward();
  EXPECT_EQ(first, 2);
  EXPECT_EQ(second, 1);
}

TEST(Autograd, InPlaceWriteToASavedTensorIsRefused) {
  // exp saves its output; scaling it in place afterwards would silently scale the gradient.
  Tensor x = vec({0.5, 1.0}).set_requires_grad(true);
  Tensor y = ops::exp(x);
  Tensor yd = y.detach();
  ops::mul_(yd, 100.0);
  try {
    ops::sum(y).backward();
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("modified in place"), std::string::npos) << e.what();
  }
  // Writes before the op, or to tensors the graph never saw, are fine.
  Tensor a = vec({1.0, 2.0});
  a.fill_(3.0);
  Tensor w = vec({1.0, 1.0}).set_requires_grad(true);
  Tensor out = ops::sum(ops::mul(w, a));
  Tensor other = vec({0.0});
  other.fill_(1.0);
  out.backward();
  EXPECT_EQ(w.grad().to_vector<double>(), (std::vector<double>{3.0, 3.0}));
}

// Fan-in into linear's input (q/k/v, gate/up on one normed input): each later dX GEMM adds into
// the gradient summed so far (accumulation_target), with the same gradients as summing them.
// Checked against the sum of the three dX products formed separately, in f64.
TEST(Autograd, LinearAddsItsInputGradientIntoTheSumSoFar) {
  Generator gen(3);
  const int64_t N = 5, d = 4;
  Tensor x0 = randn({N, d}, gen).to(DType::f64).set_requires_grad(true);
  std::vector<Tensor> ws, gs;
  for (int i = 0; i < 3; ++i) {
    ws.push_back(randn({3 + i, d}, gen).to(DType::f64).set_requires_grad(true));
    gs.push_back(randn({N, 3 + i}, gen).to(DType::f64));
  }
  auto loss_of = [&](const Tensor& x) {
    Tensor l;
    for (int i = 0; i < 3; ++i) {
      Tensor t = ops::sum(ops::mul(ops::linear(x, ws[i]), gs[i]));
      l = l.defined() ? ops::add(l, t) : t;
    }
    return l;
  };
  // dL/dx = sum_i g_i W_i, and x = 2 x0 (an op output, so the sum is the engine's, not a leaf's).
  Tensor want;
  for (int i = 0; i < 3; ++i) {
    Tensor t = ops::matmul(gs[i], ws[i].detach());
    want = want.defined() ? ops::add(want, t) : t;
  }
  want = ops::mul_scalar(want, 2.0);
  loss_of(ops::mul_scalar(x0, 2.0)).backward();
  EXPECT_LT(ops::max_abs_diff(x0.grad(), want), 1e-12);

  // Inside a checkpointed block whose inner graph has the fan-in (the inner backward's own
  // targets), with a linear on the block's input created after it (an outer target offered to
  // the checkpoint node, which does not take it): as without checkpointing.
  auto block = [&](const Tensor& h) {
    Tensor t = ops::mul_scalar(h, 1.0);
    return ops::add(ops::linear(t, ws[0].detach()), ops::linear(t, ws[0].detach()));
  };
  auto run = [&](bool ckpt) {
    Tensor a = x0.detach().clone().set_requires_grad(true);
    Tensor x = ops::mul_scalar(a, 2.0);
    Tensor y = ckpt ? checkpoint(block, x, {}) : block(x);
    Tensor z = ops::linear(x, ws[1].detach());
    ops::add(ops::sum(ops::mul(y, ops::add(gs[0], gs[0]))), ops::sum(ops::mul(z, gs[1]))).backward();
    return a.grad();
  };
  EXPECT_LT(ops::max_abs_diff(run(true), run(false)), 1e-12);
}

// Where the summed gradient is referenced elsewhere, linear must not write into it.
TEST(Autograd, LinearLeavesSharedGradientsAlone) {
  Generator gen(5);
  const int64_t N = 4, d = 3;
  // (1) The user's gradient passed straight through add's backward to linear's input.
  Tensor x0 = randn({N, d}, gen).to(DType::f64).set_requires_grad(true);
  Tensor w = randn({d, d}, gen).to(DType::f64).set_requires_grad(true);
  Tensor G = randn({N, d}, gen).to(DType::f64);
  const std::vector<double> g_before = G.to_vector<double>();
  Tensor h = ops::mul_scalar(x0, 1.0);
  ops::add(ops::linear(h, w), h).backward(G);  // add is newer: h's sum is G itself at linear
  EXPECT_EQ(G.to_vector<double>(), g_before);
  EXPECT_LT(ops::max_abs_diff(x0.grad(), ops::add(G, ops::matmul(G, w.detach()))), 1e-12);
  // (2) One tensor handed by add's backward to two producers, each also read by a linear.
  Tensor p0 = randn({N, d}, gen).to(DType::f64).set_requires_grad(true);
  Tensor q0 = randn({N, d}, gen).to(DType::f64).set_requires_grad(true);
  Tensor w1 = randn({2, d}, gen).to(DType::f64), w2 = randn({5, d}, gen).to(DType::f64);
  Tensor g1 = randn({N, 2}, gen).to(DType::f64), g2 = randn({N, 5}, gen).to(DType::f64);
  Tensor g3 = randn({N, d}, gen).to(DType::f64);
  Tensor a = ops::mul_scalar(p0, 1.0), b = ops::mul_scalar(q0, 1.0);
  Tensor l1 = ops::sum(ops::mul(ops::linear(a, w1), g1));
  Tensor l2 = ops::sum(ops::mul(ops::linear(b, w2), g2));
  Tensor l3 = ops::sum(ops::mul(ops::add(a, b), g3));  // newest: its backward runs first
  ops::add(ops::add(l1, l2), l3).backward();
  EXPECT_LT(ops::max_abs_diff(p0.grad(), ops::add(g3, ops::matmul(g1, w1))), 1e-12);
  EXPECT_LT(ops::max_abs_diff(q0.grad(), ops::add(g3, ops::matmul(g2, w2))), 1e-12);
  // (3) linear(t, t) after another consumer of t has summed: t is both inputs of one node, no
  // target; d/dt sum(t t^T) = 2 (1 1^T) t, plus 3 from the other consumer.
  Tensor s0 = randn({3, 3}, gen).to(DType::f64);
  Tensor s = s0.clone().set_requires_grad(true);
  Tensor t = ops::mul_scalar(s, 1.0);
  Tensor y = ops::sum(ops::linear(t, t));
  Tensor z = ops::sum(ops::mul_scalar(t, 3.0));  // newer than the linear
  ops::add(y, z).backward();
  Tensor ones = Tensor::ones({3, 3}, DType::f64);
  EXPECT_LT(ops::max_abs_diff(s.grad(), ops::add_scalar(ops::mul_scalar(ops::matmul(ones, s0), 2.0), 3.0)),
            1e-12);
}

// The fan-in above needs no engine sums: the profiler counts none at the shared input (two with
// matmul, which has no accumulating backward).
TEST(Autograd, LinearFanInSkipsTheEngineSum) {
  Generator gen(4);
  Tensor x0 = randn({6, 4}, gen).set_requires_grad(true);
  Tensor w = randn({5, 4}, gen).set_requires_grad(true);
  auto count = [&](bool use_linear) {
    const double n = test::backward_sums([&] {
      Tensor x = ops::mul_scalar(x0, 2.0);
      Tensor l;
      for (int i = 0; i < 3; ++i) {
        Tensor y = use_linear ? ops::linear(x, w) : ops::matmul(x, w.transpose(0, 1));
        Tensor t = ops::sum(y);
        l = l.defined() ? ops::add(l, t) : t;
      }
      return l;
    });
    x0.zero_grad();
    w.zero_grad();
    return n;
  };
  EXPECT_EQ(count(false) - count(true), 2.0);
}

// Slices of one tensor (a fused q | k | v projection split): the first slice's backward forms
// the whole gradient, each later one adds its range into that sum. Ranges that overlap, a range
// along a middle dim (strided), and another consumer of the whole tensor: the gradient is the
// sum of every share, against the composition formed by hand in f64.
TEST(Autograd, SlicesAddTheirRangesIntoTheSumSoFar) {
  Generator gen(7);
  const int64_t B = 2, T = 3, F = 9;
  Tensor x0 = randn({B, T, F}, gen).to(DType::f64).set_requires_grad(true);
  struct Cut {
    int64_t dim, start, end;
  };
  // Along the last dim (strided ranges), a middle one, and the first (a contiguous range).
  const std::vector<Cut> cuts = {{2, 0, 5}, {2, 5, 7}, {2, 7, 9}, {2, 3, 8}, {1, 1, 3}, {0, 1, 2}};
  std::vector<Tensor> gs;
  for (const Cut& c : cuts) {
    Shape s{B, T, F};
    s[size_t(c.dim)] = c.end - c.start;
    gs.push_back(randn(s, gen).to(DType::f64));
  }
  Tensor gw = randn({B, T, F}, gen).to(DType::f64);
  for (bool whole_first : {false, true}) {
    x0.zero_grad();
    Tensor y = ops::mul_scalar(x0, 2.0);
    Tensor l;
    auto plus = [&](const Tensor& t) { l = l.defined() ? ops::add(l, t) : t; };
    // The whole-tensor consumer made first runs last (newest first), or first when made last.
    if (!whole_first) plus(ops::sum(ops::mul(y, gw)));
    for (size_t i = 0; i < cuts.size(); ++i)
      plus(ops::sum(ops::mul(y.slice(cuts[i].dim, cuts[i].start, cuts[i].end), gs[i])));
    if (whole_first) plus(ops::sum(ops::mul(y, gw)));
    l.backward();
    Tensor want = gw.clone();
    for (size_t i = 0; i < cuts.size(); ++i) {
      Tensor r = want.slice(cuts[i].dim, cuts[i].start, cuts[i].end);
      r.copy_(ops::add(r, gs[i]));
    }
    want = ops::mul_scalar(want, 2.0);
    EXPECT_LT(ops::max_abs_diff(x0.grad(), want), 1e-12) << "whole_first " << whole_first;
  }
}

// A tied embedding: one weight W [V, D] is the embedding table and the LM head. The LM head's
// backward runs first and forms W's sum for the pass; the embedding's backward adds its rows into
// that sum (accumulation_target on a leaf): the same gradient, bit for bit, as two separate leaves
// summed, with one engine sum fewer. Reversed (the embedding's backward first), nothing is handed
// out and the engine sums as before. Gradient accumulation over two passes adds into .grad.
TEST(Autograd, TiedEmbeddingAddsIntoTheLmHeadGradient) {
  Generator gen(12);
  const int64_t V = 11, D = 6;
  Tensor w0 = randn({V, D}, gen);
  // Rows 2, 4, 5, 6, 8 and 10 are named by no id.
  Tensor ids = Tensor::from_vector<int64_t>({3, 7, 3, 0, 9, 3, 7, 1}, {8});
  Tensor r = randn({8, V}, gen), x = randn({8, D}, gen), q = randn({8, D}, gen);
  auto loss = [&](const Tensor& emb_w, const Tensor& head_w, bool reversed) {
    if (reversed) {  // the head's node is the older one: the embedding's backward runs first
      Tensor head = ops::linear(x, head_w);
      Tensor emb = ops::embedding(emb_w, ids);
      return ops::add(ops::sum(ops::mul(head, r)), ops::sum(ops::mul(emb, q)));
    }
    Tensor h = ops::embedding(emb_w, ids);
    return ops::sum(ops::mul(ops::linear(h, head_w), r));
  };
  for (bool reversed : {false, true}) {
    SCOPED_TRACE(reversed ? "embedding's backward first" : "LM head's backward first");
    Tensor tied = w0.clone().set_requires_grad(true);
    Tensor e = w0.clone().set_requires_grad(true), h = w0.clone().set_requires_grad(true);
    const double n_tied = test::backward_sums([&] { return loss(tied, tied, reversed); });
    const double n_two = test::backward_sums([&] { return loss(e, h, reversed); });
    Tensor want = ops::add(h.grad(), e.grad());  // the engine's sum: LM head's + embedding's
    auto got = tied.grad().to_vector<double>(), ref = want.to_vector<double>();
    ASSERT_EQ(got.size(), ref.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], ref[i]) << i;
    // Two leaves: two stores. Tied: one store, plus one sum unless the embedding added into it.
    EXPECT_EQ(n_tied, reversed ? n_two : n_two - 1);
    // A second pass (gradient accumulation) adds into .grad.
    test::backward_sums([&] { return loss(tied, tied, reversed); });
    EXPECT_LT(ops::max_abs_diff(tied.grad(), ops::mul_scalar(want, 2.0)), 1e-12);
  }
}

// The weight reaching the embedding and the head through one op (a scale): the embedding adds
// into that node's sum instead (the same values as two separate weights; the graph model counts
// the engine's sums). And a leaf's sum that is also another node's pending gradient (add hands
// one tensor to both inputs) is not handed out: adding into it would corrupt the other gradient.
TEST(Autograd, EmbeddingAddsIntoANodeSumAndNeverIntoASharedOne) {
  Generator gen(13);
  const int64_t V = 8, D = 4;
  Tensor w0 = randn({V, D}, gen), w3v = randn({V, D}, gen), s = randn({V, D}, gen);
  Tensor ids = Tensor::from_vector<int64_t>({3, 3, 5, 0}, {4});
  Tensor r = randn({4, V}, gen), q = randn({4, D}, gen);
  {
    auto run = [&](const Tensor& we, const Tensor& wh, bool same) {
      Tensor v1 = ops::mul_scalar(we, 2.0);
      Tensor v2 = same ? v1 : ops::mul_scalar(wh, 2.0);
      return ops::sum(ops::mul(ops::linear(ops::embedding(v1, ids), v2), r));
    };
    Tensor t = w0.clone().set_requires_grad(true);
    Tensor a = w0.clone().set_requires_grad(true), b = w0.clone().set_requires_grad(true);
    const double n_t = test::backward_sums([&] { return run(t, t, true); });
    run(a, b, false).backward();
    auto got = t.grad().to_vector<double>();
    auto want = ops::add(a.grad(), b.grad()).to_vector<double>();
    for (size_t i = 0; i < got.size(); ++i) EXPECT_EQ(got[i], want[i]) << i;
    Tensor t2 = w0.clone().set_requires_grad(true);
    EXPECT_EQ(n_t, double(test::count_graph(run(t2, t2, true)).accumulations));
  }
  {
    auto run = [&](const Tensor& wa, const Tensor& wb, const Tensor& w3) {
      Tensor x3 = ops::mul_scalar(w3, 1.0);  // older than the embedding: its backward runs later
      Tensor e = ops::embedding(wb, ids);
      Tensor y = ops::add(wa, x3);  // one gradient tensor for wa's sum and x3's pending one
      return ops::add(ops::sum(ops::mul(y, s)), ops::sum(ops::mul(e, q)));
    };
    Tensor t = w0.clone().set_requires_grad(true), t3 = w3v.clone().set_requires_grad(true);
    Tensor a = w0.clone().set_requires_grad(true), b = w0.clone().set_requires_grad(true);
    Tensor r3 = w3v.clone().set_requires_grad(true);
    run(t, t, t3).backward();
    run(a, b, r3).backward();
    EXPECT_LT(ops::max_abs_diff(t.grad(), ops::add(a.grad(), b.grad())), 1e-12);
    EXPECT_LT(ops::max_abs_diff(t3.grad(), r3.grad()), 1e-12) << "the other gradient changed";
  }
}

// The q | k | v split needs no engine sums at the fused output: the profiler counts two fewer
// there than with three separate tensors formed by hand and added.
TEST(Autograd, SliceFanInSkipsTheEngineSum) {
  Generator gen(8);
  Tensor x0 = randn({6, 10}, gen).set_requires_grad(true);
  auto count = [&](bool slices) {
    const double n = test::backward_sums([&] {
      Tensor y = ops::mul_scalar(x0, 2.0);
      Tensor l;
      for (int64_t i = 0; i < 3; ++i) {
        // By hand: y times a 0/1 mask of the range, a whole-size tensor per share.
        Tensor part;
        if (slices) {
          part = y.slice(1, 3 * i, 3 * i + 3);
        } else {
          Tensor m = Tensor::zeros({6, 10}, DType::f32);
          m.slice(1, 3 * i, 3 * i + 3).fill_(1.0);
          part = ops::mul(y, m);
        }
        Tensor t = ops::sum(part);
        l = l.defined() ? ops::add(l, t) : t;
      }
      return l;
    });
    Tensor g = x0.grad().clone();
    x0.zero_grad();
    return std::make_pair(n, g);
  };
  auto [n_mask, g_mask] = count(false);
  auto [n_slice, g_slice] = count(true);
  EXPECT_EQ(n_mask - n_slice, 2.0);
  // The last column is in no range: its gradient is 0 both ways.
  EXPECT_LT(ops::max_abs_diff(g_mask, g_slice), 1e-6);
}
