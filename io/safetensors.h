// safetensors: the Hugging Face tensor file format, read (mmap) and written (canonical layout).
//
// Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON
//   {"<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...,
//    "__metadata__": {"<key>": "<string>", ...}}
// padded with spaces, then the data buffer; data_offsets are relative to the buffer's start.
//
// The reader follows the reference implementation (huggingface/safetensors, tensor.rs) and is
// stricter where the spec says MUST: the tensors' byte ranges must tile the data buffer exactly
// (first at 0, each starting where the previous ended, the last ending at end of file: no holes,
// no overlaps, no trailing bytes, so no polyglot files), the header must start with '{', and
// duplicate JSON keys are refused. Every check throws ftune::Error naming the file and the problem.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace ftune {

// Every dtype the format names, in the reference's enum order (increasing alignment): the writer
// sorts tensors by this order descending, so each tensor's offset is aligned to its element size.
enum class StDType : uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  F8_E4M3FNUZ,
  F8_E5M2FNUZ,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64
};

const char* st_dtype_name(StDType t);
std::optional<StDType> st_dtype_from_name(std::string_view s);
int st_dtype_bits(StDType t);                 // 4 for F4, 6 for F6_*, else 8 * bytes
std::optional<DType> st_to_dtype(StDType t);  // the ftune dtype holding it, if any
StDType st_from_dtype(DType t);

// The largest header the reference accepts (and so do we): 100 MB.
inline constexpr uint64_t kSafetensorsMaxHeader = 100'000'000;

struct SafetensorsEntry {
  std::string name;
  StDType dtype = StDType::F32;
  Shape shape;
  uint64_t begin = 0;  // byte range in the data buffer, [begin, end)
  uint64_t end = 0;
  int64_t numel() const { return shape_numel(shape); }
  uint64_t nbytes() const { return end - begin; }
};

// A validated header. `entries` are in data-buffer order (sorted by offset).
struct SafetensorsHeader {
  uint64_t header_len = 0;  // N
  std::vector<SafetensorsEntry> entries;
  std::unordered_map<std::string, size_t> index;  // name -> position in entries
  std::map<std::string, std::string> metadata;    // "__metadata__" (empty when absent)
  uint64_t data_start() const { return 8 + header_len; }
  uint64_t data_size() const { return entries.empty() ? 0 : entries.back().end; }
  const SafetensorsEntry* find(const std::string& name) const;
};

// Parses and fully validates the header of a whole safetensors file held in memory (`size` is the
// file size: the data buffer must end exactly there). `what` names the source in error messages.
// Throws ftune::Error and nothing else (the fuzz targets rely on that).
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& what);

// Copies entry `e` out of `data_buffer` (the first byte after the header) into a new CPU Tensor of
// the stored dtype. Dtypes ftune has no type for (U8, I8, F8_*, ...) throw naming the tensor.
Tensor safetensors_entry_to_tensor(const SafetensorsEntry& e, const uint8_t* data_buffer,
                                   const std::string& what);

// Copies indices [begin, end) of dim `dim` of entry `e` (all of every other dim) into a new CPU
// Tensor of the stored dtype, reading only those bytes: one contiguous run for dim 0, one run per
// index of the leading dims otherwise (a column range of a matrix: one strided read per row).
// Tensor-parallel loading reads each rank's slice this way (docs/distributed.md).
Tensor safetensors_entry_range_to_tensor(const SafetensorsEntry& e, const uint8_t* data_buffer,
                                         int dim, int64_t begin, int64_t end,
                                         const std::string& what);

// A read-only private mapping of a whole file; munmaps on destruction. Move-only.
class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(MappedFile&& o) noexcept;
  MappedFile& operator=(MappedFile&& o) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return static_cast<const uint8_t*>(addr_); }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  void release();
  std::string path_;
  void* addr_ = nullptr;
  size_t size_ = 0;
};

