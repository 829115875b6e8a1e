#include "trainers/sft.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <ostream>
#include <sstream>

#include "core/allocator.h"
#include "core/autograd.h"
#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/optim.h"
#include "data/chat_template.h"
#include "data/sft_dataset.h"
#include "data/tokenizer.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "models/generate.h"
#include "models/lora.h"
#include "models/transformer.h"
#include "parallel/checkpoint_io.h"
#include "parallel/communicator.h"
#include "parallel/data_parallel.h"
#include "parallel/nccl/nccl_communicator.h"
#include "parallel/tp_ops.h"
#include "trainers/loss_scaler.h"

namespace ftune {

namespace fs = std::filesystem;

namespace {

// Resident and peak resident set of this process, in MiB (Linux /proc; 0 elsewhere).
std::pair<double, double> rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  double rss = 0, hwm = 0;
  while (std::getline(f, line)) {
    if (line.rfind("VmRSS:", 0) == 0) rss = std::stod(line.substr(6)) / 1024.0;
    if (line.rfind("VmHWM:", 0) == 0) hwm = std::stod(line.substr(6)) / 1024.0;
  }
  return {rss, hwm};
}

// A 64-bit mix of (seed, a, b): the LoRA dropout seed of micro-batch b of step a. Derived from the
// step, so a resumed run draws the same masks as an uninterrupted one.
uint64_t mix_seed(uint64_t seed, uint64_t a, uint64_t b) {
  uint64_t x = seed ^ (a * 0x9E3779B97F4A7C15ull) ^ (b * 0xC2B2AE3D27D4EB4Full);
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDull;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ull;
  return x ^ (x >> 33);
}

std::string fmt_num(const char* f, double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, f, v);
  return buf;
}

LoraOptions lora_options(const LoraSection& s, uint64_t seed) {
  LoraOptions o;
  o.r = s.r;
  o.alpha = s.alpha;
  o.dropout = s.dropout;
  o.use_rslora = s.use_rslora;
  o.target_modules = s.target_modules;
  o.seed = seed;
  return o;
}

}  // namespace

namespace {
// "0.42 s" for the log.
std::string fmt_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f s", s);
  return buf;
}
}  // namespace

struct SftTrainer::Impl {
  SftConfig cfg;
  std::ostream null_log{nullptr};  // ranks other than 0 print nothing
  std::shared_ptr<parallel::Communicator> world;
  bool is_root = true;  // world rank 0: prints, writes metrics and checkpoints
  std::ostream& log;
  Tokenizer tok;
  parallel::ProcessGrid grid;
  int dp = 1, dp_rank = 0;
  std::unique_ptr<parallel::GradReducer> reducer;     // dp > 1 or ZeRO-1
  std::map<std::string, parallel::ShardInfo> shards;  // tp > 1: the split parameters
  std::unique_ptr<parallel::ShardedAdamW> zopt;       // ZeRO-1 (then `opt` is null)
  std::optional<ChatTemplate> chat;
  std::unique_ptr<Transformer> model;
  Device device = Device::cpu();      // where the model trains
  DType param_dtype = DType::f32;     // the parameters' and activations' dtype
  bool lora = false;
  nn::NamedTensors trainable;
  std::unique_ptr<optim::AdamW> opt;
  std::unique_ptr<optim::LRSchedule> sched;
  std::unique_ptr<SftLoader> train_loader;
  std::vector<SftExample> val_examples;
  int32_t pad_id = 0;
  int64_t total_steps = 0;
  std::unique_ptr<LossScaler> scaler;  // loss scaling on (cfg.loss_scale, resolved)
  nlohmann::json resumed_trainer_state;  // the checkpoint's trainer_state after a resume

  // Progress: all of it saved in checkpoints.
  int64_t step = 0;
  int64_t skipped = 0;
  int64_t consecutive_bad = 0;
  double best_eval = INFINITY;
  int64_t evals_without_improvement = 0;
  int64_t tokens_seen = 0;
  std::string last_ckpt;
  int64_t last_saved_step = -1;
  bool stopped_early = false;
  int64_t overflow_steps = 0;  // steps skipped for a gradient overflow of the dynamic loss scale

  Impl(SftConfig c, std::ostream& l, std::shared_ptr<parallel::Communicator> w)
      : cfg(std::move(c)),
        world(w ? std::move(w) : parallel::make_world_communicator("auto")),
        is_root(world->rank() == 0),
        log(is_root ? l : null_log),
        tok(load_tokenizer(cfg)) {}

  static Tokenizer load_tokenizer(const SftConfig& cfg) {
    std::string p = cfg.tokenizer.path.empty() ? cfg.model.path : cfg.tokenizer.path;
    return fs::is_directory(p) ? Tokenizer::from_folder(p) : Tokenizer::from_file(p);
  }

  fs::path out() const { return fs::path(cfg.output_dir); }
  fs::path metrics_path() const { return out() / "metrics.jsonl"; }

