// SFT step benchmark: one optimizer step (forward + backward + clip + AdamW) of a Llama-style
// Transformer on random tokens, full fine-tuning or LoRA, as trainers/sft.cpp runs it. Prints one
// JSON line: ms/step (median of --steps after --warmup), peak RSS of the process (VmHWM), trainable
// parameters and the bytes of AdamW state. Run one configuration per process (peak RSS is the
// process's high-water mark). bench/sft/peft_step.py is the same step in PyTorch + PEFT, and
// bench/sft/run.sh runs both side by side (bench/results/cpu_sft_step.md).
//   bench_sft [--model DIR | --layers 4 --d 512 --heads 8 --kv-heads 8 --ffn 1376 --vocab 2048]
//             [--seq 256] [--batch 8] [--lora-r 8 (0: full)] [--targets all-linear] [--steps 8]
//             [--warmup 2] [--device cpu|cuda] [--dtype f32|bf16] [--ckpt 0|1] [--tie 1|0]
//             [--profile N] [--profile-json FILE] [--attention ftune|cudnn] [--chunked-loss 1|0]
//             [--gemm-autotune 0|1] [--lora-dropout 0]
// --profile N: after the timed steps (which never carry it), N more steps under the op-level
// profiler (core/profiler.h; one discarded warm-up step and one step without op hooks first), its
// table on stderr: per op label, calls, GPU and host ms per step, host issue time per phase.
// On the GPU the step ends with the loss read back (as the trainer's NaN guard does), so each timed
// step includes its whole device work; peak_gpu_mib is the caching allocator's high-water mark, and
// mfu counts 6 * params * tokens (+ attention) against the H100/H200 dense bf16 rate.
// --chunked-loss: the trainer's `chunked_loss` (default on): the loss through
// ops::linear_cross_entropy, never the whole logits; 0: linear then cross_entropy.
// --gemm-autotune: the recipe's `gemm_autotune` (default: FTUNE_GEMM_AUTOTUNE, else off): each
// GEMM shape's cuBLASLt algorithm timed at first use (in the warm-up steps).
// --lora-dropout P: the adapters' dropout (lora_dropout; 0 by default, as most recipes), a fresh
// mask per step as the trainer draws them (set_lora_dropout_seed).
// --attention: the fused attention the GPU runs (a recipe's `attention.backend`); cudnn needs a
// build with cuDNN and falls back to ftune's kernel, with a note, on shapes cuDNN does not serve.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/optim.h"
#include "core/profiler.h"
#include "core/rng.h"
#include "io/hf_config.h"
#include "models/lora.h"
#include "models/transformer.h"

using namespace ftune;

