// The SFT trainer under data parallelism (2 and 4 ranks), in process through SftTrainer: the loss
// and grad-norm curves of DP(world) with batch b and accumulation a equal, to 1e-5 relative over
// 20 steps, those of ONE process with batch b and accumulation a * world (the same global batch:
// SftLoader's rank r takes batches r, r + world, ...), for full fine-tuning with and without
// accumulation and for LoRA with dropout; ZeRO-1 equals plain DP; buckets are several; only rank 0
// writes; a ZeRO-1 checkpoint written by DP(world) resumes in one process; TP x DP with and
// without ZeRO-1 equals one process and resumes across layouts.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "models/transformer.h"
#include "tests/mpi/mpi_world.h"
#include "tests/test_util.h"
#include "trainers/sft.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using testing::world;

using test_util::expect_same_curve;
using test_util::Metrics;
using test_util::read_metrics;

class DpSft : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    // One directory for all ranks: rank 0 picks the name and makes the files.
    auto& w = *world();
    Tensor id = Tensor::from_vector<int64_t>({int64_t(std::random_device{}() & 0x7fffffff)}, {1});
    w.broadcast(id, 0);
    root_ = fs::temp_directory_path() / ("ftune_test_dp_" + std::to_string(id.data<int64_t>()[0]));
    model_ = root_ / "model";
    data_ = root_ / "train.jsonl";
    val_ = root_ / "val.jsonl";
    if (w.rank() == 0) {
      fs::remove_all(root_);
      fs::create_directories(model_);
      test_util::write_tiny_llama(model_);
      // 64 examples in batches of 2: 32 batches per epoch, which divide among 2 and 4 ranks (so
      // no rank wraps around and the global batches match).
      std::mt19937 rng(3);
      test_util::write_add_dataset(data_, 64, rng);
      test_util::write_add_dataset(val_, 12, rng);
    }
    w.barrier();
  }
  static void TearDownTestSuite() {
    world()->barrier();
    if (world()->rank() == 0 && !std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root_);
  }

  static SftConfig config(const std::string& name, int64_t accum) {
    SftConfig c;
    c.output_dir = (root_ / name).string();
    c.seed = 11;
    c.model.path = model_.string();
    c.tokenizer.max_seq_len = 64;
    c.dataset.path = data_.string();
    c.dataset.val_path = val_.string();
    c.optimizer.lr = 3e-3;
    c.optimizer.weight_decay = 0.01;
    c.lr_scheduler.name = "cosine";
    c.lr_scheduler.num_warmup_steps = 2;
    c.batch_size = 2;
    c.gradient_accumulation_steps = accum;
    c.max_steps = 20;
    c.clip_grad_norm = 1.0;
    c.parallel.bucket_mb = 0.02;  // ~5k floats: the tiny model's 20 tensors make several buckets
    return c;
  }

  // DP over the world with `accum`, and (rank 0 only) one process with accum * world; compares
  // the curves on rank 0. Returns the DP run's log (rank 0's).
  static std::string check_dp_equals_single(const std::string& name, SftConfig dpc,
                                            const std::string& ref_name = "") {
    auto& w = *world();
    const int n = w.size() / int(dpc.parallel.tp);  // the data-parallel degree
    std::ostringstream dp_log;
    SftResult dres = SftTrainer(dpc, dp_log).train();
    EXPECT_EQ(dres.steps, 20);
    if (w.rank() == 0) {
      SftConfig one = dpc;
      one.output_dir = (root_ / (ref_name.empty() ? name + "_one" : ref_name)).string();
      one.gradient_accumulation_steps = dpc.gradient_accumulation_steps * n;
      one.parallel.zero = 0;
      one.parallel.tp = 1;
      Metrics ref;
      if (ref_name.empty() || !fs::exists(fs::path(one.output_dir) / "metrics.jsonl")) {
        std::ostringstream log;
        SftResult r = SftTrainer(one, log, parallel::make_single_communicator()).train();
        EXPECT_EQ(r.steps, 20);
        EXPECT_NEAR(r.eval_after->loss, dres.eval_after->loss, 1e-5 * r.eval_after->loss);
        EXPECT_EQ(r.eval_after->tokens, dres.eval_after->tokens);
        EXPECT_NEAR(r.eval_after->accuracy, dres.eval_after->accuracy, 1e-9);
      }
      ref = read_metrics(fs::path(one.output_dir) / "metrics.jsonl");
      Metrics got = read_metrics(fs::path(dpc.output_dir) / "metrics.jsonl");
      expect_same_curve(got.train_loss, ref.train_loss, 1e-5, name + " loss");
      expect_same_curve(got.grad_norm, ref.grad_norm, 1e-5, name + " grad_norm");
      expect_same_curve(got.eval_loss, ref.eval_loss, 1e-5, name + " eval loss");
      EXPECT_LT(got.train_loss.back(), got.train_loss.front());  // it trains
    }
    return dp_log.str();
  }

  static int buckets_in(const std::string& log) {
    std::smatch m;
    if (!std::regex_search(log, m, std::regex(R"((\d+) gradient buckets)"))) return -1;
    return std::stoi(m[1]);
  }

  static fs::path root_, model_, data_, val_;
};
fs::path DpSft::root_, DpSft::model_, DpSft::data_, DpSft::val_;

