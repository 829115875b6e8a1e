// Training-step benchmark of the CPU backend: a Llama-style decoder stack built from core/ops.h,
// one step = forward + backward + AdamW over every parameter, timed as the median of N steps after
// a warm-up. bench/compare_torch.py runs the same model (same init, same data) in PyTorch.
//   bench_step [--layers 4] [--d 256] [--heads 4] [--kv-heads H] [--ffn F] [--seq 256] [--batch 8]
//              [--vocab 4096] [--steps 10] [--warmup 2] [--threads N] [--seed 1234]
//              [--profile N] [--json FILE]
// --profile N runs N more steps with a timer around every op, forward and backward, and prints
// where the time goes (per op label, ms per step). The timed steps never carry the timers.
#include <omp.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "core/ops.h"
#include "core/optim.h"
#include "core/rng.h"

// OpenBLAS runs its own thread pool (the pthread build): --threads sets it next to OpenMP's.
extern "C" void openblas_set_num_threads(int num_threads);
extern "C" int openblas_get_num_threads(void);

namespace ftune::bench {

namespace {

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU time of the whole process (every thread, spinning included): on a shared machine it does not
// count the time this process waited for a core, so with --threads 1 it is the steadier number.
double cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return double(ts.tv_sec) * 1e3 + double(ts.tv_nsec) * 1e-6;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Config {
  int64_t layers = 4, d = 256, heads = 4, kv_heads = 0, ffn = 0, seq = 256, batch = 8, vocab = 4096;
  int steps = 10, warmup = 2, threads = 0, profile = 0;
  uint64_t seed = 1234;
  double eps = 1e-5, theta = 10000.0, lr = 1e-4, wd = 0.01;
  std::string json;

  int64_t head_dim() const { return d / heads; }
  int64_t kv_dim() const { return kv_heads * head_dim(); }
};

// Llama's MLP width: 8/3 d rounded up to a multiple of 16 (d = 256 -> 688). Same rule in
// compare_torch.py.
int64_t default_ffn(int64_t d) { return (8 * d / 3 + 15) / 16 * 16; }

// Model FLOPs of one training step, the same count as compare_torch.py:
//   6 * n_matmul * tokens         (every weight that enters a GEMM: 2 flops/MAC forward, 4 backward)
// + 12 * L * B * T^2 * d          (QK^T and PV: 4 T^2 d forward per sequence and layer, x3 for
//                                  forward + backward, full T^2 counted: causal skipping earns no credit)
// Embedding lookup, norms, RoPE, SwiGLU, softmax, loss and AdamW are not counted.
int64_t matmul_params(const Config& c) {
  return c.layers * (2 * c.d * c.d + 2 * c.d * c.kv_dim() + 3 * c.d * c.ffn) + c.vocab * c.d;
}
double step_flops(const Config& c) {
  double tokens = double(c.batch) * double(c.seq);
  return 6.0 * double(matmul_params(c)) * tokens +
         12.0 * double(c.layers) * double(c.batch) * double(c.seq) * double(c.seq) * double(c.d);
}

// ---------------------------------------------------------------- per-op profiler
// Forward: a timer around each op call, keyed by a label. Backward: before backward() the graph
// is walked and every node's closure is wrapped in a timer, keyed by the label of the forward call
// that made it (node pointer -> label), else by the node's own name in parentheses.
struct OpStat {
  double fwd_ms = 0, bwd_ms = 0, fwd_cpu = 0, bwd_cpu = 0;  // wall, process CPU
  int64_t fwd_calls = 0, bwd_calls = 0;
};

class Profiler {
 public:
  bool on = false;
  std::vector<std::string> order;  // labels in first-seen order (forward order)
  std::map<std::string, OpStat> stats;
  std::unordered_map<const Node*, std::string> labels;
  double fwd_total = 0, bwd_total = 0, opt_total = 0, zero_total = 0;
  double fwd_cpu = 0, bwd_cpu = 0, opt_cpu = 0;
  int steps = 0;

  OpStat& stat(const std::string& label) {
    auto it = stats.find(label);
    if (it == stats.end()) {
      order.push_back(label);
      it = stats.emplace(label, OpStat{}).first;
    }
    return it->second;
  }

  template <class F>
  Tensor op(const char* label, F&& f) {
    if (!on) return f();
    const double t0 = now_ms(), c0 = cpu_ms();
    Tensor out = f();
    OpStat& s = stat(label);
    s.fwd_ms += now_ms() - t0;
    s.fwd_cpu += cpu_ms() - c0;
    ++s.fwd_calls;
    label_new_nodes(out, label);
    return out;
  }

