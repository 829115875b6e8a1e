// Peak resident memory of one attention forward+backward, for
// bench/results/cpu_attention_memory.md. Run each T in a fresh process (ru_maxrss is a high-water
// mark):
//   for t in 1024 2048 4096 8192; do build/bench/attention_rss $t; done
//   attention_rss T [B H D]   (defaults B=1 H=8 D=64, causal, f32)
#include <sys/resource.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include "core/ops.h"
#include "core/rng.h"

using namespace ftune;

namespace {
long max_rss_kib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;  // KiB on Linux
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: attention_rss T [B H D]\n");
    return 2;
  }
  const int64_t T = std::atoll(argv[1]);
  const int64_t B = argc > 2 ? std::atoll(argv[2]) : 1, H = argc > 3 ? std::atoll(argv[3]) : 8,
                D = argc > 4 ? std::atoll(argv[4]) : 64;
  try {
    Generator g(1);
    Tensor q = randn({B, T, H, D}, g).set_requires_grad(true);
    Tensor k = randn({B, T, H, D}, g).set_requires_grad(true);
    Tensor v = randn({B, T, H, D}, g).set_requires_grad(true);
    Tensor w = randn({B, T, H, D}, g);
    const long before = max_rss_kib();
    auto t0 = std::chrono::steady_clock::now();
    Tensor out = ops::attention(q, k, v);
    out.backward(w);
    double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    const long after = max_rss_kib();
    const double in_mib = 4.0 * double(B * T * H * D) / (1 << 20);  // one [B, T, H, D] f32 tensor
    const double scores_mib = 4.0 * double(B * H) * double(T) * double(T) / (1 << 20);
    std::printf(
        "T=%lld B=%lld H=%lld D=%lld causal f32: peak RSS %.1f MiB (%.1f MiB before the op, +%.1f "
        "MiB), "
        "one q-sized tensor %.1f MiB, a [B,H,T,T] f32 score matrix would be %.0f MiB; fwd+bwd %.1f "
        "ms\n",
        (long long)T, (long long)B, (long long)H, (long long)D, after / 1024.0, before / 1024.0,
        (after - before) / 1024.0, in_mib, scores_mib, ms);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "attention_rss: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