  void setup() {
    // ZeRO-1's gradient shards keep the parameters' dtype, and the loss scale is divided out in
    // place: in f16 the small gradients would flush to zero (plain DP widens them to f32 first).
    FTUNE_CHECK(cfg.parallel.zero == 0 || cfg.dtype != "f16", "[sft] ", cfg.recipe_file,
                ": dtype f16 with parallel.zero: 1 is not supported yet (the f16 gradient shards "
                "would underflow when the loss scale is divided out); use bf16, or zero: 0");
    if (cfg.device == "cpu") {
      FTUNE_CHECK(cfg.dtype == "f32", "[sft] ", cfg.recipe_file, ": dtype ", cfg.dtype,
                  " needs device: cuda (the CPU trains in f32)");
    } else {
      FTUNE_CHECK(cuda_available(), "[sft] ", cfg.recipe_file, ": device ", cfg.device,
                  " but no GPU is usable here",
#ifdef FTUNE_HAVE_CUDA
                  " (CUDA found no device)"
#else
                  " (ftune was built without CUDA: FTUNE_CUDA=OFF)"
#endif
      );
      int idx = 0;
      if (cfg.device == "cuda") {
        idx = cuda::select_device_for_local_rank();  // one GPU per local rank
      } else {
        idx = std::stoi(cfg.device.substr(5));
        FTUNE_CHECK(idx < cuda_device_count(), "[sft] ", cfg.recipe_file, ": device ", cfg.device,
                    " but this machine has ", cuda_device_count(), " GPU(s)");
        cuda::set_device(idx);
      }
      device = Device::cuda(idx);
      cuda::set_allow_tf32(cfg.allow_tf32);
      if (cfg.gemm_autotune) cuda::set_gemm_autotune(true);  // else FTUNE_GEMM_AUTOTUNE's default
      ops::set_attention_backend(cfg.attention.backend);  // throws clearly without cuDNN
    }
    param_dtype = cfg.dtype == "bf16" ? DType::bf16 : cfg.dtype == "f16" ? DType::f16 : DType::f32;
    setup_loss_scaler();
    grid = parallel::make_grid(world, int(cfg.parallel.tp));
    dp = grid.dp;
    dp_rank = grid.dp_rank;
    FTUNE_CHECK(cfg.parallel.dp == 0 || cfg.parallel.dp == dp, "[sft] ", cfg.recipe_file,
                ": parallel.dp = ", cfg.parallel.dp, " but the job has ", world->size(),
                " ranks and tp = ", grid.tp, ", so dp = ", dp,
                " (leave parallel.dp out: it is derived)");
    FTUNE_CHECK(cfg.parallel.zero == 0 || cfg.parallel.zero == 1,
                "[sft] parallel.zero must be 0 "
                "or 1, got ",
                cfg.parallel.zero);

    if (cfg.parallel.backend == "nccl") {
      FTUNE_CHECK(parallel::nccl_support(), "[sft] ", cfg.recipe_file,
                  ": parallel.backend: nccl, but this build has no NCCL (FTUNE_CUDA=ON and NCCL "
                  "at configure time)");
      FTUNE_CHECK(device.is_cuda(), "[sft] ", cfg.recipe_file,
                  ": parallel.backend: nccl needs device: cuda (NCCL reduces GPU tensors)");
#ifdef FTUNE_HAVE_NCCL
      // Tensor parallel: the activations' all-reduces (two per block forward, two backward) and
      // the vocab-parallel loss's gather go through NCCL on the GPU, not through host memory.
      // Bootstrapped over the MPI tp group; every tp rank makes it here (a collective). With dp > 1
      // the dp group's NCCL communicator (below) runs beside it, the gradient buckets' all-reduces
      // overlapping the backward's tp all-reduces: NCCL allows that when every rank issues the
      // collectives of both in the same order, which holds because every rank runs the same
      // graph and the buckets fire from the same gradient-ready hooks (untested: no multi-GPU
      // machine here, docs/distributed.md "NCCL").
      if (grid.tp > 1)
        grid.tp_group = parallel::make_nccl_communicator(grid.tp_group, device.index);
#endif
    }
    fs::create_directories(out());

    // Chat template: the recipe's name, else the tokenizer's, else none (text formats only).
    const std::string& ct = cfg.tokenizer.chat_template;
    if (!ct.empty() && ct != "auto") {
      chat = ChatTemplate::by_name(ct, tok.config());
    } else if (!tok.config().chat_template.empty()) {
      chat = ChatTemplate::from_config(tok.config());
    }
    pad_id = tok.pad_id().value_or(tok.eos_id().value_or(0));

    HfConfigOptions hopt;
    hopt.max_seq_len = cfg.tokenizer.max_seq_len;
    if (cfg.model.init == "random") {
      ModelConfig mc = load_hf_config((fs::path(cfg.model.path) / "config.json").string(), hopt);
      model = std::make_unique<Transformer>(mc);
      model->init_random(cfg.seed, cfg.model.init_std);
      // Tensor parallel: every rank initialised the full model; it keeps its slices (parameter
      // names stay the HF names; shard_infos() says where each slice sits in the full tensor).
      if (grid.tp > 1) model->shard_for_tp(grid.tp_group);
    } else if (grid.tp > 1) {
      // Each tp rank reads only its slices from the safetensors files.
      model = Transformer::from_pretrained_sharded(cfg.model.path, grid.tp_group, hopt);
    } else {
      model = Transformer::from_pretrained(cfg.model.path, hopt);
    }
    FTUNE_CHECK(tok.vocab_size() <= model->config().vocab_size, "[sft] the tokenizer of ",
                tok.source(), " has ", tok.vocab_size(),
                " tokens, more than the model's vocab_size ", model->config().vocab_size);

    lora = cfg.lora.enabled;
    if (lora) apply_lora(*model, lora_options(cfg.lora, cfg.seed));
    // Onto the GPU in the training dtype (adapters included; AdamW keeps f32 masters of 16-bit
    // parameters). The trainable list is taken after: the move replaces the tensors.
    if (device.is_cuda() || param_dtype != DType::f32) {
      const bool fused = model->fused_qkv();
      model->to_(device, param_dtype);
      // Batched q/k/v: fuse the moved weights now, so the host buffer of the old ones is freed
      // here rather than at the first forward.
      if (fused) model->set_fused_qkv(true);
    }
    model->set_activation_checkpointing(cfg.enable_activation_checkpointing);
    if (lora) {
      trainable = lora_parameters(*model);
    } else {
      for (auto& [name, t] : model->named_parameters())
        if (t.requires_grad()) trainable.emplace_back(name, t);
    }
    if (grid.tp > 1) shards = model->shard_infos();  // adapters included
    model->train();

    // Data.
    SftDatasetOptions dopt;
    dopt.format = sft_format_from_name(cfg.dataset.format);
    dopt.train_on_input = cfg.dataset.train_on_input;
    dopt.max_seq_len = cfg.tokenizer.max_seq_len;
    dopt.truncation = cfg.dataset.truncation;
    dopt.chat_template = (ct == "auto") ? "" : ct;
    SftDataStats st;
    std::vector<SftExample> train = load_sft_jsonl(cfg.dataset.path, tok, dopt, &st);
    if (!cfg.dataset.val_path.empty()) {
      SftDataStats vst;
      val_examples = load_sft_jsonl(cfg.dataset.val_path, tok, dopt, &vst);
      FTUNE_CHECK(!val_examples.empty(), "[sft] ", cfg.dataset.val_path, ": no held-out examples (",
                  vst.lines, " lines, ", vst.dropped, " dropped by truncation: drop, ",
                  vst.no_targets, " with no target token left after truncation)");
    } else if (cfg.dataset.val_size > 0) {
      auto [tr, va] = split_holdout(std::move(train), cfg.dataset.val_size, cfg.seed);
      train = std::move(tr);
      val_examples = std::move(va);
    }
    FTUNE_CHECK(!train.empty(), "[sft] ", cfg.dataset.path, ": no training examples (", st.lines,
                " lines, ", st.dropped, " dropped by truncation: drop, ", st.no_targets,
                " with no target token left after truncation)");
    log << "data: " << train.size() << " train examples (" << st.target_tokens
        << " target tokens in the file, " << st.truncated << " truncated, " << st.dropped
        << " dropped, " << st.no_targets << " without targets), " << val_examples.size()
        << " held out\n";

    SftLoaderOptions lopt;
    lopt.batch_size = cfg.batch_size;
    lopt.max_seq_len = cfg.tokenizer.max_seq_len;
    lopt.packed = cfg.dataset.packed;
    lopt.shuffle = cfg.dataset.shuffle;
    lopt.seed = cfg.seed;
    lopt.pad_id = pad_id;
    lopt.rank = dp_rank;  // rank r takes batches r, r + dp, ...: a disjoint shard per replica
    lopt.world_size = dp;
    train_loader = std::make_unique<SftLoader>(std::move(train), lopt);
    int64_t per_epoch = train_loader->batches_per_epoch();
    FTUNE_CHECK(per_epoch > 0, "[sft] ", cfg.dataset.path, ": no full batch of ", cfg.batch_size,
                " in the training split");
    int64_t accum = cfg.gradient_accumulation_steps;
    total_steps = cfg.max_steps > 0 ? cfg.max_steps : (cfg.epochs * per_epoch + accum - 1) / accum;
    FTUNE_CHECK(total_steps > 0, "[sft] nothing to train: max_steps and epochs give 0 steps");

    // Optimizer: decay on matrices only.
    optim::AdamWOptions o;
    o.lr = cfg.optimizer.lr;
    o.beta1 = cfg.optimizer.beta1;
    o.beta2 = cfg.optimizer.beta2;
    o.eps = cfg.optimizer.eps;
    o.weight_decay = cfg.optimizer.weight_decay;
    // Every replica starts from rank 0's trainable weights (random init and LoRA are seeded, but
    // the broadcast does not rely on that). Frozen base weights come from the same files.
    for (auto& [n, t] : trainable) grid.dp_group->broadcast(t, 0);
    if (dp > 1 || cfg.parallel.zero == 1) {
      std::vector<Tensor> ps;
      for (auto& [n, t] : trainable) ps.push_back(t);
      // parallel.backend: nccl: the reducer's buckets live on the parameters' device (the GPU),
      // so the NCCL communicator reduces them in place; its CPU flags go through the GPU.
      std::shared_ptr<parallel::Communicator> grad_comm = grid.dp_group;
#ifdef FTUNE_HAVE_NCCL
      if (cfg.parallel.backend == "nccl")
        grad_comm = parallel::make_nccl_communicator(grid.dp_group, device.index);
#endif
      reducer = std::make_unique<parallel::GradReducer>(
          ps, grad_comm,
          parallel::ReducerOptions{cfg.parallel.bucket_mb, cfg.parallel.zero == 1});
    }
    if (cfg.parallel.zero == 1) {
      zopt = std::make_unique<parallel::ShardedAdamW>(
          optim::decay_groups(trainable, o.weight_decay), o, *reducer);
    } else {
      opt = std::make_unique<optim::AdamW>(optim::decay_groups(trainable, o.weight_decay), o);
    }
    sched = std::make_unique<optim::LRSchedule>(
        optim::schedule_kind_from_name(cfg.lr_scheduler.name), cfg.optimizer.lr,
        cfg.lr_scheduler.num_warmup_steps, total_steps, cfg.lr_scheduler.min_lr_ratio);

    int64_t n_train = 0;
    for (auto& [n, t] : trainable) n_train += t.numel();
    log << "model: " << model->config().architecture << ", " << model->num_parameters()
        << " parameters, " << n_train << " trainable" << (lora ? " (LoRA)" : "") << "\n";
    if (world->size() > 1 || reducer) {
      log << "parallel: " << world->size() << " ranks, dp " << dp << ", tp " << grid.tp << ", zero "
          << cfg.parallel.zero << ", " << (reducer ? reducer->num_buckets() : 0)
          << " gradient buckets over " << (reducer ? reducer->comm().backend() : "none")
          << " (bucket_mb " << cfg.parallel.bucket_mb << "); global batch "
          << cfg.batch_size * accum * dp << " = batch_size " << cfg.batch_size << " x accumulation "
          << accum << " x dp " << dp << "\n";
    }
    log << "steps: " << total_steps << " (" << per_epoch << " micro-batches per epoch, " << accum
        << " per step)\n";
    if (world->backend() == "mpi")  // how GPU tensors reach MPI (docs/distributed.md)
      log << "mpi: " << parallel::mpi_cuda_aware().reason << "\n";

    if (cfg.resume) {
      restore();
      recount_total_steps();
    } else {
      FTUNE_CHECK(list_checkpoints(out().string()).empty(), "[sft] ", out().string(),
                  " already holds checkpoints of an earlier run: set resume: true to continue "
                  "it, or choose another output_dir");
    }
    if (step == 0 && is_root) {
      std::ofstream(metrics_path(), std::ios::trunc);  // a fresh run starts a fresh log
    }
  }

