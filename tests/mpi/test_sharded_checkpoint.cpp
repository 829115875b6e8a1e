// Sharded HDF5 checkpoints under mpirun (2 and 4 ranks): every rank writes its slices into one
// file; a single-process load reads exactly the full tensors (bit for bit), the file describes
// like a single-process save of the same tensors, each rank's slice loader reads its part of a
// single-process file, and bad arguments fail on every rank without leaving a file behind.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <sstream>

#include "core/ops.h"
#include "io/checkpoint.h"
#include "parallel/checkpoint_io.h"
#include "tests/mpi/mpi_world.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using testing::world;

// A folder every rank sees: rank 0 makes it and broadcasts the name.
std::string shared_dir(parallel::Communicator& w) {
  std::string name;
  if (w.rank() == 0) {
    char tmpl[] = "/tmp/ftune_mpi_ckpt_XXXXXX";
    EXPECT_NE(::mkdtemp(tmpl), nullptr);
    name = tmpl;
  }
  Tensor buf = Tensor::zeros({64}, DType::i32);
  for (size_t i = 0; i < name.size(); ++i) buf.data<int32_t>()[i] = name[i];
  w.broadcast(buf, 0);
  name.clear();
  for (int64_t i = 0; i < 64 && buf.data<int32_t>()[i]; ++i) name += char(buf.data<int32_t>()[i]);
  return name;
}

// A full tensor with distinct values per element (exact in every dtype used here).
Tensor full_tensor(const Shape& shape, DType dt, int seed) {
  Tensor t = Tensor::arange(shape_numel(shape), DType::f64);
  std::vector<double> v = t.to_vector<double>();
  for (double& x : v) x = double(int64_t(x * 7 + seed * 13) % 1021) - 500.0;
  return Tensor::from_vector<double>(v, shape).to(dt);
}

bool bit_equal(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  Tensor ac = a.contiguous(), bc = b.contiguous();
  return std::memcmp(ac.raw_data(), bc.raw_data(), size_t(a.numel()) * dtype_size(a.dtype())) == 0;
}

// [begin, end) of rank r's block of n rows split over `parts` ranks (uneven: the first get more).
std::pair<int64_t, int64_t> block(int64_t n, int parts, int r) {
  const int64_t base = n / parts, extra = n % parts;
  const int64_t begin = r * base + std::min<int64_t>(r, extra);
  return {begin, begin + base + (r < extra ? 1 : 0)};
}

// The tensors of the test: how each is split over the ranks.
struct Spec {
  std::string group, name;
  Shape shape;
  DType dtype;
  int dim;       // -1: replicated
  bool tp_grid;  // split over the "tp" pairs of ranks, written by dp replica 0 only
  int blocks = 1;       // the split dim holds this many equal blocks (GPT-2's fused [q | k | v])
  int writer = -1;      // dim -1: a slice naming the tensor whole, written by this rank alone
  bool flat = false;    // ZeRO-1 style: each rank (dp rank, with tp_grid) holds a flat range
};

// The flat range [begin, end) of n elements that rank k of `parts` holds: uneven cuts (rank 0
// one element more) so the ranges end in the middle of rows.
std::pair<int64_t, int64_t> flat_range(int64_t n, int parts, int k) {
  auto cut = [&](int j) { return j == 0 ? int64_t(0) : j == parts ? n : n * j / parts + 1; };
  return {cut(k), cut(k + 1)};
}

std::vector<Spec> specs() {
  return {
      {"model", "embed.weight", {12, 6}, DType::f32, 0, false},  // split rows
      {"model", "proj.weight", {5, 16}, DType::bf16, 1, false},  // split columns
      {"model", "norm.weight", {6}, DType::f16, -1, false},      // replicated
      {"model", "uneven.weight", {7, 3}, DType::f32, 0, false},  // 7 rows over 2 or 4 ranks
      {"model", "tp.weight", {4, 8}, DType::f32, 1, true},       // tp x dp: replicas skip
      {"model", "scale", {}, DType::f32, -1, false},             // a scalar
      {"optimizer", "exp_avg.embed.weight", {12, 6}, DType::f32, 0, false},
      {"optimizer", "exp_avg_sq.embed.weight", {12, 6}, DType::f64, 0, false},
      {"optimizer", "count", {3}, DType::i64, -1, false},
      {"model", "c_attn.weight", {12, 6}, DType::f32, 0, true, 3},   // tp, each of 3 blocks
      {"model", "c_attn.bias", {12}, DType::bf16, 0, false, 3},      // every rank, each block
      {"model", "ln_f.weight", {5}, DType::f32, -1, false, 1, 1},    // whole, written by rank 1
      // ZeRO-1: flat ranges of a replicated tensor over all ranks, and of each tp part (3 blocks)
      // over its dp group
      {"optimizer", "exp_avg.zero", {5, 7}, DType::f32, -1, false, 1, -1, true},
      {"optimizer", "exp_avg.c_attn", {12, 7}, DType::f32, 0, true, 3, -1, true},
  };
}

