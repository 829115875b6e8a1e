// HDF5 checkpoints: a bit-exact round trip of every field and dtype, refusals (truncated, text,
// foreign HDF5, newer version, incomplete, missing group, disagreeing attributes), listing,
// latest-valid selection, pruning, and crash safety: a writer SIGKILLed mid-save never leaves a
// half file that is taken for a checkpoint.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include "io/checkpoint.h"
#include "io_test_util.h"

#ifdef FTUNE_HAVE_HDF5
#include <hdf5.h>
#endif

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test::expect_error;
using test::TempDir;
using test::tensor_bytes;

#define SKIP_WITHOUT_HDF5() \
  if (!checkpoint_support()) GTEST_SKIP() << "[checkpoint] this build has no HDF5"

// A tensor of random bits (NaN payloads, infinities, subnormals, -0 included for floats).
Tensor random_bits(const Shape& shape, DType dt, std::mt19937_64& rng) {
  Tensor t = Tensor::empty(shape, dt);
  auto* p = static_cast<uint8_t*>(t.raw_data());
  const size_t n = size_t(t.numel()) * dtype_size(dt);
  for (size_t i = 0; i < n; ++i) p[i] = uint8_t(rng());
  if (dt == DType::b8)
    for (size_t i = 0; i < n; ++i) p[i] &= 1;
  return t;
}

Checkpoint sample_checkpoint(uint64_t seed = 1) {
  std::mt19937_64 rng(seed);
  Checkpoint ck;
  ck.step = 1234;
  ck.epoch = 3;
  ck.adapter_only = false;
  ck.model = {
      {"model.embed_tokens.weight", random_bits({7, 5}, DType::bf16, rng)},
      {"model.layers.0.self_attn.q_proj.weight", random_bits({5, 5}, DType::f32, rng)},
      {"model.layers.0.mlp.up_proj.weight", random_bits({3, 2, 4}, DType::f16, rng)},
      {"model.norm.weight", random_bits({5}, DType::f32, rng)},
      {"a_scalar", random_bits({}, DType::f32, rng)},
      {"empty", Tensor::empty({0, 4}, DType::bf16)},
      {"f64", random_bits({2, 2}, DType::f64, rng)},
      {"i32", random_bits({3}, DType::i32, rng)},
      {"mask", random_bits({6}, DType::b8, rng)},
      {"lm_head.weight", random_bits({7, 5}, DType::bf16, rng)},  // after "model.*": order kept
  };
  ck.optimizer.step = 1234;
  for (const char* p : {"model.norm.weight", "model.embed_tokens.weight"}) {
    const Shape s = std::string(p) == "model.norm.weight" ? Shape{5} : Shape{7, 5};
    ck.optimizer.tensors.emplace_back(std::string(p) + ".exp_avg", random_bits(s, DType::f32, rng));
    ck.optimizer.tensors.emplace_back(std::string(p) + ".exp_avg_sq",
                                      random_bits(s, DType::f32, rng));
    ck.optimizer.tensors.emplace_back(std::string(p) + ".step",
                                      Tensor::from_vector<int64_t>({1233}, {}));
  }
  ck.optimizer.tensors.emplace_back("model.embed_tokens.weight.master",
                                    random_bits({7, 5}, DType::f32, rng));
  ck.trainer_state = {{"sampler", {{"epoch", 3}, {"index", 17}, {"seed", 42}}},
                      {"rng", {{"state", 18446744073709551615ull}, {"inc", 12345}}},
                      {"nan_steps", 0},
                      {"best_eval_loss", 1.25},
                      {"note", "unicode \xc3\xa9\xe2\x9c\x93"}};
  ck.recipe_yaml = "model:\n  path: /models/x\noptimizer:\n  lr: 2.0e-05\n# caf\xc3\xa9\n";
  ck.model_config = {
      {"model_type", "llama"}, {"hidden_size", 5}, {"num_hidden_layers", 1}, {"vocab_size", 7}};
  ck.adapter_config = {{"r", 8}, {"alpha", 16}, {"target_modules", {"q_proj", "v_proj"}}};
  return ck;
}

