#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "io/safetensors.h"
#include "io_test_util.h"

using namespace ftune;
using namespace ftune::test;

namespace {

// A tensor of dtype dt with distinct non-trivial values (never all zeros).
Tensor random_tensor(const Shape& shape, DType dt, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  std::vector<double> v(size_t(shape_numel(shape)));
  for (auto& x : v)
    x = dt == DType::b8 ? double(g() % 2) : is_floating(dt) ? u(g) : double(int(g() % 2001) - 1000);
  return Tensor::from_vector(v, shape).to(dt);
}

NamedTensors one_of_each() {
  NamedTensors t;
  uint32_t seed = 1;
  for (DType dt :
       {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::b8})
    t.emplace_back(str_cat("t_", dtype_name(dt)), random_tensor({3, 5}, dt, seed++));
  return t;
}

}  // namespace

TEST(Safetensors, RoundTripEveryDtype) {
  TempDir dir;
  NamedTensors tensors = one_of_each();
  tensors.emplace_back("scalar", Tensor::scalar(2.5));
  tensors.emplace_back("empty", Tensor::zeros({0, 3}, DType::bf16));
  tensors.emplace_back("transposed", random_tensor({4, 6}, DType::f32, 99).transpose(0, 1));
  StringMap md = {{"format", "pt"}, {"note", "quote \" backslash \\ newline \n tab \t \x01 é"}};
  std::string path = dir.file("a.safetensors");
  save_safetensors(path, tensors, md);

  SafetensorsFile f(path);
  EXPECT_EQ(f.metadata(), md);
  EXPECT_EQ(f.entries().size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    SCOPED_TRACE(name);
    Tensor r = f.get(name);
    EXPECT_EQ(r.dtype(), t.dtype());
    EXPECT_EQ(r.shape(), t.shape());
    EXPECT_TRUE(r.is_contiguous());
    EXPECT_EQ(tensor_bytes(r), tensor_bytes(t));  // bit exact
    EXPECT_EQ(f.info(name).nbytes(), size_t(t.numel()) * dtype_size(t.dtype()));
  }
  // No temporary file is left behind.
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(Safetensors, CanonicalLayout) {
  // The reference writer: tensors sorted by dtype (descending alignment) then name; compact JSON
  // with __metadata__ first; header padded with spaces to a multiple of 8.
  NamedTensors t = {{"b", Tensor::zeros({2}, DType::f16)},
                    {"a", Tensor::zeros({2}, DType::f16)},
                    {"c", Tensor::zeros({1, 2}, DType::f32)},
                    {"m", Tensor::zeros({}, DType::b8)}};
  auto bytes = serialize_safetensors(t, {{"format", "pt"}});
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  std::string header(bytes.begin() + 8, bytes.begin() + 8 + long(n));
  std::string expect =
      R"({"__metadata__":{"format":"pt"},"c":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},)"
      R"("a":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},)"
      R"("b":{"dtype":"F16","shape":[2],"data_offsets":[12,16]},)"
      R"("m":{"dtype":"BOOL","shape":[],"data_offsets":[16,17]}})";
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(header.substr(0, expect.size()), expect);
  EXPECT_EQ(header.substr(expect.size()), std::string(n - expect.size(), ' '));
  EXPECT_EQ(bytes.size(), 8 + n + 17);
  // Each tensor's offset in the file is a multiple of its element size.
  auto h = parse_safetensors_header(bytes.data(), bytes.size(), "mem");
  for (const auto& e : h.entries)
    EXPECT_EQ((h.data_start() + e.begin) % size_t(st_dtype_bits(e.dtype) / 8), 0u) << e.name;
}

TEST(Safetensors, SaveEqualsSerializeAndReplacesAtomically) {
  TempDir dir;
  std::string path = dir.file("x.safetensors");
  NamedTensors t = one_of_each();
  save_safetensors(path, {{"old", Tensor::ones({3})}});
  save_safetensors(path, t, {{"k", "v"}});
  EXPECT_EQ(read_bytes(path), serialize_safetensors(t, {{"k", "v"}}));
  // A failing save (undefined tensor) leaves the previous file whole and no temporary behind.
  auto before = read_bytes(path);
  EXPECT_THROW(save_safetensors(path, {{"a", Tensor::ones({2})}, {"bad", Tensor()}}), Error);
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(Safetensors, WriterRejectsBadNames) {
  expect_error(
      [] {
        serialize_safetensors({{"a", Tensor::ones({1})}, {"a", Tensor::ones({1})}});
      },
      {"'a' given twice"});
  expect_error(
      [] {
        serialize_safetensors({{"__metadata__", Tensor::ones({1})}});
      },
      {"__metadata__"});
  expect_error([] { serialize_safetensors({{"bad\xff", Tensor::ones({1})}}); }, {"UTF-8"});
  expect_error([] { serialize_safetensors({}, {{"k", "\xc0\xaf"}}); }, {"UTF-8"});  // overlong
}

TEST(Safetensors, EmptyFileAndNullMetadata) {
  auto b = serialize_safetensors({});
  auto h = parse_safetensors_header(b.data(), b.size(), "mem");
  EXPECT_TRUE(h.entries.empty());
  EXPECT_EQ(b.size(), 16u);  // "{}" padded to 8
  auto b2 =
      st_bytes(R"({"__metadata__":null,"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})", 4);
  auto h2 = parse_safetensors_header(b2.data(), b2.size(), "mem");
  EXPECT_TRUE(h2.metadata.empty());
  ASSERT_EQ(h2.entries.size(), 1u);
  // Unknown keys inside a tensor entry are ignored, as by the reference.
  auto b3 = st_bytes(R"({"a":{"dtype":"I32","shape":[1],"data_offsets":[0,4],"x":[1]}}   )", 4);
  EXPECT_NO_THROW(parse_safetensors_header(b3.data(), b3.size(), "mem"));
}

// ---- header validation: one test per malformed case, bad files built byte by byte.

class SafetensorsBad : public ::testing::Test {
 protected:
  // Writes `bytes` to a file and expects opening it to throw naming the file and `problem`.
  void expect_bad(const std::vector<uint8_t>& bytes, std::initializer_list<std::string> problem) {
    std::string path = dir_.file("bad.safetensors");
    write_bytes(path, bytes);
    try {
      SafetensorsFile f(path);
      ADD_FAILURE() << "opened a malformed file";
    } catch (const Error& e) {
      std::string msg = e.what();
      EXPECT_NE(msg.find(path), std::string::npos) << "message does not name the file: " << msg;
      EXPECT_NE(msg.find("[safetensors]"), std::string::npos) << msg;
      for (const auto& p : problem) EXPECT_NE(msg.find(p), std::string::npos) << p << " | " << msg;
    }
  }
  static std::string one(const std::string& entry) { return "{\"a\":" + entry + "}"; }
  TempDir dir_;
};

TEST_F(SafetensorsBad, ShorterThan8Bytes) {
  expect_bad({}, {"0 bytes, shorter than the 8-byte"});
  expect_bad({1, 0, 0}, {"3 bytes, shorter than the 8-byte"});
}

TEST_F(SafetensorsBad, HeaderLengthPastEof) {
  expect_bad(st_bytes("{}", 0, 100), {"header length 100 runs past the end of the file (10 bytes"});
  expect_bad(st_bytes("", 0, 1), {"runs past the end"});
}

TEST_F(SafetensorsBad, HeaderLengthAbsurd) {
  expect_bad(st_bytes("{}", 0, int64_t(1) << 40), {"absurdly large"});
  expect_bad(st_bytes("{}", 0, 100'000'001), {"absurdly large"});
  auto b = st_bytes("{}", 0);
  std::memset(b.data(), 0xff, 8);  // 2^64 - 1
  expect_bad(b, {"absurdly large"});
}

TEST_F(SafetensorsBad, EmptyHeader) { expect_bad(st_bytes("", 0), {"header is empty"}); }

TEST_F(SafetensorsBad, HeaderNotJson) {
  expect_bad(st_bytes("{not json}", 0), {"header is not valid JSON"});
  expect_bad(st_bytes("{\"a\":1", 0), {"header is not valid JSON"});  // truncated
  expect_bad(st_bytes(std::string("{}\0\0\0\0\0\0", 8), 0), {"header is not valid JSON"});  // NULs
  expect_bad(st_bytes(std::string("{\"\xff\":1}"), 0), {"header is not valid JSON"});  // bad UTF-8
  expect_bad(st_bytes("{} {}", 0), {"header is not valid JSON"});  // trailing junk
}

TEST_F(SafetensorsBad, HeaderNotObject) {
  expect_bad(st_bytes("[1, 2]  ", 0), {"does not start with '{'"});
  expect_bad(st_bytes("\"str\"", 0), {"does not start with '{'"});
  expect_bad(st_bytes(" {}", 0), {"does not start with '{'"});  // the spec: MUST begin with '{'
}

TEST_F(SafetensorsBad, TensorEntryNotObject) {
  expect_bad(st_bytes(one("[1]"), 0), {"tensor 'a'", "expected an object"});
}

TEST_F(SafetensorsBad, MissingFields) {
  expect_bad(st_bytes(one(R"({"shape":[1],"data_offsets":[0,4]})"), 4), {"missing \"dtype\""});
  expect_bad(st_bytes(one(R"({"dtype":"F32","data_offsets":[0,4]})"), 4), {"missing \"shape\""});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[1]})"), 4), {"missing \"data_offsets\""});
}

