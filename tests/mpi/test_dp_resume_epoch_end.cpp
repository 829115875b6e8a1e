// Resuming at another dp from a checkpoint written at an epoch's end when the epoch's batches do
// not divide among the old dp ranks (15 batches over dp 2: the last round wraps around, so the
// replicas consumed 16): the run resumes at dp 1 (and, with 4 ranks, dp 4) and continues with
// the batches that follow, so its loss curve equals the uninterrupted dp-2 run's wherever the
// two layouts take the same global batches.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "tests/mpi/mpi_world.h"
#include "tests/test_util.h"
#include "trainers/sft.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using testing::world;

std::vector<double> train_losses(const fs::path& p) { return test_util::read_metrics(p).train_loss; }

void expect_same_prefix(const std::vector<double>& got, const std::vector<double>& ref, size_t n,
                        const std::string& what) {
  ASSERT_GE(got.size(), n) << what;
  ASSERT_GE(ref.size(), n) << what;
  for (size_t i = 0; i < n; ++i)
    EXPECT_NEAR(got[i], ref[i], 1e-5 * std::fabs(ref[i])) << what << " at step " << i + 1;
}

TEST(DpResume, EpochEndCheckpointResumesAtAnotherDp) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  auto& w = *world();
  Tensor id = Tensor::from_vector<int64_t>({int64_t(std::random_device{}() & 0x7fffffff)}, {1});
  w.broadcast(id, 0);
  const fs::path root =
      fs::temp_directory_path() / ("ftune_test_dp_epoch_" + std::to_string(id.data<int64_t>()[0]));
  const fs::path model = root / "model", data = root / "train.jsonl";
  if (w.rank() == 0) {
    fs::remove_all(root);
    fs::create_directories(model);
    test_util::write_tiny_llama(model);
    std::mt19937 rng(5);
    test_util::write_add_dataset(data, 30, rng);  // 15 batches of 2 per epoch
  }
  w.barrier();

  // The global batch is 4 batches of 2 at every dp (accumulation 4 / dp). At dp 2 an epoch is 8
  // micro-batches per rank, 4 steps: the step-4 checkpoint is at the epoch's end.
  auto config = [&](const std::string& name, int64_t dp) {
    SftConfig c;
    c.output_dir = (root / name).string();
    c.seed = 7;
    c.model.path = model.string();
    c.tokenizer.max_seq_len = 64;
    c.dataset.path = data.string();
    c.optimizer.lr = 3e-3;
    c.lr_scheduler.name = "cosine";
    c.lr_scheduler.num_warmup_steps = 1;
    c.batch_size = 2;
    c.gradient_accumulation_steps = 4 / dp;
    c.max_steps = 12;
    c.save_every_n_steps = 4;
    return c;
  };

  // The uninterrupted dp-2 run, on world ranks 0 and 1.
  std::shared_ptr<parallel::Communicator> pair = w.split(w.rank() < 2 ? 0 : 1, w.rank());
  if (w.rank() < 2) {
    std::ostringstream log;
    SftResult r = SftTrainer(config("dp2", 2), log, pair).train();
    EXPECT_EQ(r.steps, 12);
  }
  w.barrier();
  auto seed_dir = [&](const std::string& name) {
    if (w.rank() == 0) {
      const fs::path dst = root / name;
      fs::create_directories(dst);
      ASSERT_TRUE(fs::exists(root / "dp2" / checkpoint_file_name(4)));
      fs::copy_file(root / "dp2" / checkpoint_file_name(4), dst / checkpoint_file_name(4));
      fs::copy_file(root / "dp2" / "metrics.jsonl", dst / "metrics.jsonl");
    }
    w.barrier();
  };
  std::vector<double> ref;
  if (w.rank() == 0) ref = train_losses(root / "dp2" / "metrics.jsonl");

  // dp 2 -> 1: epoch 2's 15 batches are steps 5-7 and three of step 8, whose fourth is epoch 3's
  // first where dp 2 wrapped around: the curves agree through step 7.
  seed_dir("dp1");
  if (w.rank() == 0) {
    SftConfig c = config("dp1", 1);
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log, parallel::make_single_communicator()).train();
    EXPECT_EQ(r.steps, 12);
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    std::vector<double> got = train_losses(root / "dp1" / "metrics.jsonl");
    EXPECT_EQ(got.size(), 12u);
    expect_same_prefix(got, ref, 7, "dp 2 -> 1 loss");
  }
  w.barrier();

  // dp 2 -> 4 (4 ranks): 15 batches over 4 ranks wrap around at the same step as over 2, so the
  // curves agree over all 12 steps, epoch 3 included.
  if (w.size() == 4) {
    seed_dir("dp4");
    SftConfig c = config("dp4", 4);
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log).train();
    EXPECT_EQ(r.steps, 12);
    if (w.rank() == 0) {
      std::vector<double> got = train_losses(root / "dp4" / "metrics.jsonl");
      EXPECT_EQ(got.size(), 12u);
      expect_same_prefix(got, ref, 12, "dp 2 -> 4 loss");
    }
  }
  w.barrier();
  if (w.rank() == 0 && !std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root);
}

}  // namespace
}  // namespace ftune
