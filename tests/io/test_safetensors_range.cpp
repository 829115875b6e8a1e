// SafetensorsFile / SafetensorsModel::get_range: a slice along one dim read straight from the file
// equals the same slice of the whole tensor, bit for bit, for every dtype and dim.
#include <gtest/gtest.h>

#include <random>
#include <tuple>
#include <vector>

#include "io/safetensors.h"
#include "io_test_util.h"

using namespace ftune;
using namespace ftune::test;

namespace {

Tensor distinct_tensor(const Shape& shape, DType dt, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<double> v(size_t(shape_numel(shape)));
  for (auto& x : v) x = dt == DType::b8 ? double(g() % 2) : double(int(g() % 2001) - 1000) / 8.0;
  return Tensor::from_vector(v, shape).to(dt);
}

}  // namespace

TEST(SafetensorsRange, EverySliceOfEveryDimMatchesTheWholeTensor) {
  TempDir dir;
  NamedTensors tensors;
  uint32_t seed = 7;
  for (DType dt :
       {DType::f32, DType::f64, DType::f16, DType::bf16, DType::i32, DType::i64, DType::b8})
    tensors.emplace_back(str_cat("m_", dtype_name(dt)), distinct_tensor({5, 7}, dt, seed++));
  tensors.emplace_back("cube", distinct_tensor({3, 4, 6}, DType::f32, 99));
  tensors.emplace_back("vec", distinct_tensor({9}, DType::bf16, 100));
  const std::string path = dir.file("r.safetensors");
  save_safetensors(path, tensors);
  SafetensorsFile f(path);
  SafetensorsModel m = SafetensorsModel::open_file(path);
  for (const auto& [name, t] : tensors) {
    for (int d = 0; d < t.dim(); ++d) {
      const int64_t n = t.size(d);
      for (int64_t b = 0; b <= n; ++b)
        for (int64_t e = b; e <= n; ++e) {
          SCOPED_TRACE(str_cat(name, " dim ", d, " [", b, ", ", e, ")"));
          Tensor want = t.slice(d, b, e).contiguous();
          Tensor got = f.get_range(name, d, b, e);
          EXPECT_EQ(got.dtype(), t.dtype());
          ASSERT_EQ(got.shape(), want.shape());
          EXPECT_TRUE(got.is_contiguous());
          EXPECT_EQ(tensor_bytes(got), tensor_bytes(want));
          EXPECT_EQ(tensor_bytes(m.get_range(name, d, b, e)), tensor_bytes(want));
        }
    }
  }
}

TEST(SafetensorsRange, BadRangesThrowNamingTheFileAndTensor) {
  TempDir dir;
  const std::string path = dir.file("r.safetensors");
  save_safetensors(path, {{"w", distinct_tensor({4, 3}, DType::f32, 1)}});
  SafetensorsFile f(path);
  for (auto [d, b, e] : std::vector<std::tuple<int, int64_t, int64_t>>{
           {2, 0, 1}, {-1, 0, 1}, {0, -1, 2}, {0, 3, 2}, {0, 0, 5}, {1, 0, 4}}) {
    SCOPED_TRACE(str_cat(d, " ", b, " ", e));
    try {
      f.get_range("w", d, b, e);
      ADD_FAILURE() << "no throw";
    } catch (const Error& err) {
      EXPECT_NE(std::string(err.what()).find(path), std::string::npos) << err.what();
      EXPECT_NE(std::string(err.what()).find("'w'"), std::string::npos) << err.what();
    }
  }
  EXPECT_THROW(f.get_range("absent", 0, 0, 1), Error);
}
