// The typed form of a recipe (recipes/*.yaml): what the trainers read. launch/recipe.cpp parses
// and validates the YAML (keys, types, files, conflicts, each with file:line:column) and fills
// these structs; the trainers never see YAML. Defaults here are the defaults of a recipe that
// leaves a key out (docs/recipes.md lists them).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ftune {

struct ModelSection {
  std::string path;           // HF model folder (config.json, weights, tokenizer files)
  std::string init = "pretrained";  // "pretrained": load the weights; "random": init_random(seed)
  double init_std = 0.02;     // init: random
};

struct TokenizerSection {
  std::string path;             // tokenizer.json or a folder holding it; default: model.path
  int64_t max_seq_len = 512;    // examples longer than this are cut by dataset.truncation
  std::string chat_template;    // "" / "auto": from tokenizer_config.json; else a template name
};

struct DatasetSection {
  std::string path;             // JSONL file
  std::string format = "auto";  // auto | text | prompt_completion | messages | alpaca
  bool train_on_input = false;  // false: prompt tokens get label -100
  bool packed = false;          // best-fit-decreasing packing into rows of max_seq_len
  std::string truncation = "right";  // right (keep the start) | left (keep the end) | drop
  std::string val_path;         // held-out JSONL; else val_size of the training file
  double val_size = 0.0;        // fraction (< 1) or a count (>= 1) of examples held out
  bool shuffle = true;
};

struct LoraSection {
  bool enabled = false;  // a `lora:` section is present
  int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  bool use_rslora = false;  // scale alpha / sqrt(r) instead of alpha / r
  // HF module names ("q_proj", "v_proj", "c_attn", ...) or the single entry "all-linear"
  // (every projection of the blocks, not lm_head, as PEFT does).
  std::vector<std::string> target_modules = {"q_proj", "v_proj"};
};

struct OptimizerSection {
  std::string name = "adamw";
  double lr = 2e-5;
  double beta1 = 0.9, beta2 = 0.999;  // YAML: betas: [0.9, 0.999]
  double eps = 1e-8;
  double weight_decay = 0.0;  // on matrices only
};

struct SchedulerSection {
  std::string name = "constant";  // constant | linear | cosine
  int64_t num_warmup_steps = 0;
  double min_lr_ratio = 0.0;
};

struct EvalGenerateSection {
  std::vector<std::string> prompts;  // user messages (chat template applied) or raw text
  int64_t max_new_tokens = 32;
  double temperature = 0.0;
};

struct EarlyStoppingSection {
  int64_t patience = 0;  // 0: off; else stop after this many evals without improvement
  double min_delta = 0.0;
};

// `parallel:` of a recipe. The job's size comes from the launcher (mpirun); the recipe sets tp, and
// dp = world / tp (docs/distributed.md).
struct ParallelSection {
  int64_t dp = 0;  // informational: 0 = derived (world / tp); when set, it must equal world / tp
  int64_t tp = 1;
  int64_t zero = 0;         // 0: plain data parallel; 1: ZeRO-1 (optimizer state sharded over dp)
  double bucket_mb = 25.0;  // gradient bucket size for the all-reduce / reduce-scatter
  // Communicator of the gradients: "auto" / "mpi" (the MPI world; GPU tensors staged through the
  // host; "mpi" forces MPI even for one process), "nccl" (device: cuda, builds with NCCL: the dp
  // group's gradients go through a NCCL communicator bootstrapped over the MPI dp group).
  std::string backend = "auto";
};

// `attention:` of a recipe: which fused attention the GPU runs (core/ops.h set_attention_backend;
// docs/gpu.md "cuDNN attention backend").
struct AttentionSection {
  std::string backend = "ftune";  // ftune | cudnn
};

struct SftConfig {
  std::string recipe_file;    // where the recipe came from (messages)
  std::string resolved_yaml;  // the resolved recipe, as printed and saved in checkpoints
  std::string output_dir = "output";
  uint64_t seed = 0;
  std::string dtype = "f32";  // f32 | bf16 | f16: the parameters' and activations' dtype (16-bit
                              // types on the GPU only; AdamW keeps f32 masters)
  std::string device = "cpu";  // cpu | cuda | cuda:N ("cuda": the GPU of the local rank)
  bool enable_activation_checkpointing = false;  // recompute each block in the backward
  bool allow_tf32 = false;  // f32 GEMMs on the GPU may use TF32 tensor cores
  bool gemm_autotune = false;  // GPU GEMMs: the fastest of cuBLASLt's top picks, timed at first use
  // The training loss through ops::linear_cross_entropy: the LM head and cross-entropy in chunks
  // of rows, never the whole [tokens, vocab] logits (nor their gradient). Same loss and
  // gradients up to the order of dW's sums. Off: linear then cross_entropy. Not under TP (the
  // vocab-parallel loss has no logits gathered anyway), nor with dtype f16 (the loss scale must
  // reach the logits' gradient before it is formed in f16). Evaluation also takes its loss and
  // token accuracy by chunks when this is on (in every dtype: no gradient is formed there).
  bool chunked_loss = true;

  ModelSection model;
  TokenizerSection tokenizer;
  DatasetSection dataset;
  LoraSection lora;
  OptimizerSection optimizer;
  SchedulerSection lr_scheduler;
  ParallelSection parallel;
  AttentionSection attention;

  int64_t batch_size = 8;  // sequences (rows, when packed) per micro-batch
  int64_t epochs = 1;
  int64_t max_steps = -1;  // optimizer steps; -1: epochs decide
  int64_t gradient_accumulation_steps = 1;
  double clip_grad_norm = 0.0;  // 0: off

  int64_t log_every_n_steps = 1;
  int64_t eval_every_n_steps = 0;  // 0: only at the end
  int64_t eval_max_batches = 0;    // 0: the whole held-out split
  int64_t save_every_n_steps = 0;  // 0: only at the end
  int64_t keep_last_n = 0;         // 0: keep every checkpoint
  bool resume = false;
  int64_t max_consecutive_nan_steps = 5;  // NaN/inf loss guard: abort after this many in a row
  // Loss scaling (trainers/loss_scaler.h, docs/gpu.md). "auto": "dynamic" for dtype f16, "none"
  // for f32/bf16; "dynamic": torch.amp.GradScaler's schedule from loss_scale_init; "fixed": the
  // constant loss_scale_init (YAML: `loss_scale: <number>`); "none": no scaling.
  std::string loss_scale = "auto";
  double loss_scale_init = 65536.0;             // 2^16
  int64_t loss_scale_growth_interval = 2000;    // clean steps before the scale doubles
  EarlyStoppingSection early_stopping;
  std::optional<EvalGenerateSection> eval_generate;
};

}  // namespace ftune
