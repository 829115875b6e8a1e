// ops::set_attention_backend (core/ops/attention.cpp): names other than ftune / cudnn are refused,
// and cudnn in a build without cuDNN fails with an error that says so (and leaves the backend
// as it was). The GPU side of the cudnn backend is tests/cuda/test_attention_cudnn.cpp.
#include <gtest/gtest.h>

#include <string>

#include "core/error.h"
#include "core/ops.h"
#include "core/rng.h"

namespace ftune {
namespace {

std::string error_of(const std::string& name) {
  try {
    ops::set_attention_backend(name);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(AttentionBackend, DefaultIsFtuneAndUnknownNamesAreRefused) {
  EXPECT_EQ(ops::attention_backend(), "ftune");
  std::string e = error_of("flash");
  EXPECT_NE(e.find("unknown backend `flash`"), std::string::npos) << e;
  EXPECT_EQ(ops::attention_backend(), "ftune");
  EXPECT_EQ(error_of("ftune"), "");
}

TEST(AttentionBackend, CudnnErrorsClearlyWithoutCudnn) {
  if (ops::cudnn_attention_built()) {
    // A cuDNN build accepts it (the GPU test checks what it does).
    EXPECT_EQ(error_of("cudnn"), "");
    EXPECT_EQ(ops::attention_backend(), "cudnn");
    ops::set_attention_backend("ftune");
    return;
  }
  std::string e = error_of("cudnn");
  EXPECT_NE(e.find("[attention] backend cudnn: this ftune was built without cuDNN"),
            std::string::npos)
      << e;
  EXPECT_EQ(ops::attention_backend(), "ftune");
}

// With the backend set, CPU tensors still run the CPU kernel (cuDNN is GPU-only): same result.
TEST(AttentionBackend, CpuTensorsIgnoreTheBackend) {
  if (!ops::cudnn_attention_built()) GTEST_SKIP() << "built without cuDNN: cannot set cudnn";
  Generator g(5);
  Tensor q = randn({1, 9, 2, 8}, g), k = randn({1, 9, 2, 8}, g), v = randn({1, 9, 2, 8}, g);
  Tensor a = ops::attention(q, k, v);
  ops::set_attention_backend("cudnn");
  Tensor b = ops::attention(q, k, v);
  ops::set_attention_backend("ftune");
  EXPECT_EQ(a.to_vector<float>(), b.to_vector<float>());
}

}  // namespace
}  // namespace ftune
