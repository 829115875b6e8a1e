// Timing mode (c) of the op-test table: times forward and forward+backward of every case marked
// bench (or every case with --all) in f32 on the CPU and prints a table.
//   bench_ops [--all] [--filter SUBSTR] [--reps N] [--json FILE]
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

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <class F>
double median_ms(int reps, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    double t0 = now_ms();
    f();
    t.push_back(now_ms() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
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
    else {
      std::fprintf(stderr, "usage: bench_ops [--all] [--filter SUBSTR] [--reps N] [--json FILE]\n");
      return 2;
    }
  }
  std::printf("%-44s %12s %14s %10s\n", "case", "fwd ms", "fwd+bwd ms", "GFLOP/s");
  std::ofstream js;
  if (!json.empty()) js.open(json);
  try {
    for (const OpCase& c : op_table()) {
      if (!all && !c.bench) continue;
      std::string name = case_name(c);
      if (!filter.empty() && name.find(filter) == std::string::npos) continue;
      auto xs = make_inputs(c, DType::f32, 1, false);
      double fwd = median_ms(reps, [&] {
        NoGradGuard ng;
        c.run(xs);
      });
      double both = 0;
      if (c.bench_backward && c.gradcheck) {
        auto xg = make_inputs(c, DType::f32, 1, true);
        Tensor w;
        both = median_ms(reps, [&] {
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