struct Built {
  Checkpoint full, local;
  std::vector<TensorSlice> slices;
};

// The full checkpoint, this rank's part of it and its slices. The "tp" layout pairs ranks
// (2 ranks: tp 2, dp 1; 4 ranks: tp 2, dp 2), tp-major like ProcessGrid.
Built build(int rank, int size) {
  Built b;
  b.full.step = b.local.step = 42;
  b.full.epoch = b.local.epoch = 3;
  b.full.optimizer.step = b.local.optimizer.step = 42;
  b.full.trainer_state = b.local.trainer_state = {{"sampler", {{"epoch", 3}, {"index", 17}}}};
  b.full.recipe_yaml = b.local.recipe_yaml = "method: sft\nmodel: tiny\n";
  b.full.model_config = b.local.model_config = {{"model_type", "llama"}, {"hidden_size", 6}};
  const int tp = 2, tp_rank = rank % tp, dp_rank = rank / tp;
  int seed = 0;
  for (const Spec& s : specs()) {
    Tensor full = full_tensor(s.shape, s.dtype, ++seed);
    auto& fdst = s.group == "model" ? b.full.model : b.full.optimizer.tensors;
    auto& ldst = s.group == "model" ? b.local.model : b.local.optimizer.tensors;
    fdst.emplace_back(s.name, full);
    if (s.dim < 0 && s.flat) {
      auto [a, e] = flat_range(full.numel(), size, rank);
      ldst.emplace_back(s.name, full.contiguous().view({-1}).slice(0, a, e).contiguous());
      TensorSlice sl{s.group + "/" + s.name, -1, 0, s.shape};
      sl.flat_offset = a;
      sl.flat_count = e - a;
      b.slices.push_back(sl);
      continue;
    }
    if (s.dim < 0) {
      ldst.emplace_back(s.name, full);
      if (s.writer >= 0) {
        TensorSlice sl{s.group + "/" + s.name, -1, 0, s.shape};
        sl.write = rank == s.writer % size;
        b.slices.push_back(sl);
      }
      continue;
    }
    const int parts = s.tp_grid ? tp : size, me = s.tp_grid ? tp_rank : rank;
    const int64_t per_block = s.shape[size_t(s.dim)] / s.blocks;
    auto [begin, end] = block(per_block, parts, me);
    std::vector<Tensor> runs;  // this rank's run of every block, in block order
    for (int64_t k = 0; k < s.blocks; ++k)
      runs.push_back(full.slice(s.dim, k * per_block + begin, k * per_block + end));
    Tensor part = ops::cat(runs, s.dim).contiguous();
    TensorSlice sl{s.group + "/" + s.name, s.dim, begin, s.shape};
    sl.write = !s.tp_grid || dp_rank == 0;
    sl.blocks = s.blocks;
    if (s.flat) {  // the dp replicas of this tp part each hold a flat range of it
      const int dp = size / tp;
      auto [a, e] = flat_range(part.numel(), dp, dp_rank);
      part = part.view({-1}).slice(0, a, e).contiguous();
      sl.count = end - begin;
      sl.flat_offset = a;
      sl.flat_count = e - a;
      sl.write = true;
    }
    ldst.emplace_back(s.name, part);
    b.slices.push_back(sl);
  }
  return b;
}

// describe_checkpoint without the lines naming the file and its size.
std::string describe_layout(const std::string& path) {
  std::istringstream in(describe_checkpoint(path, true));
  std::string out;
  for (std::string line; std::getline(in, line);)
    if (line.rfind("checkpoint:", 0) != 0 && line.rfind("format:", 0) != 0) out += line + "\n";
  return out;
}

