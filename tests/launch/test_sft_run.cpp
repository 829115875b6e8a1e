// `ftune run` end to end on a tiny random Llama (the gpt2 fixture tokenizer, ChatML), and the
// built-in quickstart recipe on the embedded model: training lowers the loss; a run killed with
// SIGKILL at a random step and resumed with resume=true reproduces exactly the loss curve (and the
// final weights) of a run never interrupted, for full fine-tuning and for LoRA with dropout; a NaN
// loss aborts after the configured streak.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/autograd.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "models/lora.h"
#include "models/transformer.h"
#include "tests/test_util.h"
#include "tests/thread_group.h"
#include "trainers/sft.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test_util::quote;
using test_util::slurp;
using test_util::Metrics;
using test_util::read_metrics;

// Runs ftune with args (already quoted), output to log; returns the exit code.
int run_ftune(const std::string& args, const fs::path& log) {
  std::string cmd = "OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive " + quote(FTUNE_BINARY) + " " +
                    args + " >" + quote(log.string()) + " 2>&1";
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

int64_t last_step(const fs::path& metrics) {
  int64_t s = 0;
  std::ifstream in(metrics);
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("split", "") == "train") s = j["step"];
  }
  return s;
}

class SftRun : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("ftune_test_sft_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    fs::create_directories(root_);
    model_ = root_ / "model";
    test_util::write_tiny_llama(model_);
    data_ = root_ / "train.jsonl";
    std::mt19937 rng(3);
    test_util::write_add_dataset(data_, 160, rng);
  }
  static void TearDownTestSuite() {
    if (!std::getenv("FTUNE_KEEP_TEST_DIR")) fs::remove_all(root_);  // keep it to read the logs
  }

  // The recipe of these tests; `extra` appended (YAML).
  static fs::path write_recipe(const std::string& name, const std::string& extra) {
    fs::path p = root_ / (name + ".yaml");
    std::ofstream r(p);
    r << "method: sft\n"
      << "seed: 11\n"
      << "output_dir: " << (root_ / name).string() << "\n"
      << "model:\n  path: " << model_.string() << "\n"
      << "tokenizer:\n  max_seq_len: 64\n"
      << "dataset:\n  path: " << data_.string() << "\n  packed: true\n  val_size: 16\n"
      << "optimizer:\n  lr: 3.0e-3\n  weight_decay: 0.01\n"
      << "lr_scheduler:\n  name: cosine\n  num_warmup_steps: 2\n"
      << "batch_size: 2\n"
      << "gradient_accumulation_steps: 2\n"
      << "max_steps: 14\n"
      << "clip_grad_norm: 1.0\n"
      << "eval_every_n_steps: 5\n"
      << "save_every_n_steps: 2\n"
      << "keep_last_n: 2\n"
      << extra;
    return p;
  }

  // SftTrainer in this process on `ranks` threads of an in-process communicator
  // (tests/thread_group.h), the layout c.parallel's (tp, zero; dp = ranks / tp); the run's metrics.
  // The multi-rank runs of tests/mpi use mpirun; this runs where there is none (the GPU check).
  static Metrics train_in_threads(const SftConfig& c, int ranks) {
    test::run_ranks(ranks, [&](int r, std::shared_ptr<parallel::Communicator> w) {
      std::ostringstream log;
      SftResult res = SftTrainer(c, log, w).train();
      EXPECT_EQ(res.steps, c.max_steps) << "rank " << r << "\n" << log.str();
      const std::string layout = str_cat("parallel: ", ranks, " ranks, dp ", ranks / c.parallel.tp,
                                         ", tp ", c.parallel.tp);
      if (r == 0 && ranks > 1) EXPECT_NE(log.str().find(layout), std::string::npos) << log.str();
    });
    return read_metrics(fs::path(c.output_dir) / "metrics.jsonl");
  }
  static SftConfig thread_config(const std::string& name, const std::string& device) {
    SftConfig c;
    c.output_dir = (root_ / name).string();
    c.seed = 11;
    c.device = device;
    c.model.path = model_.string();
    c.tokenizer.max_seq_len = 64;
    c.dataset.path = data_.string();
    c.dataset.packed = true;
    c.dataset.val_size = 16;
    c.optimizer.lr = 3e-3;
    c.optimizer.weight_decay = 0.01;
    c.lr_scheduler.name = "cosine";
    c.lr_scheduler.num_warmup_steps = 2;
    c.batch_size = 2;
    c.max_steps = 8;
    c.clip_grad_norm = 1.0;
    c.eval_every_n_steps = 4;  // evaluation over the layout (tp: loss and argmax over the shards)
    c.save_every_n_steps = 4;  // checkpoints gathered to full shapes
    return c;
  }
  // thread_config at tp 2 with LoRA of rank r on every linear, with dropout.
  static SftConfig tp_lora_config(const std::string& name, const std::string& device, int r,
                                  double dropout) {
    SftConfig c = thread_config(name, device);
    c.parallel.tp = 2;
    c.lora.enabled = true;
    c.lora.r = r;
    c.lora.target_modules = {"all-linear"};
    c.lora.dropout = dropout;
    c.optimizer.lr = 1e-2;
    return c;
  }
  // `c` on 2 ranks (its tp and zero) against one rank with the same global batch (dp 2: twice
  // the accumulation): loss, grad-norm and eval-loss curves within rtol.
  static void check_two_ranks_in_threads(const std::string& name, const SftConfig& c,
                                         double rtol) {
    SftConfig o = c;
    o.output_dir = (root_ / (name + "_one")).string();
    o.parallel.tp = 1;
    o.parallel.zero = 0;
    o.gradient_accumulation_steps = c.gradient_accumulation_steps * (2 / c.parallel.tp);
    Metrics one = train_in_threads(o, 1);
    SftConfig t = c;
    t.output_dir = (root_ / (name + "_two")).string();
    Metrics two = train_in_threads(t, 2);
    test_util::expect_same_curve(two.train_loss, one.train_loss, rtol, name + " loss");
    test_util::expect_same_curve(two.grad_norm, one.grad_norm, rtol, name + " grad_norm");
    test_util::expect_same_curve(two.eval_loss, one.eval_loss, rtol, name + " eval loss");
    // It trains (on the CPU; the GPU runs are held to the CPU-verified one-rank curve instead).
    if (c.device == "cpu") EXPECT_LT(two.train_loss.back(), two.train_loss.front()) << name;
    if (!checkpoint_support()) return;
    // The two ranks' step-4 checkpoint (full shapes, gathered over tp from wherever the tensors
    // live) resumes on one rank and continues on the one-rank curve.
    const fs::path resumed = root_ / (name + "_resumed");
    fs::remove_all(resumed);
    fs::create_directories(resumed);
    ASSERT_TRUE(fs::exists(fs::path(t.output_dir) / checkpoint_file_name(4))) << name;
    fs::copy_file(fs::path(t.output_dir) / checkpoint_file_name(4),
                  resumed / checkpoint_file_name(4));
    fs::copy_file(fs::path(t.output_dir) / "metrics.jsonl", resumed / "metrics.jsonl");
    SftConfig r = o;
    r.output_dir = resumed.string();
    r.resume = true;
    Metrics res = train_in_threads(r, 1);
    test_util::expect_same_curve(res.train_loss, one.train_loss, rtol, name + " resumed loss");
  }

  // An uninterrupted run, and one SIGKILLed at a random step then resumed; same curves.
  static void check_kill_and_resume(const std::string& name, const std::string& extra) {
    fs::path recipe = write_recipe(name, extra);
    fs::path a = root_ / (name + "_a"), b = root_ / (name + "_b");
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " output_dir=" + quote(a.string()),
                        root_ / (name + "_a.log")),
              0)
        << slurp(root_ / (name + "_a.log"));
    std::random_device rd;
    const int64_t kill_at = 3 + int64_t(rd() % 9);  // steps 3..11 of 14
    SCOPED_TRACE("killed after step " + std::to_string(kill_at));
    pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      std::string log = (root_ / (name + "_b1.log")).string();
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::setenv("OMP_NUM_THREADS", "2", 1);
      ::setenv("OMP_WAIT_POLICY", "passive", 1);
      std::string out = "output_dir=" + b.string();
      ::execl(FTUNE_BINARY, FTUNE_BINARY, "run", recipe.c_str(), out.c_str(), (char*)nullptr);
      ::_exit(127);
    }
    auto t0 = std::chrono::steady_clock::now();
    bool killed = false;
    while (std::chrono::steady_clock::now() - t0 < std::chrono::minutes(5)) {
      int status = 0;
      if (::waitpid(pid, &status, WNOHANG) == pid) break;  // finished before the kill point
      if (last_step(b / "metrics.jsonl") >= kill_at) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        killed = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    ASSERT_TRUE(killed) << "the run ended before step " << kill_at << "\n"
                        << slurp(root_ / (name + "_b1.log"));
    ASSERT_LT(last_step(b / "metrics.jsonl"), 14);
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " output_dir=" + quote(b.string()) +
                            " resume=true",
                        root_ / (name + "_b2.log")),
              0)
        << slurp(root_ / (name + "_b2.log"));
    std::string log2 = slurp(root_ / (name + "_b2.log"));
    EXPECT_NE(log2.find("resume: "), std::string::npos) << log2;

    Metrics ma = read_metrics(a / "metrics.jsonl"), mb = read_metrics(b / "metrics.jsonl");
    ASSERT_EQ(ma.steps.size(), 14u);
    EXPECT_EQ(ma.steps, mb.steps);
    // Bit for bit: same machine, same threads, same seed.
    EXPECT_EQ(ma.train_loss, mb.train_loss);
    EXPECT_EQ(ma.grad_norm, mb.grad_norm);
    EXPECT_EQ(ma.lr, mb.lr);
    EXPECT_EQ(ma.eval_loss, mb.eval_loss);
    // The loss fell.
    EXPECT_LT(ma.eval_loss.back(), ma.eval_loss.front());

    // The final checkpoints hold identical tensors; keep_last_n left two.
    auto la = list_checkpoints(a.string()), lb = list_checkpoints(b.string());
    ASSERT_EQ(la.size(), 2u);
    ASSERT_FALSE(lb.empty());
    EXPECT_EQ(la.back().first, 14);
    Checkpoint ca = load_checkpoint(la.back().second), cb = load_checkpoint(lb.back().second);
    ASSERT_EQ(ca.model.size(), cb.model.size());
    for (size_t i = 0; i < ca.model.size(); ++i) {
      EXPECT_EQ(ca.model[i].first, cb.model[i].first);
      EXPECT_EQ(ca.model[i].second.to_vector<float>(), cb.model[i].second.to_vector<float>())
          << ca.model[i].first;
    }
    ASSERT_EQ(ca.optimizer.tensors.size(), cb.optimizer.tensors.size());
    for (size_t i = 0; i < ca.optimizer.tensors.size(); ++i) {
      EXPECT_EQ(ca.optimizer.tensors[i].second.to_vector<double>(),
                cb.optimizer.tensors[i].second.to_vector<double>())
          << ca.optimizer.tensors[i].first;
    }
  }

  static fs::path root_, model_, data_;
};

