// Tensor-parallel Transformers (Transformer::shard_for_tp) against the single-process model, for
// every family of tests/fixtures/models: logits, loss and the gradient of every parameter
// (gathered to full shape); LoRA on TP layers; TP2 x DP2 training against one process. At 4
// ranks the tp=2 tests run on each of the two tp groups of a 2 x 2 grid; gpt2 also runs at tp=4.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "core/optim.h"
#include "core/rng.h"
#include "models/lora.h"
#include "models/transformer.h"
#include "parallel/tp_ops.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

using testing::world;

std::string fixture(const std::string& family) {
  return std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/models/" + family;
}

// max |a - b| / max |b| (b not all zero).
double rel_err(const Tensor& a, const Tensor& b) {
  double scale = 0.0;
  for (double v : b.to_vector<double>()) scale = std::max(scale, std::fabs(v));
  return ops::max_abs_diff(a, b) / std::max(scale, 1e-30);
}

// The tp group of size tp holding this rank (tp-major grid over the world).
std::shared_ptr<parallel::Communicator> tp_group(int tp) {
  return parallel::make_grid(world(), tp).tp_group;
}

// Every parameter's gradient at full shape (collective over the model's tp group).
std::map<std::string, Tensor> full_grads(const Transformer& m) {
  std::map<std::string, Tensor> out;
  const auto infos = m.shard_infos();
  for (auto& [name, t] : m.named_parameters()) {
    if (!t.grad().defined()) continue;
    auto it = infos.find(name);
    out[name] =
        it == infos.end() ? t.grad() : parallel::gather_shards(t.grad(), it->second, m.tp_group());
  }
  return out;
}

// Sets parameter `name` of a (possibly sharded) model from its full-shape value.
void set_full(Transformer& m, const std::string& name, const Tensor& full) {
  const auto infos = m.shard_infos();
  auto it = infos.find(name);
  NoGradGuard no_grad;
  m.parameter(name).copy_(it == infos.end() ? full : parallel::shard_slice(full, it->second));
}

struct Batch {
  Tensor ids, targets;
};

Batch make_batch(int64_t vocab, uint64_t seed, int64_t B = 2, int64_t T = 6) {
  Generator gen(seed);
  Batch b;
  b.ids = randint({B, T}, gen, 0, vocab);
  std::vector<int64_t> t = randint({B, T}, gen, 0, vocab).to_vector<int64_t>();
  t[1] = -100;  // an ignored position
  b.targets = Tensor::from_vector(t, {B, T});
  return b;
}

// Logits, loss and every gradient of the tp-sharded model equal the full model's.
void check_family(const std::string& family, int tp) {
  auto ref = Transformer::from_pretrained(fixture(family));
  auto mod = Transformer::from_pretrained(fixture(family));
  auto group = tp_group(tp);
  mod->shard_for_tp(group);
  ASSERT_EQ(mod->tp_size(), tp);
  const int64_t V = ref->config().vocab_size;
  Batch b = make_batch(V, 7);

  Tensor ref_logits = ref->forward(b.ids);
  Tensor ref_loss = ops::cross_entropy(ref_logits, b.targets);
  ref_loss.backward();

  Tensor logits = mod->forward(b.ids);  // gathered
  EXPECT_LT(rel_err(logits, ref_logits), 1e-5) << family << " tp " << tp;
  Tensor shard = mod->forward_logits_shard(b.ids);
  parallel::Range vr = parallel::shard_range(V, tp, group->rank());
  EXPECT_EQ(shard.size(2), vr.size);
  Tensor loss = parallel::vocab_parallel_cross_entropy(shard, b.targets, group);
  EXPECT_LT(std::fabs(loss.item() - ref_loss.item()), 1e-5 * std::fabs(ref_loss.item()));
  loss.backward();

  auto want = full_grads(*ref);
  auto got = full_grads(*mod);
  ASSERT_EQ(got.size(), want.size()) << family;
  for (auto& [name, g] : want) {
    ASSERT_TRUE(got.count(name)) << family << " " << name;
    ASSERT_EQ(got[name].shape(), g.shape()) << family << " " << name;
    EXPECT_LT(rel_err(got[name], g), 1e-5) << family << " tp " << tp << " " << name;
  }
  // The gathered parameters are the full model's.
  auto full = mod->gather_full_parameters();
  auto ref_params = ref->named_parameters();
  ASSERT_EQ(full.size(), ref_params.size());
  for (size_t i = 0; i < full.size(); ++i) {
    EXPECT_EQ(full[i].first, ref_params[i].first);
    EXPECT_EQ(ops::max_abs_diff(full[i].second, ref_params[i].second), 0.0) << full[i].first;
  }
}

