// A stand-in for a training job under mpirun that dies as told (issue 5, "Failure"): every rank
// runs steps of all_reduce + a checkpoint save; rank FTUNE_TEST_FAIL_RANK dies at step
// FTUNE_TEST_FAIL_AT_STEP. Modes (FTUNE_TEST_FAIL_MODE):
//   throw  an ftune::Error, handled by the same main() error path as the ftune CLI
//          (parallel::report_fatal_error: one "error on rank R of N" line, then MPI_Abort)
//   kill   raise(SIGKILL): no handler runs, mpirun must notice and take the job down
//   exit   std::_Exit(3) without MPI_Finalize: mpirun must notice the early exit
//   kill_in_save  SIGKILL from a timer thread 1 ms (FTUNE_TEST_KILL_DELAY_US) into step N, while
//   the ranks keep saving
//          with no pause: the kill lands at a random point, usually inside a collective save
// The other ranks keep calling collectives, which would block forever if mpirun did not kill them.
//
//   mpi_failure_probe run DIR     the job (under mpirun); checkpoints go to DIR/step_*.h5
//   mpi_failure_probe check DIR N one process: the newest valid checkpoint in DIR loads, holds
//                                 what its step wrote, and its step is >= N
// tests/mpi_failure/run_case.sh drives it (ctest mpi_failure_*).
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>

#include "core/error.h"
#include "io/checkpoint.h"
#include "parallel/checkpoint_io.h"
#include "parallel/communicator.h"

namespace ftune {
namespace {

int env_int(const char* name, int dflt) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : dflt;
}

constexpr int64_t kRows = 8, kCols = 6;

// The full [kRows, kCols] tensor of step s (what the check expects back).
float value_at(int64_t step, int64_t i, int64_t j) { return float(step * 1000 + i * kCols + j); }

// Step s's checkpoint, sharded: "w" split along dim 0 over the ranks (each writes its rows into
// the one file, parallel HDF5), "b" replicated.
void save_step(const std::string& dir, int64_t step, parallel::Communicator& comm) {
  const int r = comm.rank(), n = comm.size();
  const int64_t rows = kRows / n, off = rows * r;
  Tensor w = Tensor::empty({rows, kCols}, DType::f32);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < kCols; ++j) w.data<float>()[i * kCols + j] = value_at(step, off + i, j);
  Checkpoint ck;
  ck.step = step;
  ck.model.emplace_back("w", w);
  ck.model.emplace_back("b", Tensor::full({kCols}, double(step), DType::f32));
  ck.trainer_state = {{"probe_step", step}};
  parallel::save_checkpoint_parallel(dir + "/" + checkpoint_file_name(step), ck,
                                     {{"model/w", 0, off, {kRows, kCols}}}, comm);
}

int run(const std::string& dir) {
  auto world = parallel::make_world_communicator("mpi");
  const int rank = world->rank();
  const int fail_rank = env_int("FTUNE_TEST_FAIL_RANK", 1);
  const int fail_step = env_int("FTUNE_TEST_FAIL_AT_STEP", 3);
  const char* mode_env = std::getenv("FTUNE_TEST_FAIL_MODE");
  const std::string mode = mode_env ? mode_env : "throw";
  FTUNE_CHECK(mode == "throw" || mode == "kill" || mode == "exit" || mode == "kill_in_save",
              "[probe] FTUNE_TEST_FAIL_MODE '", mode, "' is not throw, kill, exit, kill_in_save");
  const bool async_kill = mode == "kill_in_save";
  // Enough steps that the survivors are still stepping (in collectives) when the peer dies.
  for (int64_t step = 1; step <= 1000; ++step) {
    Tensor x = Tensor::full({1024}, 1.0f, DType::f32);
    world->all_reduce(x);
    FTUNE_CHECK(x.data<float>()[0] == float(world->size()), "[probe] all_reduce gave ",
                x.data<float>()[0]);
    if (async_kill && rank == fail_rank && step == fail_step) {
      const int delay_us = env_int("FTUNE_TEST_KILL_DELAY_US", 1000);
      std::thread([delay_us] {
        std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
        ::raise(SIGKILL);
      }).detach();
    }
    save_step(dir, step, *world);
    if (async_kill && step >= fail_step) continue;  // save back to back until the kill lands
    if (rank == fail_rank && step == fail_step) {
      if (mode == "kill") ::raise(SIGKILL);
      if (mode == "exit") std::_Exit(3);
      FTUNE_THROW("[probe] injected failure at step ", step, " (FTUNE_TEST_FAIL_MODE=throw)");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  FTUNE_THROW("[probe] rank ", rank, " finished 1000 steps: the failing rank never failed");
}

int check(const std::string& dir, int64_t min_step) {
  auto path = latest_valid_checkpoint(dir);
  FTUNE_CHECK(path.has_value(), "[probe] no valid checkpoint in ", dir);
  Checkpoint ck = load_checkpoint(*path);
  FTUNE_CHECK(ck.step >= min_step, "[probe] newest valid checkpoint ", *path, " is step ", ck.step,
              ", expected >= ", min_step);
  FTUNE_CHECK(ck.model.size() == 2 && ck.model[0].first == "w" && ck.model[1].first == "b",
              "[probe] ", *path, ": unexpected tensors");
  const Tensor& w = ck.model[0].second;
  FTUNE_CHECK(w.shape() == Shape({kRows, kCols}), "[probe] ", *path, ": w is ", w.desc());
  for (int64_t i = 0; i < kRows; ++i)
    for (int64_t j = 0; j < kCols; ++j)
      FTUNE_CHECK(w.data<float>()[i * kCols + j] == value_at(ck.step, i, j), "[probe] ", *path,
                  ": w[", i, ",", j, "] is wrong");
  FTUNE_CHECK(ck.model[1].second.data<float>()[0] == float(ck.step), "[probe] ", *path,
              ": b is wrong");
  FTUNE_CHECK(ck.trainer_state.value("probe_step", int64_t(-1)) == ck.step, "[probe] ", *path,
              ": trainer_state is wrong");
  // A save cut short leaves at most a temp file, which never counts as a checkpoint.
  int temps = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.find(".tmp-") == std::string::npos) continue;
    ++temps;
    FTUNE_CHECK(!is_valid_checkpoint(e.path().string()), "[probe] temp file ", name,
                " passes as a valid checkpoint");
  }
  std::printf(
      "mpi_failure_probe: %s (step %lld) is complete and correct; %d temp file(s), "
      "none valid\n",
      path->c_str(), (long long)ck.step, temps);
  return 0;
}

}  // namespace
}  // namespace ftune

int main(int argc, char** argv) {
  try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "run" && argc == 3) return ftune::run(argv[2]);
    if (cmd == "check" && argc == 4) return ftune::check(argv[2], std::atoll(argv[3]));
    std::fprintf(stderr, "usage: mpi_failure_probe run DIR | check DIR MIN_STEP\n");
    return 2;
  } catch (const std::exception& e) {
    return ftune::parallel::report_fatal_error("mpi_failure_probe", e.what());
  }
}