  // Labels the nodes this call made: those reachable from out that no earlier call labelled
  // (composite ops and views inside the call get the call's label).
  void label_new_nodes(const Tensor& out, const char* label) {
    if (!out.grad_fn()) return;
    std::vector<const Node*> stack{out.grad_fn().get()};
    while (!stack.empty()) {
      const Node* n = stack.back();
      stack.pop_back();
      if (!labels.emplace(n, label).second) continue;
      for (const auto& e : n->edges)
        if (e.node && !labels.count(e.node.get())) stack.push_back(e.node.get());
    }
  }

  // Wraps the backward closure of every node reachable from root.
  void instrument(const Tensor& root) {
    if (!on || !root.grad_fn()) return;
    std::vector<Node*> stack{root.grad_fn().get()};
    std::unordered_set<Node*> seen{root.grad_fn().get()};
    while (!stack.empty()) {
      Node* n = stack.back();
      stack.pop_back();
      auto it = labels.find(n);
      OpStat* s = &stat(it != labels.end() ? it->second : "(" + n->name + ")");
      BackwardFn inner = std::move(n->backward);
      n->backward = [inner = std::move(inner), s](const Tensor& g, const std::vector<bool>& need) {
        const double t0 = now_ms(), c0 = cpu_ms();
        std::vector<Tensor> r = inner(g, need);
        s->bwd_ms += now_ms() - t0;
        s->bwd_cpu += cpu_ms() - c0;
        ++s->bwd_calls;
        return r;
      };
      for (auto& e : n->edges)
        if (e.node && seen.insert(e.node.get()).second) stack.push_back(e.node.get());
    }
    labels.clear();
  }
};

Profiler g_prof;

// ---------------------------------------------------------------- the model
struct Layer {
  Tensor attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down;
};

struct Model {
  Config cfg;
  Tensor embed, final_norm, lm_head;
  std::vector<Layer> layers;
  std::vector<Tensor> params;  // every trainable tensor, in creation order
  std::vector<std::string> names;  // their dotted names
};

// Weights ~ N(0, 0.02) from one Philox generator, norm weights = 1. The draw order (embed; per
// layer wq wk wv wo w_gate w_up w_down; lm_head) is mirrored by compare_torch.py so both sides
// start from bit-identical weights.
Model build_model(const Config& c, Generator& gen) {
  Model m;
  m.cfg = c;
  auto add = [&](Tensor t, std::string name) {
    t.set_requires_grad(true);
    m.params.push_back(t);
    m.names.push_back(std::move(name));
    return t;
  };
  auto normal = [&](Shape s, std::string name) { return add(randn(s, gen, 0.0, 0.02), name); };
  auto ones = [&](int64_t n, std::string name) { return add(Tensor::ones({n}), name); };
  m.embed = normal({c.vocab, c.d}, "embed");
  for (int64_t l = 0; l < c.layers; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    Layer L;
    L.attn_norm = ones(c.d, p + "attn_norm");
    L.wq = normal({c.d, c.d}, p + "wq");
    L.wk = normal({c.kv_dim(), c.d}, p + "wk");
    L.wv = normal({c.kv_dim(), c.d}, p + "wv");
    L.wo = normal({c.d, c.d}, p + "wo");
    L.mlp_norm = ones(c.d, p + "mlp_norm");
    L.w_gate = normal({c.ffn, c.d}, p + "w_gate");
    L.w_up = normal({c.ffn, c.d}, p + "w_up");
    L.w_down = normal({c.d, c.ffn}, p + "w_down");
    m.layers.push_back(std::move(L));
  }
  m.final_norm = ones(c.d, "final_norm");
  m.lm_head = normal({c.vocab, c.d}, "lm_head");
  return m;
}

// ids, targets [B, T] (i64) -> scalar mean cross-entropy.
Tensor forward(const Model& m, const Tensor& ids, const Tensor& targets, const Tensor& positions) {
  const Config& c = m.cfg;
  const int64_t B = c.batch, T = c.seq, H = c.heads, Hkv = c.kv_heads, hd = c.head_dim();
  Profiler& P = g_prof;
  Tensor x = P.op("embedding", [&] { return ops::embedding(m.embed, ids); });  // [B, T, d]
  for (const Layer& L : m.layers) {
    Tensor h = P.op("rms_norm", [&] { return ops::rms_norm(x, L.attn_norm, c.eps); });
    Tensor q = P.op("linear q/k/v", [&] { return ops::linear(h, L.wq).view({B, T, H, hd}); });
    Tensor k = P.op("linear q/k/v", [&] { return ops::linear(h, L.wk).view({B, T, Hkv, hd}); });
    Tensor v = P.op("linear q/k/v", [&] { return ops::linear(h, L.wv).view({B, T, Hkv, hd}); });
    q = P.op("rope", [&] { return ops::rope(q, positions, c.theta); });
    k = P.op("rope", [&] { return ops::rope(k, positions, c.theta); });
    Tensor a = P.op("attention", [&] { return ops::attention(q, k, v).reshape({B, T, c.d}); });
    Tensor o = P.op("linear o", [&] { return ops::linear(a, L.wo); });
    x = P.op("residual add", [&] { return ops::add(x, o); });
    h = P.op("rms_norm", [&] { return ops::rms_norm(x, L.mlp_norm, c.eps); });
    Tensor g = P.op("linear gate/up", [&] { return ops::linear(h, L.w_gate); });
    Tensor u = P.op("linear gate/up", [&] { return ops::linear(h, L.w_up); });
    Tensor s = P.op("swiglu", [&] { return ops::swiglu(g, u); });
    Tensor dn = P.op("linear down", [&] { return ops::linear(s, L.w_down); });
    x = P.op("residual add", [&] { return ops::add(x, dn); });
  }
  x = P.op("rms_norm", [&] { return ops::rms_norm(x, m.final_norm, c.eps); });
  Tensor logits = P.op("linear lm_head", [&] { return ops::linear(x, m.lm_head); });  // [B, T, V]
  return P.op("cross_entropy", [&] {
    return ops::cross_entropy(logits.view({B * T, c.vocab}), targets.view({B * T}));
  });
}

// ---------------------------------------------------------------- the optimizer
// core/optim.h's AdamW (torch.optim.AdamW semantics) over every parameter, one group, weight
// decay on all of them as in compare_torch.py. Kept in one place so another optimizer drops in.
class Optimizer {
 public:
  Optimizer(const Model& m, const Config& c) : impl_(make_groups(m, c), options(c)) {}
  void step() { impl_.step(); }
  void zero_grad() { impl_.zero_grad(); }  // set to none, as torch's default