namespace {

double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model_dir, targets = "all-linear";
  int64_t layers = 4, d = 512, heads = 8, kv = 8, ffn = 1376, vocab = 2048, seq = 256, batch = 8;
  int64_t lora_r = 8, steps = 8, warmup = 2, ckpt = 0, tie = 1, profile = 0, chunked_loss = 1;
  int64_t gemm_autotune = -1;  // -1: FTUNE_GEMM_AUTOTUNE's default
  double lora_dropout = 0;
  std::string device = "cpu", dtype = "f32", profile_json, attention = "ftune";
  for (int i = 1; i < argc; i += 2) {
    std::string k = argv[i];
    if (i + 1 >= argc) {
      std::fprintf(stderr, "bench_sft: option %s needs a value\n", k.c_str());
      return 2;
    }
    std::string v = argv[i + 1];
    if (k == "--model")
      model_dir = v;
    else if (k == "--layers")
      layers = std::stoll(v);
    else if (k == "--d")
      d = std::stoll(v);
    else if (k == "--heads")
      heads = std::stoll(v);
    else if (k == "--kv-heads")
      kv = std::stoll(v);
    else if (k == "--ffn")
      ffn = std::stoll(v);
    else if (k == "--vocab")
      vocab = std::stoll(v);
    else if (k == "--seq")
      seq = std::stoll(v);
    else if (k == "--batch")
      batch = std::stoll(v);
    else if (k == "--lora-r")
      lora_r = std::stoll(v);
    else if (k == "--lora-dropout")
      lora_dropout = std::stod(v);
    else if (k == "--targets")
      targets = v;
    else if (k == "--steps")
      steps = std::stoll(v);
    else if (k == "--warmup")
      warmup = std::stoll(v);
    else if (k == "--device")
      device = v;
    else if (k == "--dtype")
      dtype = v;
    else if (k == "--ckpt")
      ckpt = std::stoll(v);
    else if (k == "--tie")
      tie = std::stoll(v);
    else if (k == "--profile")
      profile = std::stoll(v);
    else if (k == "--profile-json")
      profile_json = v;
    else if (k == "--attention")
      attention = v;
    else if (k == "--chunked-loss")
      chunked_loss = std::stoll(v);
    else if (k == "--gemm-autotune")
      gemm_autotune = std::stoll(v);
    else {
      std::fprintf(stderr, "bench_sft: unknown option %s\n", k.c_str());
      return 2;
    }
  }
  if (steps < 1 || warmup < 0 || profile < 0) {
    std::fprintf(stderr, "bench_sft: --steps must be >= 1, --warmup and --profile >= 0\n");
    return 2;
  }
  try {
    std::unique_ptr<Transformer> model;
    if (!model_dir.empty()) {
      model = Transformer::from_pretrained(model_dir);
    } else {
      nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                            {"model_type", "llama"},
                            {"vocab_size", vocab},
                            {"hidden_size", d},
                            {"intermediate_size", ffn},
                            {"num_hidden_layers", layers},
                            {"num_attention_heads", heads},
                            {"num_key_value_heads", kv},
                            {"max_position_embeddings", std::max<int64_t>(seq, 512)},
                            {"rms_norm_eps", 1e-5},
                            {"tie_word_embeddings", tie != 0}};
      model = std::make_unique<Transformer>(parse_hf_config(cfg, "bench"));
      model->init_random(1);
    }
    const ModelConfig& mc = model->config();
    const int64_t base_params = model->num_parameters();  // before adapters are added
    nn::NamedTensors trainable;
    if (lora_r > 0) {
      LoraOptions lo;
      lo.r = lora_r;
      lo.alpha = 2.0 * double(lora_r);
      lo.dropout = lora_dropout;
      lo.target_modules = {targets};
      apply_lora(*model, lo);
      trainable = lora_parameters(*model);
    } else {
      for (auto& [n, t] : model->named_parameters())
        if (t.requires_grad()) trainable.emplace_back(n, t);
    }
    const Device dev = device == "cuda" ? Device::cuda(0) : Device::cpu();
    const DType dt = dtype == "bf16" ? DType::bf16 : dtype == "f16" ? DType::f16 : DType::f32;
    if (dev.is_cuda() || dt != DType::f32) {
      model->to_(dev, dt);
      trainable = lora_r > 0 ? lora_parameters(*model) : nn::NamedTensors{};
      if (lora_r == 0)
        for (auto& [n, t] : model->named_parameters())
          if (t.requires_grad()) trainable.emplace_back(n, t);
    }
    ops::set_attention_backend(attention);  // throws clearly for an unknown name or no cuDNN
    if (gemm_autotune >= 0) cuda::set_gemm_autotune(gemm_autotune != 0);
    model->set_activation_checkpointing(ckpt != 0);
    model->train();  // as the trainer does (LoRA dropout, if any, applies in training mode)
    std::vector<Tensor> params;
    int64_t n_train = 0;
    for (auto& [n, t] : trainable) {
      params.push_back(t);
      n_train += t.numel();
    }
    optim::AdamW opt(optim::decay_groups(trainable, 0.01), {});
    Generator gen(5);
    Tensor ids = randint({batch, seq}, gen, 0, mc.vocab_size, DType::i32).to(dev);
    Tensor labels = randint({batch * seq}, gen, 0, mc.vocab_size, DType::i64).to(dev);
    std::vector<double> ms, phase_fwd, phase_bwd, phase_opt;
    // The summed cross-entropy of the batch, as trainers/sft.cpp takes it.
    auto loss_sum = [&] {
      if (chunked_loss) {
        Tensor h = model->hidden_states(ids);
        return ops::linear_cross_entropy(h.view({batch * seq, mc.hidden_size}),
                                         model->lm_head_weight(), labels, -100,
                                         ops::Reduction::sum);
      }
      Tensor logits = model->forward(ids);
      return ops::cross_entropy(logits.view({batch * seq, mc.vocab_size}), labels, -100,
                                ops::Reduction::sum);
    };
    for (int64_t s = 0; s < warmup + steps; ++s) {
      auto t0 = std::chrono::steady_clock::now();
      if (lora_r > 0) set_lora_dropout_seed(*model, uint64_t(s) + 1);  // fresh masks per step
      // The trainer's loss: a summed cross-entropy read back (NaN guard), scaled by 1/targets.
      Tensor ce = loss_sum();
      if (!std::isfinite(ce.item())) throw std::runtime_error("non-finite loss");  // syncs
      auto t1 = std::chrono::steady_clock::now();
      ops::mul_scalar(ce, 1.0 / double(batch * seq)).backward();
      if (dev.is_cuda()) cuda_synchronize(dev.index);
      auto t2 = std::chrono::steady_clock::now();
      // As the trainer: the norm (read back), its clipping coefficient applied inside AdamW.
      opt.step(optim::clip_coefficient(std::sqrt(optim::grad_sum_squares(params)), 1.0));
      opt.zero_grad();
      if (dev.is_cuda()) cuda_synchronize(dev.index);
      auto t3 = std::chrono::steady_clock::now();
      auto msd = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
      if (s >= warmup) {
        ms.push_back(msd(t0, t3));
        phase_fwd.push_back(msd(t0, t1));
        phase_bwd.push_back(msd(t1, t2));
        phase_opt.push_back(msd(t2, t3));
      }
    }
    // Read the high-water mark before export_state() below copies the whole AdamW state.
    const double peak_rss = peak_rss_mib();
    std::sort(ms.begin(), ms.end());
    const size_t h = ms.size() / 2;
    const double median = ms.size() % 2 ? ms[h] : 0.5 * (ms[h - 1] + ms[h]);
    int64_t state_bytes = 0;
    for (auto& [n, t] : opt.export_state().tensors)
      state_bytes += t.numel() * int64_t(dtype_size(t.dtype()));
    // Training FLOPs per token: 6 per parameter touched by a GEMM (forward 2, backward 4; the
    // embedding lookup is not a GEMM, a tied lm_head is), plus causal attention's
    // 6 * 2 * seq * d per layer (QK^T and PV, forward + backward, halved by the mask).
    const double gemm_params = double(base_params) - (tie ? 0.0 : double(mc.vocab_size * mc.hidden_size));
    const double flops_per_token = 6.0 * gemm_params + 6.0 * double(mc.num_hidden_layers) *
                                                         double(seq) * double(mc.num_attention_heads * mc.head_dim);
    const double tps = double(batch * seq) / (median / 1e3);
    nlohmann::json gpu = nullptr;
    if (dev.is_cuda()) gpu = double(cuda_allocator_stats(0).peak_bytes) / (1 << 20);
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[v.size() / 2];
    };
    nlohmann::json out = {
        {"model", model_dir.empty() ? "random" : model_dir},
        {"ms_forward_loss", med(phase_fwd)},
        {"ms_backward", med(phase_bwd)},
        {"ms_clip_adamw", med(phase_opt)},
        {"device", device},
        {"dtype", dtype},
        {"activation_checkpointing", ckpt != 0},
        {"attention", attention},
        {"chunked_loss", chunked_loss != 0},
        {"gemm_autotune", cuda::gemm_autotune()},
        {"fused_qkv", lora_r > 0 && model->fused_qkv()},
        {"peak_gpu_mib", gpu},
        {"mfu_vs_989tflops",
         dev.is_cuda() ? nlohmann::json(tps * flops_per_token / 989e12) : nlohmann::json(nullptr)},
        {"layers", mc.num_hidden_layers},
        {"d", mc.hidden_size},
        {"vocab", mc.vocab_size},
        {"params", base_params},
        {"mode", lora_r > 0 ? "lora" : "full"},
        {"lora_r", lora_r},
        {"lora_dropout", lora_dropout},
        {"lora_fused", std::getenv("FTUNE_LORA_FUSED") ? std::getenv("FTUNE_LORA_FUSED") : "auto"},
        {"attn_wgmma", std::getenv("FTUNE_ATTN_WGMMA") ? std::getenv("FTUNE_ATTN_WGMMA") : "auto"},
        {"trainable", n_train},
        {"seq", seq},
        {"batch", batch},
        {"ms_per_step", median},
        {"tokens_per_s", double(batch * seq) / (median / 1e3)},
        {"peak_rss_mib", peak_rss},
        {"adamw_state_mib", double(state_bytes) / (1024.0 * 1024.0)}};
    std::printf("%s\n", out.dump().c_str());
    std::fflush(stdout);

    if (profile > 0) {
      // The timed step, with the loss read (the NaN guard) moved after the step so that nothing
      // but the gradient norm's read synchronizes inside it: the host issue time of forward and
      // backward shows whether the host keeps ahead of the GPU.
      auto profiled = [&](bool hooks) {
        profiler::begin_step(dev, hooks);
        profiler::phase("forward");
        Tensor ce = loss_sum();
        Tensor loss = ops::mul_scalar(ce, 1.0 / double(batch * seq));
        profiler::phase("backward");
        loss.backward();
        profiler::phase("clip");
        const double coef = optim::clip_coefficient(std::sqrt(optim::grad_sum_squares(params)), 1.0);
        profiler::phase("adamw");
        opt.step(coef);
        opt.zero_grad();
        profiler::end_step();
        if (!std::isfinite(ce.item())) throw std::runtime_error("non-finite loss");
      };
      profiled(true);  // warm-up: the profiler's event pool and labels
      profiler::reset();
      profiled(false);
      for (int64_t s = 0; s < profile; ++s) profiled(true);
      const profiler::Report rep = profiler::report();
      std::fprintf(stderr, "== profile: bench_sft %s%s, %s %s, L=%lld d=%lld seq=%lld batch=%lld ==\n%s\n",
                   lora_r > 0 ? "lora r=" : "full", lora_r > 0 ? std::to_string(lora_r).c_str() : "",
                   device.c_str(), dtype.c_str(), (long long)mc.num_hidden_layers,
                   (long long)mc.hidden_size, (long long)seq, (long long)batch,
                   profiler::format_table(rep).c_str());
      if (!profile_json.empty()) {
        std::ofstream js(profile_json);
        if (!js) throw std::runtime_error("cannot write " + profile_json);
        js << profiler::to_json(rep) << "\n";
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_sft: %s\n", e.what());
    return 1;
  }
  return 0;
}
