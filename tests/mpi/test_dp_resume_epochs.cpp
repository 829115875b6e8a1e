// An epochs-based run (no max_steps) checkpointed at dp 2 and resumed at another dp with the same
// recipe (batch_size and accumulation per rank, so the global batch changes with dp) trains the
// epochs' remaining batches exactly: not the step count the new dp would give a fresh run.
//
// The data: 16 examples of 16 distinct token lengths, batch_size 1, accumulation 1, 2 epochs:
// 8 steps per epoch at dp 2, 16 at dp 1, 4 at dp 4. Global batch g of an epoch is the same
// example at every dp, so a one-process reference run (1 example per step) names, by its
// per-step token counts, the example behind each global batch. The dp-2 checkpoint at step 4
// has consumed global batches 0-7 of epoch 1; the run resumed at dp d must then take exactly
// batches 8-31 (the rest of epoch 1 and all of epoch 2), d per step: 4 + 24 / d steps.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
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

struct TrainLine {
  int64_t step = 0, epoch = 0, tokens = 0;
  double loss = 0;
};

std::vector<TrainLine> train_lines(const fs::path& metrics) {
  std::vector<TrainLine> out;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    nlohmann::json j = nlohmann::json::parse(line);
    if (j["split"] != "train") continue;
    out.push_back({j["step"].get<int64_t>(), j["epoch"].get<int64_t>(),
                   j["tokens"].get<int64_t>(), j["loss"].is_null() ? NAN : j["loss"].get<double>()});
  }
  return out;
}

constexpr int kExamples = 16, kEpochs = 2, kSavedStep = 4;