TEST(MpiCheckpoint, ShardedSaveEqualsSingleProcessSave) {
  auto& w = *world();
  const std::string dir = shared_dir(w);
  Built b = build(w.rank(), w.size());
  const std::string path = dir + "/" + checkpoint_file_name(42);
  parallel::save_checkpoint_parallel(path, b.local, b.slices, w);
  // Every rank sees the final file as soon as the save returns; no temp file is left.
  ASSERT_TRUE(is_valid_checkpoint(path));
  Checkpoint got = load_checkpoint(path);
  EXPECT_EQ(got.step, 42);
  EXPECT_EQ(got.epoch, 3);
  EXPECT_EQ(got.optimizer.step, 42);
  EXPECT_EQ(got.trainer_state, b.full.trainer_state);
  EXPECT_EQ(got.recipe_yaml, b.full.recipe_yaml);
  EXPECT_EQ(got.model_config, b.full.model_config);
  ASSERT_EQ(got.model.size(), b.full.model.size());
  for (size_t i = 0; i < got.model.size(); ++i) {
    EXPECT_EQ(got.model[i].first, b.full.model[i].first);
    EXPECT_TRUE(bit_equal(got.model[i].second, b.full.model[i].second)) << got.model[i].first;
  }
  ASSERT_EQ(got.optimizer.tensors.size(), b.full.optimizer.tensors.size());
  for (size_t i = 0; i < got.optimizer.tensors.size(); ++i)
    EXPECT_TRUE(bit_equal(got.optimizer.tensors[i].second, b.full.optimizer.tensors[i].second))
        << got.optimizer.tensors[i].first;
  w.barrier();
  // The layout a single-process save of the full tensors has (what ftune inspect shows).
  const std::string serial = dir + "/serial/" + checkpoint_file_name(42);
  if (w.rank() == 0) {
    save_checkpoint(serial, b.full);
    EXPECT_EQ(describe_layout(path), describe_layout(serial));
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    EXPECT_EQ(names, (std::vector<std::string>{"serial", "step_00000042.h5"}));
  }
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

TEST(MpiCheckpoint, EachRankReadsItsSliceOfASingleProcessFile) {
  auto& w = *world();
  const std::string dir = shared_dir(w);
  const std::string path = dir + "/" + checkpoint_file_name(42);
  Built b = build(w.rank(), w.size());
  if (w.rank() == 0) save_checkpoint(path, b.full);
  w.barrier();
  // Read back with counts given explicitly (as a resuming rank knows them).
  std::vector<TensorSlice> want = b.slices;  // flat ranges (ZeRO shards) included
  for (auto& s : want) {
    if (s.flat_count >= 0) continue;  // their count is given
    const auto& ts = s.name.rfind("model/", 0) == 0 ? b.local.model : b.local.optimizer.tensors;
    for (const auto& [n, t] : ts)
      if (s.name.substr(s.name.find('/') + 1) == n && s.dim >= 0)
        s.count = t.shape()[size_t(s.dim)] / s.blocks;
  }
  Checkpoint mine = load_checkpoint_sharded(path, want);
  ASSERT_EQ(mine.model.size(), b.local.model.size());
  for (size_t i = 0; i < mine.model.size(); ++i)
    EXPECT_TRUE(bit_equal(mine.model[i].second, b.local.model[i].second)) << mine.model[i].first;
  ASSERT_EQ(mine.optimizer.tensors.size(), b.local.optimizer.tensors.size());
  for (size_t i = 0; i < mine.optimizer.tensors.size(); ++i)  // the flat pieces come back 1-D
    EXPECT_TRUE(bit_equal(mine.optimizer.tensors[i].second, b.local.optimizer.tensors[i].second))
        << mine.optimizer.tensors[i].first;
  EXPECT_EQ(mine.trainer_state, b.full.trainer_state);
  // One tensor on its own, and a layout this job does not have: the last 3 rows, count -1.
  Tensor rows = load_checkpoint_slice(path, "model/embed.weight", 0, 9, -1);
  EXPECT_TRUE(bit_equal(rows, b.full.model[0].second.slice(0, 9, 12).contiguous()));
  EXPECT_THROW(load_checkpoint_slice(path, "model/embed.weight", 0, 10, 3), Error);
  EXPECT_THROW(load_checkpoint_slice(path, "model/embed.weight", 2, 0, 1), Error);
  EXPECT_THROW(load_checkpoint_slice(path, "model/nope", 0, 0, 1), Error);
  EXPECT_THROW(load_checkpoint_slice(path, "embed.weight", 0, 0, 1), Error);
  // Rows [1, 3) of each of the 3 blocks of 4: rows 1, 2, 5, 6, 9, 10.
  Tensor qkv = load_checkpoint_slice(path, "model/c_attn.weight", 0, 1, 2, 3);
  const Tensor& cfull = b.full.model[6].second;
  ASSERT_EQ(b.full.model[6].first, "c_attn.weight");
  EXPECT_TRUE(bit_equal(qkv, ops::cat({cfull.slice(0, 1, 3), cfull.slice(0, 5, 7),
                                       cfull.slice(0, 9, 11)}, 0).contiguous()));
  EXPECT_THROW(load_checkpoint_slice(path, "model/c_attn.weight", 0, 3, 2, 3), Error);  // past a block
  EXPECT_THROW(load_checkpoint_slice(path, "model/c_attn.weight", 0, 0, 1, 5), Error);  // 12 % 5
  w.barrier();
  if (w.rank() == 0) fs::remove_all(dir);
}

// Arguments that cannot make a correct file fail on EVERY rank (none left waiting in a
// collective), and neither the checkpoint nor a temp file appears.
TEST(MpiCheckpoint, BadShardingFailsOnEveryRankAndLeavesNoFile) {
  auto& w = *world();
  const std::string dir = shared_dir(w);
  const std::string path = dir + "/" + checkpoint_file_name(7);
  auto expect_fails_everywhere = [&](const Built& b, const char* what) {
    EXPECT_THROW(parallel::save_checkpoint_parallel(path, b.local, b.slices, w), Error) << what;
    w.barrier();
    EXPECT_TRUE(fs::is_empty(dir)) << what;
    w.barrier();
  };
  {  // a gap: the last rank does not write its rows
    Built b = build(w.rank(), w.size());
    if (w.rank() == w.size() - 1) b.slices[0].write = false;
    expect_fails_everywhere(b, "gap");
  }
  {  // rank 1 disagrees on a full shape
    Built b = build(w.rank(), w.size());
    if (w.rank() == 1) b.local.model[2].second = Tensor::zeros({7}, DType::f16);
    expect_fails_everywhere(b, "shape");
  }
  {  // rank 0 alone passes a slice that does not fit
    Built b = build(w.rank(), w.size());
    if (w.rank() == 0) b.slices[0].offset = 11;
    expect_fails_everywhere(b, "range");
  }
  {  // a replicated tensor that two ranks write
    Built b = build(w.rank(), w.size());
    for (auto& s : b.slices)
      if (s.name == "model/ln_f.weight") s.write = w.rank() < 2;
    expect_fails_everywhere(b, "written twice");
  }
  {  // blocks that do not divide the split dimension
    Built b = build(w.rank(), w.size());
    for (auto& s : b.slices)
      if (s.name == "model/c_attn.bias") s.blocks = 5;
    expect_fails_everywhere(b, "blocks");
  }
  {  // flat ranges that overlap (rank 0 reaches one element into rank 1's range)
    Built b = build(w.rank(), w.size());
    for (auto& s : b.slices)
      if (s.name == "optimizer/exp_avg.zero" && w.rank() == 1) {
        s.flat_offset -= 1;
        s.flat_count += 1;
        b.local.optimizer.tensors[3].second = Tensor::zeros({s.flat_count}, DType::f32);
      }
    expect_fails_everywhere(b, "flat overlap");
  }
  {  // a flat range past the end of the tensor
    Built b = build(w.rank(), w.size());
    for (auto& s : b.slices)
      if (s.name == "optimizer/exp_avg.zero" && w.rank() == w.size() - 1) s.flat_offset += 1;
    expect_fails_everywhere(b, "flat range");
  }
  {  // a slice naming no tensor
    Built b = build(w.rank(), w.size());
    b.slices.push_back({"model/absent", 0, 0, {2}});
    expect_fails_everywhere(b, "absent");
  }
  if (w.rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace ftune