// One .safetensors file: the header is validated on open, tensors are copied out on demand. The
// mapping lives as long as this object (tensors returned by get() own their memory).
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsEntry>& entries() const { return header_.entries; }
  std::vector<std::string> names() const;  // in file order
  bool contains(const std::string& name) const { return header_.find(name) != nullptr; }
  const SafetensorsEntry& info(const std::string& name) const;  // throws when absent
  Tensor get(const std::string& name) const;
  // Indices [begin, end) of dim `dim` only (see safetensors_entry_range_to_tensor).
  Tensor get_range(const std::string& name, int dim, int64_t begin, int64_t end) const;
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const SafetensorsHeader& header() const { return header_; }

 private:
  std::string path_;
  std::shared_ptr<const MappedFile> map_;
  SafetensorsHeader header_;
};

// A model's weights: one model.safetensors, or the shards listed by model.safetensors.index.json
// ({"metadata": {...}, "weight_map": {tensor: shard file}}). Shards are opened lazily, on the first
// access to one of their tensors; a shard file that does not exist is an error at open time.
// Safe to call from several threads.
class SafetensorsModel {
 public:
  // A folder: the index when present, else model.safetensors.
  static SafetensorsModel open_folder(const std::string& dir);
  static SafetensorsModel open_index(const std::string& index_path);
  static SafetensorsModel open_file(const std::string& path);

  std::vector<std::string> names() const;  // sorted
  bool contains(const std::string& name) const { return where_.count(name) != 0; }
  const SafetensorsEntry& info(const std::string& name) const;
  Tensor get(const std::string& name) const;
  // Indices [begin, end) of dim `dim` only (see safetensors_entry_range_to_tensor).
  Tensor get_range(const std::string& name, int dim, int64_t begin, int64_t end) const;
  const std::string& shard_path(const std::string& name) const;
  size_t num_shards() const { return shards_.size(); }
  // The index's "metadata" ({"total_size": "1234", ...}; numbers as their JSON text; empty for a
  // single file).
  const std::map<std::string, std::string>& index_metadata() const { return index_metadata_; }
  // Opens every shard and checks each listed tensor is where the index says it is.
  void check_all() const;

 private:
  struct Shard {
    std::string path;
    std::once_flag once;
    std::unique_ptr<SafetensorsFile> file;
  };
  SafetensorsModel() = default;
  const SafetensorsFile& shard(size_t i) const;
  const SafetensorsEntry& entry_in_shard(const std::string& name, size_t& shard_i) const;

  std::string source_;  // the index (or single file) path, for messages
  std::vector<std::unique_ptr<Shard>> shards_;
  std::unordered_map<std::string, size_t> where_;  // tensor -> shard
  std::map<std::string, std::string> index_metadata_;
};

// ---- writing

using NamedTensors = std::vector<std::pair<std::string, Tensor>>;
using StringMap = std::map<std::string, std::string>;

// The bytes of a safetensors file in the reference writer's canonical layout: tensors sorted by
// dtype alignment (descending) then name, header JSON compact and space-padded to a multiple of 8.
// For the same tensors and at most one metadata key this is byte-identical to the Python/Rust
// library's output (it writes metadata in hash order; we write it sorted).
std::vector<uint8_t> serialize_safetensors(const NamedTensors& tensors,
                                           const StringMap& metadata = {});

// Writes the same bytes to `path` via "<path>.tmp" + fsync + rename, so a crash never leaves a
// half-written file under the real name. Tensors may be non-contiguous views or on a GPU.
void save_safetensors(const std::string& path, const NamedTensors& tensors,
                      const StringMap& metadata = {});

// Writes a model folder as transformers' save_pretrained does: tensors are assigned to shards in
// the given (state-dict) order, a new shard starting when the next tensor would push the current
// one past max_shard_bytes (a tensor larger than that gets a shard of its own). One shard ->
// "model.safetensors"; several -> "model-0000i-of-0000n.safetensors" plus
// "model.safetensors.index.json". Each file gets metadata {"format": "pt"} (transformers requires
// it) merged with `metadata`. The index is written last; stale shards or index of an earlier
// save in `dir` are removed. Returns the files written (index last when sharded).
std::vector<std::string> save_safetensors_model(const std::string& dir, const NamedTensors& tensors,
                                                uint64_t max_shard_bytes = 5'000'000'000ull,
                                                const StringMap& metadata = {});

}  // namespace ftune
