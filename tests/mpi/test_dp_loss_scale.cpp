// Dynamic loss scaling under data parallelism (and ZeRO-1, and TP x DP), in process through
// SftTrainer: the ranks unscale after the gradient reduction and agree on found_inf (an
// all-reduce max), so a run whose huge initial scale overflows the first steps skips the same
// steps, holds the same scales and follows the same curve as ONE process with the same global
// batch. Under ZeRO-1 each rank checks only its own gradient shard and under TP its own slices:
// without the agreement the ranks would disagree on skipping the step.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "tests/mpi/mpi_world.h"
#include "tests/test_util.h"
#include "trainers/sft.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using testing::world;

struct Curve {
  std::vector<double> loss, grad_norm, lr, scale;
  std::vector<bool> overflow;
};

Curve read_curve(const fs::path& p) {
  Curve c;
  std::ifstream in(p);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["split"] != "train") continue;
    c.loss.push_back(j["loss"]);
    c.grad_norm.push_back(j["grad_norm"]);
    c.lr.push_back(j["lr"]);
    c.scale.push_back(j.value("loss_scale", 0.0));
    c.overflow.push_back(j.value("overflow", false));
  }
  return c;
}

class DpLossScale : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto& w = *world();
    Tensor id = Tensor::from_vector<int64_t>({int64_t(std::random_device{}() & 0x7fffffff)}, {1});
    w.broadcast(id, 0);
    root_ = fs::temp_directory_path() /
            ("ftune_test_dp_scale_" + std::to_string(id.data<int64_t>()[0]));
    model_ = root_ / "model";
    data_ = root_ / "train.jsonl";
    if (w.rank() == 0) {
      fs::remove_all(root_);
      fs::create_directories(model_);
      test_util::write_tiny_llama(model_);
      std::mt19937 rng(3);
      test_util::write_add_dataset(data_, 64, rng);  // 32 batches of 2: divides among 2 and 4
    }
    w.barrier();
  }
  static void TearDownTestSuite() {
    world()->barrier();
    if (world()->rank() == 0 && !std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root_);
  }

  static SftConfig config(const std::string& name) {
    SftConfig c;
    c.output_dir = (root_ / name).string();
    c.seed = 5;
    c.model.path = model_.string();
    c.model.init = "random";
    c.model.init_std = 1.0;  // large gradients: a scale near the f32 maximum overflows them
    c.tokenizer.max_seq_len = 64;
    c.dataset.path = data_.string();
    c.optimizer.lr = 3e-3;
    c.lr_scheduler.name = "linear";
    c.lr_scheduler.num_warmup_steps = 2;
    c.batch_size = 2;
    c.max_steps = 12;
    c.clip_grad_norm = 1.0;
    c.parallel.bucket_mb = 0.02;  // several buckets
    c.loss_scale = "dynamic";
    c.loss_scale_init = std::ldexp(1.0, 126);
    c.loss_scale_growth_interval = 3;  // grows again, and overflows again
    return c;
  }

  // rtol: of the losses and gradient norms against the one process. The std-1 weights make this
  // model chaotic: the other summation order of 4 ranks drifts by up to 3e-5 over 12 steps (2
  // ranks: below 1e-5). The overflow steps and the scales must be exactly the same.
  static void check(const std::string& name, SftConfig dpc, double rtol = 2e-4) {
    auto& w = *world();
    const int dp = w.size() / int(dpc.parallel.tp);
    std::ostringstream dp_log;
    SftResult dres = SftTrainer(dpc, dp_log).train();
    EXPECT_EQ(dres.steps, 12);
    // Every rank saw the same overflows (a disagreement would have hung or diverged by now).
    const int64_t lo = w.all_reduce_int(dres.overflow_steps, parallel::ReduceOp::min);
    const int64_t hi = w.all_reduce_int(dres.overflow_steps, parallel::ReduceOp::max);
    EXPECT_EQ(lo, hi) << name;
    if (w.rank() != 0) return;
    SftConfig one = dpc;
    one.output_dir = (root_ / (name + "_one")).string();
    one.gradient_accumulation_steps = dp;
    one.parallel.zero = 0;
    one.parallel.tp = 1;
    std::ostringstream log;
    SftResult r = SftTrainer(one, log, parallel::make_single_communicator()).train();
    EXPECT_GE(r.overflow_steps, 1) << "the huge initial scale did not overflow\n" << log.str();
    EXPECT_EQ(dres.overflow_steps, r.overflow_steps) << name;
    EXPECT_EQ(dres.loss_scale, r.loss_scale) << name;
    Curve got = read_curve(fs::path(dpc.output_dir) / "metrics.jsonl");
    Curve ref = read_curve(fs::path(one.output_dir) / "metrics.jsonl");
    ASSERT_EQ(got.loss.size(), 12u);
    ASSERT_EQ(ref.loss.size(), 12u);
    for (size_t i = 0; i < 12; ++i) {
      SCOPED_TRACE(name + " step " + std::to_string(i + 1));
      EXPECT_EQ(got.overflow[i], ref.overflow[i]);
      EXPECT_EQ(got.scale[i], ref.scale[i]);
      EXPECT_EQ(got.lr[i], ref.lr[i]);
      EXPECT_NEAR(got.loss[i], ref.loss[i], rtol * std::fabs(ref.loss[i]));
      EXPECT_NEAR(got.grad_norm[i], ref.grad_norm[i], rtol * std::fabs(ref.grad_norm[i]) + 1e-12);
    }
    EXPECT_LT(got.loss.back(), got.loss.front());
  }

  static fs::path root_, model_, data_;
};
fs::path DpLossScale::root_, DpLossScale::model_, DpLossScale::data_;

TEST_F(DpLossScale, DataParallelAgreesWithOneProcess) { check("dp", config("dp")); }

TEST_F(DpLossScale, ZeroOneAgreesWithOneProcess) {
  SftConfig c = config("zero");
  c.parallel.zero = 1;
  check("zero", c);
}

TEST_F(DpLossScale, TensorParallelAgreesWithOneProcess) {
  if (world()->size() % 2 != 0) GTEST_SKIP() << "needs an even world";
  SftConfig c = config("tp");
  c.parallel.tp = 2;
  // The std-1 weights make this model chaotic: TP's other summation order alone (loss_scale none)
  // drifts from the one process by up to ~1% in gradient norm over 12 steps, so the curve is
  // checked loosely here; the overflow steps and the scales must still be exactly the same.
  check("tp", c, 3e-2);
}

}  // namespace
}  // namespace ftune