 private:
  static std::vector<optim::ParamGroup> make_groups(const Model& m, const Config& c) {
    optim::ParamGroup g;
    for (size_t i = 0; i < m.params.size(); ++i) g.params.emplace_back(m.names[i], m.params[i]);
    g.weight_decay = c.wd;
    return {std::move(g)};
  }
  static optim::AdamWOptions options(const Config& c) {
    optim::AdamWOptions o;
    o.lr = c.lr;
    o.beta1 = 0.9;
    o.beta2 = 0.999;
    o.eps = 1e-8;
    o.weight_decay = c.wd;
    return o;
  }
  optim::AdamW impl_;
};

// One training step; returns the loss (read before the update).
double train_step(Model& m, Optimizer& opt, const Tensor& ids, const Tensor& targets,
                  const Tensor& positions) {
  Profiler& P = g_prof;
  const double t0 = now_ms();
  opt.zero_grad();
  const double t1 = now_ms(), c1 = cpu_ms();
  Tensor loss = forward(m, ids, targets, positions);
  const double t2 = now_ms(), c2 = cpu_ms();
  P.instrument(loss);
  const double t3 = now_ms(), c3 = cpu_ms();
  loss.backward();
  const double t4 = now_ms(), c4 = cpu_ms();
  opt.step();
  const double t5 = now_ms(), c5 = cpu_ms();
  if (P.on) {
    P.zero_total += t1 - t0;
    P.fwd_total += t2 - t1;
    P.bwd_total += t4 - t3;
    P.opt_total += t5 - t4;
    P.fwd_cpu += c2 - c1;
    P.bwd_cpu += c4 - c3;
    P.opt_cpu += c5 - c4;
    ++P.steps;
  }
  return loss.item();
}

// ---------------------------------------------------------------- driver
[[noreturn]] void usage(const char* msg) {
  if (msg) std::fprintf(stderr, "bench_step: %s\n", msg);
  std::fprintf(stderr,
               "usage: bench_step [--layers N] [--d N] [--heads N] [--kv-heads N] [--ffn N] [--seq N]\n"
               "                  [--batch N] [--vocab N] [--steps N] [--warmup N] [--threads N]\n"
               "                  [--seed N] [--profile N] [--json FILE]\n");
  std::exit(2);
}

Config parse(int argc, char** argv) {
  Config c;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) usage(("missing value after " + a).c_str());
      return argv[++i];
    };
    auto num = [&]() -> int64_t {
      std::string s = next();
      char* end = nullptr;
      long long v = std::strtoll(s.c_str(), &end, 10);
      if (s.empty() || *end) usage(("bad number '" + s + "' for " + a).c_str());
      return v;
    };
    if (a == "--layers") c.layers = num();
    else if (a == "--d") c.d = num();
    else if (a == "--heads") c.heads = num();
    else if (a == "--kv-heads") c.kv_heads = num();
    else if (a == "--ffn") c.ffn = num();
    else if (a == "--seq") c.seq = num();
    else if (a == "--batch") c.batch = num();
    else if (a == "--vocab") c.vocab = num();
    else if (a == "--steps") c.steps = int(num());
    else if (a == "--warmup") c.warmup = int(num());
    else if (a == "--threads") c.threads = int(num());
    else if (a == "--seed") c.seed = uint64_t(num());
    else if (a == "--profile") c.profile = int(num());
    else if (a == "--json") c.json = next();
    else if (a == "-h" || a == "--help") usage(nullptr);
    else usage(("unknown argument " + a).c_str());
  }
  if (c.kv_heads == 0) c.kv_heads = c.heads;
  if (c.ffn == 0) c.ffn = default_ffn(c.d);
  if (c.layers < 1 || c.d < 1 || c.heads < 1 || c.seq < 1 || c.batch < 1 || c.vocab < 2 ||
      c.steps < 1 || c.warmup < 0 || c.profile < 0 || c.ffn < 1)
    usage("sizes and --steps must be positive");
  if (c.d % c.heads || (c.d / c.heads) % 2) usage("--d must be heads * an even head_dim");
  if (c.kv_heads < 1 || c.heads % c.kv_heads) usage("--heads must be a multiple of --kv-heads");
  return c;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') o += '\\';
    o += ch;
  }
  return o;
}