TEST_F(SafetensorsBad, UnknownDtype) {
  expect_bad(st_bytes(one(R"({"dtype":"F33","shape":[1],"data_offsets":[0,4]})"), 4),
             {"tensor 'a'", "unknown dtype 'F33'"});
  expect_bad(st_bytes(one(R"({"dtype":"f32","shape":[1],"data_offsets":[0,4]})"), 4),
             {"unknown dtype 'f32'"});  // names are case sensitive
  expect_bad(st_bytes(one(R"({"dtype":4,"shape":[1],"data_offsets":[0,4]})"), 4),
             {"\"dtype\" must be a string"});
}

TEST_F(SafetensorsBad, NegativeOrNonIntegerDims) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[-1,2],"data_offsets":[0,4]})"), 4),
             {"negative dimension -1"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[2.5],"data_offsets":[0,4]})"), 4),
             {"non-negative integers"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":"2","data_offsets":[0,4]})"), 4),
             {"\"shape\" must be a list"});
  expect_bad(
      st_bytes(one(R"({"dtype":"F32","shape":[9223372036854775808],"data_offsets":[0,4]})"), 4),
      {"too large"});
}

TEST_F(SafetensorsBad, NumelTimesItemsizeOverflows) {
  expect_bad(
      st_bytes(one(R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})"), 4),
      {"overflows"});
  // numel fits 64 bits but times 8 bytes does not.
  expect_bad(
      st_bytes(one(R"({"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,4]})"), 4),
      {"overflows"});
}

