// Transformer::from_pretrained_sharded (each tp rank reads only its slices) against
// from_pretrained + shard_for_tp: the same parameters, bit for bit, the same shard layout and tie,
// the same logits; and the same refusals. At 4 ranks tp=2 runs on each tp group of a 2 x 2 grid,
// and tp=4 where the family allows it.
#include <gtest/gtest.h>

#include <cstring>
#include <string>

#include "core/rng.h"
#include "models/transformer.h"
#include "parallel/tp_ops.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using testing::world;

std::string fixture(const std::string& family) {
  return std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/models/" + family;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  if (a.dtype() != b.dtype() || a.shape() != b.shape() || !a.is_contiguous() || !b.is_contiguous())
    return false;
  return std::memcmp(a.raw_data(), b.raw_data(), size_t(a.numel()) * dtype_size(a.dtype())) == 0;
}

void check_family(const std::string& family, int tp) {
  SCOPED_TRACE(family + " tp=" + std::to_string(tp));
  auto group = parallel::make_grid(world(), tp).tp_group;
  auto ref = Transformer::from_pretrained(fixture(family));
  bool ref_ok = true;
  std::string ref_err;
  try {
    ref->shard_for_tp(group);
  } catch (const Error& e) {
    ref_ok = false;
    ref_err = e.what();
  }
  if (!ref_ok) {  // a layout shard_for_tp refuses is refused the same way
    try {
      Transformer::from_pretrained_sharded(fixture(family), group);
      ADD_FAILURE() << "from_pretrained_sharded accepted what shard_for_tp refuses: " << ref_err;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()), ref_err);
    }
    return;
  }
  auto mod = Transformer::from_pretrained_sharded(fixture(family), group);
  ASSERT_EQ(mod->tp_size(), tp);
  const auto rp = ref->named_parameters(), mp = mod->named_parameters();
  ASSERT_EQ(rp.size(), mp.size());
  for (size_t i = 0; i < rp.size(); ++i) {
    SCOPED_TRACE(rp[i].first);
    EXPECT_EQ(mp[i].first, rp[i].first);
    EXPECT_EQ(mp[i].second.requires_grad(), rp[i].second.requires_grad());
    EXPECT_TRUE(mp[i].second.is_leaf());
    EXPECT_TRUE(same_bits(mp[i].second, rp[i].second))
        << mp[i].second.desc() << " vs " << rp[i].second.desc();
  }
  const auto ri = ref->shard_infos(), mi = mod->shard_infos();
  ASSERT_EQ(ri.size(), mi.size());
  for (const auto& [name, a] : ri) {
    ASSERT_TRUE(mi.count(name)) << name;
    const auto& b = mi.at(name);
    EXPECT_TRUE(a.dim == b.dim && a.full_size == b.full_size && a.offset == b.offset &&
                a.size == b.size && a.blocks == b.blocks)
        << name;
  }
  // A tied head stays one tensor (listed once, under the embedding's name); an untied one is its
  // own vocab shard.
  bool head_listed = false;
  for (const auto& [n, t] : mp) head_listed = head_listed || n == "lm_head.weight";
  EXPECT_EQ(head_listed, !mod->config().tie_word_embeddings);
  Generator gen(5);
  Tensor ids = randint({2, 5}, gen, 0, mod->config().vocab_size);
  NoGradGuard no_grad;
  EXPECT_TRUE(same_bits(mod->forward_logits_shard(ids), ref->forward_logits_shard(ids)));
}

const char* kFamilies[] = {"llama", "llama_bias", "mistral", "qwen2", "gpt2"};

TEST(TpLoad, ShardedLoadEqualsLoadThenShardTp2) {
  if (world()->size() % 2 != 0) GTEST_SKIP() << "needs an even number of ranks";
  for (const char* f : kFamilies) check_family(f, 2);
}

TEST(TpLoad, ShardedLoadEqualsLoadThenShardTp4) {
  if (world()->size() % 4 != 0) GTEST_SKIP() << "needs a multiple of 4 ranks";
  for (const char* f : kFamilies) check_family(f, 4);
}

TEST(TpLoad, MissingFolderAndSizeOneGroup) {
  auto group = parallel::make_grid(world(), 1).tp_group;
  EXPECT_THROW(Transformer::from_pretrained_sharded(fixture("absent"), group), Error);
  // A size-1 group (or none) is a plain from_pretrained: not sharded.
  auto m = Transformer::from_pretrained_sharded(fixture("qwen2"), group);
  EXPECT_EQ(m->tp_size(), 1);
  auto n = Transformer::from_pretrained_sharded(fixture("qwen2"), nullptr);
  auto r = Transformer::from_pretrained(fixture("qwen2"));
  const auto rp = r->named_parameters(), np = n->named_parameters();
  ASSERT_EQ(rp.size(), np.size());
  for (size_t i = 0; i < rp.size(); ++i) EXPECT_TRUE(same_bits(np[i].second, rp[i].second));
}

}  // namespace
}  // namespace ftune