TEST_F(DpSft, FullFinetuneEqualsOneProcess) {
  std::string log = check_dp_equals_single("full", config("full", 1));
  if (world()->rank() == 0) {
    EXPECT_GT(buckets_in(log), 2) << log;
    EXPECT_NE(log.find("global batch " + std::to_string(2 * world()->size())), std::string::npos)
        << log;
  } else {
    EXPECT_EQ(log, "");  // only rank 0 prints
  }
}

TEST_F(DpSft, GradientAccumulationEqualsOneProcess) {
  check_dp_equals_single("accum", config("accum", 2), "accum_one");
}

TEST_F(DpSft, ZeroOneEqualsPlainDp) {
  SftConfig c = config("zero", 2);
  c.parallel.zero = 1;
  c.save_every_n_steps = 10;
  // Also against the one-process run of the previous test (same configuration).
  check_dp_equals_single("zero", c, "accum_one");
  if (world()->rank() == 0) {
    Metrics plain = read_metrics(root_ / "accum" / "metrics.jsonl");
    Metrics zero = read_metrics(root_ / "zero" / "metrics.jsonl");
    expect_same_curve(zero.train_loss, plain.train_loss, 1e-5, "zero vs plain loss");
    expect_same_curve(zero.grad_norm, plain.grad_norm, 1e-5, "zero vs plain grad_norm");
  }
}

// The ZeRO-1 checkpoint of step 10 (optimizer state gathered to full shapes by DP(world)) resumes
// in one process and continues on the one-process curve.
TEST_F(DpSft, ZeroCheckpointResumesInOneProcess) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  world()->barrier();
  if (world()->rank() == 0) {
    const fs::path src = root_ / "zero", dst = root_ / "zero_resume";
    ASSERT_TRUE(fs::exists(src / checkpoint_file_name(10)));
    fs::create_directories(dst);
    fs::copy_file(src / checkpoint_file_name(10), dst / checkpoint_file_name(10));
    fs::copy_file(src / "metrics.jsonl", dst / "metrics.jsonl");
    SftConfig c = config("zero_resume", 2 * world()->size());
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log, parallel::make_single_communicator()).train();
    EXPECT_EQ(r.steps, 20);
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    Metrics ref = read_metrics(root_ / "accum_one" / "metrics.jsonl");
    Metrics got = read_metrics(dst / "metrics.jsonl");
    expect_same_curve(got.train_loss, ref.train_loss, 1e-5, "resumed loss");
  }
  world()->barrier();
}

TEST_F(DpSft, LoraWithDropoutEqualsOneProcess) {
  SftConfig c = config("lora", 2);
  c.lora.enabled = true;
  c.lora.r = 4;
  c.lora.dropout = 0.1;
  c.lora.target_modules = {"q_proj", "v_proj", "down_proj"};
  c.optimizer.lr = 1e-2;
  check_dp_equals_single("lora", c);
}