TEST(DpResume, EpochsRunResumedAtAnotherDpFinishesTheEpochs) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  auto& w = *world();
  Tensor id = Tensor::from_vector<int64_t>({int64_t(std::random_device{}() & 0x7fffffff)}, {1});
  w.broadcast(id, 0);
  const fs::path root = fs::temp_directory_path() /
                        ("ftune_test_dp_epochs_" + std::to_string(id.data<int64_t>()[0]));
  const fs::path model = root / "model", data = root / "train.jsonl";
  if (w.rank() == 0) {
    fs::remove_all(root);
    fs::create_directories(model);
    test_util::write_tiny_llama(model);
    std::ofstream d(data);
    for (int i = 0; i < kExamples; ++i) {  // example i is i tokens longer than example 0
      std::string words = "count";
      for (int k = 0; k < i; ++k) words += " x";
      nlohmann::json ex = {{"messages",
                            {{{"role", "user"}, {"content", words}},
                             {{"role", "assistant"}, {"content", "done"}}}}};
      d << ex.dump() << "\n";
    }
  }
  w.barrier();

  auto config = [&](const std::string& name) {
    SftConfig c;
    c.output_dir = (root / name).string();
    c.seed = 3;
    c.model.path = model.string();
    c.tokenizer.max_seq_len = 64;
    c.dataset.path = data.string();
    c.optimizer.lr = 1e-3;
    c.lr_scheduler.name = "cosine";
    c.batch_size = 1;
    c.gradient_accumulation_steps = 1;
    c.epochs = kEpochs;  // max_steps unset: the epochs decide
    c.save_every_n_steps = kSavedStep;
    return c;
  };

  // The one-process reference: tokens[g] is the length of global batch g's example (epoch-major).
  std::vector<int64_t> tokens;
  if (w.rank() == 0) {
    std::ostringstream log;
    SftResult r = SftTrainer(config("ref"), log, parallel::make_single_communicator()).train();
    EXPECT_EQ(r.steps, kEpochs * kExamples);
    for (const TrainLine& l : train_lines(root / "ref" / "metrics.jsonl")) tokens.push_back(l.tokens);
    ASSERT_EQ(tokens.size(), size_t(kEpochs * kExamples));
    // Each epoch shows each example once, and the lengths tell the examples apart.
    for (int e = 0; e < kEpochs; ++e) {
      std::set<int64_t> seen(tokens.begin() + e * kExamples, tokens.begin() + (e + 1) * kExamples);
      EXPECT_EQ(seen.size(), size_t(kExamples)) << "epoch " << e + 1;
    }
  }

  // The dp-2 run on world ranks 0 and 1: 8 steps per epoch.
  std::shared_ptr<parallel::Communicator> pair = w.split(w.rank() < 2 ? 0 : 1, w.rank());
  if (w.rank() < 2) {
    std::ostringstream log;
    SftResult r = SftTrainer(config("dp2"), log, pair).train();
    EXPECT_EQ(r.steps, kEpochs * kExamples / 2);
  }
  w.barrier();

  // A directory holding the dp-2 run's step-4 checkpoint and its metrics up to there.
  auto seed_dir = [&](const std::string& name) {
    if (w.rank() == 0) {
      const fs::path dst = root / name;
      fs::create_directories(dst);
      ASSERT_TRUE(fs::exists(root / "dp2" / checkpoint_file_name(kSavedStep)));
      fs::copy_file(root / "dp2" / checkpoint_file_name(kSavedStep),
                    dst / checkpoint_file_name(kSavedStep));
      fs::copy_file(root / "dp2" / "metrics.jsonl", dst / "metrics.jsonl");
    }
    w.barrier();
  };
  // The resumed run's steps after kSavedStep take global batches 2 * kSavedStep + dp * i, ...
  // (dp of them per step) through the end of the last epoch, and not one more.
  auto check_resumed = [&](const fs::path& dir, int dp, const std::string& log) {
    const int64_t left = kEpochs * kExamples - 2 * kSavedStep;  // global batches after step 4
    const int64_t want_steps = kSavedStep + left / dp;
    std::vector<TrainLine> lines = train_lines(dir / "metrics.jsonl");
    // Not ASSERT (that aborts the job): the other layouts are still checked.
    EXPECT_EQ(lines.size(), size_t(want_steps)) << "dp " << dp;
    if (lines.size() != size_t(want_steps)) return;
    for (int64_t s = kSavedStep; s < want_steps; ++s) {
      const int64_t g0 = 2 * kSavedStep + (s - kSavedStep) * dp;
      int64_t want = 0;
      for (int64_t g = g0; g < g0 + dp; ++g) want += tokens[size_t(g)];
      EXPECT_EQ(lines[size_t(s)].step, s + 1);
      EXPECT_EQ(lines[size_t(s)].tokens, want) << "dp " << dp << ", step " << s + 1;
      EXPECT_EQ(lines[size_t(s)].epoch, g0 / kExamples) << "dp " << dp << ", step " << s + 1;
    }
    const std::string note = "steps: " + std::to_string(want_steps) + " after the resume";
    EXPECT_NE(log.find(note), std::string::npos) << log;
  };

  // dp 2 -> 1: 4 + 24 steps (a fresh dp-1 run would plan 32).
  seed_dir("dp1");
  if (w.rank() == 0) {
    SftConfig c = config("dp1");
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log, parallel::make_single_communicator()).train();
    EXPECT_EQ(r.steps, kSavedStep + (kEpochs * kExamples - 2 * kSavedStep));
    check_resumed(root / "dp1", 1, log.str());
  }
  w.barrier();

  // dp 2 -> 4 (4 ranks): 4 + 6 steps (a fresh dp-4 run would plan 8).
  if (w.size() == 4) {
    seed_dir("dp4");
    SftConfig c = config("dp4");
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log).train();
    EXPECT_EQ(r.steps, kSavedStep + (kEpochs * kExamples - 2 * kSavedStep) / 4);
    if (w.rank() == 0) check_resumed(root / "dp4", 4, log.str());
  }
  w.barrier();

  // dp 2 -> 2: the count and the curve are the uninterrupted run's, and nothing is recounted.
  seed_dir("dp2b");
  if (w.rank() < 2) {
    SftConfig c = config("dp2b");
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log, pair).train();
    EXPECT_EQ(r.steps, kEpochs * kExamples / 2);
    if (w.rank() == 0) {
      EXPECT_EQ(log.str().find("after the resume"), std::string::npos) << log.str();
      std::vector<TrainLine> got = train_lines(root / "dp2b" / "metrics.jsonl");
      std::vector<TrainLine> ref = train_lines(root / "dp2" / "metrics.jsonl");
      ASSERT_EQ(got.size(), ref.size());
      for (size_t i = 0; i < ref.size(); ++i) {
        EXPECT_EQ(got[i].tokens, ref[i].tokens) << "step " << i + 1;
        EXPECT_EQ(got[i].loss, ref[i].loss) << "step " << i + 1;  // bit for bit
      }
    }
  }
  w.barrier();
  if (w.rank() == 0 && !std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root);
}

}  // namespace
}  // namespace ftune