  // loss_scale "auto": dynamic for f16 (its gradients underflow without), none for f32 and bf16
  // (which then train exactly as without a scaler).
  void setup_loss_scaler() {
    const std::string mode = cfg.loss_scale != "auto" ? cfg.loss_scale
                             : cfg.dtype == "f16"     ? std::string("dynamic")
                                                      : std::string("none");
    FTUNE_CHECK(mode == "dynamic" || mode == "fixed" || mode == "none", "[sft] ", cfg.recipe_file,
                ": loss_scale must be auto, dynamic, fixed or none, got ", cfg.loss_scale);
    if (mode == "none") return;
    LossScalerOptions o;
    o.init_scale = cfg.loss_scale_init;
    o.growth_interval = cfg.loss_scale_growth_interval;
    o.dynamic = mode == "dynamic";
    try {
      scaler = std::make_unique<LossScaler>(o);
    } catch (const Error& e) {
      FTUNE_THROW("[sft] ", cfg.recipe_file, ": ", e.what());
    }
    log << "loss scaling: " << mode << ", scale " << o.init_scale
        << (o.dynamic ? ", growth_interval " + std::to_string(o.growth_interval) : std::string())
        << "\n";
  }

  // Divides the reduced gradients by the loss scale; true (on every rank) when one of them is
  // inf or NaN on some rank: tp ranks hold other slices and ZeRO-1 ranks other shards.
  bool unscale_all_ranks(double scale, const std::vector<Tensor>& params) {
    bool found = false;
    if (zopt) {
      std::vector<Tensor> bufs;
      if (reducer->reduced())
        for (size_t b = 0; b < reducer->num_buckets(); ++b) bufs.push_back(reducer->grad_shard(b));
      found = unscale_buffers(bufs, scale);
    } else {
      found = unscale_grads(params, scale);
    }
    if (world->size() > 1)
      found = world->all_reduce_int(found ? 1 : 0, parallel::ReduceOp::max) != 0;
    return found;
  }

  // ---------------------------------------------------------------- checkpoints
  // Collective under ZeRO-1 (the optimizer state is gathered to full shapes of this rank's
  // parameters). With `gather`, tp-split tensors are gathered to full shapes too (collective);
  // without, they stay this rank's slices (for the sharded save). With `zero_flat` (ZeRO-1), the
  // optimizer state stays this rank's flat shards, their offsets in *zero_flat (no collective).
  Checkpoint make_checkpoint(bool gather = true, std::vector<int64_t>* zero_flat = nullptr) {
    Checkpoint c;
    c.step = step;
    c.epoch = train_loader->epoch();
    c.adapter_only = lora;
    c.model = lora ? lora_parameters(*model) : model->named_parameters();
    if (zopt && zero_flat) {
      parallel::ShardedAdamW::LocalState ls = zopt->export_local_state();
      c.optimizer = std::move(ls.state);
      *zero_flat = std::move(ls.flat_offset);
    } else {
      c.optimizer = zopt ? zopt->export_state() : opt->export_state();
    }
    // Full shapes (tp > 1 with `gather`): the file does not depend on the layout. Gathered where
    // the tensors are (on the GPU a NCCL tp group gathers them in place), one at a time, then
    // copied to host memory, from which the file is written.
    const bool tp_gather = grid.tp > 1 && gather;
    for (auto& [n, t] : c.model) {
      if (tp_gather) t = gather_if_split(n, t);
      if (device.is_cuda()) t = t.detach().to(Device::cpu());
    }
    for (auto& [n, t] : c.optimizer.tensors) {
      if (tp_gather) t = gather_if_split(param_of_state(n), t);
      if (device.is_cuda()) t = t.detach().to(Device::cpu());
    }
    c.trainer_state = {
        {"sampler", train_loader->state()},
        {"skipped_steps", skipped},
        {"consecutive_bad_steps", consecutive_bad},
        {"best_eval_loss",
         std::isfinite(best_eval) ? nlohmann::json(best_eval) : nlohmann::json(nullptr)},
        {"evals_without_improvement", evals_without_improvement},
        {"tokens_seen", tokens_seen},
        {"early_stopped", stopped_early},
        {"total_steps", total_steps},
        {"seed", cfg.seed},
        {"parallel", {{"dp", dp}, {"tp", grid.tp}, {"zero", cfg.parallel.zero}}},
        {"tokenizer_path",
         fs::absolute(cfg.tokenizer.path.empty() ? cfg.model.path : cfg.tokenizer.path)
             .lexically_normal()
             .string()}};
    c.trainer_state["overflow_steps"] = overflow_steps;
    if (scaler) c.trainer_state["loss_scaler"] = scaler->state();
    c.recipe_yaml = cfg.resolved_yaml;
    c.model_config = model->config().to_json();
    if (lora) {
      const LoraSection& s = cfg.lora;
      c.adapter_config = {{"r", s.r},
                          {"alpha", s.alpha},
                          {"dropout", s.dropout},
                          {"use_rslora", s.use_rslora},
                          {"target_modules", s.target_modules},
                          {"base_model", fs::absolute(cfg.model.path).lexically_normal().string()}};
    } else {
      c.adapter_config = nullptr;
    }
    return c;
  }