// Tensor parallel (tp = 2; with 4 ranks a 2 x 2 grid): the curves equal one process with the same
// global batch, for full fine-tuning and LoRA (no dropout: row-parallel layers draw their masks
// per tp rank), and the checkpoints (full shapes) resume across layouts.
TEST_F(DpSft, TensorParallelEqualsOneProcess) {
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  SftConfig c = config("tp", 2);
  c.parallel.tp = 2;
  c.save_every_n_steps = 10;
  std::string log = check_dp_equals_single("tp", c);
  if (world()->rank() == 0) {
    EXPECT_NE(log.find("tp 2"), std::string::npos) << log;
    // Each rank wrote its own slices into the one file (no gathered tensors).
    if (sharded_checkpoint_support())
      EXPECT_NE(log.find("ranks wrote their slices"), std::string::npos) << log;
  }
}

TEST_F(DpSft, TensorParallelLoraEqualsOneProcess) {
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  SftConfig c = config("tp_lora", 2);
  c.parallel.tp = 2;
  c.lora.enabled = true;
  c.lora.r = 4;
  c.lora.target_modules = {"all-linear"};
  c.lora.dropout = 0.25;  // row-parallel ranks draw their slices of the one-process masks
  check_dp_equals_single("tp_lora", c);
}

// Copies `from`'s step-10 checkpoint and metrics into a fresh run directory `to` (rank 0).
void seed_resume_dir(const fs::path& from, const fs::path& to) {
  if (world()->rank() == 0) {
    fs::remove_all(to);
    fs::create_directories(to);
    fs::copy_file(from / checkpoint_file_name(10), to / checkpoint_file_name(10));
    fs::copy_file(from / "metrics.jsonl", to / "metrics.jsonl");
  }
  world()->barrier();
}

// (tp 2, dp n/2) -> one process.
TEST_F(DpSft, TensorParallelCheckpointResumesInOneProcess) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  const int dp = world()->size() / 2;
  seed_resume_dir(root_ / "tp", root_ / "tp_to_one");
  if (world()->rank() == 0) {
    SftConfig c = config("tp_to_one", 2 * dp);
    c.resume = true;
    std::ostringstream log;
    SftResult r = SftTrainer(c, log, parallel::make_single_communicator()).train();
    EXPECT_EQ(r.steps, 20);
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    expect_same_curve(read_metrics(root_ / "tp_to_one" / "metrics.jsonl").train_loss,
                      read_metrics(root_ / "tp_one" / "metrics.jsonl").train_loss, 1e-5, "2 -> 1 loss");
  }
  world()->barrier();
}

// One process -> (tp 2, dp n/2).
TEST_F(DpSft, OneProcessCheckpointResumesUnderTensorParallel) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  seed_resume_dir(root_ / "tp_one", root_ / "one_to_tp");
  SftConfig c = config("one_to_tp", 2);
  c.parallel.tp = 2;
  c.resume = true;
  std::ostringstream log;
  SftResult r = SftTrainer(c, log).train();
  EXPECT_EQ(r.steps, 20);
  if (world()->rank() == 0) {
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    expect_same_curve(read_metrics(root_ / "one_to_tp" / "metrics.jsonl").train_loss,
                      read_metrics(root_ / "tp_one" / "metrics.jsonl").train_loss, 1e-5, "1 -> 2 loss");
  }
}

// (tp 2, dp n/2) -> (tp 1, dp n): with 4 ranks, (tp2, dp2) -> (tp1, dp4).
TEST_F(DpSft, TensorParallelCheckpointResumesAsDataParallel) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  seed_resume_dir(root_ / "tp", root_ / "tp_to_dp");
  SftConfig c = config("tp_to_dp", 1);  // 1 x dp n = 2 x dp n/2: the same global batch
  c.resume = true;
  std::ostringstream log;
  SftResult r = SftTrainer(c, log).train();
  EXPECT_EQ(r.steps, 20);
  if (world()->rank() == 0) {
    expect_same_curve(read_metrics(root_ / "tp_to_dp" / "metrics.jsonl").train_loss,
                      read_metrics(root_ / "tp_one" / "metrics.jsonl").train_loss, 1e-5, "tp -> dp loss");
  }
}