TEST_F(SafetensorsBad, SubByteDtypeNotWholeBytes) {
  expect_bad(st_bytes(one(R"({"dtype":"F4","shape":[3],"data_offsets":[0,2]})"), 2),
             {"not a whole number of bytes"});
}

TEST_F(SafetensorsBad, DataOffsetsMalformed) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0]})"), 4),
             {"must be [begin, end]"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})"), 4),
             {"must be [begin, end]"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), 4),
             {"two non-negative integers"});
}

TEST_F(SafetensorsBad, BeginAfterEnd) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[1],"data_offsets":[8,4]})"), 8),
             {"tensor 'a'", "[8, 4] has begin > end"});
}

TEST_F(SafetensorsBad, EndPastDataBuffer) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,16]})"), 12),
             {"tensor 'a'", "end past the data buffer (12 bytes)"});
  expect_bad(
      st_bytes(one(R"({"dtype":"F32","shape":[4],"data_offsets":[0,18446744073709551615]})"), 16),
      {"end past the data buffer"});
}

TEST_F(SafetensorsBad, ByteSizeNotNumelTimesItemsize) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[2,2],"data_offsets":[0,12]})"), 12),
             {"tensor 'a'", "hold 12 bytes but F32[2, 2] needs 16 bytes"});
}

TEST_F(SafetensorsBad, OverlappingTensors) {
  expect_bad(st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})",
                      24),
             {"tensor 'b' [8, 24) overlaps tensor 'a' [0, 16)"});
  // The same range twice (an aliasing attempt) is an overlap too.
  expect_bad(st_bytes(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                      R"("b":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}})",
                      16),
             {"overlaps"});
}