  // "<param>.exp_avg" -> "<param>" (the optimizer state is named after its parameter).
  static std::string param_of_state(const std::string& n) {
    size_t dot = n.rfind('.');
    return dot == std::string::npos ? n : n.substr(0, dot);
  }
  Tensor gather_if_split(const std::string& param, const Tensor& t) const {
    auto it = shards.find(param);
    if (it == shards.end() || it->second.dim < 0 || t.dim() == 0) return t;
    return parallel::gather_shards(t.contiguous(), it->second, grid.tp_group);
  }
  // Where this rank's part of the checkpoint tensor "model/<n>" or "optimizer/<n>" lies in the
  // full tensor (shape `full`): nullopt when not split (the parameter is replicated over tp).
  std::optional<TensorSlice> tp_slice_of(const std::string& path, const Shape& full) const {
    const size_t slash = path.find('/');
    const std::string n = path.substr(slash + 1);
    const std::string param = path.compare(0, slash, "model") == 0 ? n : param_of_state(n);
    auto it = shards.find(param);
    if (it == shards.end() || it->second.dim < 0 || full.empty()) return std::nullopt;
    const parallel::ShardInfo& si = it->second;
    FTUNE_CHECK(int64_t(full.size()) > si.dim && full[size_t(si.dim)] == si.full_size,
                "[sft] checkpoint tensor ", path, " is ", shape_str(full), ", but the model splits ",
                si.full_size, " along dimension ", si.dim);
    TensorSlice s;
    s.name = path;
    s.dim = si.dim;
    s.offset = si.offset;
    s.count = si.size;
    s.blocks = si.blocks;
    s.full_shape = full;
    return s;
  }

  // Tensor parallel or ZeRO-1, over MPI with parallel HDF5: every rank writes its own slices of
  // the full-shape tensors (tp slices; ZeRO-1's flat shards of the AdamW state) into the one file,
  // and no rank gathers anything. Otherwise (dp only: every replica holds everything; or no
  // MPI-IO) rank 0 writes what make_checkpoint gathered.
  // FTUNE_SHARDED_CHECKPOINT=0 falls back to the gathered save (e.g. a shared file system whose
  // MPI-IO locking misbehaves); the file is the same either way.
  bool sharded_save() const {
    const char* env = std::getenv("FTUNE_SHARDED_CHECKPOINT");
    if (env && std::string(env) == "0") return false;
    return world->size() > 1 && (grid.tp > 1 || zopt) && world->backend() == "mpi" &&
           sharded_checkpoint_support();
  }
  void save_sharded(const std::string& path) {
    std::vector<int64_t> zero_flat;
    Checkpoint c = make_checkpoint(false, &zero_flat);
    std::map<std::string, Shape> param_shape;  // this rank's (tp-local) parameter shapes
    for (const auto& [n, t] : trainable) param_shape[n] = t.shape();
    std::vector<TensorSlice> slices;
    const int64_t nw = world->size();
    int64_t k = 0;  // spreads the writes: tensor k by world rank k % nw, or by dp rank k % dp
    auto add = [&](const char* group, const nn::NamedTensors& ts) {
      for (size_t i = 0; i < ts.size(); ++i) {
        const auto& [n, t] = ts[i];
        const bool model_group = std::string(group) == "model";
        const std::string param = model_group ? n : param_of_state(n);
        const std::string path_in_file = std::string(group) + "/" + n;
        const bool flat = !model_group && !zero_flat.empty() && zero_flat[i] >= 0;
        const Shape local = flat ? param_shape.at(param) : t.shape();
        auto it = shards.find(param);
        TensorSlice s;
        if (it == shards.end() || it->second.dim < 0 || local.empty()) {
          s.name = path_in_file;
          s.dim = -1;
          s.full_shape = local;
          // A flat ZeRO shard of a tp-replicated tensor: the dp group of one tp rank writes it.
          s.write = flat ? grid.tp_rank == k % grid.tp : world->rank() == k % nw;
        } else {
          Shape full = local;
          full[size_t(it->second.dim)] = it->second.full_size;
          s = *tp_slice_of(path_in_file, full);
          s.write = flat || grid.dp_rank == k % dp;  // one replica of this tp slice writes it
        }
        if (flat) {
          s.flat_offset = zero_flat[i];
          s.flat_count = t.numel();
        }
        ++k;
        slices.push_back(std::move(s));
      }
    };
    add("model", c.model);
    add("optimizer", c.optimizer.tensors);
    parallel::save_checkpoint_parallel(path, c, slices, *world);
  }

  void save() {
    if (!checkpoint_support()) {  // the minimal build: train, but say that nothing is saved
      if (last_saved_step < 0)
        log << "warning: this build has no HDF5: no checkpoints are written (rebuild with "
               "FTUNE_HDF5=ON)\n";
      last_saved_step = step;
      return;
    }
    fs::path p = out() / checkpoint_file_name(step);
    const auto t0 = std::chrono::steady_clock::now();
    auto seconds = [&] {
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    };
    if (sharded_save()) {  // collective; the file is in place on return
      save_sharded(p.string());
      if (is_root) {
        const double s = seconds();
        prune_checkpoints(out().string(), cfg.keep_last_n);
        log << "checkpoint: " << p.string() << " (sharded: " << world->size()
            << " ranks wrote their slices; " << fmt_seconds(s) << ")\n";
      }
    } else {
      Checkpoint c = make_checkpoint();  // every rank (gathers what is sharded)
      if (is_root) {  // the weights are replicated now: rank 0 writes the whole file
        save_checkpoint(p.string(), c);
        const double s = seconds();
        prune_checkpoints(out().string(), cfg.keep_last_n);
        log << "checkpoint: " << p.string() << " (" << fmt_seconds(s) << ")\n";
      }
    }
    world->barrier();  // the file is complete (renamed) before any rank goes on
    last_ckpt = p.string();
    last_saved_step = step;
  }