void expect_same_tensors(const nn::NamedTensors& a, const nn::NamedTensors& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    SCOPED_TRACE(a[i].first);
    EXPECT_EQ(a[i].first, b[i].first);
    EXPECT_EQ(a[i].second.dtype(), b[i].second.dtype());
    EXPECT_EQ(a[i].second.shape(), b[i].second.shape());
    EXPECT_TRUE(tensor_bytes(a[i].second) == tensor_bytes(b[i].second)) << "bits differ";
  }
}

void expect_same(const Checkpoint& a, const Checkpoint& b) {
  EXPECT_EQ(a.step, b.step);
  EXPECT_EQ(a.epoch, b.epoch);
  EXPECT_EQ(a.adapter_only, b.adapter_only);
  expect_same_tensors(a.model, b.model);
  EXPECT_EQ(a.optimizer.step, b.optimizer.step);
  expect_same_tensors(a.optimizer.tensors, b.optimizer.tensors);
  EXPECT_EQ(a.trainer_state, b.trainer_state);
  EXPECT_EQ(a.recipe_yaml, b.recipe_yaml);
  EXPECT_EQ(a.model_config, b.model_config);
  EXPECT_EQ(a.adapter_config, b.adapter_config);
}

std::vector<std::string> dir_names(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Checkpoint, FileNames) {
  EXPECT_EQ(checkpoint_file_name(0), "step_00000000.h5");
  EXPECT_EQ(checkpoint_file_name(100), "step_00000100.h5");
  EXPECT_EQ(checkpoint_file_name(123456789), "step_123456789.h5");
  EXPECT_THROW(checkpoint_file_name(-1), Error);
}

TEST(Checkpoint, ListSortsByStepAndIgnoresOthers) {  // needs no HDF5: names only
  TempDir d;
  for (const char* n : {"step_00000100.h5", "step_00000020.h5", "step_123456789.h5",
                        "step_00000300.h5.tmp-4242", "step_x.h5", "notes.txt", "step_00000005.h5x"})
    test::write_bytes(d.file(n), {1});
  fs::create_directory(d.file("step_00000007.h5"));  // a folder is not a checkpoint
  auto l = list_checkpoints(d.path());
  ASSERT_EQ(l.size(), 3u);
  EXPECT_EQ(l[0], std::make_pair(int64_t(20), d.file("step_00000020.h5")));
  EXPECT_EQ(l[1], std::make_pair(int64_t(100), d.file("step_00000100.h5")));
  EXPECT_EQ(l[2], std::make_pair(int64_t(123456789), d.file("step_123456789.h5")));
  EXPECT_TRUE(list_checkpoints(d.file("missing")).empty());
}

TEST(Checkpoint, WithoutHdf5EveryReadAndWriteThrows) {
  if (checkpoint_support()) GTEST_SKIP() << "this build has HDF5";
  TempDir d;
  expect_error([&] { save_checkpoint(d.file("a.h5"), Checkpoint()); }, {"no HDF5"});
  expect_error([&] { load_checkpoint(d.file("a.h5")); }, {"no HDF5"});
  expect_error([&] { describe_checkpoint(d.file("a.h5")); }, {"no HDF5"});
  std::string why;
  EXPECT_FALSE(is_valid_checkpoint(d.file("a.h5"), &why));
  EXPECT_NE(why.find("no HDF5"), std::string::npos);
}

TEST(Checkpoint, RoundTripIsBitExact) {
  SKIP_WITHOUT_HDF5();
  TempDir d;
  const Checkpoint ck = sample_checkpoint();
  const std::string path = d.file("sub/dir/" + checkpoint_file_name(1234));  // folders are made
  save_checkpoint(path, ck);
  EXPECT_EQ(dir_names(d.file("sub/dir")), std::vector<std::string>{"step_00001234.h5"});
  std::string why;
  EXPECT_TRUE(is_valid_checkpoint(path, &why)) << why;
  expect_same(load_checkpoint(path), ck);

  // adapter-only, null adapter config, empty everything; and overwrite in place
  Checkpoint small;
  small.adapter_only = true;
  small.step = 7;
  small.model = {{"base_model.model.layers.0.q_proj.lora_A.weight",
                  Tensor::from_vector<float>({1, -2, 3, 4}, {2, 2})}};
  save_checkpoint(path, small);
  Checkpoint back = load_checkpoint(path);
  expect_same(back, small);
  EXPECT_TRUE(back.adapter_config.is_null());
  EXPECT_TRUE(back.trainer_state.is_object() && back.trainer_state.empty());
}