// Tensor parallel + ZeRO-1 (tp 2 x dp n/2, the optimizer state sharded over each dp group): the
// curves equal one process and the tp run with zero 0 (the clip norm sums the split parameters'
// squares over tp and the ZeRO shards over dp); the checkpoint holds the full-shape state.
TEST_F(DpSft, TensorParallelZeroEqualsOneProcess) {
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  SftConfig c = config("tp_zero", 2);
  c.parallel.tp = 2;
  c.parallel.zero = 1;
  c.save_every_n_steps = 10;
  std::string log = check_dp_equals_single("tp_zero", c, "tp_one");
  if (world()->rank() == 0) {
    EXPECT_NE(log.find("tp 2, zero 1"), std::string::npos) << log;
    Metrics plain = read_metrics(root_ / "tp" / "metrics.jsonl");
    Metrics zero = read_metrics(root_ / "tp_zero" / "metrics.jsonl");
    expect_same_curve(zero.train_loss, plain.train_loss, 1e-5, "tp zero vs tp loss");
    expect_same_curve(zero.grad_norm, plain.grad_norm, 1e-5, "tp zero vs tp grad_norm");
    if (checkpoint_support()) {  // the same full-shape optimizer state as the zero-0 tp run's
      Checkpoint a = load_checkpoint((root_ / "tp_zero" / checkpoint_file_name(10)).string());
      Checkpoint b = load_checkpoint((root_ / "tp" / checkpoint_file_name(10)).string());
      ASSERT_EQ(a.optimizer.tensors.size(), b.optimizer.tensors.size());
      std::map<std::string, Tensor> ref(b.optimizer.tensors.begin(), b.optimizer.tensors.end());
      for (auto& [n, t] : a.optimizer.tensors) {
        ASSERT_TRUE(ref.count(n)) << n;
        ASSERT_EQ(t.shape(), ref[n].shape()) << n;
        std::vector<double> x = t.to(DType::f64).to_vector<double>();
        std::vector<double> y = ref[n].to(DType::f64).to_vector<double>();
        double scale = 0, diff = 0;
        for (size_t i = 0; i < x.size(); ++i) {
          scale = std::max(scale, std::fabs(y[i]));
          diff = std::max(diff, std::fabs(x[i] - y[i]));
        }
        EXPECT_LE(diff, 1e-4 * scale) << n;
      }
    }
  }
}

// (tp 2, dp n/2, zero 1) -> (tp 1, dp n, zero 1): with 4 ranks (tp2, dp2) -> (tp1, dp4).
TEST_F(DpSft, TensorParallelZeroCheckpointResumesAsZeroDataParallel) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  seed_resume_dir(root_ / "tp_zero", root_ / "tp_zero_to_dp_zero");
  SftConfig c = config("tp_zero_to_dp_zero", 1);  // 1 x dp n = 2 x dp n/2: the same global batch
  c.parallel.zero = 1;
  c.resume = true;
  std::ostringstream log;
  SftResult r = SftTrainer(c, log).train();
  EXPECT_EQ(r.steps, 20);
  if (world()->rank() == 0) {
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    expect_same_curve(read_metrics(root_ / "tp_zero_to_dp_zero" / "metrics.jsonl").train_loss,
                      read_metrics(root_ / "tp_one" / "metrics.jsonl").train_loss, 1e-5,
                      "tp zero -> dp zero loss");
  }
}

// (tp 2, dp n/2, zero 1) -> (tp 2, dp n/2, zero 0).
TEST_F(DpSft, TensorParallelZeroCheckpointResumesWithoutZero) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  seed_resume_dir(root_ / "tp_zero", root_ / "tp_zero_to_tp");
  SftConfig c = config("tp_zero_to_tp", 2);
  c.parallel.tp = 2;
  c.resume = true;
  std::ostringstream log;
  SftResult r = SftTrainer(c, log).train();
  EXPECT_EQ(r.steps, 20);
  if (world()->rank() == 0) {
    EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
    expect_same_curve(read_metrics(root_ / "tp_zero_to_tp" / "metrics.jsonl").train_loss,
                      read_metrics(root_ / "tp_one" / "metrics.jsonl").train_loss, 1e-5,
                      "tp zero -> tp loss");
  }
}

