// Loss kernels (kernels/loss.h, cuda twins) over Llama-3-sized logits: [4096 rows x 128256] bf16
// (1.05 GB per tensor, far past L2). Bytes are the minimum that must move: each [N, V] input read
// once and each [N, V] output written once (the per-row vectors are negligible), so a kernel that
// sweeps a row twice (softmax, KL forward) shows at most ~50% of copy bandwidth by construction.
#include <cuda_runtime.h>

#include <vector>

#include "bench/gpu/gpu_bench.h"
#include "core/rng.h"
#include "kernels/loss.h"

namespace {

using ftune::DType;
using ftune::bench::Row;
namespace kc = ftune::kernels::cuda;

template <class T>
T* dev_alloc(size_t n) {
  void* p = nullptr;
  BENCH_CUDA(cudaMalloc(&p, std::max<size_t>(16, n * sizeof(T))));
  return static_cast<T*>(p);
}

}  // namespace

FTUNE_GPU_BENCH(loss) {
  const int64_t n = 4096, v = 128256;
  const double nv = double(n) * double(v), es = 2.0;  // bf16
  void* x = ftune::bench::random_device(2, n * v, 1, 3.0f, 21);
  void* t = ftune::bench::random_device(2, n * v, 1, 3.0f, 22);
  void* dx = ftune::bench::random_device(2, n * v, 1, 1.0f, 23);
  void* dt = ftune::bench::random_device(2, n * v, 1, 1.0f, 24);
  float* g = static_cast<float*>(ftune::bench::random_device(4, n, 0, 1.0f, 25));
  float* stat = dev_alloc<float>(size_t(6 * n));
  float* out = dev_alloc<float>(size_t(n));
  int64_t* tgt = dev_alloc<int64_t>(size_t(n));
  {
    ftune::Generator gen(5);
    std::vector<int64_t> h = ftune::randint({n}, gen, 0, v).to_vector<int64_t>();
    BENCH_CUDA(cudaMemcpy(tgt, h.data(), h.size() * sizeof(int64_t), cudaMemcpyHostToDevice));
  }
  const std::string shape = " bf16 4096x128256";
  auto add = [&](const std::string& name, double bytes, double ms, const std::string& note) {
    Row r;
    r.name = name + shape;
    r.ms = ms;
    r.bytes = bytes;
    r.note = note;
    ctx.add(r);
  };

  add("ce_fwd (nll + row stats)", nv * es, ctx.time_ms([&] {
        kc::nll_forward(x, DType::bf16, tgt, n, v, -100, stat, out, DType::f32, 1.0f);
      }),
      "one sweep; target >= 70% copy BW");
  add("ce_bwd (dlogits)", 2 * nv * es, ctx.time_ms([&] {
        kc::nll_backward(x, DType::bf16, tgt, stat, g, 1, 1.0f / float(n), n, v, -100, dx);
      }),
      "read logits + write dlogits; target >= 70%");
  add("entropy_fwd", nv * es, ctx.time_ms([&] {
        kc::entropy_forward(x, DType::bf16, n, v, stat, out);
      }),
      "one sweep");
  kc::entropy_forward(x, DType::bf16, n, v, stat, out);
  add("entropy_bwd", 2 * nv * es, ctx.time_ms([&] {
        kc::entropy_backward(x, DType::bf16, stat, out, g, n, v, dx);
      }),
      "");
  add("kl_fwd forward T=2", 2 * nv * es, ctx.time_ms([&] {
        kc::kl_forward(x, t, DType::bf16, n, v, ftune::kernels::Divergence::forward, 0.5, 0.5, out,
                       stat);
      }),
      "2 inputs, two sweeps (lse, then the sum): <= 50% by design");
  add("kl_fwd jsd(0.5)", 2 * nv * es, ctx.time_ms([&] {
        kc::kl_forward(x, t, DType::bf16, n, v, ftune::kernels::Divergence::jsd, 0.5, 1.0, out,
                       stat);
      }),
      "two sweeps");
  add("kl_bwd forward (ds, dt)", 4 * nv * es, ctx.time_ms([&] {
        kc::kl_backward(x, t, DType::bf16, stat, g, n, v, ftune::kernels::Divergence::forward, 0.5,
                        1.0, dx, dt);
      }),
      "");
  add("log_softmax_fwd", 2 * nv * es, ctx.time_ms([&] {
        kc::softmax_forward(x, DType::bf16, n, v, true, dx);
      }),
      "two sweeps of the input");
  for (void* p : {x, t, dx, dt}) ftune::bench::free_device(p);
  for (void* p : {static_cast<void*>(g), static_cast<void*>(stat), static_cast<void*>(out),
                  static_cast<void*>(tgt)})
    cudaFree(p);
}