TEST(Checkpoint, NonContiguousTensorIsSavedAsItsValues) {
  SKIP_WITHOUT_HDF5();
  TempDir d;
  Checkpoint ck;
  Tensor t = Tensor::from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3});
  ck.model = {{"t", t.transpose(0, 1)}};
  save_checkpoint(d.file("x.h5"), ck);
  Checkpoint back = load_checkpoint(d.file("x.h5"));
  EXPECT_EQ(back.model[0].second.shape(), (Shape{3, 2}));
  EXPECT_EQ(back.model[0].second.to_vector<float>(), (std::vector<float>{1, 4, 2, 5, 3, 6}));
}

TEST(Checkpoint, BadNamesAreRefusedAndLeaveNoTempFile) {
  SKIP_WITHOUT_HDF5();
  TempDir d;
  Checkpoint ck;
  ck.model = {{"a", Tensor::zeros({2})}, {"a", Tensor::zeros({2})}};
  expect_error([&] { save_checkpoint(d.file("x.h5"), ck); },
               {d.file("x.h5"), "\"a\" appears twice"});
  ck.model = {{"a/b", Tensor::zeros({2})}};
  expect_error([&] { save_checkpoint(d.file("x.h5"), ck); }, {"a/b", "not a valid dataset name"});
  EXPECT_TRUE(dir_names(d.path()).empty());
  // an unwritable place: the error names the path
  expect_error([&] { save_checkpoint("/proc/ftune_no/x.h5", Checkpoint()); }, {"/proc/ftune_no"});
}