fs::path SftRun::root_, SftRun::model_, SftRun::data_;

TEST_F(SftRun, FullFineTuneKilledAndResumedMatchesUninterrupted) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  check_kill_and_resume("full", "");
}

TEST_F(SftRun, LoraWithDropoutKilledAndResumedMatchesUninterrupted) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  check_kill_and_resume("lora",
                        "lora:\n  r: 4\n  alpha: 8\n  dropout: 0.1\n  target_modules: "
                        "[all-linear]\n");
}

TEST_F(SftRun, NanLossAbortsAfterTheConfiguredStreak) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  // An absurd learning rate without clipping blows the loss up; the guard skips and aborts.
  fs::path recipe = write_recipe("nan", "max_consecutive_nan_steps: 2\n");
  fs::path log = root_ / "nan.log";
  int rc = run_ftune("run " + quote(recipe.string()) + " optimizer.lr=1.0e+30 clip_grad_norm=0 " +
                         "save_every_n_steps=1",
                     log);
  std::string out = slurp(log);
  EXPECT_EQ(rc, 1) << out;
  EXPECT_NE(out.find("NaN/inf for 2 consecutive steps"), std::string::npos) << out;
  // The last good checkpoint is still loadable.
  auto ck = latest_valid_checkpoint((root_ / "nan").string());
  ASSERT_TRUE(ck.has_value()) << out;
  EXPECT_NO_THROW(load_checkpoint(*ck));
}

