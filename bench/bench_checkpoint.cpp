// Checkpoint save / validate / load throughput (io/checkpoint.h) for a checkpoint of about N MB:
// 64 tensors, half bf16 model weights, half f32 optimizer state, like a 16-bit model's save.
//   bench_checkpoint [MB=100] [DIR=$TMPDIR] [REPS=3]
// Save includes the fsyncs and the rename; reads come from the page cache (the file was just
// written), so load measures HDF5 + memcpy, not the disk.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "io/checkpoint.h"

using namespace ftune;

static double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char** argv) {
  const double mb = argc > 1 ? std::atof(argv[1]) : 100;
  const std::string dir = argc > 2 ? argv[2] : std::filesystem::temp_directory_path().string();
  const int reps = argc > 3 ? std::atoi(argv[3]) : 3;
  const int n = 64;
  const int64_t per = int64_t(mb * 1e6 / n);  // bytes per tensor
  Checkpoint ck;
  ck.step = 1;
  for (int i = 0; i < n / 2; ++i) {
    Tensor w = Tensor::full({per / 2}, 0.5 + i, DType::bf16);
    ck.model.emplace_back("model.layers." + std::to_string(i) + ".weight", w);
    ck.optimizer.tensors.emplace_back("model.layers." + std::to_string(i) + ".weight.exp_avg",
                                      Tensor::full({per / 4}, 0.25 * i));
  }
  ck.recipe_yaml = "bench: true\n";
  const std::string path = dir + "/bench_ckpt.h5";
  std::vector<double> ts, tv, tl;
  for (int r = 0; r < reps; ++r) {
    double t0 = now();
    save_checkpoint(path, ck);
    double t1 = now();
    bool ok = is_valid_checkpoint(path);
    double t2 = now();
    Checkpoint back = load_checkpoint(path);
    double t3 = now();
    if (!ok || back.model.size() != ck.model.size()) return 1;
    ts.push_back(t1 - t0), tv.push_back(t2 - t1), tl.push_back(t3 - t2);
  }
  const double bytes = double(std::filesystem::file_size(path));
  auto med = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  std::printf(
      "checkpoint %.1f MB (%d tensors), median of %d: save %.3f s (%.0f MB/s), "
      "validate %.4f s, load %.3f s (%.0f MB/s)\n",
      bytes / 1e6, n, reps, med(ts), bytes / 1e6 / med(ts), med(tv), med(tl),
      bytes / 1e6 / med(tl));
  std::filesystem::remove(path);
  return 0;
}
