// Loss scaling in `ftune run` end to end (trainers/sft.cpp, trainers/loss_scaler.h) on the tiny
// random Llama. The CPU trains in f32 only, so the CPU tests force a scale on f32 (the trainer's
// logic does not depend on the dtype): a huge initial scale makes the first steps' gradients
// overflow; those steps are skipped (no update, the lr schedule does not advance), the scale halves
// until the gradients are finite, and the run then follows the run without scaling step for step.
// The scale is in metrics.jsonl and in checkpoints (resume continues it exactly); the recipe keys
// are validated. The GPU test trains f16 with dynamic scaling (skips without a GPU).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "io/checkpoint.h"
#include "tests/test_util.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test_util::quote;
using test_util::slurp;

int run_ftune(const std::string& args, const fs::path& log) {
  std::string cmd = "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive " + quote(FTUNE_BINARY) + " " +
                    args + " >" + quote(log.string()) + " 2>&1";
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

// The train lines of a metrics.jsonl.
std::vector<nlohmann::json> train_lines(const fs::path& p) {
  std::vector<nlohmann::json> out;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["split"] == "train") out.push_back(j);
  }
  return out;
}

class LossScaleRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("ftune_test_loss_scale_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
    model_ = root_ / "model";
    test_util::write_tiny_llama(model_);
    data_ = root_ / "train.jsonl";
    std::mt19937 rng(5);
    // 4 examples, batch_size 4, no shuffle: every step trains on the same batch, so a run whose
    // first k steps were skipped is, from step k + 1 on, the unscaled run from step 1 on.
    test_util::write_add_dataset(data_, 4, rng);
  }
  static void TearDownTestSuite() {
    if (!std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root_);
  }

  // std1: random weights of std 1 (not the checkpoint's 0.02) for the CPU tests: gradients large
  // enough that a scale near the f32 maximum overflows them.
  static fs::path write_recipe(const std::string& name, const std::string& extra,
                               bool std1 = true) {
    fs::path p = root_ / (name + ".yaml");
    std::ofstream r(p);
    r << "method: sft\n"
      << "seed: 3\n"
      << "output_dir: " << (root_ / name).string() << "\n"
      << "model:\n  path: " << model_.string() << "\n"
      << (std1 ? "  init: random\n  init_std: 1.0\n" : "") << "tokenizer:\n  max_seq_len: 64\n"
      << "dataset:\n  path: " << data_.string() << "\n  shuffle: false\n"
      << "optimizer:\n  lr: 1.0e-2\n  weight_decay: 0.01\n"
      << "lr_scheduler:\n  name: linear\n  num_warmup_steps: 2\n"
      << "batch_size: 4\n"
      << "max_steps: 16\n"
      << "clip_grad_norm: 1.0\n"
      << extra;
    return p;
  }
  static void run_ok(const std::string& name, const std::string& extra,
                     const std::string& overrides = "", bool std1 = true) {
    fs::path recipe = write_recipe(name, extra, std1);
    fs::path log = root_ / (name + ".log");
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " " + overrides, log), 0) << slurp(log);
  }

  static fs::path root_, model_, data_;
};

fs::path LossScaleRun::root_, LossScaleRun::model_, LossScaleRun::data_;

// 2^126: the gradients of this model (weights of std 1) overflow f32 at this scale and for a
// halving or two after.
const char* kHugeInit = "loss_scale: dynamic\nloss_scale_init: 8.507059173023462e+37\n";