TEST_F(SftRun, EarlyStoppingStopsAfterPatienceEvaluations) {
  // min_delta 100: no evaluation after the first can improve enough, so patience 1 stops the run
  // at the second evaluation (step 10 of 14).
  fs::path recipe = write_recipe("early", "early_stopping:\n  patience: 1\n  min_delta: 100\n");
  fs::path log = root_ / "early.log";
  ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " save_every_n_steps=0", log), 0)
      << slurp(log);
  std::string out = slurp(log);
  EXPECT_NE(out.find("early stopping"), std::string::npos) << out;
  Metrics m = read_metrics(root_ / "early" / "metrics.jsonl");
  ASSERT_FALSE(m.steps.empty());
  EXPECT_EQ(m.steps.back(), 10);
  EXPECT_EQ(m.eval_loss.size(), 4u);  // before, step 5, step 10, after
}

TEST_F(SftRun, GradientAccumulationMatchesOneBigBatch) {
  // The step loss is the mean over every target token of the step, however the rows are split
  // into micro-batches: 4 rows at once or 2 x 2 accumulated give the same curve (up to rounding).
  fs::path recipe = write_recipe("accum", "");
  std::string common = " max_steps=4 save_every_n_steps=0 eval_every_n_steps=0 ~dataset.val_size";
  ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + common +
                          " batch_size=4 gradient_accumulation_steps=1 output_dir=" +
                          quote((root_ / "accum1").string()),
                      root_ / "accum1.log"),
            0)
      << slurp(root_ / "accum1.log");
  ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + common +
                          " batch_size=2 gradient_accumulation_steps=2 output_dir=" +
                          quote((root_ / "accum2").string()),
                      root_ / "accum2.log"),
            0)
      << slurp(root_ / "accum2.log");
  Metrics a = read_metrics(root_ / "accum1" / "metrics.jsonl");
  Metrics b = read_metrics(root_ / "accum2" / "metrics.jsonl");
  ASSERT_EQ(a.train_loss.size(), 4u);
  ASSERT_EQ(b.train_loss.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_NEAR(a.train_loss[i], b.train_loss[i], 1e-5 * std::abs(a.train_loss[i])) << i;
    EXPECT_NEAR(a.grad_norm[i], b.grad_norm[i], 1e-4 * std::abs(a.grad_norm[i])) << i;
  }
}