// GPT-2's fused c_attn is split by heads inside each of its q, k, v blocks (TensorSlice::blocks):
// a (tp 2) checkpoint written slice by slice, full and LoRA, resumes in one process on the
// one-process curve.
TEST_F(DpSft, Gpt2TensorParallelCheckpointResumesInOneProcess) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  const fs::path gpt2 = root_ / "gpt2_model";
  if (world()->rank() == 0) test_util::write_tiny_gpt2(gpt2);
  world()->barrier();
  const int dp = world()->size() / 2;
  for (bool lora : {false, true}) {
    const std::string name = lora ? "gpt2_tp_lora" : "gpt2_tp";
    SftConfig c = config(name, 2);
    c.model.path = gpt2.string();
    c.parallel.tp = 2;
    c.save_every_n_steps = 10;
    if (lora) {
      c.lora.enabled = true;
      c.lora.r = 4;
      c.lora.target_modules = {"all-linear"};
      c.optimizer.lr = 1e-2;
    }
    check_dp_equals_single(name, c);
    seed_resume_dir(root_ / name, root_ / (name + "_to_one"));
    if (world()->rank() == 0) {
      SftConfig one = c;
      one.output_dir = (root_ / (name + "_to_one")).string();
      one.parallel.tp = 1;
      one.gradient_accumulation_steps = 2 * dp;
      one.resume = true;
      std::ostringstream log;
      SftResult r = SftTrainer(one, log, parallel::make_single_communicator()).train();
      EXPECT_EQ(r.steps, 20);
      EXPECT_NE(log.str().find("resume: "), std::string::npos) << log.str();
      expect_same_curve(read_metrics(root_ / (name + "_to_one") / "metrics.jsonl").train_loss,
                        read_metrics(root_ / (name + "_one") / "metrics.jsonl").train_loss, 1e-5,
                        name + " -> one process loss");
    }
    world()->barrier();
  }
}

// FTUNE_SHARDED_CHECKPOINT=0: the gathered save (rank 0 writes what the ranks gathered) gives
// the same file, tensor for tensor, as the sharded save of TensorParallelEqualsOneProcess.
TEST_F(DpSft, GatheredSaveFallbackWritesTheSameCheckpoint) {
  if (!checkpoint_support()) GTEST_SKIP() << "no HDF5 in this build";
  if (world()->size() % 2) GTEST_SKIP() << "tp = 2 needs an even number of ranks";
  SftConfig c = config("tp_gathered", 2);
  c.parallel.tp = 2;
  c.save_every_n_steps = 10;
  setenv("FTUNE_SHARDED_CHECKPOINT", "0", 1);
  std::ostringstream log;
  SftResult r = SftTrainer(c, log).train();
  unsetenv("FTUNE_SHARDED_CHECKPOINT");
  EXPECT_EQ(r.steps, 20);
  if (world()->rank() == 0) {
    EXPECT_EQ(log.str().find("ranks wrote their slices"), std::string::npos) << log.str();
    Checkpoint a = load_checkpoint((root_ / "tp_gathered" / checkpoint_file_name(10)).string());
    Checkpoint b = load_checkpoint((root_ / "tp" / checkpoint_file_name(10)).string());
    ASSERT_EQ(a.model.size(), b.model.size());
    ASSERT_EQ(a.optimizer.tensors.size(), b.optimizer.tensors.size());
    auto same = [](const Tensor& x, const Tensor& y) {
      return x.shape() == y.shape() && x.dtype() == y.dtype() &&
             x.to(DType::f64).to_vector<double>() == y.to(DType::f64).to_vector<double>();
    };
    for (size_t i = 0; i < a.model.size(); ++i) {
      EXPECT_EQ(a.model[i].first, b.model[i].first);
      EXPECT_TRUE(same(a.model[i].second, b.model[i].second)) << a.model[i].first;
    }
    for (size_t i = 0; i < a.optimizer.tensors.size(); ++i) {
      EXPECT_EQ(a.optimizer.tensors[i].first, b.optimizer.tensors[i].first);
      EXPECT_TRUE(same(a.optimizer.tensors[i].second, b.optimizer.tensors[i].second))
          << a.optimizer.tensors[i].first;
    }
    EXPECT_EQ(a.trainer_state.at("sampler"), b.trainer_state.at("sampler"));
  }
  world()->barrier();
}

}  // namespace
}  // namespace ftune