TEST_F(SafetensorsBad, HolesBetweenTensors) {
  // The reference (and so ftune) requires the ranges to tile the buffer: no polyglot files.
  expect_bad(st_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}})",
                      24),
             {"bytes [8, 16) of the data buffer belong to no tensor"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[4,12]})"), 12),
             {"bytes [0, 4)"});
}

TEST_F(SafetensorsBad, TrailingBytesAfterLastTensor) {
  expect_bad(st_bytes(one(R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), 11),
             {"the last 3 bytes of the file belong to no tensor"});
  expect_bad(st_bytes("{}", 1), {"the last 1 bytes"});
}

TEST_F(SafetensorsBad, DuplicateKeys) {
  expect_bad(st_bytes(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("a":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}})",
                      4),
             {"key \"a\" twice"});
  expect_bad(st_bytes(one(R"({"dtype":"F32","dtype":"I32","shape":[1],"data_offsets":[0,4]})"), 4),
             {"key \"dtype\" twice"});
}

TEST_F(SafetensorsBad, MetadataNotStrings) {
  expect_bad(st_bytes(R"({"__metadata__":{"k":1}})", 0), {"\"__metadata__\" value for \"k\""});
  expect_bad(st_bytes(R"({"__metadata__":[]})", 0), {"\"__metadata__\" must be an object"});
}

TEST_F(SafetensorsBad, OpenErrors) {
  expect_error([&] { SafetensorsFile f(dir_.file("missing.safetensors")); },
               {"cannot open", "missing.safetensors", "No such file"});
  expect_error([&] { SafetensorsFile f(dir_.path()); }, {"is a directory"});
}

TEST(Safetensors, DtypesWithoutFtuneType) {
  TempDir dir;
  std::string path = dir.file("u8.safetensors");
  write_bytes(path, st_bytes(R"({"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]},)"
                             R"("q":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},)"
                             R"("f":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[11,12]}}     )",
                             12));
  SafetensorsFile f(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "q", "f"}));  // file order
  EXPECT_EQ(f.info("q").dtype, StDType::U8);
  EXPECT_EQ(f.info("q").shape, (Shape{3}));
  EXPECT_EQ(f.get("a").to_vector<int64_t>()[0], 0x0706050403020100);
  expect_error([&] { f.get("q"); }, {path, "tensor 'q' has dtype U8", "no type for"});
  expect_error([&] { f.get("f"); }, {"F8_E4M3"});
  expect_error([&] { f.get("nope"); }, {path, "no tensor named 'nope'", "'a', 'q', 'f'"});
}

TEST(Safetensors, BoolBytesNormalized) {
  auto b = st_bytes(R"({"m":{"dtype":"BOOL","shape":[4],"data_offsets":[0,4]}})", 0);
  for (uint8_t x : {0, 1, 2, 255}) b.push_back(x);
  auto h = parse_safetensors_header(b.data(), b.size(), "mem");
  Tensor t = safetensors_entry_to_tensor(h.entries[0], b.data() + h.data_start(), "mem");
  auto* p = static_cast<const uint8_t*>(t.raw_data());
  EXPECT_EQ(std::vector<uint8_t>(p, p + 4), (std::vector<uint8_t>{0, 1, 1, 1}));
}