TEST_F(SftRun, ActivationCheckpointingGivesTheSameCurve) {
  // Recomputing each block in the backward changes what is kept, not what is computed: the same
  // losses and gradient norms, bit for bit (LoRA with dropout: the masks are seeded per step).
  fs::path recipe = write_recipe("ckpt", "lora:\n  r: 4\n  dropout: 0.1\n");
  std::string common = " max_steps=3 save_every_n_steps=0 eval_every_n_steps=0 ~dataset.val_size";
  for (const char* on : {"false", "true"}) {
    std::string name = std::string("ckpt_") + on;
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + common +
                            " enable_activation_checkpointing=" + on +
                            " output_dir=" + quote((root_ / name).string()),
                        root_ / (name + ".log")),
              0)
        << slurp(root_ / (name + ".log"));
  }
  Metrics a = read_metrics(root_ / "ckpt_false" / "metrics.jsonl");
  Metrics b = read_metrics(root_ / "ckpt_true" / "metrics.jsonl");
  ASSERT_EQ(a.train_loss.size(), 3u);
  EXPECT_EQ(a.train_loss, b.train_loss);
  EXPECT_EQ(a.grad_norm, b.grad_norm);
}

TEST_F(SftRun, DeviceAndDtypeRefusalsNameTheProblem) {
  fs::path recipe = write_recipe("refuse", "");
  ASSERT_NE(run_ftune("run " + quote(recipe.string()) + " dtype=bf16 max_steps=3", root_ / "r1.log"), 0);
  EXPECT_NE(slurp(root_ / "r1.log").find("dtype bf16 needs device: cuda"), std::string::npos)
      << slurp(root_ / "r1.log");
  if (!cuda_available()) {
    ASSERT_NE(run_ftune("run " + quote(recipe.string()) + " device=cuda max_steps=3", root_ / "r2.log"), 0);
    EXPECT_NE(slurp(root_ / "r2.log").find("no GPU is usable here"), std::string::npos)
        << slurp(root_ / "r2.log");
    EXPECT_NE(slurp(root_ / "r2.log").find(recipe.string()), std::string::npos);
  }
}

