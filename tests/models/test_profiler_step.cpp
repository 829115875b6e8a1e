// The step profiler (core/profiler.h) on the Transformer's SFT step, as bench_sft --profile runs
// it: every layer's ops are seen with the right call counts, full fine-tuning and LoRA.
#include <gtest/gtest.h>

#include <map>
#include <nlohmann/json.hpp>

#include "core/optim.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "io/hf_config.h"
#include "models/lora.h"
#include "models/transformer.h"
#include "tests/profiler_model.h"

namespace ftune {
namespace {

constexpr int64_t kL = 2, kD = 32, kH = 4, kKv = 2, kFfn = 48, kV = 64, kB = 2, kT = 8;

std::unique_ptr<Transformer> llama() {
  nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                        {"model_type", "llama"},
                        {"vocab_size", kV},
                        {"hidden_size", kD},
                        {"intermediate_size", kFfn},
                        {"num_hidden_layers", kL},
                        {"num_attention_heads", kH},
                        {"num_key_value_heads", kKv},
                        {"max_position_embeddings", 64},
                        {"rms_norm_eps", 1e-5},
                        {"tie_word_embeddings", true}};
  auto m = std::make_unique<Transformer>(parse_hf_config(cfg, "test"));
  m->init_random(1);
  return m;
}

// Sum of the calls of the rows of a phase whose label starts with prefix.
double calls(const profiler::Report& r, const std::string& phase, const std::string& prefix) {
  double n = 0;
  for (const auto& row : r.rows)
    if (row.phase == phase && row.label.rfind(prefix, 0) == 0) n += row.calls;
  return n;
}

void run(bool lora) {
  profiler::reset();
  auto model = llama();
  if (lora) {
    LoraOptions lo;
    lo.r = 4;
    lo.alpha = 8;
    lo.target_modules = {"all-linear"};
    apply_lora(*model, lo);
  }
  nn::NamedTensors trainable;
  if (lora)
    trainable = lora_parameters(*model);
  else
    for (auto& [n, t] : model->named_parameters())
      if (t.requires_grad()) trainable.emplace_back(n, t);
  std::vector<Tensor> params;
  for (auto& [n, t] : trainable) params.push_back(t);
  optim::AdamW opt(optim::decay_groups(trainable, 0.01), {});
  Generator gen(5);
  Tensor ids = randint({kB, kT}, gen, 0, kV, DType::i32);
  Tensor labels = randint({kB * kT}, gen, 0, kV, DType::i64);
  test::GraphCount graph;
  for (int s = 0; s < 2; ++s) {
    profiler::begin_step(Device::cpu());
    profiler::phase("forward");
    Tensor logits = model->forward(ids);
    Tensor loss = ops::cross_entropy(logits.view({kB * kT, kV}), labels);
    graph = test::count_graph(loss);
    profiler::phase("backward");
    loss.backward();
    profiler::phase("optimizer");
    optim::clip_grad_norm(params, 1.0);
    opt.step();
    opt.zero_grad();
    profiler::end_step();
  }
  profiler::Report r = profiler::report();
  SCOPED_TRACE(profiler::format_table(r));
  const std::string lin = lora ? "lora_linear [" : "linear [";
  const int64_t kv = kKv * (kD / kH);
  auto shape = [](int64_t o, int64_t i) {
    return std::to_string(o) + "," + std::to_string(i) + "]";
  };
  EXPECT_EQ(calls(r, "forward", "embedding"), 1.0);
  EXPECT_EQ(calls(r, "forward", "rms_norm"), double(2 * kL + 1));
  // Under LoRA q, k and v run as one batched op (models: fused q/k/v on a frozen base).
  const bool fused = lora && model->fused_qkv();
  if (fused) {
    EXPECT_EQ(calls(r, "forward", lin + shape(kD, kD)), double(kL));  // o
    EXPECT_EQ(calls(r, "forward", "lora_linear_multi [" + shape(kD + 2 * kv, kD)), double(kL));
    EXPECT_EQ(calls(r, "backward", "bwd lora_linear_multi ["), double(kL));
  } else {
    EXPECT_EQ(calls(r, "forward", lin + shape(kD, kD)), double(2 * kL));  // q, o
    EXPECT_EQ(calls(r, "forward", lin + shape(kv, kD)), double(2 * kL));  // k, v
  }
  EXPECT_EQ(calls(r, "forward", lin + shape(kFfn, kD)), double(2 * kL));
  EXPECT_EQ(calls(r, "forward", lin + shape(kD, kFfn)), double(kL));
  EXPECT_EQ(calls(r, "forward", "linear [" + shape(kV, kD)), 1.0);  // the tied lm_head
  EXPECT_EQ(calls(r, "forward", "rope"), double(2 * kL));
  EXPECT_EQ(calls(r, "forward", "attention"), double(kL));
  EXPECT_EQ(calls(r, "forward", "swiglu"), double(kL));
  EXPECT_EQ(calls(r, "forward", "add"), double(2 * kL));
  EXPECT_EQ(calls(r, "forward", "cross_entropy"), 1.0);
  EXPECT_EQ(calls(r, "backward", "bwd " + lin),
            double((fused ? 4 : 7) * kL + (lora ? 0 : 1)));  // + lm_head
  EXPECT_EQ(calls(r, "backward", "bwd attention"), double(kL));
  EXPECT_EQ(calls(r, "backward", "bwd cross_entropy"), 1.0);
  int64_t nodes = 0;
  for (const auto& [name, n] : graph.nodes) nodes += n;
  EXPECT_EQ(calls(r, "backward", "bwd "), double(nodes));
  EXPECT_EQ(calls(r, "backward", "autograd accumulate"), double(graph.accumulations));
  EXPECT_EQ(calls(r, "optimizer", "clip_grad_norm"), 1.0);
  EXPECT_EQ(calls(r, "optimizer", "adamw"), 1.0);
  EXPECT_LE(r.attributed_host_ms, r.wall_ms);
  profiler::reset();
}

TEST(ProfilerStep, FullFineTuningStepOfTheTransformer) { run(false); }
TEST(ProfilerStep, LoraStepOfTheTransformer) { run(true); }

}  // namespace
}  // namespace ftune
