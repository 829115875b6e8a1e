// The tensor-parallel ops (parallel/tp_ops.h) over the whole world as one tp group (2 or 4
// ranks): each against the single-process op it replaces, value and gradient, with vocab
// shards of unequal sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "core/ops.h"
#include "core/rng.h"
#include "parallel/tp_ops.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using namespace parallel;
using testing::world;

// max |a - b| / max(1, max |b|).
double rel_err(const Tensor& a, const Tensor& b) {
  double scale = 1.0;
  for (double v : b.to_vector<double>()) scale = std::max(scale, std::fabs(v));
  return ops::max_abs_diff(a, b) / scale;
}

ShardInfo last_dim_shard(int64_t full, int dim, const Communicator& c) {
  Range r = shard_range(full, c.size(), c.rank());
  ShardInfo s;
  s.dim = dim;
  s.full_size = full;
  s.offset = r.offset;
  s.size = r.size;
  return s;
}

TEST(TpOps, CopyToTpSumsGradsReduceFromTpSumsValues) {
  auto w = world();
  const int n = w->size(), r = w->rank();
  Generator gen(1);
  Tensor x = randn({3, 5}, gen).set_requires_grad(true);  // the same on every rank
  // Each rank scales the replicated input differently: the true gradient sums the scales.
  Tensor y = ops::mul_scalar(copy_to_tp(x, w), double(r + 1));
  Tensor z = reduce_from_tp(y, w);
  // z = x * sum(r + 1) on every rank.
  const double s = n * (n + 1) / 2.0;
  EXPECT_LT(rel_err(z, ops::mul_scalar(x.detach(), s)), 1e-6);
  ops::sum(z).backward();
  // d sum(z) / dx through reduce (identity) and each rank's scale, summed by copy_to_tp.
  EXPECT_LT(ops::max_abs_diff(x.grad(), Tensor::full({3, 5}, s)), 1e-6);
}

TEST(TpOps, GatherAndScatterLastDimUnequalShards) {
  auto w = world();
  Generator gen(2);
  const int64_t V = 11;  // 2 ranks: 6 + 5; 4 ranks: 3 + 3 + 3 + 2
  Tensor full = randn({2, 3, V}, gen);
  ShardInfo si = last_dim_shard(V, 2, *w);
  Tensor mine = shard_slice(full, si).set_requires_grad(true);
  EXPECT_EQ(mine.size(2), si.size);
  Tensor g = gather_last_dim(mine, w);
  EXPECT_EQ(ops::max_abs_diff(g, full), 0.0);
  Tensor weights = randn({2, 3, V}, gen);
  ops::sum(ops::mul(g, weights)).backward();
  EXPECT_EQ(ops::max_abs_diff(mine.grad(), shard_slice(weights, si)), 0.0);

  Tensor fx = full.clone().set_requires_grad(true);
  Tensor sc = scatter_last_dim(fx, w);
  EXPECT_EQ(ops::max_abs_diff(sc, shard_slice(full, si)), 0.0);
  ops::sum(ops::mul(sc, shard_slice(weights, si))).backward();
  EXPECT_EQ(ops::max_abs_diff(fx.grad(), weights), 0.0);  // every rank's slice, gathered
}

TEST(TpOps, ShardSliceAndGatherShardsWithBlocks) {
  auto w = world();
  const int n = w->size();
  Generator gen(3);
  const int64_t block = 4 * n;  // fused [q | k | v]: 3 blocks, each split over the ranks
  Tensor full = randn({5, 3 * block}, gen);
  ShardInfo si;
  si.dim = 1;
  si.full_size = 3 * block;
  si.blocks = 3;
  Range r = shard_range(block, n, w->rank());
  si.offset = r.offset;
  si.size = r.size;
  Tensor mine = shard_slice(full, si);
  ASSERT_EQ(mine.shape(), Shape({5, 3 * r.size}));
  for (int b = 0; b < 3; ++b)
    EXPECT_EQ(ops::max_abs_diff(mine.slice(1, b * r.size, (b + 1) * r.size),
                                full.slice(1, b * block + r.offset, b * block + r.offset + r.size)),
              0.0);
  EXPECT_EQ(ops::max_abs_diff(gather_shards(mine, si, w), full), 0.0);
  // Unequal shards along dim 0, and a replicated tensor.
  Tensor emb = randn({13, 3}, gen);
  ShardInfo se = last_dim_shard(13, 0, *w);
  EXPECT_EQ(ops::max_abs_diff(gather_shards(shard_slice(emb, se), se, w), emb), 0.0);
  EXPECT_EQ(ops::max_abs_diff(gather_shards(emb, ShardInfo{}, w), emb), 0.0);
  se.full_size = 12;
  EXPECT_THROW(shard_slice(emb, se), Error);
}

TEST(TpOps, VocabParallelEmbeddingEqualsEmbedding) {
  auto w = world();
  Generator gen(4);
  const int64_t V = 13, D = 6;
  Tensor full = randn({V, D}, gen);
  ShardInfo si = last_dim_shard(V, 0, *w);
  Tensor ids = randint({2, 7}, gen, 0, V);
  Tensor fw = full.clone().set_requires_grad(true);
  Tensor ref = ops::embedding(fw, ids);
  Tensor mine = shard_slice(full, si).set_requires_grad(true);
  Tensor got = vocab_parallel_embedding(mine, ids, si.offset, w);
  EXPECT_LT(ops::max_abs_diff(got, ref), 1e-6);
  Tensor gw = randn({2, 7, D}, gen);
  ops::sum(ops::mul(ref, gw)).backward();
  ops::sum(ops::mul(got, gw)).backward();
  EXPECT_LT(ops::max_abs_diff(mine.grad(), shard_slice(fw.grad(), si)), 1e-6);
}