// The default loss through ops::linear_cross_entropy (chunked_loss: true, never the whole logits)
// and the plain linear + cross_entropy train the same curve, full fine-tuning and LoRA.
TEST_F(SftRun, ChunkedLossTrainsTheSameCurveAsTheWholeLogits) {
  for (const char* extra : {"", "lora:\n  r: 4\n  alpha: 8\n"}) {
    SCOPED_TRACE(*extra ? "lora" : "full");
    fs::path recipe = write_recipe(*extra ? "chunk_lora" : "chunk_full", extra);
    std::vector<Metrics> m;
    for (const char* chunked : {"true", "false"}) {
      fs::path out = root_ / (std::string(*extra ? "chunk_lora_" : "chunk_full_") + chunked);
      ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " max_steps=6 save_every_n_steps=0 " +
                              "chunked_loss=" + chunked + " output_dir=" + quote(out.string()),
                          out.string() + ".log"),
                0)
          << slurp(out.string() + ".log");
      m.push_back(read_metrics(out / "metrics.jsonl"));
    }
    ASSERT_EQ(m[0].train_loss.size(), 6u);
    ASSERT_EQ(m[1].train_loss.size(), 6u);
    for (size_t i = 0; i < 6; ++i) {
      EXPECT_NEAR(m[0].train_loss[i], m[1].train_loss[i], 1e-6 * std::abs(m[1].train_loss[i])) << i;
      EXPECT_NEAR(m[0].grad_norm[i], m[1].grad_norm[i], 1e-6 * std::abs(m[1].grad_norm[i])) << i;
    }
    // Evaluation by chunks too (its loss and token accuracy): the same metrics.
    ASSERT_EQ(m[0].eval_loss.size(), m[1].eval_loss.size());
    ASSERT_FALSE(m[0].eval_loss.empty());
    ASSERT_EQ(m[0].eval_accuracy.size(), m[0].eval_loss.size());
    ASSERT_EQ(m[1].eval_accuracy.size(), m[1].eval_loss.size());
    for (size_t i = 0; i < m[0].eval_loss.size(); ++i) {
      EXPECT_NEAR(m[0].eval_loss[i], m[1].eval_loss[i], 1e-6 * std::abs(m[1].eval_loss[i])) << i;
      EXPECT_EQ(m[0].eval_accuracy[i], m[1].eval_accuracy[i]) << i;
    }
  }
}

// Two ranks as 2 threads of this process equal one rank with the same global batch: tensor
// parallelism (tp 2; full fine-tuning, and LoRA on every linear with dropout) and data parallelism
// (dp 2, with ZeRO-1). The CPU twin of the GPU tests below (it checks the in-process harness and
// the trainer's multi-rank paths where no GPU is; tests/mpi does the same over MPI).
TEST_F(SftRun, TwoRanksInThreadsMatchOneRank) {
  SftConfig tp = thread_config("thr_tp_full", "cpu");
  tp.parallel.tp = 2;
  check_two_ranks_in_threads("thr_tp_full", tp, 1e-5);
  // dropout: row-parallel ranks draw their slices of the one-rank masks
  check_two_ranks_in_threads("thr_tp_lora", tp_lora_config("thr_tp_lora", "cpu", 4, 0.25), 1e-5);
  SftConfig dp = thread_config("thr_dp_zero", "cpu");
  dp.parallel.zero = 1;
  check_two_ranks_in_threads("thr_dp_zero", dp, 1e-5);
}

// Tensor parallelism on the GPU: tp 2 (two threads sharing the one GPU, collectives through the
// host) against one rank on the same GPU. f32 full fine-tuning to 1e-4 (other summation orders);
// bf16 LoRA with dropout (the fused low-rank kernels on column slices of the masks) to 5% (as
// GpuRunMatchesTheCpuRun's bf16: roundings in other GEMM shapes, loss and grad norm alike).
TEST_F(SftRun, GpuTensorParallelMatchesOneGpu) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  SftConfig full = thread_config("gpu_tp_full", "cuda");
  full.parallel.tp = 2;
  check_two_ranks_in_threads("gpu_tp_full", full, 1e-4);
  SftConfig lora = tp_lora_config("gpu_tp_lora", "cuda", 8, 0.1);
  lora.dtype = "bf16";
  check_two_ranks_in_threads("gpu_tp_lora", lora, 5e-2);
}

// Data parallelism on the GPU, as above, against one rank with twice the accumulation: dp 2 with
// the GPU gradient buckets all-reduced from the gradient-ready hooks (f32), and with ZeRO-1 (the
// buckets reduce-scattered, each rank's f32 masters of its shard, the parameters all-gathered;
// f32 and bf16). f32 full fine-tuning to 1e-4, bf16 to 5%.
TEST_F(SftRun, GpuDataParallelMatchesOneGpu) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  check_two_ranks_in_threads("gpu_dp_plain", thread_config("gpu_dp_plain", "cuda"), 1e-4);
  SftConfig f32 = thread_config("gpu_dp_f32", "cuda");
  f32.parallel.zero = 1;
  check_two_ranks_in_threads("gpu_dp_f32", f32, 1e-4);
  SftConfig bf = thread_config("gpu_dp_bf16", "cuda");
  bf.parallel.zero = 1;
  bf.dtype = "bf16";
  check_two_ranks_in_threads("gpu_dp_bf16", bf, 5e-2);
}