int run(int argc, char** argv) {
  Config c = parse(argc, argv);
  if (c.threads > 0) {
    omp_set_num_threads(c.threads);
    openblas_set_num_threads(c.threads);
  }
  const int omp_threads = omp_get_max_threads(), blas_threads = openblas_get_num_threads();

  Generator gen(c.seed);
  Model m = build_model(c, gen);
  // Random tokens and targets, drawn after the weights (compare_torch.py draws them the same way).
  Tensor ids = randint({c.batch, c.seq}, gen, 0, c.vocab, DType::i64);
  Tensor targets = randint({c.batch, c.seq}, gen, 0, c.vocab, DType::i64);
  Tensor positions = Tensor::arange(c.seq, DType::i64);
  Optimizer opt(m, c);
  int64_t n_params = 0;
  for (const Tensor& p : m.params) n_params += p.numel();

  std::vector<double> losses, times, cpu_times;
  for (int s = 0; s < c.warmup + c.steps; ++s) {
    const double t0 = now_ms(), c0 = cpu_ms();
    losses.push_back(train_step(m, opt, ids, targets, positions));
    const double dt = now_ms() - t0, dc = cpu_ms() - c0;
    if (s >= c.warmup) {
      times.push_back(dt);
      cpu_times.push_back(dc);
    }
  }
  const double med = median(times), cpu_med = median(cpu_times);
  const double fastest = *std::min_element(times.begin(), times.end());
  const double flops = step_flops(c);
  const double gflops = flops / (med * 1e6);

  std::printf(
      "ftune  L=%lld d=%lld H=%lld kv=%lld ffn=%lld T=%lld B=%lld V=%lld threads=%d/%d: "
      "%.2f ms/step (median of %d, min %.2f, cpu %.2f), %.2f GFLOP/s, loss %.5f -> %.5f\n",
      (long long)c.layers, (long long)c.d, (long long)c.heads, (long long)c.kv_heads,
      (long long)c.ffn, (long long)c.seq, (long long)c.batch, (long long)c.vocab, omp_threads,
      blas_threads, med, c.steps, fastest, cpu_med, gflops, losses.front(), losses.back());

  if (c.profile > 0) {  // separate, instrumented steps
    g_prof.on = true;
    for (int s = 0; s < c.profile; ++s) train_step(m, opt, ids, targets, positions);
    g_prof.on = false;
    const double k = 1.0 / g_prof.steps;
    double fsum = 0, bsum = 0, fcsum = 0, bcsum = 0;
    std::printf("\nper-op time, ms/step (mean of %d instrumented steps; cpu = process CPU time)\n",
                g_prof.steps);
    std::printf("%-22s %9s %9s %9s %9s %6s\n", "op", "fwd", "bwd", "fwd cpu", "bwd cpu", "calls");
    for (const std::string& l : g_prof.order) {
      const OpStat& s = g_prof.stats[l];
      fsum += s.fwd_ms * k;
      bsum += s.bwd_ms * k;
      fcsum += s.fwd_cpu * k;
      bcsum += s.bwd_cpu * k;
      std::printf("%-22s %9.2f %9.2f %9.2f %9.2f %6lld\n", l.c_str(), s.fwd_ms * k, s.bwd_ms * k,
                  s.fwd_cpu * k, s.bwd_cpu * k, (long long)(s.fwd_calls / g_prof.steps));
    }
    std::printf("%-22s %9.2f %9.2f %9.2f %9.2f\n", "(engine, untimed glue)", g_prof.fwd_total * k - fsum,
                g_prof.bwd_total * k - bsum, g_prof.fwd_cpu * k - fcsum, g_prof.bwd_cpu * k - bcsum);
    std::printf("%-22s %9.2f %9.2f %9.2f %9.2f\n", "forward / backward", g_prof.fwd_total * k,
                g_prof.bwd_total * k, g_prof.fwd_cpu * k, g_prof.bwd_cpu * k);
    std::printf("%-22s %9.2f %9s %9.2f\n", "optimizer (AdamW)", g_prof.opt_total * k, "",
                g_prof.opt_cpu * k);
    std::printf("%-22s %9.2f\n", "zero_grad", g_prof.zero_total * k);
  }

  if (!c.json.empty()) {
    std::ofstream js(c.json);
    if (!js) throw Error("[bench_step] cannot write " + c.json);
    js.precision(10);
    js << "{\"impl\":\"ftune\",\"layers\":" << c.layers << ",\"d\":" << c.d << ",\"heads\":" << c.heads
       << ",\"kv_heads\":" << c.kv_heads << ",\"ffn\":" << c.ffn << ",\"seq\":" << c.seq
       << ",\"batch\":" << c.batch << ",\"vocab\":" << c.vocab << ",\"steps\":" << c.steps
       << ",\"warmup\":" << c.warmup << ",\"omp_threads\":" << omp_threads
       << ",\"blas_threads\":" << blas_threads << ",\"n_params\":" << n_params
       << ",\"n_matmul_params\":" << matmul_params(c) << ",\"flop_per_step\":" << flops
       << ",\"ms_per_step\":" << med << ",\"cpu_ms_per_step\":" << cpu_med
       << ",\"gflops\":" << gflops << ",\"ms_all\":[";
    for (size_t i = 0; i < times.size(); ++i) js << (i ? "," : "") << times[i];
    js << "],\"cpu_ms_all\":[";
    for (size_t i = 0; i < cpu_times.size(); ++i) js << (i ? "," : "") << cpu_times[i];
    js << "],\"losses\":[";
    for (size_t i = 0; i < losses.size(); ++i) js << (i ? "," : "") << losses[i];
    js << "]";
    if (g_prof.steps > 0) {
      const double k = 1.0 / g_prof.steps;
      js << ",\"profile\":{\"steps\":" << g_prof.steps << ",\"forward_ms\":" << g_prof.fwd_total * k
         << ",\"backward_ms\":" << g_prof.bwd_total * k << ",\"optimizer_ms\":" << g_prof.opt_total * k
         << ",\"zero_grad_ms\":" << g_prof.zero_total * k << ",\"forward_cpu_ms\":" << g_prof.fwd_cpu * k
         << ",\"backward_cpu_ms\":" << g_prof.bwd_cpu * k << ",\"optimizer_cpu_ms\":" << g_prof.opt_cpu * k
         << ",\"ops\":[";
      bool first = true;
      for (const std::string& l : g_prof.order) {
        const OpStat& s = g_prof.stats[l];
        js << (first ? "" : ",") << "{\"op\":\"" << json_escape(l) << "\",\"fwd_ms\":" << s.fwd_ms * k
           << ",\"bwd_ms\":" << s.bwd_ms * k << ",\"fwd_cpu_ms\":" << s.fwd_cpu * k
           << ",\"bwd_cpu_ms\":" << s.bwd_cpu * k << "}";
        first = false;
      }
      js << "]}";
    }
    js << "}\n";
  }
  return 0;
}

}  // namespace
}  // namespace ftune::bench

int main(int argc, char** argv) {
  try {
    return ftune::bench::run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_step: error: %s\n", e.what());
    return 1;
  }
}
