// Single-thread CPU time of the op-table cases (bench_ops' cases, same inputs), for a shared,
// noisy machine: the calling thread's CPU clock does not count time slices lost to other
// processes, and the minimum over repetitions drops cache interference. Compare with
// `python3 bench/attention_torch.py --threads 1 --cpu-time`.
//   attention_cpu_time [--filter SUBSTR] [--reps N]   (default filter "attention/bench")
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "tests/op_table.h"

using namespace ftune;
using namespace ftune::test;

namespace {

double thread_cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

template <class F>
double min_ms(int reps, F&& f) {
  f();  // warm-up
  double best = 1e300;
  for (int i = 0; i < reps; ++i) {
    double t0 = thread_cpu_ms();
    f();
    best = std::min(best, thread_cpu_ms() - t0);
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  std::string filter = "attention/bench";
  int reps = 5;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--filter") && i + 1 < argc) {
      filter = argv[++i];
    } else if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: attention_cpu_time [--filter SUBSTR] [--reps N]\n");
      return 2;
    }
  }
  omp_set_num_threads(1);  // every kernel then runs on this thread, whose CPU clock we read
  std::printf("%-44s %12s %14s %10s\n", "case (1 thread, CPU time)", "fwd ms", "fwd+bwd ms",
              "GFLOP/s");
  try {
    for (const OpCase& c : op_table()) {
      const std::string name = case_name(c);
      if (name.find(filter) == std::string::npos) continue;
      auto xs = make_inputs(c, DType::f32, 1, false);
      double fwd = min_ms(reps, [&] {
        NoGradGuard ng;
        c.run(xs);
      });
      auto xg = make_inputs(c, DType::f32, 1, true);
      Tensor w;
      double both = min_ms(reps, [&] {
        Tensor out = c.run(xg);
        if (!w.defined()) w = Tensor::ones(out.shape());
        out.backward(w);
        for (auto& x : xg)
          if (x.requires_grad()) x.zero_grad();
      });
      double gf = c.flops ? c.flops() / (fwd * 1e6) : 0.0;
      std::printf("%-44s %12.3f %14.3f %10.1f\n", name.c_str(), fwd, both, gf);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attention_cpu_time: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