TEST(TpModels, Gpt2LogitsAndGradsMatchSingleProcess) { check_family("gpt2", 2); }
TEST(TpModels, LlamaLogitsAndGradsMatchSingleProcess) { check_family("llama", 2); }
TEST(TpModels, MistralLogitsAndGradsMatchSingleProcess) { check_family("mistral", 2); }
TEST(TpModels, Qwen2LogitsAndGradsMatchSingleProcess) { check_family("qwen2", 2); }

TEST(TpModels, Gpt2AtTp4) {
  if (world()->size() % 4 != 0) GTEST_SKIP() << "needs 4 ranks";
  check_family("gpt2", 4);
}

TEST(TpModels, RefusesTpLargerThanKvHeads) {
  // llama_bias: 4 heads, 1 kv head; tp = 2 would need replicated kv heads.
  auto m = Transformer::from_pretrained(fixture("llama_bias"));
  try {
    m->shard_for_tp(tp_group(2));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("num_key_value_heads"), std::string::npos) << e.what();
  }
  EXPECT_EQ(m->tp_size(), 1);  // untouched
  auto l = Transformer::from_pretrained(fixture("llama"));
  l->shard_for_tp(tp_group(2));
  EXPECT_THROW(l->shard_for_tp(tp_group(2)), Error);  // once only
  EXPECT_THROW(l->init_random(1), Error);
  EXPECT_THROW(l->save_pretrained("/nonexistent/never"), Error);
}

TEST(TpModels, CachedGenerationMatchesSingleProcess) {
  auto ref = Transformer::from_pretrained(fixture("llama"));
  auto mod = Transformer::from_pretrained(fixture("llama"));
  mod->shard_for_tp(tp_group(2));
  Batch b = make_batch(ref->config().vocab_size, 11, 2, 5);
  KVCache rc = ref->make_cache(2, 8, {0, 1});
  KVCache mc = mod->make_cache(2, 8, {0, 1});
  EXPECT_EQ(mc.k[0].size(2), ref->config().num_key_value_heads / 2);
  Tensor a = ref->forward(b.ids, {.cache = &rc});
  Tensor c = mod->forward(b.ids, {.cache = &mc});
  EXPECT_LT(rel_err(c, a), 1e-5);
  Tensor next = b.ids.slice(1, 0, 1).contiguous();
  EXPECT_LT(rel_err(mod->forward(next, {.cache = &mc}), ref->forward(next, {.cache = &rc})), 1e-5);
}

// LoRA on every projection: the sharded adapters (A or B split along the base split) give the
// same loss and the same gradients of A and B as unsharded LoRA. With dropout, every tp rank must
// draw its slice of the one-process masks (row-parallel inputs are split over the ranks).
void check_lora(const std::string& family, double dropout = 0.0) {
  auto ref = Transformer::from_pretrained(fixture(family));
  auto mod = Transformer::from_pretrained(fixture(family));
  auto group = tp_group(2);
  mod->shard_for_tp(group);
  LoraOptions opt;
  opt.r = 4;
  opt.alpha = 8;
  opt.target_modules = {"all-linear"};
  opt.seed = 3;
  opt.dropout = dropout;
  EXPECT_EQ(apply_lora(*ref, opt), apply_lora(*mod, opt));
  // B starts at zero (the gradient of A would be zero): give it the same random values.
  Generator gen(9);
  for (auto& [name, t] : lora_parameters(*ref)) {
    if (name.find("lora_B") == std::string::npos) continue;
    Tensor full = randn(t.shape(), gen, 0.0, 0.1);
    set_full(*ref, name, full);
    set_full(*mod, name, full);
  }
  Batch b = make_batch(ref->config().vocab_size, 5);
  ref->train();
  mod->train();
  set_lora_dropout_seed(*ref, 0x5eed);
  set_lora_dropout_seed(*mod, 0x5eed);
  if (dropout > 0) {  // the masks do change the loss (else this test could not fail)
    NoGradGuard no_grad;
    ref->eval();
    const double plain = ops::cross_entropy(ref->forward(b.ids), b.targets).item();
    ref->train();
    EXPECT_GT(std::fabs(ops::cross_entropy(ref->forward(b.ids), b.targets).item() - plain), 1e-4);
  }
  Tensor ref_loss = ops::cross_entropy(ref->forward(b.ids), b.targets);
  ref_loss.backward();
  Tensor loss =
      parallel::vocab_parallel_cross_entropy(mod->forward_logits_shard(b.ids), b.targets, group);
  loss.backward();
  EXPECT_LT(std::fabs(loss.item() - ref_loss.item()), 1e-5 * std::fabs(ref_loss.item()));
  // Both ran the batched q/k/v (docs/lora.md; the shards fuse their own head slices).
  if (family != "gpt2") EXPECT_TRUE(ref->fused_qkv() && mod->fused_qkv());
  auto want = full_grads(*ref);
  auto got = full_grads(*mod);
  EXPECT_EQ(want.size(), lora_parameters(*ref).size());  // the base is frozen
  ASSERT_EQ(got.size(), want.size());
  for (auto& [name, g] : want) EXPECT_LT(rel_err(got.at(name), g), 1e-5) << family << " " << name;
  // Merging on the shards gives the shards of the merged full model.
  merge_lora(*ref);
  merge_lora(*mod);
  auto full = mod->gather_full_parameters();
  auto ref_params = ref->named_parameters();
  ASSERT_EQ(full.size(), ref_params.size());
  for (size_t i = 0; i < full.size(); ++i)
    EXPECT_LT(ops::max_abs_diff(full[i].second, ref_params[i].second), 1e-6) << full[i].first;
}

