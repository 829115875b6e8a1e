// Supervised fine-tuning (and pretraining, which is SFT on `text` data): full fine-tuning or LoRA,
// gradient accumulation with a token-level mean over the whole accumulated step, clipping, AdamW
// with decay on matrices only, warmup + constant/linear/cosine, evaluation (loss, perplexity,
// token accuracy, optional sample generations), early stopping, a NaN/inf loss guard, JSONL
// metrics and HDF5 checkpoints with exact resume.
//
// Exact resume: a run stopped at any point (SIGKILL included) and resumed from its last
// checkpoint reproduces, bit for bit on the same machine and thread count, the losses of a run
// that was never stopped: everything that decides the next step (weights, AdamW state, step,
// sampler position, LoRA dropout seeds, counters) is in the checkpoint or derived from the step.
#pragma once
#include <cstdint>
#include <iosfwd>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "trainers/config.h"

namespace ftune {

namespace parallel {
class Communicator;
}

struct EvalMetrics {
  double loss = 0;  // mean over target tokens
  double perplexity = 0;
  double accuracy = 0;  // argmax == target, over target tokens
  int64_t tokens = 0;   // target tokens evaluated
};

struct SftResult {
  int64_t steps = 0;          // optimizer steps done when the run ended (resumed ones included)
  int64_t skipped_steps = 0;  // steps skipped by the NaN/inf guard
  int64_t overflow_steps = 0;  // steps skipped for a gradient overflow (dynamic loss scaling)
  double loss_scale = 0;       // the loss scale at the end; 0: no loss scaling
  double last_loss = 0;       // the last step's training loss
  std::optional<EvalMetrics> eval_before, eval_after;  // before the first step, at the end
  bool early_stopped = false;
  std::string last_checkpoint;  // "" when none was written
};

class SftTrainer {
 public:
  // Loads the tokenizer, the model (pretrained or random), adds LoRA, reads the datasets, builds
  // the optimizer and, with cfg.resume, restores the latest valid checkpoint in output_dir.
  // Progress and messages go to `log` (normally stdout) on world rank 0; the other ranks are
  // silent. `world`: the job's ranks (default: parallel::make_world_communicator("auto"), so the
  // same code runs on 1 rank or under mpirun); tests pass a single-rank communicator to compute a
  // one-process reference inside an MPI job. Every rank of `world` constructs the trainer and
  // calls train() / evaluate() (collectives); see docs/distributed.md.
  SftTrainer(SftConfig cfg, std::ostream& log,
             std::shared_ptr<parallel::Communicator> world = nullptr);
  ~SftTrainer();
  SftTrainer(const SftTrainer&) = delete;
  SftTrainer& operator=(const SftTrainer&) = delete;

  SftResult train();
  // On the held-out split, its batches shared among the dp ranks and the metrics reduced; throws
  // when there is none.
  EvalMetrics evaluate();
  // Sample generations for cfg.eval_generate's prompts (greedy unless a temperature is set).
  std::vector<std::string> sample_generations();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ftune
