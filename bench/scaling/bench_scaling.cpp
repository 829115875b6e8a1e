// Distributed step benchmark (issue 5, "Scaling benchmark"; bench/scaling/run.sh drives it): one
// full fine-tuning step of a Llama-style Transformer on random tokens, laid out as tp x dp over the
// MPI world, as trainers/sft.cpp runs it: forward (forward_logits_shard + vocab-parallel
// cross-entropy when tp > 1), backward (the GradReducer's buckets all-reduce from the grad-ready
// hooks when dp > 1), reducer finish, global-norm clip, AdamW (ShardedAdamW with --zero 1).
//
// Per step: a world barrier, the step, a world barrier; the wall time between the barriers is the
// step time (so it includes waiting for the slowest rank). Communication time is what
// parallel::CommStats accounts on each rank: wall time inside MPI calls (blocking collectives,
// starting async ones, Work::wait/done), not communication that overlaps compute. The barrier
// after the step is not counted as communication.
//
// Rank 0 prints one JSON line. `--batch` is the batch of one replica (per dp rank; the tp ranks
// of a replica share it): DP weak scaling keeps it, TP strong scaling keeps it with tp = world.
//   mpirun -np N bench_scaling [--tp 1] [--zero 0] [--bucket-mb 25] [--layers 4 --d 256
//     --heads 8 --kv-heads 4 --ffn 688 --vocab 2048] [--seq 256] [--batch 4] [--steps 8]
//     [--warmup 2] [--clip 1.0]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/autograd.h"
#include "core/optim.h"
#include "core/rng.h"
#include "io/hf_config.h"
#include "models/transformer.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/tp_ops.h"

using namespace ftune;

