// Timing mode (c) of the op-test table: times forward and forward+backward of every case marked
// bench (or every case with --all) in f32 on the CPU and prints a table.
//   bench_ops [--all] [--filter SUBSTR] [--reps N] [--json FILE] [--cpu-time]
// --cpu-time: one thread, the minimum of the calling thread's CPU clock over the repetitions:
// steadier on a shared machine, since time slices lost to other processes are not counted.
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>

#include "tests/op_table.h"

using namespace ftune;
using namespace ftune::test;

namespace {

bool g_cpu_time = false;

double now_ms() {
  if (g_cpu_time) {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
  }
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median of the wall times, or the minimum of the CPU times (--cpu-time).
template <class F>
double time_ms(int reps, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    double t0 = now_ms();
    f();
    t.push_back(now_ms() - t0);
  }
  std::sort(t.begin(), t.end());
  return g_cpu_time ? t.front() : t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool all = false;
  std::string filter, json;
  int reps = 10;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--all")) all = true;
    else if (!std::strcmp(argv[i], "--filter") && i + 1 < argc) filter = argv[++i];
    else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) reps = std::atoi(argv[++i]);
    else if (!std::strcmp(argv[i], "--json") && i + 1 < argc) json = argv[++i];
    else if (!std::strcmp(argv[i], "--cpu-time")) g_cpu_time = true;
    else {
      std::fprintf(stderr, "usage: bench_ops [--all] [--filter SUBSTR] [--reps N] [--json FILE] [--cpu-time]\n");
      return 2;
    }
  }
  if (g_cpu_time) omp_set_num_threads(1);  // every kernel runs on this thread, whose clock we read
  std::printf("%-44s %12s %14s %10s\n", g_cpu_time ? "case (1 thread, CPU time)" : "case", "fwd ms",
              "fwd+bwd ms", "GFLOP/s");
  std::ofstream js;
  if (!json.empty()) js.open(json);
  try {
    for (const OpCase& c : op_table()) {
      if (!all && !c.bench) continue;
      std::string name = case_name(c);
      if (!filter.empty() && name.find(filter) == std::string::npos) continue;
      auto xs = make_inputs(c, DType::f32, 1, false);
      double fwd = time_ms(reps, [&] {
        NoGradGuard ng;
        c.run(xs);
      });
      double both = 0;
      if (c.bench_backward && c.gradcheck) {
        auto xg = make_inputs(c, DType::f32, 1, true);
        Tensor w;
        both = time_ms(reps, [&] {
          Tensor out = c.run(xg);
          if (!w.defined()) w = Tensor::ones(out.shape());
          out.backward(w);
          for (auto& x : xg)
            if (x.requires_grad()) x.zero_grad();
        });
      }
      double gf = c.flops ? c.flops() / (fwd * 1e6) : 0.0;
      std::printf("%-44s %12.3f %14.3f %10.1f\n", name.c_str(), fwd, both, gf);
      if (js) js << "{\"case\":\"" << name << "\",\"fwd_ms\":" << fwd << ",\"fwd_bwd_ms\":" << both
                 << ",\"gflops\":" << gf << "}\n";
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_ops: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