#ifdef FTUNE_HAVE_HDF5
// Opens a saved checkpoint read-write and lets `edit` damage it.
template <class F>
void edit_h5(const std::string& path, F&& edit) {
  hid_t f = H5Fopen(path.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  ASSERT_GE(f, 0);
  edit(f);
  H5Fclose(f);
}

void set_attr_i64(hid_t obj, const char* name, int64_t v) {
  hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
  ASSERT_GE(a, 0);
  H5Awrite(a, H5T_NATIVE_INT64, &v);
  H5Aclose(a);
}
#endif

TEST(Checkpoint, RefusesBadFiles) {
  SKIP_WITHOUT_HDF5();
#ifdef FTUNE_HAVE_HDF5
  TempDir d;
  Checkpoint ck = sample_checkpoint();
  ck.model.emplace_back("big", Tensor::zeros({256, 1024}));  // 1 MiB: half cuts into the data
  const std::string good = d.file("good.h5");
  save_checkpoint(good, ck);
  const std::vector<uint8_t> bytes = test::read_bytes(good);

  auto refused = [&](const std::string& path, std::initializer_list<std::string> parts) {
    SCOPED_TRACE(path);
    std::string why;
    EXPECT_FALSE(is_valid_checkpoint(path, &why));
    if (std::getenv("FTUNE_TEST_VERBOSE")) std::printf("%s\n", why.c_str());
    for (const auto& p : parts) EXPECT_NE(why.find(p), std::string::npos) << why;
    expect_error([&] { load_checkpoint(path); }, parts);
    expect_error([&] { describe_checkpoint(path); }, parts);
  };

  const std::string half = d.file("half.h5");
  test::write_bytes(half, std::vector<uint8_t>(bytes.begin(), bytes.begin() + bytes.size() / 2));
  refused(half, {half, "truncated"});
  const std::string stub = d.file("stub.h5");  // a few bytes: the signature and little else
  test::write_bytes(stub, std::vector<uint8_t>(bytes.begin(), bytes.begin() + 12));
  refused(stub, {stub});

  const std::string text = d.file("text.h5");
  test::write_bytes(text, {'h', 'e', 'l', 'l', 'o', '\n'});
  refused(text, {text, "not an HDF5 file"});
  const std::string empty = d.file("empty.h5");
  test::write_bytes(empty, {});
  refused(empty, {empty, "not an HDF5 file"});
  refused(d.file("missing.h5"), {d.file("missing.h5"), "no such file"});

  const std::string foreign = d.file("foreign.h5");
  {
    hid_t f = H5Fcreate(foreign.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    hsize_t n = 4;
    hid_t s = H5Screate_simple(1, &n, nullptr);
    hid_t ds = H5Dcreate2(f, "data", H5T_NATIVE_FLOAT, s, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    float v[4] = {1, 2, 3, 4};
    H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(ds);
    H5Sclose(s);
    H5Fclose(f);
  }
  refused(foreign, {foreign, "not an ftune checkpoint"});

  auto damaged = [&](const char* name, auto edit, std::initializer_list<std::string> parts) {
    const std::string p = d.file(name);
    fs::copy_file(good, p);
    edit_h5(p, edit);
    refused(p, parts);
  };
  damaged("newer.h5", [](hid_t f) { set_attr_i64(f, "format_version", 2); },
          {"format_version 2 is newer"});
  damaged("incomplete.h5", [](hid_t f) { H5Adelete(f, "complete"); }, {"incomplete"});
  damaged("nooptim.h5", [](hid_t f) { H5Ldelete(f, "optimizer", H5P_DEFAULT); },
          {"missing group /optimizer"});
  damaged("norecipe.h5", [](hid_t f) { H5Ldelete(f, "recipe", H5P_DEFAULT); },
          {"missing dataset /recipe"});
  damaged("shape.h5",
          [](hid_t f) {
            hid_t ds = H5Dopen2(f, "model/model.norm.weight", H5P_DEFAULT);
            hid_t a = H5Aopen(ds, "shape", H5P_DEFAULT);
            int64_t v = 6;
            H5Awrite(a, H5T_NATIVE_INT64, &v);
            H5Aclose(a);
            H5Dclose(ds);
          },
          {"/model/model.norm.weight", "shape attribute [6] but the dataset is [5]"});
  damaged("dtype.h5",
          [](hid_t f) {
            hid_t ds = H5Dopen2(f, "optimizer/model.norm.weight.exp_avg", H5P_DEFAULT);
            H5Adelete(ds, "dtype");
            hid_t t = H5Tcopy(H5T_C_S1);
            H5Tset_size(t, H5T_VARIABLE);
            hid_t s = H5Screate(H5S_SCALAR);
            hid_t a = H5Acreate2(ds, "dtype", t, s, H5P_DEFAULT, H5P_DEFAULT);
            const char* v = "bfloat16";
            H5Awrite(a, t, &v);
            H5Aclose(a);
            H5Sclose(s);
            H5Tclose(t);
            H5Dclose(ds);
          },
          {"/optimizer/model.norm.weight.exp_avg", "dtype attribute bfloat16", "float32"});
#endif
}

TEST(Checkpoint, LatestValidSkipsACorruptNewestOne) {
  SKIP_WITHOUT_HDF5();
  TempDir d;
  EXPECT_FALSE(latest_valid_checkpoint(d.path()).has_value());
  EXPECT_FALSE(latest_valid_checkpoint(d.file("missing")).has_value());
  Checkpoint ck = sample_checkpoint();
  ck.model.emplace_back("big", Tensor::zeros({64, 1024}));
  for (int64_t s : {10, 20}) {
    ck.step = s;
    save_checkpoint(d.file(checkpoint_file_name(s)), ck);
  }
  const std::string s20 = d.file(checkpoint_file_name(20));
  const std::string s30 = d.file(checkpoint_file_name(30)), s40 = d.file(checkpoint_file_name(40));
  const auto bytes = test::read_bytes(s20);
  test::write_bytes(s30, std::vector<uint8_t>(bytes.begin(), bytes.begin() + bytes.size() / 2));
  test::write_bytes(s40, {'n', 'o', 'p', 'e'});
  test::write_bytes(d.file("step_00000050.h5.tmp-1"), {1, 2, 3});  // a temp file is no candidate
  ::testing::internal::CaptureStderr();
  auto latest = latest_valid_checkpoint(d.path());
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(*latest, s20);
  EXPECT_EQ(load_checkpoint(*latest).step, 20);
  EXPECT_NE(err.find(s40), std::string::npos) << err;
  EXPECT_NE(err.find("not an HDF5 file"), std::string::npos) << err;
  EXPECT_NE(err.find(s30), std::string::npos) << err;
  EXPECT_NE(err.find("truncated"), std::string::npos) << err;
}

TEST(Checkpoint, PruneKeepsTheNewestAndRemovesDeadWritersTempFiles) {
  SKIP_WITHOUT_HDF5();
  TempDir d;
  Checkpoint ck;
  ck.model = {{"w", Tensor::ones({3})}};
  for (int64_t s : {5, 1, 30, 12, 7}) save_checkpoint(d.file(checkpoint_file_name(s)), ck);
  // A dead writer's temp file (a child that already exited) and a live one's (ours).
  pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);
  const std::string dead = checkpoint_file_name(40) + ".tmp-" + std::to_string(child);
  const std::string live = checkpoint_file_name(41) + ".tmp-" + std::to_string(::getppid());
  test::write_bytes(d.file(dead), {1});
  test::write_bytes(d.file(live), {1});
  test::write_bytes(d.file("other.txt"), {1});

  prune_checkpoints(d.path(), 0);  // keeps every checkpoint, still clears the dead temp file
  EXPECT_EQ(list_checkpoints(d.path()).size(), 5u);
  EXPECT_FALSE(fs::exists(d.file(dead)));
  prune_checkpoints(d.path(), 3);
  std::vector<std::string> want{live, "other.txt", checkpoint_file_name(7),
                                checkpoint_file_name(12), checkpoint_file_name(30)};
  std::sort(want.begin(), want.end());
  EXPECT_EQ(dir_names(d.path()), want);
  prune_checkpoints(d.path(), 3);  // idempotent
  EXPECT_EQ(list_checkpoints(d.path()).size(), 3u);
  prune_checkpoints(d.path(), 1);
  ASSERT_EQ(list_checkpoints(d.path()).size(), 1u);
  EXPECT_EQ(list_checkpoints(d.path())[0].first, 30);
  EXPECT_THROW(prune_checkpoints(d.path(), -1), Error);
  prune_checkpoints(d.file("missing"), 2);  // nothing to do
}

// ------------------------------------------------------------------ crash safety

constexpr int64_t kKillElems = 50 * 1000 * 1000;  // 200 MB of f32 per checkpoint

// Step s's checkpoint: every weight is float(s) but the first (s * 3) and the last (-s).
Checkpoint kill_test_checkpoint(int64_t step) {
  Checkpoint ck;
  ck.step = step;
  Tensor w = Tensor::empty({kKillElems}, DType::f32);
  float* p = w.data<float>();
  std::fill(p, p + kKillElems, float(step));
  p[0] = float(step * 3);
  p[kKillElems - 1] = -float(step);
  ck.model = {{"w", w}};
  ck.trainer_state = {{"step", step}};
  return ck;
}

bool matches_step(const Checkpoint& ck, int64_t step) {
  if (ck.step != step || ck.trainer_state != nlohmann::json{{"step", step}} || ck.model.size() != 1)
    return false;
  const Tensor& w = ck.model[0].second;
  if (w.numel() != kKillElems) return false;
  const float* p = w.data<float>();
  if (p[0] != float(step * 3) || p[kKillElems - 1] != -float(step)) return false;
  for (int64_t i = 1; i + 1 < kKillElems; ++i)
    if (p[i] != float(step)) return false;
  return true;
}

bool has_temp_file(const std::string& dir) {
  for (const auto& n : dir_names(dir))
    if (n.find(".tmp-") != std::string::npos) return true;
  return false;
}

// The next step the writer reports done, or -1 after timeout_ms.
int64_t read_report(int fd, int timeout_ms) {
  pollfd pfd{fd, POLLIN, 0};
  int64_t s = -1;
  if (::poll(&pfd, 1, timeout_ms) > 0 && ::read(fd, &s, sizeof(s)) == ssize_t(sizeof(s))) return s;
  return -1;
}

// Kills and reaps the writer if a failed assertion leaves the test early.
struct ChildGuard {
  pid_t pid;
  ~ChildGuard() {
    if (pid > 0 && ::waitpid(pid, nullptr, WNOHANG) == 0) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

TEST(Checkpoint, SigkillDuringSaveLeavesThePreviousCheckpointLoadable) {
  SKIP_WITHOUT_HDF5();
  std::mt19937 rng(20261127);
  int mid_write_kills = 0;
  const int trials = 5;
  for (int trial = 0; trial < trials; ++trial) {
    SCOPED_TRACE("trial " + std::to_string(trial));
    std::chrono::steady_clock::time_point t_first;
    TempDir d;
    int fds[2];
    ASSERT_EQ(::pipe(fds), 0);
    pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {  // the writer: saves step 1, 2, 3, ... until killed, reporting each one
      ::close(fds[0]);
      try {
        for (int64_t s = 1; s < 1000; ++s) {
          save_checkpoint(d.file(checkpoint_file_name(s)), kill_test_checkpoint(s));
          prune_checkpoints(d.path(), 2);
          if (::write(fds[1], &s, sizeof(s)) != ssize_t(sizeof(s))) ::_exit(3);
        }
      } catch (...) {
        ::_exit(2);
      }
      ::_exit(0);
    }
    ::close(fds[1]);
    ChildGuard guard{child};
    // Two saves done: the time between them is one save cycle (fill, write, fsync, prune).
    std::vector<int64_t> done;
    for (int i = 0; i < 2; ++i) {
      done.push_back(read_report(fds[0], 120000));
      ASSERT_GE(done.back(), 1) << "the writer did not finish a checkpoint in 2 minutes";
      if (i == 0) t_first = std::chrono::steady_clock::now();
    }
    const double cycle_ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t_first)
            .count();
    // Mostly: wait for the next save's temp file, then kill within the first half of a cycle (the
    // write itself); the last trial kills at a random time, wherever the writer is.
    const bool aim = trial + 1 < trials;
    const auto t0 = std::chrono::steady_clock::now();
    if (aim)
      while (!has_temp_file(d.path()) &&
             std::chrono::steady_clock::now() - t0 < std::chrono::seconds(60))
        std::this_thread::sleep_for(std::chrono::microseconds(200));
    const double delay_ms =
        std::uniform_real_distribution<double>(0, (aim ? 0.5 : 1.5) * cycle_ms)(rng);
    std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(delay_ms));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    int status = 0;
    ::waitpid(child, &status, 0);
    guard.pid = 0;
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "writer failed: " << status;
    const bool mid_write = has_temp_file(d.path());
    mid_write_kills += mid_write;
    for (int64_t s; (s = read_report(fds[0], 0)) > 0;) done.push_back(s);
    ::close(fds[0]);
    const int64_t last = done.back();

    // Every name that looks like a checkpoint is a complete one: no half file is ever taken.
    for (const auto& [step, path] : list_checkpoints(d.path())) {
      std::string why;
      EXPECT_TRUE(is_valid_checkpoint(path, &why)) << path << ": " << why;
    }
    auto latest = latest_valid_checkpoint(d.path());
    ASSERT_TRUE(latest.has_value());
    Checkpoint ck = load_checkpoint(*latest);
    // The last reported save, or the next one when the kill came between rename and report.
    EXPECT_TRUE(ck.step == last || ck.step == last + 1) << ck.step << " vs " << last;
    EXPECT_TRUE(matches_step(ck, ck.step)) << "contents of step " << ck.step << " differ";
    std::printf(
        "trial %d: save cycle %.0f ms, killed %.0f ms later %s, last reported step %lld, "
        "resumed from step %lld\n",
        trial, cycle_ms, delay_ms, mid_write ? "mid-write (temp file left)" : "between writes",
        (long long)last, (long long)ck.step);
    // The killed writer's temp file is stale now: prune clears it.
    prune_checkpoints(d.path(), 0);
    EXPECT_FALSE(has_temp_file(d.path()));
  }
  // Most kills must land inside a write, or the test proves little; on a loaded 2-core machine the
  // save cycle's timing varies (seen: 2 of 5 between writes while the suite ran beside a build).
  EXPECT_GE(mid_write_kills, trials / 2 + 1) << "too few kills landed inside a write";
}

}  // namespace
}  // namespace ftune