TEST_F(LossScaleRun, OverflowSkipsTheStepHalvesTheScaleThenFollowsTheUnscaledRun) {
  run_ok("ref", "");
  run_ok("over", kHugeInit);
  std::vector<nlohmann::json> ref = train_lines(root_ / "ref" / "metrics.jsonl");
  std::vector<nlohmann::json> over = train_lines(root_ / "over" / "metrics.jsonl");
  ASSERT_EQ(ref.size(), 16u);
  ASSERT_EQ(over.size(), 16u);
  for (const auto& j : ref) {  // no scaler: no scale in the metrics, nothing skipped
    EXPECT_FALSE(j.contains("loss_scale")) << j.dump();
    EXPECT_FALSE(j["skipped"].get<bool>());
  }
  // The first k steps overflow: skipped, the scale halves each time, the lr stays at step 0's.
  size_t k = 0;
  while (k < over.size() && over[k]["overflow"].get<bool>()) ++k;
  ASSERT_GE(k, 1u) << "the huge initial scale did not overflow";
  ASSERT_LE(k, 8u) << "too many overflows to compare 8 steps";
  for (size_t i = 0; i < over.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    const double scale = over[i]["loss_scale"].get<double>();
    EXPECT_EQ(scale, std::ldexp(1.0, 126 - int(std::min(i, k))));  // then constant (interval 2000)
    EXPECT_EQ(over[i]["overflow"].get<bool>(), i < k);
    EXPECT_EQ(over[i]["skipped"].get<bool>(), i < k);
    if (i < k) {
      EXPECT_EQ(over[i]["lr"].get<double>(), ref[0]["lr"].get<double>());
      EXPECT_EQ(over[i]["loss"].get<double>(), ref[0]["loss"].get<double>());  // same weights
    }
  }
  // From step k + 1 on: the unscaled run from step 1 on (same batch, same lr schedule position:
  // the skipped steps did not advance it). Scaling by a power of two commutes with the rounding of
  // every product and sum, so the curves agree to rounding noise.
  for (size_t j = 0; j + k < over.size(); ++j) {
    SCOPED_TRACE("ref step " + std::to_string(j + 1));
    const auto &o = over[j + k], &r = ref[j];
    EXPECT_EQ(o["lr"].get<double>(), r["lr"].get<double>());
    EXPECT_NEAR(o["loss"].get<double>(), r["loss"].get<double>(),
                1e-5 * std::abs(r["loss"].get<double>()));
    EXPECT_NEAR(o["grad_norm"].get<double>(), r["grad_norm"].get<double>(),
                1e-4 * std::abs(r["grad_norm"].get<double>()));
  }
  // The overflow skips are not NaN-guard skips.
  const std::string log = slurp(root_ / "over.log");
  EXPECT_NE(log.find("gradient overflow at loss scale"), std::string::npos) << log;
  EXPECT_EQ(log.find("non-finite"), std::string::npos) << log;
  EXPECT_NE(log.find("| loss_scale "), std::string::npos) << log;
}

TEST_F(LossScaleRun, TheScaleGrowsAfterTheIntervalAndResumeContinuesItExactly) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  // Overflow first, then growth every 3 clean steps (so the scale keeps changing), checkpoints
  // every 5 steps. The run resumed from step 10 must log exactly the curve and scales of the
  // uninterrupted run.
  const std::string extra =
      std::string(kHugeInit) + "loss_scale_growth_interval: 3\n" + "save_every_n_steps: 5\n";
  run_ok("grow", extra);
  std::vector<nlohmann::json> a = train_lines(root_ / "grow" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 16u);
  size_t k = 0;
  while (a[k]["overflow"].get<bool>()) ++k;
  ASSERT_GE(k, 1u);
  // After the last overflow, every 3rd clean step doubles the scale until it overflows again.
  bool grew = false;
  for (size_t i = k + 1; i < a.size(); ++i) {
    const double prev = a[i - 1]["loss_scale"], cur = a[i]["loss_scale"];
    grew |= cur == 2 * prev;
    EXPECT_TRUE(cur == prev || cur == 2 * prev || cur == prev / 2) << i;
  }
  EXPECT_TRUE(grew);
  // The checkpoint holds the scaler's state and the overflow count.
  auto ckpts = list_checkpoints((root_ / "grow").string());
  ASSERT_FALSE(ckpts.empty());
  Checkpoint last = load_checkpoint(ckpts.back().second);
  ASSERT_TRUE(last.trainer_state.contains("loss_scaler")) << last.trainer_state.dump();
  EXPECT_TRUE(last.trainer_state["loss_scaler"]["dynamic"].get<bool>());
  int64_t overflows = 0;
  for (const auto& j : a) overflows += j["overflow"].get<bool>();
  EXPECT_EQ(last.trainer_state["overflow_steps"].get<int64_t>(), overflows);

  // A copy without the last checkpoints (steps 15 and 16) resumes from step 10.
  fs::path b = root_ / "grow_resumed";
  fs::remove_all(b);
  fs::copy(root_ / "grow", b, fs::copy_options::recursive);
  for (auto& [st, path] : list_checkpoints(b.string()))
    if (st > 10) fs::remove(path);
  fs::path recipe = write_recipe("grow", extra);
  ASSERT_EQ(
      run_ftune("run " + quote(recipe.string()) + " resume=true output_dir=" + quote(b.string()),
                root_ / "grow_resumed.log"),
      0)
      << slurp(root_ / "grow_resumed.log");
  std::vector<nlohmann::json> r = train_lines(b / "metrics.jsonl");
  ASSERT_EQ(r.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    EXPECT_EQ(r[i]["loss_scale"].get<double>(), a[i]["loss_scale"].get<double>());
    EXPECT_EQ(r[i]["overflow"].get<bool>(), a[i]["overflow"].get<bool>());
    EXPECT_EQ(r[i]["lr"].get<double>(), a[i]["lr"].get<double>());
    EXPECT_EQ(r[i]["loss"].get<double>(), a[i]["loss"].get<double>());
    EXPECT_EQ(r[i]["grad_norm"].get<double>(), a[i]["grad_norm"].get<double>());
  }
}

