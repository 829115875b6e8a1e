// Training checkpoints in HDF5: model (or adapter) tensors at full shape, optimizer state, step,
// trainer state (sampler, seed, counters, ...), the resolved recipe and the model config, in one file per
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
#include <functional>
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
  // sampler position, seed, nan counter, best eval, ...
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

// ---- Sharded checkpoints (issue 5): several ranks, one file, tensors at full shape.

// One rank's part of a tensor: the dataset "model/<name>" or "optimizer/<name>" has `full_shape`;
// this rank holds the slice [offset, offset + count) along `dim` (a contiguous block of rows or
// columns; tensor parallelism splits like that). With blocks > 1 the full tensor's `dim` is made
// of `blocks` equal blocks (GPT-2's fused [q | k | v] c_attn) and the slice is
// [b * full / blocks + offset, ... + count) of every block b, concatenated in block order in the
// local tensor (as parallel::ShardInfo describes a TP shard). dim -1: the whole tensor, written by
// the ranks whose `write` is set (to spread the writes of replicated tensors over ranks).
struct TensorSlice {
  std::string name;    // "model/<name>" or "optimizer/<name>": the dataset's path in the file
  int64_t dim = 0;     // the split dimension; -1: not split
  int64_t offset = 0;  // the slice's start along dim (within each block)
  Shape full_shape;    // the whole tensor's shape (what the file stores)
  int64_t count = -1;  // its length along dim (per block); -1: the local tensor's size / blocks
                       // (save) / to the end of the block (load)
  bool write = true;   // save: false where another rank writes the same slice (a dp replica)
  int64_t blocks = 1;
  // With flat_count >= 0 the local tensor (any shape, flat_count elements) holds the
  // elements [flat_offset, flat_offset + flat_count) of the part described above (its shape:
  // full_shape with dim's size count * blocks; count must be given), in row-major order. ZeRO-1
  // shards the optimizer state of a parameter so. Save, and load through the slice_of overload of
  // load_checkpoint_sharded.
  int64_t flat_offset = 0;
  int64_t flat_count = -1;
};

// True when this build can do save_checkpoint_sharded over several ranks (HDF5 with MPI-IO).
bool sharded_checkpoint_support();

// A collective save by every rank of an MPI communicator into ONE file with parallel HDF5 (MPI-IO):
// `local` holds this rank's tensors: the slice of each tensor named in `slices`, the whole
// tensor for the others (replicated: written by rank 0 only). Every rank passes the same tensor
// names, in the same order, with the same dtypes and full shapes (checked: an Error on every rank
// otherwise), and the written slices must cover every tensor exactly (checked by element count).
// The step, epoch, strings and trainer_state come from rank 0. The file is identical in layout to
// save_checkpoint of the full tensors, and written with the same protocol: "<path>.tmp-<pid of
// rank 0>" (tensor data collectively, then rank 0 adds the header and complete=1, fsyncs and
// renames); when it returns on any rank, the final file is in place for all.
// `mpi_comm` points to an MPI_Comm (parallel/checkpoint_io.h passes a Communicator's; io/ does not
// depend on parallel/); nullptr: this process alone (the slices must then be whole tensors).
// Throws on every rank when any rank's arguments are bad; an HDF5 or I/O error on one rank throws
// there, and main() takes the job down (the other ranks may be inside a collective).
void save_checkpoint_sharded(const std::string& path, const Checkpoint& local,
                             const std::vector<TensorSlice>& slices, void* mpi_comm);

// The slice [offset, offset + count) along `dim` of the tensor `name` ("model/<name>" or
// "optimizer/<name>") of a checkpoint, whichever layout wrote it (count -1: to the end). Validates
// the file as load_checkpoint does. Any number of processes may read one file at once.
Tensor load_checkpoint_slice(const std::string& path, const std::string& name, int64_t dim,
                             int64_t offset, int64_t count, int64_t blocks = 1);

// load_checkpoint, reading for each tensor named in `slices` only that slice (resume at another
// tp/dp layout: each rank reads its part); other tensors come whole.
Checkpoint load_checkpoint_sharded(const std::string& path, const std::vector<TensorSlice>& slices);
// The same, asking `slice_of(path, full_shape)` for each tensor of the file ("model/<name>" or
// "optimizer/<name>"): a slice to read only that part (its name and full_shape are ignored), or
// nullopt to read it whole. For a reader that knows the split by name, not the file's tensors.
// A slice with flat_count >= 0 reads those elements of its part as a 1-D tensor (ZeRO-1 shards).
Checkpoint load_checkpoint_sharded(
    const std::string& path,
    const std::function<std::optional<TensorSlice>(const std::string&, const Shape&)>& slice_of);

// For `ftune inspect FILE`: format version, step, epoch, adapter_only, a model config summary,
// tensor and parameter counts, bytes, optimizer state, trainer_state and the recipe; with
// verbose, every tensor's name, shape and dtype. Reads no tensor data. Throws like load.
std::string describe_checkpoint(const std::string& path, bool verbose = false);

}  // namespace ftune
