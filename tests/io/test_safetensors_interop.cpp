// Interop with the reference Python library, both directions:
//  - files written by safetensors / huggingface_hub (tests/fixtures/make_safetensors_fixtures.py,
//    committed with expected.json) are read by ftune, and re-serialized byte for byte;
//  - WritesFileForPython writes the file tests/fixtures/check_ftune_safetensors.py checks.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "io_test_util.h"

using namespace ftune;
using namespace ftune::test;
using json = nlohmann::json;

namespace {

const std::string kDir = std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/safetensors";

json load_expected() { return json::parse(read_bytes(kDir + "/expected.json")); }

void expect_tensor(const Tensor& t, const json& want, const std::string& name) {
  SCOPED_TRACE(name);
  EXPECT_EQ(st_dtype_name(st_from_dtype(t.dtype())), want["dtype"].get<std::string>());
  EXPECT_EQ(t.shape(), want["shape"].get<Shape>());
  if (t.dtype() == DType::i64 || t.dtype() == DType::i32) {
    EXPECT_EQ(t.to_vector<int64_t>(), want["values"].get<std::vector<int64_t>>());
  } else {
    // Python wrote the stored numbers as exact doubles; compare exactly.
    EXPECT_EQ(t.to_vector<double>(), want["values"].get<std::vector<double>>());
  }
}

}  // namespace

TEST(SafetensorsInterop, ReadsPythonWrittenFiles) {
  json exp = load_expected();
  ASSERT_GE(exp["files"].size(), 3u);
  for (auto& [fname, want] : exp["files"].items()) {
    SCOPED_TRACE(fname);
    SafetensorsFile f(kDir + "/" + fname);
    EXPECT_EQ(f.metadata(), want["metadata"].get<StringMap>());
    EXPECT_EQ(f.entries().size(), want["tensors"].size());
    NamedTensors all;
    for (auto& [name, w] : want["tensors"].items()) {
      Tensor t = f.get(name);
      expect_tensor(t, w, name);
      all.emplace_back(name, t);
    }
    // ftune's writer reproduces the reference writer's bytes exactly.
    EXPECT_EQ(serialize_safetensors(all, f.metadata()), read_bytes(kDir + "/" + fname));
  }
}

TEST(SafetensorsInterop, ReadsHuggingFaceShardedFolder) {
  json exp = load_expected()["sharded"];
  SafetensorsModel m = SafetensorsModel::open_folder(kDir + "/sharded");
  EXPECT_EQ(m.num_shards(), 2u);
  ASSERT_EQ(m.names().size(), exp["tensors"].size());
  for (auto& [name, w] : exp["tensors"].items()) {
    expect_tensor(m.get(name), w, name);
    EXPECT_EQ(std::filesystem::path(m.shard_path(name)).filename().string(),
              exp["weight_map"][name].get<std::string>());
  }
  m.check_all();
  // Each shard re-serializes to the same bytes (huggingface_hub adds {"format": "pt"}).
  for (const char* shard :
       {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}) {
    std::string path = kDir + "/sharded/" + shard;
    SafetensorsFile f(path);
    NamedTensors all;
    for (const auto& n : f.names()) all.emplace_back(n, f.get(n));
    EXPECT_EQ(serialize_safetensors(all, f.metadata()), read_bytes(path)) << shard;
  }
}

namespace {

// Must match expected() in tests/fixtures/check_ftune_safetensors.py.
NamedTensors interop_tensors() {
  std::vector<double> base(12);
  for (int i = 0; i < 12; ++i) base[size_t(i)] = i;
  Tensor b = Tensor::from_vector(base, {3, 4});
  std::vector<double> f(12), half(12), i32(12), i64(12), m(12);
  for (int i = 0; i < 12; ++i) {
    f[size_t(i)] = i * 0.25 - 1.5;
    half[size_t(i)] = i * 0.5;
    i32[size_t(i)] = i * 7 - 20;
    i64[size_t(i)] = double(int64_t(i) * (int64_t(1) << 33) - 5);  // exact in a double
    m[size_t(i)] = i % 3 == 0;
  }
  Tensor ff = Tensor::from_vector(f, {3, 4});
  NamedTensors t;
  for (DType dt : {DType::f32, DType::f64, DType::f16, DType::bf16})
    t.emplace_back(str_cat("x_", dtype_name(dt)), ff.to(dt));
  t.emplace_back("x_i32", Tensor::from_vector(i32, {3, 4}).to(DType::i32));
  t.emplace_back("x_i64", Tensor::from_vector(i64, {3, 4}).to(DType::i64));
  t.emplace_back("x_bool", Tensor::from_vector(m, {3, 4}).to(DType::b8));
  t.emplace_back("transposed", Tensor::from_vector(half, {3, 4}).to(DType::f32).transpose(0, 1));
  t.emplace_back("scalar", Tensor::scalar(3.25));
  t.emplace_back("empty", Tensor::zeros({0, 2}, DType::bf16));
  return t;
}

}  // namespace

TEST(SafetensorsInterop, WritesFileForPython) {
  TempDir dir;
  const char* env = std::getenv("FTUNE_INTEROP_OUT");
  std::string path = env && *env ? env : dir.file("ftune_interop.safetensors");
  NamedTensors t = interop_tensors();
  save_safetensors(path, t, {{"format", "pt"}});
  SafetensorsFile f(path);
  for (const auto& [name, want] : t)
    EXPECT_EQ(tensor_bytes(f.get(name)), tensor_bytes(want)) << name;
  EXPECT_EQ(f.get("x_i64").to_vector<int64_t>()[11], 11 * (int64_t(1) << 33) - 5);
}
