// SFT datasets: JSONL files in the formats Hugging Face / TRL use (text, prompt/completion,
// messages, alpaca), tokenized into ids plus a per-token training mask; a seeded held-out split;
// and SftLoader, the epoch-based (packing, distributed) batcher whose position is checkpointed.
// docs/datasets.md describes the formats, masking, truncation, packing and the sampler state.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "data/tokenizer.h"

namespace ftune {

enum class SftFormat { auto_detect, text, prompt_completion, messages, alpaca };
// "auto", "text", "prompt_completion", "messages", "alpaca"; anything else throws.
SftFormat sft_format_from_name(const std::string& name);
const char* sft_format_name(SftFormat f);

struct SftDatasetOptions {
  SftFormat format = SftFormat::auto_detect;  // auto: from the first line's keys
  bool train_on_input = false;   // false: prompt tokens (and system/user turns) get label -100
  int64_t max_seq_len = 512;
  std::string truncation = "right";  // right: keep the start; left: keep the end; drop: skip
  // For messages and conversational prompt/completion: "" or "auto" = the tokenizer's
  // (tokenizer_config.json), else a ChatTemplate name. String prompt/completion and alpaca are
  // concatenated as plain text, never templated.
  std::string chat_template;
  bool add_eos = true;  // text, prompt/completion (strings) and alpaca get eos appended (trained)
};

struct SftExample {
  std::vector<int32_t> ids;
  std::vector<uint8_t> train_mask;  // 1: this token is a training target (token 0 never is)
  int64_t line = 0;                 // 1-based line of the JSONL file
};

struct SftDataStats {
  int64_t lines = 0;       // non-blank lines read
  int64_t examples = 0;    // examples kept
  int64_t truncated = 0;   // kept examples that were cut to max_seq_len
  int64_t dropped = 0;     // examples over max_seq_len skipped (truncation: drop)
  int64_t tokens = 0;      // tokens of the kept examples
  int64_t target_tokens = 0;  // tokens with train_mask 1 in the kept examples
  int64_t no_targets = 0;  // examples skipped because nothing in them is trained on (e.g. a
                           // prompt that fills max_seq_len); not counted in `dropped`
};

// Reads JSONL; a bad line (invalid JSON, missing/mistyped key, empty messages, unknown role...)
// throws ftune::Error naming "file:line" and the problem. Blank lines are skipped. Lines are
// tokenized in parallel (OpenMP); the result does not depend on the thread count.
std::vector<SftExample> load_sft_jsonl(const std::string& path, const Tokenizer& tok,
                                       const SftDatasetOptions& opt,
                                       SftDataStats* stats = nullptr);
// One JSON record (an already parsed line) to an example; `where` ("file:line") prefixes errors.
// Returns false (and leaves `out` unspecified) when the example is skipped: over max_seq_len
// under truncation "drop" (*dropped = true) or without any target token (*dropped = false).
// `format` must not be auto_detect (see detect_sft_format).
bool encode_sft_record(const nlohmann::json& record, SftFormat format, const Tokenizer& tok,
                       const SftDatasetOptions& opt, const std::string& where, SftExample& out,
                       bool* truncated = nullptr, bool* dropped = nullptr);
// The format a record's keys imply: messages > prompt+completion > instruction+output > text.
SftFormat detect_sft_format(const nlohmann::json& record, const std::string& where);

// Seeded held-out split: val_size < 1 is a fraction (ceil(val_size * n) examples, as HF's
// train_test_split), >= 1 a count. Deterministic for a seed; both parts keep the input order.
// Returns {train, val}.
std::pair<std::vector<SftExample>, std::vector<SftExample>> split_holdout(
    std::vector<SftExample> all, double val_size, uint64_t seed);

// One micro-batch. ids/labels/positions are [B, T]; labels are next-token targets already
// shifted and aligned with ids: labels[b][t] = ids[b][t+1] when that token is in the same
// sequence and is a training target, else -100. So loss = cross_entropy(logits.view({B*T,V}),
// labels.view({B*T})) with ignore_index -100, no shift.
struct SftBatch {
  Tensor ids;         // i32 [B, T], pad_id on padding
  Tensor labels;      // i64 [B, T]
  Tensor positions;   // i32 [B, T]: 0.. restarting at each packed sequence; padding continues
  Tensor cu_seqlens;  // i32 [n+1] over the flattened B*T tokens when packed (each row's padding
                      // tail is its own segment; a sequence never spans rows); else undefined
  int64_t num_targets = 0;  // labels != -100
  int64_t num_tokens = 0;   // non-padding tokens
};

struct SftLoaderOptions {
  int64_t batch_size = 8;  // rows per batch (sequences, or packed rows)
  int64_t max_seq_len = 512;
  bool packed = false;
  bool shuffle = true;
  uint64_t seed = 0;
  int32_t pad_id = 0;
  int rank = 0, world_size = 1;  // rank r takes batches r, r + world_size, ...
  bool drop_last = false;  // drop the last partial batch and the batches that do not divide
                           // evenly among ranks (else ranks short of a batch wrap around)
};

struct SftPackingStats {
  int64_t rows = 0, sequences = 0, tokens = 0;
  double fill_ratio = 0.0;  // tokens / (rows * max_seq_len)
};

// Epoch-based iteration. Each epoch: a permutation of the examples from (seed, epoch) (Philox;
// identical on every machine and thread count), then (packed) best-fit-decreasing packing of
// that order into rows of max_seq_len followed by a seeded shuffle of the rows, then batches of
// batch_size rows; rank r takes every world_size-th batch. Rows are right-padded to the longest
// row of their batch. The position is the checkpointed state: restoring it and continuing yields
// exactly the batches an uninterrupted loader would have produced.
class SftLoader {
 public:
  SftLoader(std::vector<SftExample> examples, SftLoaderOptions opt);