namespace {

using clock_type = std::chrono::steady_clock;

double ms_since(clock_type::time_point t0) {
  return std::chrono::duration<double, std::milli>(clock_type::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t h = v.size() / 2;
  return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

struct Flags {
  int64_t tp = 1, zero = 0, layers = 4, d = 256, heads = 8, kv = 4, ffn = 688, vocab = 2048;
  int64_t seq = 256, batch = 4, steps = 8, warmup = 2;
  double bucket_mb = 25.0, clip = 1.0;
};

Flags parse(int argc, char** argv) {
  Flags f;
  std::map<std::string, int64_t*> ints = {
      {"--tp", &f.tp},       {"--zero", &f.zero},   {"--layers", &f.layers},
      {"--d", &f.d},         {"--heads", &f.heads}, {"--kv-heads", &f.kv},
      {"--ffn", &f.ffn},     {"--vocab", &f.vocab}, {"--seq", &f.seq},
      {"--batch", &f.batch}, {"--steps", &f.steps}, {"--warmup", &f.warmup}};
  std::map<std::string, double*> reals = {{"--bucket-mb", &f.bucket_mb}, {"--clip", &f.clip}};
  for (int i = 1; i < argc; i += 2) {
    std::string k = argv[i];
    if (i + 1 >= argc) throw std::runtime_error("option " + k + " needs a value");
    std::string v = argv[i + 1];
    if (auto it = ints.find(k); it != ints.end())
      *it->second = std::stoll(v);
    else if (auto jt = reals.find(k); jt != reals.end())
      *jt->second = std::stod(v);
    else
      throw std::runtime_error("unknown option " + k);
  }
  if (f.steps < 1 || f.warmup < 0 || f.batch < 1 || f.seq < 1)
    throw std::runtime_error("--steps, --batch, --seq must be >= 1 and --warmup >= 0");
  if (f.zero != 0 && f.zero != 1) throw std::runtime_error("--zero must be 0 or 1");
  if (f.zero == 1 && f.tp > 1) throw std::runtime_error("--zero 1 with --tp > 1 is not supported");
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  int rc = 0;
  try {
    const Flags f = parse(argc, argv);
    std::shared_ptr<parallel::Communicator> world = parallel::make_world_communicator();
    parallel::ProcessGrid grid = parallel::make_grid(world, int(f.tp));
    const bool root = world->rank() == 0;

    nlohmann::json cfg = {{"architectures", {"LlamaForCausalLM"}},
                          {"model_type", "llama"},
                          {"vocab_size", f.vocab},
                          {"hidden_size", f.d},
                          {"intermediate_size", f.ffn},
                          {"num_hidden_layers", f.layers},
                          {"num_attention_heads", f.heads},
                          {"num_key_value_heads", f.kv},
                          {"max_position_embeddings", std::max<int64_t>(f.seq, 512)},
                          {"rms_norm_eps", 1e-5},
                          {"tie_word_embeddings", true}};
    Transformer model(parse_hf_config(cfg, "bench_scaling"));
    model.init_random(1);  // the same weights on every rank (no broadcast needed)
    const int64_t n_params = model.num_parameters();
    if (grid.tp > 1) model.shard_for_tp(grid.tp_group);
    nn::NamedTensors trainable;
    for (auto& [n, t] : model.named_parameters())
      if (t.requires_grad()) trainable.emplace_back(n, t);
    std::vector<Tensor> params;
    for (auto& [n, t] : trainable) params.push_back(t);
    std::map<std::string, parallel::ShardInfo> shards;
    if (grid.tp > 1) shards = model.shard_infos();
    model.train();

    std::unique_ptr<parallel::GradReducer> reducer;
    if (grid.dp > 1 || f.zero == 1)
      reducer = std::make_unique<parallel::GradReducer>(
          params, grid.dp_group, parallel::ReducerOptions{f.bucket_mb, f.zero == 1});
    std::unique_ptr<optim::AdamW> opt;
    std::unique_ptr<parallel::ShardedAdamW> zopt;
    if (f.zero == 1)
      zopt = std::make_unique<parallel::ShardedAdamW>(optim::decay_groups(trainable, 0.01),
                                                      optim::AdamWOptions{}, *reducer);
    else
      opt = std::make_unique<optim::AdamW>(optim::decay_groups(trainable, 0.01),
                                           optim::AdamWOptions{});

    // Random tokens: one batch per replica (the tp ranks of a replica must see the same ids).
    Generator gen(1000 + uint64_t(grid.dp_rank));
    const int64_t V = model.config().vocab_size;
    Tensor ids = randint({f.batch, f.seq}, gen, 0, V, DType::i32);
    Tensor labels = randint({f.batch * f.seq}, gen, 0, V, DType::i64);
    // The trainer's loss: summed cross-entropy over the replica, scaled by 1 / global targets.
    const int64_t global_tokens = f.batch * f.seq * grid.dp;

    // Global gradient norm under TP: split parameters' squares summed over tp, replicated ones
    // counted once (as the trainer clips).
    auto clip = [&]() -> double {
      if (zopt) return zopt->clip_grad_norm(f.clip);
      if (grid.tp == 1) return optim::clip_grad_norm(params, f.clip);
      NoGradGuard ng;
      double split = 0, repl = 0;
      for (auto& [n, t] : trainable) {
        Tensor g = t.grad();
        if (!g.defined()) continue;
        double s = optim::grad_sum_squares({t});
        (shards.count(n) ? split : repl) += s;
      }
      double norm = std::sqrt(grid.tp_group->all_reduce_scalar(split) + repl);
      if (norm > f.clip) {
        const double scale = f.clip / (norm + 1e-6);
        for (auto& t : params)
          if (t.grad().defined()) {
            Tensor g = t.grad();
            ops::mul_(g, scale);
          }
      }
      return norm;
    };

    parallel::set_comm_stats_enabled(true);
    std::vector<double> step_ms, comm_ms, fwd_ms, bwd_ms, finish_ms, opt_ms;
    int64_t comm_bytes = 0, comm_calls = 0;
    double loss = 0;
    for (int64_t s = 0; s < f.warmup + f.steps; ++s) {
      world->barrier();
      parallel::reset_comm_stats();
      auto t0 = clock_type::now();
      Tensor ce;
      if (grid.tp == 1) {
        Tensor logits = model.forward(ids);
        ce = ops::cross_entropy(logits.view({f.batch * f.seq, V}), labels, -100,
                                ops::Reduction::sum);
      } else {
        Tensor shard = model.forward_logits_shard(ids);
        ce = parallel::vocab_parallel_cross_entropy(shard.view({-1, shard.size(-1)}), labels,
                                                    grid.tp_group, -100, ops::Reduction::sum);
      }
      loss = ce.item();  // the trainer reads it back (NaN guard)
      if (!std::isfinite(loss)) throw std::runtime_error("non-finite loss");
      const double t_fwd = ms_since(t0);
      ops::mul_scalar(ce, 1.0 / double(global_tokens)).backward();
      const double t_bwd = ms_since(t0);
      if (reducer) reducer->finish();
      const double t_fin = ms_since(t0);
      clip();
      if (zopt) {
        zopt->step();
        zopt->zero_grad();
      } else {
        opt->step();
        opt->zero_grad();
      }
      const double t_opt = ms_since(t0);
      const parallel::CommStats cs = parallel::comm_stats();  // before the closing barrier
      world->barrier();
      const double t_step = ms_since(t0);
      if (s < f.warmup) continue;
      step_ms.push_back(t_step);
      comm_ms.push_back(cs.seconds * 1e3);
      fwd_ms.push_back(t_fwd);
      bwd_ms.push_back(t_bwd - t_fwd);
      finish_ms.push_back(t_fin - t_bwd);
      opt_ms.push_back(t_opt - t_fin);
      comm_bytes = cs.bytes;
      comm_calls = cs.calls;
    }
    parallel::set_comm_stats_enabled(false);

    // Across ranks: the mean and the max of each rank's communication time, step by step.
    const int64_t n = f.steps;
    Tensor cm = Tensor::from_vector<double>(comm_ms, {n});
    Tensor cx = cm.clone();
    world->all_reduce(cm, parallel::ReduceOp::sum);
    world->all_reduce(cx, parallel::ReduceOp::max);
    std::vector<double> comm_mean(static_cast<size_t>(n)), comm_max(comm_mean), frac(comm_mean);
    for (int64_t i = 0; i < n; ++i) {
      comm_mean[size_t(i)] = cm.data<double>()[i] / double(world->size());
      comm_max[size_t(i)] = cx.data<double>()[i];
      frac[size_t(i)] = comm_mean[size_t(i)] / step_ms[size_t(i)];
    }
    // The step time is the same on every rank (barriers); rank 0's is reported.
    const double step = median(step_ms);
    if (root) {
      const double tps = double(global_tokens) / (step / 1e3);
      nlohmann::json out = {{"world", world->size()},
                            {"tp", grid.tp},
                            {"dp", grid.dp},
                            {"zero", f.zero},
                            {"bucket_mb", f.bucket_mb},
                            {"buckets", reducer ? int64_t(reducer->num_buckets()) : 0},
                            {"omp_threads", omp_get_max_threads()},
                            {"layers", f.layers},
                            {"d", f.d},
                            {"heads", f.heads},
                            {"kv_heads", f.kv},
                            {"ffn", f.ffn},
                            {"vocab", f.vocab},
                            {"params", n_params},
                            {"seq", f.seq},
                            {"batch_per_replica", f.batch},
                            {"global_tokens", global_tokens},
                            {"steps", f.steps},
                            {"step_ms", step},
                            {"step_ms_min", *std::min_element(step_ms.begin(), step_ms.end())},
                            {"tokens_per_s", tps},
                            {"tokens_per_s_per_rank", tps / double(world->size())},
                            {"comm_ms", median(comm_mean)},
                            {"comm_ms_max_rank", median(comm_max)},
                            {"comm_frac", median(frac)},
                            {"comm_mib_per_step_rank0", double(comm_bytes) / (1024.0 * 1024.0)},
                            {"collectives_per_step_rank0", comm_calls},
                            {"rank0_fwd_ms", median(fwd_ms)},
                            {"rank0_bwd_ms", median(bwd_ms)},
                            {"rank0_finish_ms", median(finish_ms)},
                            {"rank0_opt_ms", median(opt_ms)},
                            {"loss", loss / double(f.batch * f.seq)}};
      std::printf("%s\n", out.dump().c_str());
      std::fflush(stdout);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_scaling: %s\n", e.what());
    parallel::abort_job(1);
    rc = 1;
  }
  return rc;
}