TEST(TpOps, VocabParallelCrossEntropyEqualsCrossEntropy) {
  auto w = world();
  Generator gen(5);
  const int64_t N = 9, V = 23;
  Tensor logits = randn({3, 3, V}, gen, 0.0, 3.0);
  std::vector<int64_t> t = randint({N}, gen, 0, V).to_vector<int64_t>();
  t[2] = -100;
  t[7] = -100;
  t[0] = 0;
  t[1] = V - 1;  // the first and last columns: first and last shard
  Tensor targets = Tensor::from_vector(t, {3, 3});
  ShardInfo si = last_dim_shard(V, 2, *w);
  for (ops::Reduction red : {ops::Reduction::mean, ops::Reduction::sum, ops::Reduction::none}) {
    Tensor fl = logits.clone().set_requires_grad(true);
    Tensor ref = ops::cross_entropy(fl, targets, -100, red);
    Tensor mine = shard_slice(logits, si).set_requires_grad(true);
    Tensor got = vocab_parallel_cross_entropy(mine, targets, w, -100, red);
    ASSERT_EQ(got.shape(), ref.shape());
    EXPECT_LT(rel_err(got, ref), 1e-6) << int(red);
    // Given the full vocabulary (the shard_range split), the same bits without the sizes' gather.
    Tensor known = vocab_parallel_cross_entropy(mine.detach(), targets, w, -100, red, V);
    EXPECT_EQ(ops::max_abs_diff(known, got), 0.0) << int(red);
    Tensor gw = red == ops::Reduction::none ? randn({3, 3}, gen) : Tensor::scalar(1.7);
    ref.backward(gw);
    got.backward(gw);
    EXPECT_LT(rel_err(mine.grad(), shard_slice(fl.grad(), si)), 1e-6) << int(red);
  }
  // Every row ignored: 0, with a zero gradient (as ops::cross_entropy).
  Tensor mine = shard_slice(logits, si).set_requires_grad(true);
  Tensor none = Tensor::full({3, 3}, -100.0, DType::i64);
  Tensor l = vocab_parallel_cross_entropy(mine, none, w);
  EXPECT_EQ(l.item(), 0.0);
  l.backward();
  for (float v : mine.grad().to_vector<float>()) EXPECT_EQ(v, 0.0f);
  // A target outside the full vocabulary is refused (on every rank alike), and so is a
  // vocabulary size whose split does not give this rank's shard (no collective reached).
  Tensor bad = Tensor::full({3, 3}, double(V), DType::i64);
  EXPECT_THROW(vocab_parallel_cross_entropy(mine, bad, w), Error);
  EXPECT_THROW(vocab_parallel_cross_entropy(mine, none, w, -100, ops::Reduction::mean, 8 * V),
               Error);
}

// The edges of the shard protocol: a rank whose vocabulary shard is empty (V = ranks - 1 gives
// the last rank none); an ignore_index of -1, 0 or 3 (values a shard's local targets could take:
// a target offset + 3 on another rank is column 3 there); and f64 logits, against
// ops::cross_entropy at f64 precision.
TEST(TpOps, VocabParallelCrossEntropyEmptyShardAndIgnoreIndexValues) {
  auto w = world();
  Generator gen(6);
  for (int64_t ignore : {int64_t(-1), int64_t(0), int64_t(3)})
  for (int64_t V : {int64_t(w->size() - 1), int64_t(11)}) {
    if (ignore >= V) continue;
    ShardInfo si = last_dim_shard(V, 1, *w);
    Tensor logits = randn({6, V}, gen, 0.0, 4.0).to(DType::f64);
    // Row 0 ignored; rows 1, 2 at column `ignore` of the second and third shard.
    const int64_t chunk = (V + w->size() - 1) / w->size();
    std::vector<int64_t> t = {ignore, chunk + ignore, 2 * chunk + ignore, 0, V - 1, 1};
    for (size_t k = 1; k < t.size(); ++k)
      if (t[k] < 0 || t[k] >= V || t[k] == ignore) t[k] = ignore == V - 1 ? 0 : V - 1;
    Tensor targets = Tensor::from_vector(t, {6});
    for (ops::Reduction red : {ops::Reduction::mean, ops::Reduction::none}) {
      SCOPED_TRACE(str_cat("V ", V, " ignore_index ", ignore, " reduction ", int(red)));
      Tensor fl = logits.clone().set_requires_grad(true);
      Tensor ref = ops::cross_entropy(fl, targets, ignore, red);
      Tensor mine = shard_slice(logits, si).set_requires_grad(true);
      Tensor got = vocab_parallel_cross_entropy(mine, targets, w, ignore, red);
      ASSERT_EQ(got.shape(), ref.shape());
      ASSERT_EQ(got.dtype(), DType::f64);
      EXPECT_LT(rel_err(got, ref), 1e-12) << "V " << V << " reduction " << int(red);
      Tensor gw = red == ops::Reduction::none ? randn({6}, gen).to(DType::f64)
                                              : Tensor::scalar(0.3, DType::f64);
      ref.backward(gw);
      got.backward(gw);
      ASSERT_EQ(mine.grad().shape(), mine.shape());
      if (si.size > 0)
        EXPECT_LT(rel_err(mine.grad(), shard_slice(fl.grad(), si)), 1e-12) << "V " << V;
    }
  }
}

}  // namespace
}  // namespace ftune