  int64_t batches_per_epoch() const;  // for this rank
  // Fills `out` with the next batch; false at the end of the epoch (the epoch then advances and
  // the next call starts the next one).
  bool next(SftBatch& out);
  int64_t epoch() const { return epoch_; }
  int64_t position() const { return position_; }  // batches consumed in this epoch
  // This rank's batches still to come in the current epoch (0 at its end): after a load_state at
  // another world size, what the epoch has left at this one.
  int64_t batches_left_in_epoch() const;
  // {"epoch","position","offset","seed","num_examples","fingerprint","batch_size","world_size",
  //  "packed","max_seq_len","drop_last","shuffle"}. Rank r's batch at `position` is global batch
  //  offset + r + position * world_size of the epoch (modulo the epoch's batches: wrap-around).
  nlohmann::json state() const;
  // Throws when the state belongs to another dataset or loader setup (any saved key but the
  // layout's differs). A state saved at another world_size is converted: mid-epoch, the ranks
  // continue with the next global batches exactly (setting offset where the batches consumed do
  // not divide among the new ranks); at an epoch's end, the next call starts the next epoch.
  void load_state(const nlohmann::json& state);
  void set_epoch(int64_t e);

  // The rows of this epoch's plan (all ranks), e.g. to report the packing fill ratio.
  SftPackingStats packing_stats() const;
  const std::vector<SftExample>& examples() const { return examples_; }
  // The example indices of each row of the current epoch, in batch order (all ranks).
  const std::vector<std::vector<int64_t>>& rows() const { return rows_; }

 private:
  void plan_epoch();
  int64_t total_batches() const;  // all ranks
  // Positions of an epoch on each of `world_size` ranks that start at global batch `offset`.
  int64_t positions_after(int64_t offset, int64_t world_size) const;

  std::vector<SftExample> examples_;
  SftLoaderOptions opt_;
  uint64_t fingerprint_ = 0;
  int64_t epoch_ = 0, position_ = 0;
  int64_t offset_ = 0;  // global batches of this epoch consumed before position 0 (a resume)
  int64_t planned_epoch_ = -1;
  std::vector<std::vector<int64_t>> rows_;
};

// Philox-driven Fisher-Yates permutation of 0..n-1 for (seed, stream): what SftLoader and
// split_holdout use.
std::vector<int64_t> philox_permutation(int64_t n, uint64_t seed, uint64_t stream);
// Best-fit decreasing: items (lengths, in the given order) into bins of `capacity`; returns the
// bins as lists of positions into `lengths`, in the order the bins were opened. Every length
// must be in [1, capacity].
std::vector<std::vector<int64_t>> pack_best_fit_decreasing(const std::vector<int64_t>& lengths,
                                                           int64_t capacity);

}  // namespace ftune