TEST(TpModels, LoraOnTpLayersMatchesUnshardedLlama) { check_lora("llama"); }
TEST(TpModels, LoraOnTpLayersMatchesUnshardedGpt2) { check_lora("gpt2"); }
TEST(TpModels, LoraDropoutOnTpLayersMatchesUnshardedLlama) { check_lora("llama", 0.25); }
TEST(TpModels, LoraDropoutOnTpLayersMatchesUnshardedGpt2) { check_lora("gpt2", 0.25); }

// TP2 x DP2: each dp replica (a tp pair) takes half of the global batch; gradients averaged over
// dp with a plain all-reduce; AdamW on the shards. Losses equal one process on the whole batch.
TEST(TpModels, Tp2Dp2TrainsLikeOneProcess) {
  if (world()->size() != 4) GTEST_SKIP() << "needs 4 ranks";
  auto grid = parallel::make_grid(world(), 2);
  ASSERT_EQ(grid.dp, 2);
  auto ref = Transformer::from_pretrained(fixture("qwen2"));
  auto mod = Transformer::from_pretrained(fixture("qwen2"));
  mod->shard_for_tp(grid.tp_group);
  optim::AdamWOptions ao;
  ao.lr = 1e-2;
  // The k_proj bias has an exactly zero gradient (softmax ignores a shift shared by all keys):
  // its computed gradient is rounding noise, which Adam with eps 1e-8 would blow up to +-lr
  // steps of arbitrary sign. A larger eps keeps such noise from deciding the comparison.
  ao.eps = 1e-4;
  optim::AdamW ref_opt(optim::decay_groups(ref->named_parameters(), 0.01), ao);
  optim::AdamW opt(optim::decay_groups(mod->named_parameters(), 0.01), ao);
  const int64_t V = ref->config().vocab_size, B = 4, T = 6;
  for (int step = 0; step < 3; ++step) {
    Generator gen(100 + uint64_t(step));
    Tensor ids = randint({B, T}, gen, 0, V);
    Tensor targets = randint({B, T}, gen, 0, V);  // no ignored rows: equal token counts
    Tensor ref_loss = ops::cross_entropy(ref->forward(ids), targets);
    ref_loss.backward();
    ref_opt.step();
    ref_opt.zero_grad();

    const int64_t half = B / 2, r0 = grid.dp_rank * half;
    Tensor my_ids = ids.slice(0, r0, r0 + half).contiguous();
    Tensor my_tgt = targets.slice(0, r0, r0 + half).contiguous();
    Tensor loss = parallel::vocab_parallel_cross_entropy(mod->forward_logits_shard(my_ids), my_tgt,
                                                         grid.tp_group);
    loss.backward();
    for (auto& [name, t] : mod->named_parameters()) {
      Tensor g = t.grad();
      ASSERT_TRUE(g.defined()) << name;
      grid.dp_group->all_reduce(g, parallel::ReduceOp::avg);
    }
    opt.step();
    opt.zero_grad();
    const double global = grid.dp_group->all_reduce_scalar(loss.item()) / grid.dp;
    EXPECT_LT(std::fabs(global - ref_loss.item()), 1e-5 * std::fabs(ref_loss.item()))
        << "step " << step;
  }
  // Adam divides by sqrt(v): rounding differences of small gradients (summed in another order
  // over tp and dp) move the weights by a little more than they move the loss.
  auto full = mod->gather_full_parameters();
  auto ref_params = ref->named_parameters();
  for (size_t i = 0; i < full.size(); ++i)
    EXPECT_LT(rel_err(full[i].second, ref_params[i].second), 1e-4) << full[i].first;
}

}  // namespace
}  // namespace ftune
