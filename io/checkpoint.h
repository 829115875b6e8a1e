// Training checkpoints in HDF5: model (or adapter) tensors at full shape, optimizer state, step,
// trainer state (sampler, RNG, ...), the resolved recipe and the model config, in one file per
// save. The layout is documented in docs/checkpoint-format.md (readable with h5py).
//
// A save goes to "<path>.tmp-<pid>" and is renamed onto <path> only when complete and fsynced, so
// a crash leaves the old state or the new file, never a torn one. Loads validate everything they
// read and throw ftune::Error naming the file and the problem.
//
// Builds without HDF5 (FTUNE_HDF5=OFF) keep this API: every function that needs HDF5 throws
// "[checkpoint] this build has no HDF5" (the file-name helpers and list/prune still work).
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/nn.h"
#include "core/optim.h"

namespace ftune {

// The "format_version" this build writes and the newest it reads.
constexpr int64_t kCheckpointFormatVersion = 1;
// The root "ftune_format" attribute that marks an ftune checkpoint.
constexpr const char* kCheckpointFormatName = "ftune-checkpoint";

struct Checkpoint {
  int64_t step = 0;  // optimizer steps done
  int64_t epoch = 0;
  bool adapter_only = false;  // model holds only the LoRA adapter tensors
  nn::NamedTensors model;     // dotted HF names -> tensors (f32, bf16, f16; full shapes)
  optim::OptimizerState optimizer;
  // sampler position, rng, nan counter, best eval, ...
  nlohmann::json trainer_state = nlohmann::json::object();
  std::string recipe_yaml;        // the resolved recipe
  nlohmann::json model_config;    // ModelConfig::to_json()
  nlohmann::json adapter_config;  // LoRA options, or null
};

// True when this build can read and write checkpoints (FTUNE_HDF5=ON and HDF5 found).
bool checkpoint_support();

// Writes `path` atomically: to "<path>.tmp-<pid>", H5Fflush, close, fsync, rename, fsync the
// directory. A crash at any point leaves either the old state or the complete new file. Tensors
// may live on any device and be non-contiguous (they are copied to the CPU first). Names must be
// unique and non-empty without '/'. Throws ftune::Error naming the path (removing the temp file).
void save_checkpoint(const std::string& path, const Checkpoint& ckpt);

// Reads and validates: refuses (Error naming the file and the problem) a missing file, a non-HDF5
// file, a truncated one, a foreign HDF5 file (no ftune_format attribute), a newer format version,
// an incomplete one (no complete=1), missing groups, a tensor whose shape/dtype attributes disagree
// with its dataset. Tensors come back on the CPU in the order they were saved.
Checkpoint load_checkpoint(const std::string& path);

// The same checks as load_checkpoint without reading tensor data; never throws. `why` gets the
// reason of a refusal.
bool is_valid_checkpoint(const std::string& path, std::string* why = nullptr);

// "step_00000100.h5": 8 digits, zero-padded so names sort like steps up to 99,999,999 (larger
// steps just get more digits; list_checkpoints sorts by the number, not the name).
std::string checkpoint_file_name(int64_t step);

// The checkpoints of `dir` (files named step_<digits>.h5), ascending by step, as (step, path).
// Temp files ("*.tmp-<pid>") and anything else are ignored; a missing dir gives an empty list.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir);

// The newest checkpoint in dir that passes is_valid_checkpoint; invalid newer ones are skipped
// with a warning on stderr naming them and why. nullopt when there is none.
std::optional<std::string> latest_valid_checkpoint(const std::string& dir);

// Removes the oldest checkpoints beyond the newest keep_last_n (0: keeps all), and temp files
// "step_*.h5.tmp-<pid>" whose writer process no longer exists on this host.
void prune_checkpoints(const std::string& dir, int64_t keep_last_n);

// For `ftune inspect FILE`: format version, step, epoch, adapter_only, a model config summary,
// tensor and parameter counts, bytes, optimizer state, trainer_state and the recipe; with
// verbose, every tensor's name, shape and dtype. Reads no tensor data. Throws like load.
std::string describe_checkpoint(const std::string& path, bool verbose = false);

}  // namespace ftune