TEST(Safetensors, MmapLifetime) {
  TempDir dir;
  std::string path = std::filesystem::absolute(dir.file("m.safetensors")).string();
  Tensor src = random_tensor({64, 64}, DType::f32, 7);
  save_safetensors(path, {{"w", src}});
  Tensor got;
  {
    auto f = std::make_unique<SafetensorsFile>(path);
    EXPECT_TRUE(is_mapped(path));
    got = f->get("w");
    SafetensorsFile moved = std::move(*f);  // the mapping moves with it
    f.reset();
    EXPECT_TRUE(is_mapped(path));
    EXPECT_EQ(tensor_bytes(moved.get("w")), tensor_bytes(src));
  }
  EXPECT_FALSE(is_mapped(path));                    // unmapped with the last owner
  EXPECT_EQ(tensor_bytes(got), tensor_bytes(src));  // get() copied out of the mapping

  MappedFile a(path);
  const uint8_t* data = a.data();
  MappedFile b = std::move(a);
  EXPECT_EQ(a.data(), nullptr);
  EXPECT_EQ(b.data(), data);
  EXPECT_EQ(b.size(), std::filesystem::file_size(path));
  // Replacing the file on disk (a new save renames over it) leaves the old mapping intact.
  save_safetensors(path, {{"w", Tensor::zeros({1})}});
  auto h = parse_safetensors_header(b.data(), b.size(), path);
  EXPECT_EQ(h.entries[0].shape, (Shape{64, 64}));
}

// ---- sharded models

TEST(SafetensorsModel, ShardsAsHuggingFaceDoes) {
  // huggingface_hub's docstring example: sizes [6, 6, 2, 6, 2, 2] under a limit of 10 shard as
  // [6], [6+2], [6+2+2]; a tensor over the limit gets a shard of its own, appended at once.
  TempDir dir;
  NamedTensors t;
  int i = 0;
  for (int units : {6, 6, 2, 6, 2, 2, 12, 1}) {
    t.emplace_back(str_cat("t", i), random_tensor({units}, DType::f32, uint32_t(i)));
    ++i;
  }
  auto files = save_safetensors_model(dir.path(), t, 10 * 4);
  ASSERT_EQ(files.size(), 6u);  // 5 shards + index
  auto idx = nlohmann::json::parse(read_bytes(dir.file("model.safetensors.index.json")));
  const auto& wm = idx["weight_map"];
  auto shard = [](int k) { return str_cat("model-0000", k, "-of-00005.safetensors"); };
  EXPECT_EQ(wm["t0"], shard(1));
  EXPECT_EQ(wm["t1"], shard(2));
  EXPECT_EQ(wm["t2"], shard(2));
  EXPECT_EQ(wm["t6"], shard(3));  // oversized: alone, before the shard still being filled
  EXPECT_EQ(wm["t3"], shard(4));
  EXPECT_EQ(wm["t4"], shard(4));
  EXPECT_EQ(wm["t5"], shard(4));
  EXPECT_EQ(wm["t7"], shard(5));
  EXPECT_EQ(idx["metadata"]["total_size"], 37 * 4);
  EXPECT_EQ(idx["metadata"]["total_parameters"], 37);

  SafetensorsModel m = SafetensorsModel::open_folder(dir.path());
  EXPECT_EQ(m.num_shards(), 5u);
  EXPECT_EQ(m.names().size(), t.size());
  for (const auto& [name, tensor] : t) EXPECT_EQ(tensor_bytes(m.get(name)), tensor_bytes(tensor));
  EXPECT_NO_THROW(m.check_all());
  EXPECT_EQ(SafetensorsFile(dir.file(shard(1))).metadata().at("format"), "pt");
  EXPECT_EQ(m.index_metadata().at("total_size"), "148");
  EXPECT_EQ(m.index_metadata().at("total_parameters"), "37");
}

TEST(SafetensorsModel, OpensShardsLazily) {
  TempDir dir;
  std::string abs = std::filesystem::absolute(dir.path()).string();
  NamedTensors t = {{"a", Tensor::ones({4})}, {"b", Tensor::ones({4})}};
  save_safetensors_model(abs, t, 16);
  SafetensorsModel m = SafetensorsModel::open_folder(abs);
  std::string s1 = abs + "/model-00001-of-00002.safetensors";
  std::string s2 = abs + "/model-00002-of-00002.safetensors";
  EXPECT_FALSE(is_mapped(s1));
  EXPECT_FALSE(is_mapped(s2));
  EXPECT_EQ(m.info("b").shape, (Shape{4}));
  EXPECT_FALSE(is_mapped(s1));
  EXPECT_TRUE(is_mapped(s2));
  EXPECT_EQ(m.shard_path("a"), s1);
}