TEST_F(LossScaleRun, AFixedScaleThatOverflowsIsABadStepOfTheGuard) {
  // A fixed scale cannot adapt: its overflow goes to the NaN/inf guard, which aborts.
  fs::path recipe =
      write_recipe("fixed_over", "loss_scale: 3.0e+38\nmax_consecutive_nan_steps: 2\n");
  fs::path log = root_ / "fixed_over.log";
  EXPECT_EQ(run_ftune("run " + quote(recipe.string()), log), 1) << slurp(log);
  EXPECT_NE(slurp(log).find("NaN/inf for 2 consecutive steps"), std::string::npos) << slurp(log);
  // A fixed power-of-two scale that fits trains as the unscaled run (to rounding).
  run_ok("fixed_ok", "loss_scale: 1024\n", "max_steps=4");
  run_ok("fixed_ref", "", "max_steps=4");
  auto f = train_lines(root_ / "fixed_ok" / "metrics.jsonl");
  auto r = train_lines(root_ / "fixed_ref" / "metrics.jsonl");
  ASSERT_EQ(f.size(), 4u);
  ASSERT_EQ(r.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(f[i]["loss_scale"].get<double>(), 1024.0);
    EXPECT_NEAR(f[i]["loss"].get<double>(), r[i]["loss"].get<double>(),
                1e-5 * std::abs(r[i]["loss"].get<double>()));
  }
}