  void restore() {
    FTUNE_CHECK(checkpoint_support(),
                "[sft] resume: true needs checkpoints, and this build has "
                "no HDF5 (rebuild with FTUNE_HDF5=ON)");
    std::optional<std::string> latest = latest_valid_checkpoint(out().string());
    // Every rank reads the checkpoint itself (output_dir must be on a shared file system): they
    // must all have found the same one.
    int64_t found = -1;
    for (auto& [st, path] : list_checkpoints(out().string()))
      if (latest && path == *latest) found = st;
    const int64_t found_max = world->all_reduce_int(found, parallel::ReduceOp::max);
    const int64_t found_min = world->all_reduce_int(found, parallel::ReduceOp::min);
    FTUNE_CHECK(found_max == found_min,
                "[sft] resume: the ranks found different latest checkpoints in ", out().string(),
                " (rank ", world->rank(), ": ", latest ? *latest : std::string("none"),
                "); output_dir must be one directory shared by every rank");
    if (!latest) {
      log << "resume: no checkpoint in " << out().string() << ", starting from step 0\n";
      return;
    }
    // Under tp each rank reads only its slices of the split tensors, and under ZeRO-1 only its
    // flat shards of the AdamW state (where they lie: this rank's optimizer, as export_local_state
    // names them), whatever layout wrote the file.
    std::map<std::string, std::pair<int64_t, int64_t>> zero_range;  // name -> (flat offset, count)
    if (zopt) {
      parallel::ShardedAdamW::LocalState mine = zopt->export_local_state();
      for (size_t i = 0; i < mine.state.tensors.size(); ++i)
        if (mine.flat_offset[i] >= 0)
          zero_range[mine.state.tensors[i].first] = {mine.flat_offset[i],
                                                     mine.state.tensors[i].second.numel()};
    }
    auto slice_of = [&](const std::string& n, const Shape& full) -> std::optional<TensorSlice> {
      std::optional<TensorSlice> s = tp_slice_of(n, full);
      if (!zopt || n.rfind("optimizer/", 0) != 0 || full.empty()) return s;
      const std::string name = n.substr(10);
      auto it = zero_range.find(name);
      const bool master = name.size() > 7 && name.compare(name.size() - 7, 7, ".master") == 0;
      if (it == zero_range.end() && !master) return s;  // not sharded: whole (import checks it)
      if (!s) {
        s = TensorSlice{};
        s->name = n;
        s->dim = -1;
        s->full_shape = full;
      }
      // A master this run keeps none of (f32 parameters): nothing to read.
      s->flat_offset = it == zero_range.end() ? 0 : it->second.first;
      s->flat_count = it == zero_range.end() ? 0 : it->second.second;
      return s;
    };
    Checkpoint c = grid.tp > 1 || zopt ? load_checkpoint_sharded(*latest, slice_of)
                                       : load_checkpoint(*latest);
    FTUNE_CHECK(c.adapter_only == lora, "[sft] resume: ", *latest, " holds ",
                c.adapter_only ? "a LoRA adapter" : "full weights", " but the recipe ",
                lora ? "uses LoRA" : "does full fine-tuning");
    FTUNE_CHECK(c.model_config == model->config().to_json(), "[sft] resume: ", *latest,
                " was written for another model config than ", cfg.model.path);
    if (lora && c.adapter_config.is_object()) {
      const nlohmann::json& ac = c.adapter_config;
      const LoraSection& s = cfg.lora;
      FTUNE_CHECK(ac.value("r", int64_t(-1)) == s.r && ac.value("alpha", -1.0) == s.alpha &&
                      ac.value("dropout", -1.0) == s.dropout &&
                      ac.value("use_rslora", !s.use_rslora) == s.use_rslora &&
                      ac.value("target_modules", std::vector<std::string>{}) == s.target_modules,
                  "[sft] resume: ", *latest, " was trained with other LoRA settings (", ac.dump(),
                  ") than the recipe's lora section; resuming would not continue "
                  "the same run");
    }
    std::map<std::string, Tensor> by_name;
    for (auto& [n, t] : c.model) by_name[n] = t;
    nn::NamedTensors dst = lora ? lora_parameters(*model) : model->named_parameters();
    FTUNE_CHECK(by_name.size() == dst.size(), "[sft] resume: ", *latest, " has ", by_name.size(),
                " model tensors, the model ", dst.size());
    for (auto& [n, t] : dst) {
      auto it = by_name.find(n);
      FTUNE_CHECK(it != by_name.end(), "[sft] resume: ", *latest, " lacks tensor ", n);
      FTUNE_CHECK(it->second.shape() == t.shape(), "[sft] resume: ", *latest, ": tensor ", n,
                  " is ", it->second.desc(), ", the model's ", t.desc());
      t.copy_(it->second);
    }
    if (zopt)
      zopt->import_local_state(c.optimizer);  // this rank's shards, read as such above
    else
      opt->import_state(c.optimizer);
    const nlohmann::json& ts = c.trainer_state;
    try {
      // A state saved at another dp is converted by the loader (the same global batches next).
      train_loader->load_state(ts.at("sampler"));
    } catch (const Error& e) {
      FTUNE_THROW("[sft] resume: ", *latest, ": ", e.what());
    }
    step = c.step;
    skipped = ts.value("skipped_steps", int64_t(0));
    consecutive_bad = ts.value("consecutive_bad_steps", int64_t(0));
    best_eval =
        ts.at("best_eval_loss").is_null() ? INFINITY : ts.at("best_eval_loss").get<double>();
    evals_without_improvement = ts.value("evals_without_improvement", int64_t(0));
    tokens_seen = ts.value("tokens_seen", int64_t(0));
    resumed_trainer_state = ts;
    stopped_early = ts.value("early_stopped", false);
    overflow_steps = ts.value("overflow_steps", int64_t(0));
    if (scaler && ts.contains("loss_scaler") && !ts["loss_scaler"].is_null()) {
      try {
        scaler->load_state(ts["loss_scaler"]);
      } catch (const Error& e) {
        FTUNE_THROW("[sft] resume: ", *latest, ": ", e.what());
      }
    }
    last_ckpt = *latest;
    last_saved_step = step;
    if (is_root) truncate_metrics_after(step);
    log << "resume: " << *latest << " (step " << step << ", epoch " << c.epoch + 1 << ")\n";
  }

  // An epochs-based run (no max_steps) resumed from a checkpoint: the optimizer steps left are
  // the batches left of the current epoch and of the later ones at THIS run's dp (per-rank
  // batches per epoch depend on dp), so a run resumed at another dp still ends after exactly
  // cfg.epochs epochs. At the checkpoint's dp this equals setup()'s count: the checkpoint's
  // steps consumed step * accum of the epochs * per_epoch micro-batches.
  void recount_total_steps() {
    if (cfg.max_steps > 0 || step == 0) return;  // max_steps is fixed; no checkpoint: nothing to do
    const int64_t accum = cfg.gradient_accumulation_steps, epoch = train_loader->epoch();
    const int64_t left = epoch >= cfg.epochs
                             ? 0
                             : train_loader->batches_left_in_epoch() +
                                   (cfg.epochs - 1 - epoch) * train_loader->batches_per_epoch();
    const int64_t total = step + (left + accum - 1) / accum;
    const int64_t saved = resumed_trainer_state.value("total_steps", int64_t(-1));
    if (total != saved) {
      const nlohmann::json par = resumed_trainer_state.value("parallel", nlohmann::json::object());
      log << "steps: " << total << " after the resume (the checkpoint's run planned " << saved
          << " at dp " << par.value("dp", int64_t(1)) << "; at dp " << dp << " the "
          << cfg.epochs << " epochs take " << total - step << " more steps from step " << step
          << ")\n";
    }
    if (total == total_steps) return;
    total_steps = total;
    sched = std::make_unique<optim::LRSchedule>(
        optim::schedule_kind_from_name(cfg.lr_scheduler.name), cfg.optimizer.lr,
        cfg.lr_scheduler.num_warmup_steps, total_steps, cfg.lr_scheduler.min_lr_ratio);
  }