TEST_F(SftRun, GpuRunWithLoraDropoutMatchesTheCpuRun) {
  // LoRA with dropout in bf16 on the GPU runs the fused low-rank kernels (kernels/cuda/lora.cu;
  // the batched q/k/v adapters one by one), which draw the CPU's masks: the curve follows the
  // CPU's within bf16's 5%, and the unfused GPU path's (FTUNE_LORA_FUSED=0: cuBLASLt GEMMs and
  // dropout passes) within 2%. Skips without a GPU.
  if (!cuda_available()) GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  fs::path recipe = write_recipe("gpu_drop", "lora:\n  r: 8\n  dropout: 0.1\n");
  const std::string common = " max_steps=6 save_every_n_steps=6 eval_every_n_steps=3";
  struct Run {
    const char* fused;  // FTUNE_LORA_FUSED, null: unset
    const char* cfg;
    const char* name;
  };
  const Run runs[] = {{nullptr, "device=cpu", "drop_cpu"},
                      {nullptr, "device=cuda dtype=bf16", "drop_fused"},
                      {"0", "device=cuda dtype=bf16", "drop_unfused"}};
  for (const Run& r : runs) {
    if (r.fused) ::setenv("FTUNE_LORA_FUSED", r.fused, 1);
    else ::unsetenv("FTUNE_LORA_FUSED");
    const int rc = run_ftune("run " + quote(recipe.string()) + common + " " + r.cfg +
                                 " output_dir=" + quote((root_ / r.name).string()),
                             root_ / (std::string(r.name) + ".log"));
    ::unsetenv("FTUNE_LORA_FUSED");
    ASSERT_EQ(rc, 0) << r.name << "\n" << slurp(root_ / (std::string(r.name) + ".log"));
  }
  Metrics cpu = read_metrics(root_ / "drop_cpu" / "metrics.jsonl");
  Metrics fused = read_metrics(root_ / "drop_fused" / "metrics.jsonl");
  Metrics unfused = read_metrics(root_ / "drop_unfused" / "metrics.jsonl");
  ASSERT_EQ(cpu.train_loss.size(), 6u);
  ASSERT_EQ(fused.train_loss.size(), cpu.train_loss.size());
  ASSERT_EQ(unfused.train_loss.size(), cpu.train_loss.size());
  for (size_t i = 0; i < cpu.train_loss.size(); ++i) {
    EXPECT_NEAR(fused.train_loss[i], cpu.train_loss[i], 5e-2 * std::abs(cpu.train_loss[i])) << i;
    EXPECT_NEAR(fused.train_loss[i], unfused.train_loss[i], 2e-2 * std::abs(unfused.train_loss[i]))
        << i;
  }
}

TEST_F(SftRun, GpuRunMatchesTheCpuRun) {
  // The same recipe on the GPU: f32 follows the CPU curve closely (other summation orders), bf16
  // within 5%. Skips without a GPU.
  if (!cuda_available()) GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  fs::path recipe = write_recipe("gpu", "lora:\n  r: 4\n");
  std::string common = " max_steps=8 save_every_n_steps=4 eval_every_n_steps=4";
  for (const char* cfgs : {"device=cpu", "device=cuda", "device=cuda dtype=bf16"}) {
    std::string name = std::string("gpu_") + std::to_string(std::hash<std::string>{}(cfgs) % 1000);
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + common + " " + cfgs +
                            " output_dir=" + quote((root_ / name).string()),
                        root_ / (name + ".log")),
              0)
        << cfgs << "\n" << slurp(root_ / (name + ".log"));
  }
  auto metrics = [&](const char* cfgs) {
    std::string name = std::string("gpu_") + std::to_string(std::hash<std::string>{}(cfgs) % 1000);
    return read_metrics(root_ / name / "metrics.jsonl");
  };
  Metrics cpu = metrics("device=cpu"), gpu = metrics("device=cuda"), bf = metrics("device=cuda dtype=bf16");
  ASSERT_EQ(gpu.train_loss.size(), cpu.train_loss.size());
  for (size_t i = 0; i < cpu.train_loss.size(); ++i)
    EXPECT_NEAR(gpu.train_loss[i], cpu.train_loss[i], 1e-3 * std::abs(cpu.train_loss[i])) << i;
  ASSERT_EQ(bf.train_loss.size(), cpu.train_loss.size());
  for (size_t i = 0; i < cpu.train_loss.size(); ++i)
    EXPECT_NEAR(bf.train_loss[i], cpu.train_loss[i], 5e-2 * std::abs(cpu.train_loss[i])) << i;
  // Resume on the GPU: the f32 run's copy without its last checkpoint (step 8) resumes from step 4
  // and repeats steps 5-8 (the GPU kernels are deterministic: same losses, up to rounding).
  {
    std::string name = std::string("gpu_") + std::to_string(std::hash<std::string>{}("device=cuda") % 1000);
    fs::path dir = root_ / (name + "_resumed");
    fs::remove_all(dir);
    fs::copy(root_ / name, dir, fs::copy_options::recursive);
    for (auto& [st, path] : list_checkpoints(dir.string()))
      if (st == 8) fs::remove(path);
    ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + common +
                            " device=cuda resume=true output_dir=" + quote(dir.string()),
                        root_ / "gpu_resumed.log"),
              0)
        << slurp(root_ / "gpu_resumed.log");
    Metrics r = read_metrics(dir / "metrics.jsonl");
    ASSERT_EQ(r.train_loss.size(), gpu.train_loss.size());
    for (size_t i = 0; i < r.train_loss.size(); ++i)
      EXPECT_NEAR(r.train_loss[i], gpu.train_loss[i], 1e-6 * std::abs(gpu.train_loss[i])) << i;
  }
  // (ZeRO-1 is no longer refused on the GPU: tests/cuda/test_zero.cpp; f16 trains with loss
  // scaling: tests/launch/test_loss_scale.cpp.)
  // And the GPU's memory is in the metrics (the random tiny model barely learns in 8 steps: the
  // quickstart run of scripts/gpu_check.sh shows bf16 training on the GPU lowering the loss).
  std::ifstream in(root_ / ("gpu_" + std::to_string(std::hash<std::string>{}("device=cuda dtype=bf16") % 1000)) /
                   "metrics.jsonl");
  std::string line;
  int train_lines = 0;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    if (j.value("split", "") != "train") continue;
    ++train_lines;
    EXPECT_GT(j.value("peak_gpu_mib", 0.0), 0.0) << line;
  }
  EXPECT_EQ(train_lines, 8);
}

