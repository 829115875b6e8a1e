// LoRA on the Proj layers of the Transformer (models/proj.h), and PEFT's adapter folder format.
// PEFT's rules followed here: target matching (list: exact name or "." suffix; string: regex
// fullmatch; "all-linear": every linear layer but the output head), lora_A init
// kaiming_uniform(a=sqrt(5)), lora_B zeros, scaling alpha/r or alpha/sqrt(r), tensor names
// "base_model.model.<module>.lora_{A,B}.weight" without the adapter name.
#include "models/lora.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>

#include "core/error.h"
#include "core/rng.h"
#include "io/file_util.h"
#include "io/safetensors.h"
#include "models/proj.h"

namespace ftune {

namespace {

using json = nlohmann::json;

constexpr const char* kPeftPrefix = "base_model.model.";
constexpr uint64_t kLoraSeedStream = 0x4c6f5241;  // "LoRA": mixes a module index into a seed

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Every projection of the model, in model order. named_modules() is not const (it hands out
// mutable pointers); reading through it does not change the model.
std::vector<std::pair<std::string, Proj*>> projections(const Transformer& model) {
  std::vector<std::pair<std::string, Proj*>> out;
  for (auto& [name, m] : const_cast<Transformer&>(model).named_modules())
    if (auto* p = dynamic_cast<Proj*>(m)) out.emplace_back(name, p);
  return out;
}

std::vector<std::pair<std::string, Proj*>> adapted(const Transformer& model) {
  std::vector<std::pair<std::string, Proj*>> out;
  for (auto& [name, p] : projections(model))
    if (p->has_lora()) out.emplace_back(name, p);
  return out;
}

std::string join(const std::vector<std::string>& v, size_t max_shown = 12) {
  std::string s;
  for (size_t i = 0; i < v.size() && i < max_shown; ++i) s += (i ? ", " : "") + v[i];
  if (v.size() > max_shown) s += str_cat(", ... (", v.size() - max_shown, " more)");
  return s;
}

// The short names of the projections ("q_proj", "c_attn", ...), for error messages.
std::string projection_kinds(const Transformer& model) {
  std::set<std::string> kinds;
  for (auto& [name, p] : projections(model)) kinds.insert(name.substr(name.rfind('.') + 1));
  return join(std::vector<std::string>(kinds.begin(), kinds.end()));
}

// The projections the options target. `strict`: every list entry must match a projection (a
// user's recipe: a typo is an error); otherwise only the whole selection must be non-empty
// (PEFT's rule, for adapter folders). `what` prefixes errors (a file, or "[lora]").
std::vector<std::pair<std::string, Proj*>> select_targets(const Transformer& model,
                                                          const LoraOptions& opt, bool strict,
                                                          const std::string& what) {
  const bool all_linear =
      opt.target_regex.empty() && opt.target_modules.size() == 1 &&
      (opt.target_modules[0] == "all-linear" || opt.target_modules[0] == "all_linear");
  FTUNE_CHECK(!opt.target_regex.empty() || !opt.target_modules.empty(), what,
              " target_modules is empty");
  std::optional<std::regex> re;
  if (!opt.target_regex.empty()) {
    try {
      re.emplace(opt.target_regex, std::regex::ECMAScript);
    } catch (const std::regex_error& e) {
      FTUNE_THROW(what, " target_modules regex '", opt.target_regex, "' is invalid: ", e.what());
    }
  }
  std::vector<std::pair<std::string, Proj*>> out;
  std::vector<size_t> hits(opt.target_modules.size(), 0);
  for (auto& [name, m] : const_cast<Transformer&>(model).named_modules()) {
    if (name.empty() || dynamic_cast<LoraWeight*>(m)) continue;
    bool match = false;
    if (all_linear) {
      match = dynamic_cast<Proj*>(m) != nullptr;  // lm_head is not a Proj
    } else if (re) {
      match = std::regex_match(name, *re);
    } else {
      for (size_t i = 0; i < opt.target_modules.size(); ++i) {
        const std::string& t = opt.target_modules[i];
        if (!t.empty() && (name == t || ends_with(name, "." + t))) {
          match = true;
          ++hits[i];
        }
      }
    }
    if (!match) continue;
    auto* p = dynamic_cast<Proj*>(m);
    FTUNE_CHECK(p != nullptr, what, " target module '", name,
                "' is not a linear projection; ftune adapts only the projections of the blocks (",
                projection_kinds(model), "), not embeddings, norms, lm_head or containers");
    out.emplace_back(name, p);
  }
  if (strict && !all_linear && !re)
    for (size_t i = 0; i < hits.size(); ++i)
      FTUNE_CHECK(hits[i] > 0, what, " target module '", opt.target_modules[i],
                  "' matches no projection of ", model.config().architecture,
                  " (its projections: ", projection_kinds(model), ", or \"all-linear\")");
  FTUNE_CHECK(!out.empty(), what, " target_modules ",
              re ? "'" + opt.target_regex + "'" : "[" + join(opt.target_modules) + "]",
              " match no projection of ", model.config().architecture,
              " (its projections: ", projection_kinds(model), ")");
  return out;
}

void check_options(const LoraOptions& opt, const std::string& what) {
  FTUNE_CHECK(opt.r >= 1, what, " r must be >= 1, got ", opt.r);
  FTUNE_CHECK(std::isfinite(opt.alpha), what, " lora_alpha must be finite, got ", opt.alpha);
  FTUNE_CHECK(opt.dropout >= 0.0 && opt.dropout < 1.0, what,
              " lora_dropout must be in [0, 1), got ", opt.dropout);
}

uint64_t module_seed(uint64_t seed, uint64_t index) {
  uint32_t r[4];
  philox4x32(seed, index, kLoraSeedStream, r);
  return uint64_t(r[0]) | (uint64_t(r[1]) << 32);
}

// Adds the adapters (A random, B zero) and freezes the base. Returns the adapted modules.
std::vector<std::pair<std::string, Proj*>> apply(Transformer& model, const LoraOptions& opt,
                                                 bool strict, const std::string& what) {
  check_options(opt, what);
  FTUNE_CHECK(!has_lora(model), what,
              " the model already has LoRA adapters (merge_lora them, or load a fresh model)");
  auto targets = select_targets(model, opt, strict, what);
  model.requires_grad_(false);
  Generator gen(opt.seed);
  NoGradGuard no_grad;
  // Drawn at the full shape, then sliced: a tensor-parallel shard gets the very adapters of the
  // unsharded model.
  for (auto& [name, p] : targets) {
    const int64_t in = p->full_in_features(), out = p->full_out_features();
    const double bound = 1.0 / std::sqrt(double(in));
    Tensor a = rand({opt.r, in}, gen, -bound, bound).set_requires_grad(true);
    Tensor b = Tensor::zeros({out, opt.r}).set_requires_grad(true);
    p->add_lora_full(a, b, opt.scale(), opt.dropout);
  }
  set_lora_dropout_seed(model, 0);
  // The base is frozen now: batch q/k/v (docs/lora.md), unless switched off for comparisons.
  const char* fused = std::getenv("FTUNE_FUSED_QKV");
  model.set_fused_qkv(!(fused && std::string(fused) == "0"));
  return targets;
}

// Undoes apply() after a failed load: adapters dropped, requires_grad as before.
void rollback(Transformer& model, const std::vector<std::pair<std::string, bool>>& grad_state) {
  for (auto& [name, p] : adapted(model)) p->remove_lora();
  std::map<std::string, bool> g(grad_state.begin(), grad_state.end());
  for (auto& [name, t] : model.named_parameters())
    if (g.count(name)) t.set_requires_grad(g[name]);
}

json number_json(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 9e15) return json(int64_t(v));
  return json(v);
}

// Keys of a PEFT LoraConfig that select features ftune does not implement: each must be absent,
// null, false or empty.
const char* const kUnsupportedKeys[] = {"use_dora",
                                        "lora_bias",
                                        "modules_to_save",
                                        "layers_to_transform",
                                        "layers_pattern",
                                        "rank_pattern",
                                        "alpha_pattern",
                                        "exclude_modules",
                                        "target_parameters",
                                        "layer_replication",
                                        "trainable_token_indices",
                                        "alora_invocation_tokens",
                                        "use_qalora",
                                        "megatron_config",
                                        "loftq_config",
                                        "use_bdlora",
                                        "arrow_config",
                                        "kasa_config",
                                        "velora_config",
                                        "monteclora_config"};

bool is_unset(const json& v) {
  return v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
         ((v.is_object() || v.is_array() || v.is_string()) && v.empty());
}

}  // namespace

double LoraOptions::scale() const {
  FTUNE_CHECK(r >= 1, "[lora] r must be >= 1, got ", r);
  return use_rslora ? alpha / std::sqrt(double(r)) : alpha / double(r);
}

std::vector<std::string> apply_lora(Transformer& model, const LoraOptions& opt) {
  std::vector<std::string> names;
  for (auto& [name, p] : apply(model, opt, /*strict=*/true, "[lora]")) names.push_back(name);
  return names;
}

bool has_lora(const Transformer& model) { return !adapted(model).empty(); }

std::vector<std::string> lora_modules(const Transformer& model) {
  std::vector<std::string> names;
  for (auto& [name, p] : adapted(model)) names.push_back(name);
  return names;
}

nn::NamedTensors lora_parameters(const Transformer& model) {
  nn::NamedTensors out;
  for (auto& [name, p] : adapted(model)) {
    out.emplace_back(name + ".lora_A.weight", p->lora_A());
    out.emplace_back(name + ".lora_B.weight", p->lora_B());
  }
  return out;
}

void set_lora_dropout_seed(Transformer& model, uint64_t seed) {
  uint64_t i = 0;
  for (auto& [name, p] : adapted(model)) p->set_lora_seed(module_seed(seed, i++));
}

void merge_lora(Transformer& model) {
  auto mods = adapted(model);
  FTUNE_CHECK(!mods.empty(), "[lora] merge_lora: the model has no adapters");
  NoGradGuard no_grad;
  for (auto& [name, p] : mods) {
    const int64_t in = p->in_features(), out = p->out_features(), r = p->lora_A().size(0);
    const double s = p->lora_scale();
    const std::vector<double> a = p->lora_A().to_vector<double>(),
                              b = p->lora_B().to_vector<double>();
    std::vector<double> w = p->weight.to_vector<double>();
    // delta[o, i] = s * sum_k B[o, k] A[k, i]; a Conv1D weight is [in, out].
    for (int64_t o = 0; o < out; ++o)
      for (int64_t i = 0; i < in; ++i) {
        double d = 0;
        for (int64_t k = 0; k < r; ++k) d += b[size_t(o * r + k)] * a[size_t(k * in + i)];
        w[size_t(p->conv1d() ? i * out + o : o * in + i)] += s * d;
      }
    p->weight.copy_(Tensor::from_vector(w, p->weight.shape()));  // rounded once, to f32
    p->remove_lora();
  }
  model.requires_grad_(true);
}

// ---------------------------------------------------------------- PEFT folders

void save_peft_adapter(const std::string& dir, const Transformer& model, const LoraOptions& opt,
                       const std::string& base_model_name_or_path) {
  auto mods = adapted(model);
  FTUNE_CHECK(!mods.empty(), "[peft] save_peft_adapter(", dir, "): the model has no adapters");
  FTUNE_CHECK(model.tp_size() == 1, "[peft] save_peft_adapter(", dir,
              "): the model is a tensor-parallel shard; gather_full_parameters() first");
  check_options(opt, "[peft] save_peft_adapter:");
  bool conv1d = false;
  nn::NamedTensors tensors;
  for (auto& [name, p] : mods) {
    FTUNE_CHECK(p->lora_A().size(0) == opt.r &&
                    std::fabs(p->lora_scale() - opt.scale()) <= 1e-12 * std::fabs(opt.scale()),
                "[peft] save_peft_adapter(", dir, "): the options (r ", opt.r, ", scale ",
                opt.scale(), ") do not describe the adapter of ", name, " (r ", p->lora_A().size(0),
                ", scale ", p->lora_scale(), ")");
    conv1d = conv1d || p->conv1d();
    tensors.emplace_back(kPeftPrefix + name + ".lora_A.weight", p->lora_A());
    tensors.emplace_back(kPeftPrefix + name + ".lora_B.weight", p->lora_B());
  }

  json targets;
  const bool all_linear =
      opt.target_regex.empty() && opt.target_modules.size() == 1 &&
      (opt.target_modules[0] == "all-linear" || opt.target_modules[0] == "all_linear");
  if (!opt.target_regex.empty()) {
    targets = opt.target_regex;
  } else if (all_linear) {  // PEFT saves the expansion, not the shorthand
    targets = json::array();
    for (auto& [name, p] : mods) targets.push_back(name);
  } else {
    targets = opt.target_modules;
  }
  json c = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"base_model_name_or_path", base_model_name_or_path},
            {"r", opt.r},
            {"lora_alpha", number_json(opt.alpha)},
            {"lora_dropout", opt.dropout},
            {"use_rslora", opt.use_rslora},
            {"target_modules", targets},
            {"fan_in_fan_out", conv1d},
            {"bias", "none"},
            {"inference_mode", true},
            {"init_lora_weights", true},
            {"use_dora", false},
            {"lora_bias", false},
            {"modules_to_save", nullptr},
            {"layers_to_transform", nullptr},
            {"layers_pattern", nullptr},
            {"rank_pattern", json::object()},
            {"alpha_pattern", json::object()},
            {"revision", nullptr},
            {"auto_mapping", nullptr}};

  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  FTUNE_CHECK(!ec && dir_exists(dir), "[peft] cannot create folder ", dir, ": ", ec.message());
  save_safetensors(path_join(dir, "adapter_model.safetensors"), tensors, {{"format", "pt"}});
  write_file_atomic(path_join(dir, "adapter_config.json"), c.dump(2) + "\n", "peft");
}

