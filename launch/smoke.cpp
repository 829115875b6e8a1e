// `ftune smoke`: a few steps of a tiny regression on the CPU, to show the build works end to end.
#include <cstdio>

#include "core/ops.h"
#include "core/rng.h"

int cmd_smoke() {
  using namespace ftune;
  Generator gen(0);
  Tensor x = randn({64, 16}, gen);
  Tensor w_true = randn({4, 16}, gen);
  Tensor y = ops::linear(x, w_true);
  Tensor w = randn({4, 16}, gen, 0.0, 0.1).set_requires_grad(true);
  for (int step = 0; step < 20; ++step) {
    Tensor loss = ops::mean(ops::square(ops::sub(ops::linear(x, w), y)));
    loss.backward();
    {
      NoGradGuard ng;
      Tensor g = w.grad();
      ops::add_(w, g, -0.5);
      w.zero_grad();
    }
    if (step % 5 == 0 || step == 19) std::printf("step %2d  loss %.6f\n", step, loss.item());
  }
  return 0;
}