TEST_F(SftRun, ExportedHfAndPeftFoldersGiveTheTrainedModelsLogits) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  fs::path recipe = write_recipe("export",
                                 "lora:\n  r: 4\n  alpha: 16\n  target_modules: "
                                 "[q_proj, v_proj, down_proj]\n");
  fs::path run = root_ / "export";
  ASSERT_EQ(run_ftune("run " + quote(recipe.string()) + " max_steps=6 eval_every_n_steps=0",
                      root_ / "export.log"),
            0)
      << slurp(root_ / "export.log");
  fs::path hf = root_ / "export_hf", peft = root_ / "export_peft";
  ASSERT_EQ(run_ftune("export " + quote(run.string()) + " --format hf -o " + quote(hf.string()),
                      root_ / "export_hf.log"),
            0)
      << slurp(root_ / "export_hf.log");
  ASSERT_EQ(run_ftune("export " + quote(run.string()) + " --format peft -o " + quote(peft.string()),
                      root_ / "export_peft.log"),
            0)
      << slurp(root_ / "export_peft.log");
  EXPECT_TRUE(fs::exists(hf / "tokenizer.json"));
  EXPECT_TRUE(fs::exists(hf / "tokenizer_config.json"));
  EXPECT_TRUE(fs::exists(peft / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(peft / "adapter_model.safetensors"));
  // Exporting over an existing model folder is refused.
  EXPECT_EQ(run_ftune("export " + quote(run.string()) + " --format hf -o " + quote(hf.string()),
                      root_ / "export_again.log"),
            1);
  // `ftune generate` samples from the run's latest checkpoint (exported on the fly) as from the
  // exported HF folder: same greedy text.
  ASSERT_EQ(run_ftune("generate --model " + quote(run.string()) + " --chat -n 6 -p 'add 1 and 2'",
                      root_ / "gen_ckpt.log"),
            0)
      << slurp(root_ / "gen_ckpt.log");
  ASSERT_EQ(run_ftune("generate --model " + quote(hf.string()) + " --chat -n 6 -p 'add 1 and 2'",
                      root_ / "gen_hf.log"),
            0)
      << slurp(root_ / "gen_hf.log");
  EXPECT_EQ(slurp(root_ / "gen_ckpt.log"), slurp(root_ / "gen_hf.log"));
  EXPECT_FALSE(slurp(root_ / "gen_hf.log").empty());
  // `ftune inspect` reads the checkpoint.
  EXPECT_EQ(run_ftune("inspect " + quote(list_checkpoints(run.string()).back().second),
                      root_ / "inspect.log"),
            0)
      << slurp(root_ / "inspect.log");

  NoGradGuard ng;
  Tensor ids = Tensor::from_vector<int32_t>({5, 17, 300, 42, 7, 99, 250, 3}, {1, 8});
  auto base = Transformer::from_pretrained(model_.string());
  auto merged = Transformer::from_pretrained(hf.string());
  auto adapted = Transformer::from_pretrained(model_.string());
  load_peft_adapter(peft.string(), *adapted);
  adapted->eval();
  Tensor lb = base->forward(ids), lm = merged->forward(ids), la = adapted->forward(ids);
  EXPECT_LT(ops::max_abs_diff(lm, la), 1e-4);
  // The adapters learned something: the exports differ from the base.
  EXPECT_GT(ops::max_abs_diff(lm, lb), 1e-3);
  // And they are the checkpoint's adapters.
  Checkpoint c = load_checkpoint(list_checkpoints(run.string()).back().second);
  nn::NamedTensors lp = lora_parameters(*adapted);
  ASSERT_EQ(lp.size(), c.model.size());
  for (size_t i = 0; i < lp.size(); ++i) {
    EXPECT_EQ(lp[i].first, c.model[i].first);
    EXPECT_EQ(lp[i].second.to_vector<float>(), c.model[i].second.to_vector<float>());
  }
}