TEST(SafetensorsModel, SingleShardAndStaleFiles) {
  TempDir dir;
  NamedTensors t = {{"a", Tensor::ones({4})}, {"b", Tensor::ones({4})}};
  save_safetensors_model(dir.path(), t, 16);  // two shards + index
  EXPECT_TRUE(std::filesystem::exists(dir.file("model.safetensors.index.json")));
  auto files = save_safetensors_model(dir.path(), t);  // now fits one file
  EXPECT_EQ(files, std::vector<std::string>{dir.file("model.safetensors")});
  std::vector<std::string> left;
  for (const auto& e : std::filesystem::directory_iterator(dir.path()))
    left.push_back(e.path().filename().string());
  EXPECT_EQ(left, std::vector<std::string>{"model.safetensors"});  // old shards and index gone
  SafetensorsModel m = SafetensorsModel::open_folder(dir.path());
  EXPECT_EQ(m.num_shards(), 1u);
  EXPECT_EQ(m.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(m.index_metadata().empty());
}

TEST(SafetensorsModel, IndexErrors) {
  TempDir dir;
  std::string idx = dir.file("model.safetensors.index.json");
  save_safetensors(dir.file("s1.safetensors"), {{"a", Tensor::ones({2})}});
  auto open_with = [&](const std::string& text) {
    std::ofstream(idx) << text;
    return SafetensorsModel::open_index(idx);
  };
  expect_error([&] { open_with(R"({"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}})"); },
               {idx, "shard s2.safetensors", "holding 'b'", "does not exist"});
  expect_error([&] { open_with(R"({"metadata":{}})"); }, {idx, "missing the \"weight_map\""});
  expect_error([&] { open_with(R"({"weight_map":)"); }, {idx, "not valid JSON"});
  expect_error([&] { open_with(R"({"weight_map":{"a":"../s1.safetensors"}})"); },
               {idx, "relative paths inside the model folder"});
  expect_error([&] { open_with(R"({"weight_map":{"a":"/etc/passwd"}})"); }, {"relative paths"});
  expect_error([&] { open_with(R"({"weight_map":{"a":3}})"); }, {"must be a file name"});
  // Listed in the index but absent from its shard: found on access, naming both files.
  SafetensorsModel m = open_with(R"({"weight_map":{"a":"s1.safetensors","z":"s1.safetensors"}})");
  EXPECT_EQ(m.get("a").to_vector<float>(), (std::vector<float>{1, 1}));
  expect_error([&] { m.get("z"); }, {idx, "tensor 'z'", "s1.safetensors", "no such tensor"});
  expect_error([&] { m.check_all(); }, {"'z'"});
  expect_error([&] { m.get("q"); }, {"no tensor named 'q'"});
  expect_error([&] { SafetensorsModel::open_folder(dir.file("nowhere")); }, {"does not exist"});
  expect_error(
      [&] {
        save_safetensors_model(dir.path(), {{"a", Tensor::ones({1})}, {"a", Tensor::ones({1})}}, 1);
      },
      {"'a' given twice"});
  std::filesystem::remove(idx);
  expect_error([&] { SafetensorsModel::open_folder(dir.path()); },
               {"no model.safetensors or model.safetensors.index.json"});
}

TEST_F(SafetensorsBad, DeeplyNestedHeader) {
  // Nesting must not overflow the stack while parsing or destroying the JSON.
  std::string arrays = R"({"a":{"dtype":"F32","shape":)" + std::string(1'000'000, '[') +
                       std::string(1'000'000, ']') + R"(,"data_offsets":[0,0]}})";
  expect_bad(st_bytes(arrays, 0), {"header nests deeper than 128 levels"});
  std::string objects;
  for (int i = 0; i < 100'000; ++i) objects += "{\"k\":";
  objects += "1" + std::string(100'000, '}');
  expect_bad(st_bytes(objects, 0), {"header nests deeper than 128 levels"});
  // Within the limit, the shape's error message renders it shallowly.
  std::string nested = R"({"a":{"dtype":"F32","shape":)" + std::string(100, '[') +
                       std::string(100, ']') + R"(,"data_offsets":[0,0]}})";
  expect_bad(st_bytes(nested, 0), {"shape [[...]] must hold non-negative integers"});
}