  // Drops metrics logged after `keep_step` by the interrupted run, so the resumed run's log reads
  // as one uninterrupted run.
  void truncate_metrics_after(int64_t keep_step) {
    std::ifstream in(metrics_path());
    if (!in) return;
    std::vector<std::string> keep;
    std::string line;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded()) continue;  // a line cut by the kill
      if (j.value("step", int64_t(0)) <= keep_step) keep.push_back(line);
    }
    in.close();
    std::ofstream o(metrics_path(), std::ios::trunc);
    for (auto& l : keep) o << l << "\n";
  }

  void write_metrics(const nlohmann::json& j) {
    if (!is_root) return;
    std::ofstream o(metrics_path(), std::ios::app);
    o << j.dump() << "\n";
    o.flush();
  }

  // ---------------------------------------------------------------- forward
  // Summed cross-entropy of a batch; under TP over this rank's vocab shard of the logits (the
  // max, the sum of exps and the target logit are reduced over tp; no logits are gathered).
  Tensor loss_sum_of(const SftBatch& b) {
    // Never the whole logits (ops::linear_cross_entropy). Not in f16: its dlogits are formed in the
    // forward, before the loss scale could keep their small values from flushing to zero.
    if (grid.tp == 1 && cfg.chunked_loss && cfg.dtype != "f16") {
      ForwardOptions fo;
      fo.positions = b.positions;
      fo.cu_seqlens = b.cu_seqlens;
      Tensor h = model->hidden_states(b.ids, fo);
      return ops::linear_cross_entropy(h.view({-1, h.size(-1)}), model->lm_head_weight(),
                                       b.labels.view({-1}), -100, ops::Reduction::sum);
    }
    if (grid.tp == 1) {
      Tensor logits = logits_of(b);
      int64_t V = logits.size(-1);
      return ops::cross_entropy(logits.view({-1, V}), b.labels.view({-1}), -100,
                                ops::Reduction::sum);
    }
    ForwardOptions fo;
    fo.positions = b.positions;
    fo.cu_seqlens = b.cu_seqlens;
    Tensor shard = model->forward_logits_shard(b.ids, fo);
    return parallel::vocab_parallel_cross_entropy(shard.view({-1, shard.size(-1)}),
                                                  b.labels.view({-1}), grid.tp_group, -100,
                                                  ops::Reduction::sum, model->config().vocab_size);
  }

  // argmax over the full vocab from this rank's shard [N, V_r]: the global max per row, then the
  // smallest index reaching it (torch's first occurrence), each one all-reduce over tp.
  std::vector<int64_t> tp_argmax(const Tensor& flat_shard) {
    const int64_t offset =
        parallel::shard_range(model->config().vocab_size, grid.tp, grid.tp_rank).offset;
    Tensor local_max = ops::amax(flat_shard, -1).contiguous();
    std::vector<int64_t> local_idx = ops::argmax(flat_shard, -1).to_vector<int64_t>();
    Tensor global_max = local_max.clone();
    grid.tp_group->all_reduce(global_max, parallel::ReduceOp::max);
    std::vector<float> lm = local_max.to_vector<float>(), gm = global_max.to_vector<float>();
    std::vector<int64_t> cand(lm.size());
    for (size_t i = 0; i < lm.size(); ++i)
      cand[i] = lm[i] == gm[i] ? offset + local_idx[i] : std::numeric_limits<int64_t>::max();
    Tensor c = Tensor::from_vector<int64_t>(cand, {int64_t(cand.size())});
    grid.tp_group->all_reduce(c, parallel::ReduceOp::min);
    return c.to_vector<int64_t>();
  }

  // The global gradient norm under TP: split parameters' squares summed over the tp group,
  // replicated ones (identical on every tp rank) counted once.
  double tp_grad_norm() {
    double split = 0, replicated = 0;
    for (auto& [n, t] : trainable) {
      Tensor g = t.grad();
      if (!g.defined()) continue;
      double s = optim::grad_sum_squares({t});
      auto it = shards.find(n);
      (it != shards.end() && it->second.dim >= 0 ? split : replicated) += s;
    }
    split = grid.tp_group->all_reduce_scalar(split);
    return std::sqrt(split + replicated);
  }
  // The same under TP + ZeRO-1: the reducer's gradient shards hold the dp-summed gradient, so
  // both sums are first taken over the dp group (each shard once), then the split one over tp.
  double tp_zero_grad_norm() {
    std::vector<bool> split_flag;
    for (auto& [n, t] : trainable) {  // the reducer's parameters, in the same (model) order
      auto it = shards.find(n);
      split_flag.push_back(it != shards.end() && it->second.dim >= 0);
    }
    auto [split, replicated] = zopt->grad_sum_squares_split(split_flag);
    split = grid.tp_group->all_reduce_scalar(split);
    return std::sqrt(split + replicated);
  }

  // The batch's tensors onto the training device (cu_seqlens stay on the host: the attention op
  // sizes its grid from them).
  void to_device(SftBatch& b) const {
    if (device.is_cpu()) return;
    b.ids = b.ids.to(device);
    b.labels = b.labels.to(device);
    if (b.positions.defined()) b.positions = b.positions.to(device);
  }

  Tensor logits_of(const SftBatch& b) {
    ForwardOptions fo;
    fo.positions = b.positions;
    fo.cu_seqlens = b.cu_seqlens;
    return model->forward(b.ids, fo);
  }

  EvalMetrics evaluate() {
    FTUNE_CHECK(!val_examples.empty(),
                "[sft] evaluate: no held-out split (set dataset.val_path "
                "or dataset.val_size)");
    NoGradGuard ng;
    bool was_training = model->is_training();
    model->eval();
    SftLoaderOptions lopt;
    lopt.batch_size = cfg.batch_size;
    lopt.max_seq_len = cfg.tokenizer.max_seq_len;
    lopt.packed = cfg.dataset.packed;
    lopt.shuffle = false;
    lopt.pad_id = pad_id;
    SftLoader loader(val_examples, lopt);     // every rank plans all batches; dp rank r takes
    double loss_sum = 0;                      // batches r, r + dp, ... (no wrap-around: the
    int64_t n = 0, correct = 0, batches = 0;  // metrics are those of one process)
    SftBatch b;
    while (loader.next(b)) {
      if (cfg.eval_max_batches > 0 && batches >= cfg.eval_max_batches) break;
      if (batches++ % dp != dp_rank) continue;
      to_device(b);
      Tensor labels = b.labels.view({-1});
      std::vector<int64_t> pred;
      if (grid.tp == 1 && cfg.chunked_loss) {  // as training: never the whole logits
        ForwardOptions fo;
        fo.positions = b.positions;
        fo.cu_seqlens = b.cu_seqlens;
        Tensor h = model->hidden_states(b.ids, fo);
        Tensor am;
        loss_sum += ops::linear_cross_entropy(h.view({-1, h.size(-1)}), model->lm_head_weight(),
                                              labels, -100, ops::Reduction::sum, 0, &am)
                        .item();
        pred = am.to_vector<int64_t>();
      } else if (grid.tp == 1) {
        Tensor logits = logits_of(b);
        Tensor flat = logits.view({-1, logits.size(-1)});
        loss_sum += ops::cross_entropy(flat, labels, -100, ops::Reduction::sum).item();
        pred = ops::argmax(flat, -1).to_vector<int64_t>();
      } else {  // on the vocab shards, as training: no gathered logits
        ForwardOptions fo;
        fo.positions = b.positions;
        fo.cu_seqlens = b.cu_seqlens;
        Tensor shard = model->forward_logits_shard(b.ids, fo);
        Tensor flat = shard.view({-1, shard.size(-1)});
        loss_sum += parallel::vocab_parallel_cross_entropy(flat, labels, grid.tp_group, -100,
                                                           ops::Reduction::sum,
                                                           model->config().vocab_size)
                        .item();
        pred = tp_argmax(flat);
      }
      std::vector<int64_t> lab = labels.to_vector<int64_t>();
      for (size_t i = 0; i < lab.size(); ++i) {
        if (lab[i] == -100) continue;
        ++n;
        correct += pred[i] == lab[i];
      }
    }
    model->train(was_training);
    if (dp > 1) {
      Tensor sums = Tensor::from_vector<double>({loss_sum, double(n), double(correct)}, {3});
      grid.dp_group->all_reduce(sums);
      const double* v = sums.data<double>();
      loss_sum = v[0];
      n = int64_t(v[1]);
      correct = int64_t(v[2]);
    }
    EvalMetrics m;
    m.tokens = n;
    m.loss = n ? loss_sum / double(n) : 0.0;
    m.perplexity = std::exp(m.loss);
    m.accuracy = n ? double(correct) / double(n) : 0.0;
    return m;
  }

  std::vector<std::string> sample_generations() {
    std::vector<std::string> outs;
    if (!cfg.eval_generate) return outs;
    const EvalGenerateSection& g = *cfg.eval_generate;
    std::vector<std::vector<int32_t>> prompts;
    for (const std::string& p : g.prompts) {
      if (chat) {
        std::string text = chat->render({{"user", p}}, true).text;
        prompts.push_back(tok.encode(text, false));
      } else {
        prompts.push_back(tok.encode(p, true));
      }
    }
    GenerateOptions go;
    go.max_new_tokens = g.max_new_tokens;
    go.temperature = g.temperature;
    go.seed = cfg.seed;
    go.pad_token_id = pad_id;
    if (auto e = tok.eos_id()) go.stop_token_ids.push_back(*e);
    if (chat) {
      if (auto e = tok.token_to_id(chat->eos_token())) go.stop_token_ids.push_back(*e);
    }
    std::vector<std::vector<int32_t>> res = generate(*model, prompts, go);
    for (auto& r : res) outs.push_back(tok.decode(r, true));
    return outs;
  }

  void print_eval(const char* when, const EvalMetrics& m) {
    log << "eval" << (*when ? " " : "") << when << " | step " << step << " | loss "
        << fmt_num("%.4f", m.loss) << " | ppl " << fmt_num("%.3f", m.perplexity) << " | acc "
        << fmt_num("%.4f", m.accuracy) << " | tokens " << m.tokens << "\n";
    write_metrics({{"split", "eval"},
                   {"step", step},
                   {"loss", m.loss},
                   {"perplexity", m.perplexity},
                   {"accuracy", m.accuracy},
                   {"tokens", m.tokens}});
  }

  void print_generations(const char* when) {
    // The replicas are identical: rank 0 samples, with its tp group (the forward is collective).
    if (!cfg.eval_generate || grid.dp_rank != 0) return;
    std::vector<std::string> outs = sample_generations();
    for (size_t i = 0; i < outs.size(); ++i) {
      log << "sample" << (*when ? " " : "") << when << " | " << cfg.eval_generate->prompts[i]
          << " -> " << outs[i] << "\n";
    }
  }

  // ---------------------------------------------------------------- the loop
  SftResult train() {
    SftResult res;
    using clock = std::chrono::steady_clock;
    const int64_t accum = cfg.gradient_accumulation_steps;
    const bool has_val = !val_examples.empty();
    if (step >= total_steps || stopped_early) {  // resumed from the run's last checkpoint
      log << "nothing to do: the checkpoint is at step " << step << " of " << total_steps
          << (stopped_early ? " (the run stopped early)" : "") << "\n";
      res.steps = step;
      res.skipped_steps = skipped;
      res.overflow_steps = overflow_steps;
      res.loss_scale = scaler ? scaler->scale() : 0.0;
      res.early_stopped = stopped_early;
      res.last_checkpoint = last_ckpt;
      return res;
    }
    if (step == 0 && has_val) {
      res.eval_before = evaluate();
      print_eval("before", *res.eval_before);
      print_generations("before");
    }
    std::vector<Tensor> params;
    for (auto& [n, t] : trainable) params.push_back(t);

    while (step < total_steps) {
      auto t0 = clock::now();
      // The micro-batches of this step; the loss is the mean over all their target tokens.
      std::vector<SftBatch> mbs(static_cast<size_t>(accum));
      int64_t targets = 0, tokens = 0;
      for (auto& b : mbs) {
        if (!train_loader->next(b)) {
          bool ok = train_loader->next(b);  // the next epoch begins
          FTUNE_CHECK(ok, "[sft] the training loader produced no batch");
        }
        to_device(b);
        targets += b.num_targets;
        tokens += b.num_tokens;
      }
      // The loss is the mean over the GLOBAL batch's target tokens, so the gradients summed over
      // the replicas are exactly one process's gradient of the whole global batch.
      if (dp > 1) {
        Tensor c = Tensor::from_vector<int64_t>({targets, tokens}, {2});
        grid.dp_group->all_reduce(c);
        targets = c.data<int64_t>()[0];
        tokens = c.data<int64_t>()[1];
      }
      double loss_sum = 0;
      bool bad = false;
      if (targets > 0) {
        for (size_t i = 0; i < mbs.size(); ++i) {
          // Micro-batch i of dp rank r is micro-batch i * dp + r of the one-process run with dp
          // times the accumulation (same batches, see docs/distributed.md): same dropout seed.
          const uint64_t global_mb = uint64_t(i) * uint64_t(dp) + uint64_t(dp_rank);
          if (lora) set_lora_dropout_seed(*model, mix_seed(cfg.seed, uint64_t(step), global_mb));
          if (reducer) reducer->set_sync(i + 1 == mbs.size());  // reduce on the last one only
          Tensor ce = loss_sum_of(mbs[i]);
          double v = ce.item();
          loss_sum += v;  // a NaN/inf makes the logged loss NaN (metrics: null)
          if (!std::isfinite(v)) {
            bad = true;
            // With a reducer every rank must run every backward (the buckets are collectives);
            // the NaN then reaches every rank through the loss sum below.
            if (!reducer) break;
          }
          // Loss scaling: the backward runs on loss * scale (unscaled below, after the reduction).
          ops::mul_scalar(ce, (scaler ? scaler->scale() : 1.0) / double(targets)).backward();
        }
        if (reducer) reducer->finish();
      }
      if (dp > 1) {
        loss_sum = grid.dp_group->all_reduce_scalar(loss_sum);
        bad = !std::isfinite(loss_sum);
      }
      double loss = targets > 0 ? loss_sum / double(targets) : 0.0;
      // Loss scaling: the clip and the optimizer see the true gradients. A dynamic scale that made
      // a gradient overflow skips the step (HF Trainer: the lr schedule does not advance either)
      // and backs off; a fixed scale cannot adapt, so its overflow is a bad step of the guard.
      const double used_scale = scaler ? scaler->scale() : 1.0;
      bool overflow = false;
      if (scaler && !bad && unscale_all_ranks(used_scale, params)) {
        if (scaler->options().dynamic)
          overflow = true;
        else
          bad = true;
      }
      // The global gradient norm; clipping (torch's clip_grad_norm_) happens inside the AdamW
      // update, through its coefficient: no pass that scales the gradients first.
      double gnorm = 0;
      if (!bad && !overflow) {
        if (zopt && grid.tp > 1)
          gnorm = tp_zero_grad_norm();
        else if (zopt)
          gnorm = std::sqrt(zopt->grad_sum_squares());
        else if (grid.tp > 1)
          gnorm = tp_grad_norm();
        else  // plain DP: the reduced gradients are the same on every rank
          gnorm = std::sqrt(optim::grad_sum_squares(params));
        bad = !std::isfinite(gnorm);
      }
      const double clip_coef = optim::clip_coefficient(gnorm, cfg.clip_grad_norm);
      double lr = sched->lr_at(step - overflow_steps);
      if (overflow) {
        zero_grad();
        ++overflow_steps;
        scaler->update(true);
        log << "step " << step + 1 << ": gradient overflow at loss scale " << used_scale
            << ", step skipped; scale " << scaler->scale() << "\n";
        FTUNE_CHECK(scaler->scale() >= LossScaler::kMinScale, "[sft] the gradients overflowed at "
                    "every loss scale down to ", used_scale, " (step ", step + 1, "): they are "
                    "inf/NaN whatever the scale, not an f16 overflow. The last good checkpoint is ",
                    last_ckpt.empty() ? std::string("(none)") : last_ckpt,
                    ". Lower optimizer.lr, set clip_grad_norm, or check the data.");
      } else if (bad) {
        zero_grad();
        ++skipped;
        ++consecutive_bad;
        log << "step " << step + 1 << ": non-finite " << (std::isfinite(loss) ? "gradient" : "loss")
            << ", step skipped (" << consecutive_bad << " in a row)\n";
        FTUNE_CHECK(consecutive_bad < cfg.max_consecutive_nan_steps,
                    "[sft] the loss or gradient "
                    "was NaN/inf for ",
                    consecutive_bad, " consecutive steps (step ", step + 1,
                    "); stopping. The last good checkpoint is ",
                    last_ckpt.empty() ? std::string("(none)") : last_ckpt,
                    ". Lower optimizer.lr, set clip_grad_norm, or check the data.");
      } else {
        consecutive_bad = 0;
        if (zopt) {
          zopt->set_lr(lr);
          zopt->step(clip_coef);
        } else {
          opt->set_lr(lr);
          opt->step(clip_coef);
        }
        zero_grad();
        if (scaler) scaler->update(false);
      }
      ++step;
      tokens_seen += tokens;
      double secs = std::chrono::duration<double>(clock::now() - t0).count();
      double tps = secs > 0 ? double(tokens) / secs : 0;
      auto [rss, peak] = rss_mib();
      res.last_loss = loss;
      if (cfg.log_every_n_steps > 0 && (step % cfg.log_every_n_steps == 0 || step == total_steps)) {
        log << "epoch " << train_loader->epoch() + 1 << " | step " << step << "/" << total_steps
            << " | loss " << fmt_num("%.4f", loss) << " | lr " << fmt_num("%.3e", lr)
            << " | grad_norm " << fmt_num("%.3f", gnorm) << " | tok/s " << fmt_num("%.0f", tps)
            << " | mem " << fmt_num("%.0f", rss) << " MiB";
        if (scaler) log << " | loss_scale " << fmt_num("%g", used_scale);
        if (device.is_cuda()) {
          AllocatorStats gs = cuda_allocator_stats(device.index);
          log << " | gpu " << fmt_num("%.0f", double(gs.current_bytes) / (1 << 20)) << " MiB (peak "
              << fmt_num("%.0f", double(gs.peak_bytes) / (1 << 20)) << ")";
        }
        log << "\n";
        log.flush();
      }
      nlohmann::json gpu_mem = nullptr;
      if (device.is_cuda())
        gpu_mem = double(cuda_allocator_stats(device.index).peak_bytes) / (1 << 20);
      nlohmann::json line = {{"split", "train"},
                     {"step", step},
                     {"epoch", train_loader->epoch()},
                     {"loss", loss},
                     {"lr", lr},
                     {"grad_norm", gnorm},
                     {"skipped", bad || overflow},
                     {"tokens", tokens},
                     {"target_tokens", targets},
                     {"tokens_per_s", tps},
                     {"rss_mib", rss},
                     {"peak_rss_mib", peak},
                     {"peak_gpu_mib", gpu_mem}};
      if (scaler) {  // the scale this step's backward ran with
        line["loss_scale"] = used_scale;
        line["overflow"] = overflow;
      }
      write_metrics(line);

      bool stop = false;
      if (has_val && cfg.eval_every_n_steps > 0 && step % cfg.eval_every_n_steps == 0 &&
          step < total_steps) {
        EvalMetrics m = evaluate();
        print_eval("", m);
        print_generations("");
        stop = early_stop_after(m);
        stopped_early = stop;  // before a save at this step, so the checkpoint records it
      }
      if (cfg.save_every_n_steps > 0 && step % cfg.save_every_n_steps == 0 && step < total_steps)
        save();
      if (stop) {
        res.early_stopped = true;
        log << "early stopping: eval loss did not improve by " << cfg.early_stopping.min_delta
            << " for " << cfg.early_stopping.patience << " evaluations\n";
        break;
      }
    }
    if (has_val) {
      res.eval_after = evaluate();
      print_eval("after", *res.eval_after);
      print_generations("after");
    }
    if (last_saved_step != step) save();
    res.steps = step;
    res.skipped_steps = skipped;
    res.overflow_steps = overflow_steps;
    res.loss_scale = scaler ? scaler->scale() : 0.0;
    res.last_checkpoint = last_ckpt;
    return res;
  }

  void zero_grad() {
    if (zopt)
      zopt->zero_grad();
    else
      opt->zero_grad();
  }

  bool early_stop_after(const EvalMetrics& m) {
    if (m.loss < best_eval - cfg.early_stopping.min_delta) {
      best_eval = m.loss;
      evals_without_improvement = 0;
      return false;
    }
    ++evals_without_improvement;
    return cfg.early_stopping.patience > 0 &&
           evals_without_improvement >= cfg.early_stopping.patience;
  }
};

SftTrainer::SftTrainer(SftConfig cfg, std::ostream& log,
                       std::shared_ptr<parallel::Communicator> world)
    : impl_(std::make_unique<Impl>(std::move(cfg), log, std::move(world))) {
  impl_->setup();
}
SftTrainer::~SftTrainer() = default;
SftResult SftTrainer::train() { return impl_->train(); }
EvalMetrics SftTrainer::evaluate() { return impl_->evaluate(); }
std::vector<std::string> SftTrainer::sample_generations() { return impl_->sample_generations(); }

}  // namespace ftune