TEST_F(SftRun, AFreshRunRefusesAFolderWithCheckpointsAndAFinishedRunResumesToNothing) {
#ifndef FTUNE_HAVE_HDF5
  GTEST_SKIP() << "this build has no HDF5 (checkpoints)";
#endif
  fs::path recipe = write_recipe("again", "");
  const std::string args = "run " + quote(recipe.string()) + " max_steps=3 eval_every_n_steps=0";
  ASSERT_EQ(run_ftune(args, root_ / "again1.log"), 0) << slurp(root_ / "again1.log");
  // Without resume, the old run's checkpoints would mix with the new ones: refused.
  EXPECT_EQ(run_ftune(args, root_ / "again2.log"), 1);
  EXPECT_NE(slurp(root_ / "again2.log").find("already holds checkpoints"), std::string::npos)
      << slurp(root_ / "again2.log");
  // Resuming a finished run trains nothing and writes nothing more.
  const std::string before = slurp(root_ / "again" / "metrics.jsonl");
  ASSERT_EQ(run_ftune(args + " resume=true", root_ / "again3.log"), 0)
      << slurp(root_ / "again3.log");
  EXPECT_NE(slurp(root_ / "again3.log").find("nothing to do"), std::string::npos)
      << slurp(root_ / "again3.log");
  EXPECT_EQ(slurp(root_ / "again" / "metrics.jsonl"), before);
}

TEST(BuiltinRecipes, QuickstartAndPretrainValidateAgainstTheAssets) {
  const fs::path src(FTUNE_SOURCE_DIR);
  for (const char* r : {"recipes/quickstart_lora.yaml", "recipes/pretrain_tiny.yaml"}) {
    std::string cmd = "cd " + quote(src.string()) + " && " + quote(FTUNE_BINARY) + " validate " +
                      r + " >/dev/null 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << r;
  }
}

TEST(BuiltinRecipes, QuickstartLoraLowersTheEvalLossOfTheEmbeddedModel) {
  // scripts/quickstart.sh in small: 30 steps of recipes/quickstart_lora.yaml on assets/.
  const fs::path src(FTUNE_SOURCE_DIR);
  const fs::path out =
      fs::temp_directory_path() / ("ftune_quickstart_" + std::to_string(::getpid()));
  fs::remove_all(out);
  const fs::path log = out.string() + ".log";
  std::string cmd = "cd " + quote(src.string()) + " && OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive " +
                    quote(FTUNE_BINARY) +
                    " run recipes/quickstart_lora.yaml output_dir=" + quote(out.string()) +
                    " max_steps=30 eval_every_n_steps=0 eval.max_batches=4 "
                    "lr_scheduler.num_warmup_steps=3 >" +
                    quote(log.string()) + " 2>&1";
  int rc = std::system(cmd.c_str());
  std::string text = slurp(log);
  ASSERT_EQ(rc, 0) << text;
  Metrics m = read_metrics(out / "metrics.jsonl");
  ASSERT_EQ(m.eval_loss.size(), 2u) << text;
  EXPECT_LT(m.eval_loss[1], 0.5 * m.eval_loss[0]) << text;
  EXPECT_NE(text.find("sample after | "), std::string::npos) << text;
  fs::remove_all(out);
  fs::remove(log);
}

}  // namespace
}  // namespace ftune