LoraOptions load_peft_adapter(const std::string& dir, Transformer& model) {
  FTUNE_CHECK(dir_exists(dir), "[peft] adapter folder ", dir, " does not exist");
  const std::string cfg_path = path_join(dir, "adapter_config.json");
  const std::string st_path = path_join(dir, "adapter_model.safetensors");
  FTUNE_CHECK(file_exists(cfg_path), "[peft] ", dir, " has no adapter_config.json");
  if (!file_exists(st_path)) {
    FTUNE_CHECK(!file_exists(path_join(dir, "adapter_model.bin")), "[peft] ",
                path_join(dir, "adapter_model.bin"),
                ": pickled adapters are not read; save it with safe_serialization=True");
    FTUNE_THROW("[peft] ", dir, " has no adapter_model.safetensors");
  }
  json c;
  try {
    c = json::parse(read_text_file(cfg_path, "peft"));
  } catch (const json::exception& e) {
    FTUNE_THROW("[peft] ", cfg_path, ": not valid JSON: ", e.what());
  }
  FTUNE_CHECK(c.is_object(), "[peft] ", cfg_path, ": not a JSON object");
  const std::string what = "[peft] " + cfg_path + ":";

  auto str_of = [&](const char* key, const std::string& dflt) -> std::string {
    if (!c.contains(key) || c[key].is_null()) return dflt;
    FTUNE_CHECK(c[key].is_string(), what, " '", key, "' must be a string, got ",
                json_brief(c[key]));
    return c[key].get<std::string>();
  };
  auto num_of = [&](const char* key, double dflt) -> double {
    if (!c.contains(key) || c[key].is_null()) return dflt;
    FTUNE_CHECK(c[key].is_number(), what, " '", key, "' must be a number, got ",
                json_brief(c[key]));
    return c[key].get<double>();
  };

  const std::string type = str_of("peft_type", "");
  FTUNE_CHECK(type == "LORA", what, " peft_type is '", type, "'; only LORA adapters are read");
  const std::string task = str_of("task_type", "CAUSAL_LM");
  FTUNE_CHECK(task == "CAUSAL_LM", what, " task_type '", task,
              "' is not supported (only CAUSAL_LM: the adapter of a causal LM)");
  const std::string bias = str_of("bias", "none");
  FTUNE_CHECK(bias == "none", what, " bias '", bias,
              "' is not supported (only \"none\": trained biases are not part of ftune's LoRA)");
  for (const char* key : kUnsupportedKeys)
    FTUNE_CHECK(!c.contains(key) || is_unset(c[key]), what, " '", key, "' = ", json_brief(c[key]),
                " is not supported by ftune's LoRA (",
                key == std::string("use_dora") ? "DoRA"
                                               : "a PEFT "
                                                 "feature",
                " not implemented)");

  LoraOptions opt;
  const double r = num_of("r", 8);
  FTUNE_CHECK(r >= 1 && r == std::floor(r) && r < 1e9, what, " r must be a positive integer, got ",
              json_brief(c["r"]));
  opt.r = int64_t(r);
  opt.alpha = num_of("lora_alpha", 8);
  opt.dropout = num_of("lora_dropout", 0);
  if (c.contains("use_rslora") && !c["use_rslora"].is_null()) {
    FTUNE_CHECK(c["use_rslora"].is_boolean(), what, " 'use_rslora' must be true or false, got ",
                json_brief(c["use_rslora"]));
    opt.use_rslora = c["use_rslora"].get<bool>();
  }
  FTUNE_CHECK(c.contains("target_modules") && !c["target_modules"].is_null(), what,
              " target_modules is missing");
  const json& tm = c["target_modules"];
  if (tm.is_string()) {
    const std::string s = tm.get<std::string>();
    if (s == "all-linear" || s == "all_linear")
      opt.target_modules = {"all-linear"};
    else
      opt.target_regex = s;
  } else {
    FTUNE_CHECK(tm.is_array(), what, " target_modules must be a string or a list of strings, got ",
                json_brief(tm));
    opt.target_modules.clear();
    for (const json& t : tm) {
      FTUNE_CHECK(t.is_string(), what, " target_modules entries must be strings, got ",
                  json_brief(t));
      opt.target_modules.push_back(t.get<std::string>());
    }
  }

  // Check the tensors against the modules the config selects before touching the model.
  auto targets = select_targets(model, opt, /*strict=*/false, what);
  check_options(opt, what);
  FTUNE_CHECK(!has_lora(model), "[peft] load_peft_adapter(", dir,
              "): the model already has LoRA adapters");
  SafetensorsFile f(st_path);
  std::map<std::string, Shape> want;
  for (auto& [name, p] : targets) {
    want[kPeftPrefix + name + ".lora_A.weight"] = {opt.r, p->full_in_features()};
    want[kPeftPrefix + name + ".lora_B.weight"] = {p->full_out_features(), opt.r};
  }
  std::vector<std::string> unexpected, missing;
  for (const std::string& n : f.names()) {
    auto it = want.find(n);
    if (it == want.end()) {
      unexpected.push_back(n);
      continue;
    }
    const SafetensorsEntry& e = f.info(n);
    const auto dt = st_to_dtype(e.dtype);
    FTUNE_CHECK(dt && is_floating(*dt), "[peft] ", st_path, ": tensor '", n, "' is ",
                st_dtype_name(e.dtype), "; adapters must be F32, F16, BF16 or F64");
    FTUNE_CHECK(e.shape == it->second, "[peft] ", st_path, ": tensor '", n, "' has shape ",
                shape_str(e.shape), " but ", cfg_path, " (r ", opt.r, ") and the model need ",
                shape_str(it->second));
  }
  for (const auto& [n, s] : want)
    if (!f.contains(n)) missing.push_back(n);
  FTUNE_CHECK(
      unexpected.empty() && missing.empty(), "[peft] ", st_path, ": the tensors do not match ",
      cfg_path, missing.empty() ? "" : str_cat("; missing (", missing.size(), "): ", join(missing)),
      unexpected.empty() ? ""
                         : str_cat("; unexpected (", unexpected.size(), "): ", join(unexpected),
                                   " (only lora_A / lora_B of the targeted projections are read)"));

  std::vector<std::pair<std::string, bool>> grad_state;
  for (auto& [name, t] : model.named_parameters()) grad_state.emplace_back(name, t.requires_grad());
  try {
    auto mods = apply(model, opt, /*strict=*/false, what);
    NoGradGuard no_grad;
    for (auto& [name, p] : mods) {
      // The full tensors; a tensor-parallel shard keeps its slices.
      p->lora_A().copy_(
          parallel::shard_slice(f.get(kPeftPrefix + name + ".lora_A.weight"), p->lora_A_shard()));
      p->lora_B().copy_(
          parallel::shard_slice(f.get(kPeftPrefix + name + ".lora_B.weight"), p->lora_B_shard()));
    }
  } catch (...) {
    rollback(model, grad_state);
    throw;
  }
  return opt;
}

}  // namespace ftune