TEST_F(LossScaleRun, RecipeKeysAreValidated) {
  struct Case {
    std::string extra, overrides, expect;
  };
  const Case cases[] = {
      {"loss_scale: sometimes\n", "", "`loss_scale` must be dynamic, none or a number"},
      {"loss_scale: -4\n", "", "`loss_scale` must be > 0"},
      {"loss_scale: 1.0e+39\n", "", "must be > 0 and at most 3.4e38"},
      {"loss_scale: 128\nloss_scale_init: 64\n", "", "or loss_scale_init, not both"},
      {"loss_scale_init: 1024\n", "", "loss scaling is off for dtype f32 and bf16"},
      {"loss_scale: none\nloss_scale_growth_interval: 10\n", "", "loss_scale is none"},
      {"loss_scale: 128\nloss_scale_growth_interval: 10\n", "", "needs loss_scale: dynamic"},
      {"loss_scale: dynamic\nloss_scale_growth_interval: 0\n", "", "must be >= 1"},
      {"loss_scale: dynamic\nloss_scale_init: 0\n", "", "`loss_scale_init` must be > 0"},
      {"dtype: f16\ndevice: cuda\nparallel:\n  zero: 1\n", "",
       "parallel.zero: 1 with dtype: f16"},
  };
  int i = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.extra);
    fs::path recipe = write_recipe("bad" + std::to_string(i), c.extra);
    fs::path log = root_ / ("bad" + std::to_string(i++) + ".log");
    EXPECT_NE(run_ftune("validate " + quote(recipe.string()) + " " + c.overrides, log), 0);
    EXPECT_NE(slurp(log).find(c.expect), std::string::npos) << slurp(log);
  }
  // Accepted: dynamic on f32, a number, none, and the keys on an f16 recipe (dynamic by default).
  for (const char* ok :
       {"loss_scale: dynamic\nloss_scale_init: 256\n", "loss_scale: 512\n", "loss_scale: none\n",
        "dtype: f16\ndevice: cuda\nloss_scale_growth_interval: 100\n"}) {
    SCOPED_TRACE(ok);
    fs::path recipe = write_recipe("good" + std::to_string(i), ok);
    fs::path log = root_ / ("good" + std::to_string(i++) + ".log");
    EXPECT_EQ(run_ftune("validate " + quote(recipe.string()), log), 0) << slurp(log);
  }
}

TEST_F(LossScaleRun, CpuReferenceOfTheGpuTest) {
  // The GPU test's recipe on the CPU: the loss falls clearly over the 16 steps, so the GPU test's
  // "it trains" check can fail only on the GPU's account.
  run_ok("full_cpu", "", "", false);
  auto a = train_lines(root_ / "full_cpu" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 16u);
  EXPECT_LT(a.back()["loss"].get<double>(), 0.8 * a.front()["loss"].get<double>());
}

TEST_F(LossScaleRun, F16OnTheGpuTrainsWithDynamicScaling) {
  // f16 with its default dynamic loss scale follows the f32 GPU run; the scale is in the metrics.
  if (!cuda_available())
    GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  // Full fine-tuning from the checkpoint's weights (std-1 weights would overflow f16's forward);
  // on the CPU this recipe lowers the loss by a third (LossScaleRun.CpuReferenceOfTheGpuTest).
  run_ok("gpu_f32", "", "device=cuda", false);
  run_ok("gpu_f16", "", "device=cuda dtype=f16", false);
  auto a = train_lines(root_ / "gpu_f32" / "metrics.jsonl");
  auto b = train_lines(root_ / "gpu_f16" / "metrics.jsonl");
  ASSERT_EQ(a.size(), 16u);
  ASSERT_EQ(b.size(), 16u);
  size_t overflows = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    SCOPED_TRACE("step " + std::to_string(i + 1));
    ASSERT_TRUE(b[i].contains("loss_scale")) << b[i].dump();
    overflows += b[i]["overflow"].get<bool>();
    if (i == 0) EXPECT_EQ(b[i]["loss_scale"].get<double>(), 65536.0);
  }
  // 16 steps from 2^16 at growth_interval 2000: the scale only backs off, so the overflows are
  // the distance from 2^16; a tiny model's gradients fit f16 at 2^16 or a few halvings below.
  EXPECT_LE(overflows, 6u);
  // Step 1's loss comes from the same weights as f32's (rounded to f16): it agrees to f16
  // accuracy. Every step sees the same batch, so the f16 run's last step is f32's step 16 - k
  // after k skipped steps: it ends close to that.
  EXPECT_NEAR(b[0]["loss"].get<double>(), a[0]["loss"].get<double>(),
              1e-2 * std::abs(a[0]["loss"].get<double>()));
  EXPECT_LT(b.back()["loss"].get<double>(), 0.8 * b.front()["loss"].get<double>());
  EXPECT_NEAR(b.back()["loss"].get<double>(), a[a.size() - 1 - overflows]["loss"].get<double>(),
              5e-2 * std::abs(a.back()["loss"].get<double>()));
}

}  // namespace
}  // namespace ftune
