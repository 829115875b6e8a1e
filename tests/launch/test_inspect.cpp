// `ftune inspect FILE [--verbose]` run as a process: the summary of a checkpoint saved by the
// library, the tensor listing with --verbose, and exit codes for a bad file (1) and usage (2).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "tests/test_util.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test_util::quote;
using test_util::slurp;

struct Result {
  int rc = -1;
  std::string out, err;
};

class Inspect : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ftune_test_inspect_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  Result run(const std::vector<std::string>& args) {
    std::string cmd = quote(FTUNE_BINARY);
    for (const auto& a : args) cmd += " " + quote(a);
    const fs::path out = dir_ / "stdout", err = dir_ / "stderr";
    cmd += " >" + quote(out.string()) + " 2>" + quote(err.string());
    const int status = std::system(cmd.c_str());
    Result r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
  }

  fs::path dir_;
};

bool has(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

TEST_F(Inspect, SummarizesACheckpoint) {
  const std::string file = (dir_ / checkpoint_file_name(42)).string();
  if (!checkpoint_support()) {
    Result r = run({"inspect", file});
    EXPECT_EQ(r.rc, 1);
    EXPECT_TRUE(has(r.err, "no HDF5")) << r.err;
    GTEST_SKIP() << "[checkpoint] this build has no HDF5";
  }
  Checkpoint ck;
  ck.step = 42;
  ck.epoch = 1;
  ck.adapter_only = true;
  ck.model = {{"layers.0.q_proj.lora_A.weight", Tensor::zeros({4, 16}, DType::bf16)},
              {"layers.0.q_proj.lora_B.weight", Tensor::zeros({16, 4}, DType::bf16)},
              {"layers.0.scale", Tensor::ones({3})}};
  ck.optimizer.step = 42;
  ck.optimizer.tensors = {{"layers.0.scale.exp_avg", Tensor::zeros({3})},
                          {"layers.0.scale.exp_avg_sq", Tensor::zeros({3})}};
  ck.trainer_state = {{"sampler", {{"index", 7}}}};
  ck.recipe_yaml = "model:\n  path: /m\nepochs: 2\n";
  ck.model_config = {{"model_type", "llama"}, {"hidden_size", 16}, {"num_hidden_layers", 1}};
  ck.adapter_config = {{"r", 4}, {"alpha", 8}};
  save_checkpoint(file, ck);

  Result r = run({"inspect", file});
  ASSERT_EQ(r.rc, 0) << r.err;
  for (const char* part :
       {"format:         ftune-checkpoint version 1", "step:           42", "epoch:          1",
        "adapter_only:   true",
        "model config:   model_type=\"llama\", hidden_size=16, num_hidden_layers=1",
        "adapter config: {\"alpha\": 8, \"r\": 4}",
        "model tensors:  3 (2 bf16, 1 f32), 131 parameters, 268 B",
        "optimizer:      step 42, 2 tensors, 6 values, 24 B",
        "trainer_state:  {\"sampler\":{\"index\":7}}",
        "recipe:\n  model:\n    path: /m\n  epochs: 2\n"})
    EXPECT_TRUE(has(r.out, part)) << "lacks '" << part << "' in:\n" << r.out;
  EXPECT_FALSE(has(r.out, "lora_A")) << "tensors listed without --verbose";

  Result v = run({"inspect", "--verbose", file});
  ASSERT_EQ(v.rc, 0) << v.err;
  for (const char* part : {"  layers.0.q_proj.lora_A.weight  bf16[4, 16]\n",
                           "  layers.0.q_proj.lora_B.weight  bf16[16, 4]\n",
                           "  layers.0.scale  f32[3]\n", "  layers.0.scale.exp_avg_sq  f32[3]\n"})
    EXPECT_TRUE(has(v.out, part)) << "lacks '" << part << "' in:\n" << v.out;
}

TEST_F(Inspect, BadFileAndUsage) {
  const std::string text = (dir_ / "notes.h5").string();
  std::ofstream(text) << "not a checkpoint\n";
  Result r = run({"inspect", text});
  EXPECT_EQ(r.rc, 1);
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_TRUE(has(r.err, "ftune: error: [checkpoint]")) << r.err;
  EXPECT_TRUE(has(r.err, checkpoint_support() ? text + ": not an HDF5 file" : "no HDF5")) << r.err;
  EXPECT_EQ(run({"inspect"}).rc, 2);
  EXPECT_EQ(run({"inspect", "--help"}).rc, 0);
}

}  // namespace
}  // namespace ftune
