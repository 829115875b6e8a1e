#include "io/hf_config.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "io/file_util.h"

namespace ftune {

using json = nlohmann::json;

namespace {

struct FamilyInfo {
  ModelFamily family;
  const char* architecture;
  const char* model_type;
};

constexpr FamilyInfo kFamilies[] = {
    {ModelFamily::gpt2, "GPT2LMHeadModel", "gpt2"},
    {ModelFamily::llama, "LlamaForCausalLM", "llama"},
    {ModelFamily::mistral, "MistralForCausalLM", "mistral"},
    {ModelFamily::qwen2, "Qwen2ForCausalLM", "qwen2"},
};

std::string supported_list() {
  std::string s;
  for (const auto& f : kFamilies) s += str_cat(s.empty() ? "" : ", ", f.architecture);
  return s;
}

// Typed access to config keys: absent (or null where nullable) gives the family default; a value
// of the wrong type is an error naming the key.
class Reader {
 public:
  Reader(const json& j, const std::string& what) : j_(j), what_(what) {}

  [[noreturn]] void fail(const std::string& msg) const {
    FTUNE_THROW("[hf_config] ", what_, ": ", msg);
  }

  const json* find(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() ? nullptr : &*it;
  }
  bool present(const char* key) const {
    const json* v = find(key);
    return v && !v->is_null();
  }

  std::optional<int64_t> opt_int(const char* key) const {
    const json* v = find(key);
    if (!v || v->is_null()) return std::nullopt;
    if (!v->is_number_integer() || (v->is_number_unsigned() && v->get<uint64_t>() > INT64_MAX))
      fail(str_cat("\"", key, "\" must be an integer, got ", json_brief(*v)));
    return v->get<int64_t>();
  }
  int64_t get_int(const char* key, int64_t def) const {
    const json* v = find(key);
    if (v && v->is_null()) fail(str_cat("\"", key, "\" must be an integer, got null"));
    return opt_int(key).value_or(def);
  }
  int64_t positive(const char* key, int64_t def) const {
    int64_t x = get_int(key, def);
    if (x <= 0) fail(str_cat("\"", key, "\" must be positive, got ", x));
    return x;
  }
  double get_double(const char* key, double def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_number()) fail(str_cat("\"", key, "\" must be a number, got ", json_brief(*v)));
    return v->get<double>();
  }
  bool get_bool(const char* key, bool def) const {
    const json* v = find(key);
    if (!v) return def;
    if (!v->is_boolean())
      fail(str_cat("\"", key, "\" must be true or false, got ", json_brief(*v)));
    return v->get<bool>();
  }
  std::string get_string(const char* key, const std::string& def) const {
    const json* v = find(key);
    if (!v || v->is_null()) return def;
    if (!v->is_string()) fail(str_cat("\"", key, "\" must be a string, got ", json_brief(*v)));
    return v->get<std::string>();
  }

 private:
  const json& j_;
  const std::string& what_;
};

const FamilyInfo& resolve_family(const Reader& r, const json& j) {
  std::string arch;
  if (const json* a = r.find("architectures"); a && !a->is_null()) {
    if (!a->is_array() || a->empty() || !(*a)[0].is_string())
      r.fail(str_cat("\"architectures\" must be a non-empty list of names, got ", json_brief(*a)));
    arch = (*a)[0].get<std::string>();
  }
  std::string model_type = r.get_string("model_type", "");
  const FamilyInfo* fam = nullptr;
  for (const auto& f : kFamilies) {
    if (!arch.empty() ? arch == f.architecture : model_type == f.model_type) fam = &f;
  }
  if (!fam) {
    if (arch.empty() && model_type.empty())
      r.fail(str_cat("no \"architectures\" or \"model_type\" (supported: ", supported_list(), ")"));
    r.fail(str_cat(arch.empty() ? "model_type '" + model_type + "'" : "architecture '" + arch + "'",
                   " is not supported (supported: ", supported_list(), ")"));
  }
  if (!model_type.empty() && model_type != fam->model_type)
    r.fail(str_cat("model_type '", model_type, "' does not match architecture '", fam->architecture,
                   "' (expected '", fam->model_type, "')"));
  return *fam;
}

// rope_theta, refusing every RoPE variant but the plain one. transformers < 5 writes rope_theta and
// rope_scaling; 5 writes rope_parameters {rope_type, rope_theta}; "type" is the oldest spelling.
double parse_rope(const Reader& r) {
  double theta = r.get_double("rope_theta", 10000.0);
  for (const char* key : {"rope_parameters", "rope_scaling"}) {
    const json* rp = r.find(key);
    if (!rp || rp->is_null()) continue;
    if (!rp->is_object())
      r.fail(str_cat("\"", key, "\" must be an object or null, got ", json_brief(*rp)));
    std::string type = "default";
    for (const char* tk : {"type", "rope_type"}) {
      auto it = rp->find(tk);
      if (it != rp->end()) {
        if (!it->is_string()) r.fail(str_cat("\"", key, "\".", tk, " must be a string"));
        type = it->get<std::string>();
      }
    }
    if (type != "default")
      r.fail(str_cat("\"", key, "\" type '", type,
                     "' is not supported (supported: none, i.e. plain RoPE; remove \"", key,
                     "\" only if the model was trained without it)"));
    for (auto it = rp->begin(); it != rp->end(); ++it) {
      if (it.key() == "rope_theta") {
        if (!it->is_number()) r.fail(str_cat("\"", key, "\".rope_theta must be a number"));
        theta = it->get<double>();
      } else if (it.key() == "partial_rotary_factor") {
        if (!it->is_number() || it->get<double>() != 1.0)
          r.fail(str_cat("\"", key, "\".partial_rotary_factor ", json_brief(*it),
                         " is not supported"));
      } else if (it->is_object()) {
        r.fail(str_cat("\"", key, "\" per layer type (\"", it.key(), "\") is not supported"));
      }
    }
  }
  if (const json* p = r.find("partial_rotary_factor"); p && !p->is_null())
    if (!p->is_number() || p->get<double>() != 1.0)
      r.fail(str_cat("partial_rotary_factor ", json_brief(*p), " is not supported"));
  if (!(theta > 0) || !std::isfinite(theta))
    r.fail(str_cat("rope_theta must be positive, got ", theta));
  return theta;
}

// The keys parse_hf_config models; everything else goes to `extra`.
const std::vector<std::string>& consumed_keys(ModelFamily f) {
  static const std::vector<std::string> common = {
      "architectures",       "model_type",   "vocab_size",
      "tie_word_embeddings", "bos_token_id", "eos_token_id",
      "pad_token_id",        "torch_dtype",  "dtype"};
  static const std::vector<std::string> gpt2 = {"n_embd",
                                                "n_layer",
                                                "n_head",
                                                "n_positions",
                                                "n_inner",
                                                "activation_function",
                                                "layer_norm_epsilon"};
  static const std::vector<std::string> llama = {"hidden_size",
                                                 "intermediate_size",
                                                 "num_hidden_layers",
                                                 "num_attention_heads",
                                                 "num_key_value_heads",
                                                 "head_dim",
                                                 "max_position_embeddings",
                                                 "rms_norm_eps",
                                                 "rope_theta",
                                                 "rope_scaling",
                                                 "rope_parameters",
                                                 "partial_rotary_factor",
                                                 "hidden_act",
                                                 "attention_bias",
                                                 "mlp_bias",
                                                 "sliding_window",
                                                 "use_sliding_window",
                                                 "max_window_layers"};
  // Built once, thread-safely (a static's initialiser): trainers of several in-process ranks
  // load their configs at the same time.
  static const std::vector<std::vector<std::string>> by_family = [] {
    std::vector<std::vector<std::string>> b(4);
    for (int k = 0; k < 4; ++k) {
      b[size_t(k)] = common;
      const auto& add = ModelFamily(k) == ModelFamily::gpt2 ? gpt2 : llama;
      b[size_t(k)].insert(b[size_t(k)].end(), add.begin(), add.end());
    }
    return b;
  }();
  return by_family[size_t(f)];
}

void parse_gpt2(const Reader& r, ModelConfig& c) {
  c.vocab_size = r.positive("vocab_size", 50257);
  c.max_position_embeddings = r.positive("n_positions", 1024);
  c.hidden_size = r.positive("n_embd", 768);
  c.num_hidden_layers = r.positive("n_layer", 12);
  c.num_attention_heads = r.positive("n_head", 12);
  c.num_key_value_heads = c.num_attention_heads;
  c.intermediate_size = r.opt_int("n_inner").value_or(4 * c.hidden_size);
  if (c.intermediate_size <= 0) r.fail(str_cat("\"n_inner\" must be positive"));
  c.hidden_act = r.get_string("activation_function", "gelu_new");
  static const char* kActs[] = {"gelu_new", "gelu_pytorch_tanh", "gelu"};
  if (std::find(std::begin(kActs), std::end(kActs), c.hidden_act) == std::end(kActs))
    r.fail(str_cat("activation_function '", c.hidden_act,
                   "' is not supported (supported: gelu_new, gelu_pytorch_tanh, gelu)"));
  c.norm_eps = r.get_double("layer_norm_epsilon", 1e-5);
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", true);
  c.bos_token_id = r.find("bos_token_id") ? r.opt_int("bos_token_id") : 50256;
  if (!r.find("eos_token_id")) c.eos_token_ids = {50256};
  c.attention_bias = c.attention_out_bias = c.mlp_bias = true;
  // Attention variants GPT2LMHeadModel has flags for and ftune does not implement.
  if (!r.get_bool("scale_attn_weights", true)) r.fail("scale_attn_weights=false is not supported");
  if (r.get_bool("scale_attn_by_inverse_layer_idx", false))
    r.fail("scale_attn_by_inverse_layer_idx=true is not supported");
  if (r.get_bool("add_cross_attention", false)) r.fail("add_cross_attention=true is not supported");
  if (c.hidden_size % c.num_attention_heads != 0)
    r.fail(
        str_cat("n_embd ", c.hidden_size, " is not a multiple of n_head ", c.num_attention_heads));
  c.head_dim = c.hidden_size / c.num_attention_heads;
}

void parse_llama_like(const Reader& r, ModelConfig& c, const HfConfigOptions& opt) {
  // transformers defaults per family (configuration_{llama,mistral,qwen2}.py).
  const bool llama = c.family == ModelFamily::llama, mistral = c.family == ModelFamily::mistral;
  c.vocab_size = r.positive("vocab_size", llama ? 32000 : mistral ? 32000 : 151936);
  c.hidden_size = r.positive("hidden_size", 4096);
  c.intermediate_size = r.positive("intermediate_size", llama ? 11008 : mistral ? 14336 : 22016);
  c.num_hidden_layers = r.positive("num_hidden_layers", 32);
  c.num_attention_heads = r.positive("num_attention_heads", 32);
  // Absent: Llama None -> heads, Mistral 8, Qwen2 32; null -> heads in all three.
  int64_t kv_default = llama ? c.num_attention_heads : mistral ? 8 : 32;
  if (const json* v = r.find("num_key_value_heads"); v && v->is_null())
    kv_default = c.num_attention_heads;
  c.num_key_value_heads = r.opt_int("num_key_value_heads").value_or(kv_default);
  if (c.num_key_value_heads <= 0 || c.num_attention_heads % c.num_key_value_heads != 0)
    r.fail(str_cat("num_attention_heads ", c.num_attention_heads,
                   " is not a multiple of num_key_value_heads ", c.num_key_value_heads));
  auto hd = r.opt_int("head_dim");
  if (!hd && c.hidden_size % c.num_attention_heads != 0)
    r.fail(str_cat("hidden_size ", c.hidden_size, " is not a multiple of num_attention_heads ",
                   c.num_attention_heads, " and no head_dim is given"));
  c.head_dim = hd.value_or(c.hidden_size / c.num_attention_heads);
  if (c.head_dim <= 0 || c.head_dim % 2 != 0)
    r.fail(str_cat("head_dim ", c.head_dim, " must be positive and even (RoPE rotates pairs)"));
  c.max_position_embeddings = r.positive("max_position_embeddings", llama     ? 2048
                                                                    : mistral ? 4096 * 32
                                                                              : 32768);
  c.norm_eps = r.get_double("rms_norm_eps", 1e-6);
  c.rope_theta = parse_rope(r);
  c.hidden_act = r.get_string("hidden_act", "silu");
  if (c.hidden_act != "silu" && c.hidden_act != "swish")
    r.fail(str_cat("hidden_act '", c.hidden_act, "' is not supported (supported: silu)"));
  c.tie_word_embeddings = r.get_bool("tie_word_embeddings", false);
  if (llama) {
    c.attention_bias = c.attention_out_bias = r.get_bool("attention_bias", false);
    c.mlp_bias = r.get_bool("mlp_bias", false);
    c.bos_token_id = r.find("bos_token_id") ? r.opt_int("bos_token_id") : 1;
    if (!r.find("eos_token_id")) c.eos_token_ids = {2};
  } else if (mistral) {
    c.bos_token_id = r.find("bos_token_id") ? r.opt_int("bos_token_id") : 1;
    if (!r.find("eos_token_id")) c.eos_token_ids = {2};
    // sliding_window defaults to 4096 when absent; null disables it.
    c.sliding_window = r.find("sliding_window") ? r.opt_int("sliding_window") : 4096;
  } else {  // qwen2: q/k/v always have biases, o_proj never
    c.attention_bias = true;
    c.bos_token_id = r.opt_int("bos_token_id");
    std::optional<int64_t> w = r.find("sliding_window") ? r.opt_int("sliding_window") : 4096;
    c.sliding_window = r.get_bool("use_sliding_window", false) ? w : std::nullopt;
    c.max_window_layers = r.get_int("max_window_layers", 28);
  }

  // Which layers would apply the window (transformers: Qwen2 layers >= max_window_layers, or the
  // explicit layer_types; Mistral all layers).
  bool any_windowed = c.sliding_window.has_value();
  if (c.family == ModelFamily::qwen2 && c.sliding_window) {
    any_windowed = c.max_window_layers < c.num_hidden_layers;
    if (const json* lt = r.find("layer_types"); lt && !lt->is_null()) {
      if (!lt->is_array()) r.fail("\"layer_types\" must be a list");
      any_windowed = std::any_of(lt->begin(), lt->end(), [](const json& x) {
        return x.is_string() && x.get<std::string>() == "sliding_attention";
      });
    }
  }
  if (c.sliding_window && *c.sliding_window <= 0)
    r.fail(str_cat("sliding_window must be positive, got ", *c.sliding_window));
  if (any_windowed) {
    int64_t limit = opt.max_seq_len > 0 ? opt.max_seq_len : c.max_position_embeddings;
    if (*c.sliding_window < limit)
      r.fail(str_cat("sliding_window ", *c.sliding_window, " < ",
                     opt.max_seq_len > 0 ? "max_seq_len " : "max_position_embeddings ", limit,
                     ": sliding-window attention is not supported (it is exact full attention "
                     "only for sequences of at most ",
                     *c.sliding_window, " tokens; pass max_seq_len <= ", *c.sliding_window,
                     " to use the model with such sequences)"));
  } else {
    c.sliding_window.reset();  // no layer uses it: transformers attends fully everywhere
  }
}

}  // namespace

const char* family_name(ModelFamily f) { return kFamilies[int(f)].model_type; }

int64_t ModelConfig::max_seq_len() const {
  return sliding_window ? std::min(max_position_embeddings, *sliding_window)
                        : max_position_embeddings;
}

ModelConfig parse_hf_config(const json& j, const std::string& what, const HfConfigOptions& opt) {
  Reader r(j, what);
  if (!j.is_object()) r.fail("expected a JSON object");
  const FamilyInfo& fam = resolve_family(r, j);
  ModelConfig c;
  c.family = fam.family;
  c.architecture = fam.architecture;
  c.model_type = fam.model_type;
  if (c.family == ModelFamily::gpt2) {
    parse_gpt2(r, c);
  } else {
    parse_llama_like(r, c, opt);
  }
  if (!(c.norm_eps > 0) || !std::isfinite(c.norm_eps)) r.fail("norm epsilon must be positive");

  c.pad_token_id = r.opt_int("pad_token_id");
  if (const json* e = r.find("eos_token_id"); e && !e->is_null()) {
    if (e->is_array()) {
      c.eos_token_is_list = true;
      c.eos_token_ids.clear();
      for (const json& x : *e) {
        if (!x.is_number_integer()) r.fail(str_cat("\"eos_token_id\" list holds ", json_brief(x)));
        c.eos_token_ids.push_back(x.get<int64_t>());
      }
    } else {
      c.eos_token_ids = {r.get_int("eos_token_id", 0)};
    }
  } else if (e) {
    c.eos_token_ids.clear();  // explicit null
  }
  // transformers 5 writes "dtype", older versions "torch_dtype".
  c.torch_dtype = r.get_string("dtype", r.get_string("torch_dtype", ""));

  const auto& used = consumed_keys(c.family);
  for (auto it = j.begin(); it != j.end(); ++it)
    if (std::find(used.begin(), used.end(), it.key()) == used.end()) c.extra[it.key()] = *it;
  return c;
}

ModelConfig load_hf_config(const std::string& path, const HfConfigOptions& opt) {
  return parse_hf_config_text(read_text_file(path, "hf_config"), path, opt);
}

ModelConfig parse_hf_config_text(const std::string& text, const std::string& path,
                                 const HfConfigOptions& opt) {
  json j;
  // A bound on nesting keeps later recursive walks (copies into `extra`, dumps) off the stack's
  // end.
  auto depth_limit = [&](int depth, json::parse_event_t, json&) {
    if (depth > 128) FTUNE_THROW("[hf_config] ", path, ": JSON nests deeper than 128 levels");
    return true;
  };
  try {
    j = json::parse(text, depth_limit);
  } catch (const json::exception& e) {
    FTUNE_THROW("[hf_config] ", path, ": not valid JSON: ", e.what());
  }
  return parse_hf_config(j, path, opt);
}

json ModelConfig::to_json() const {
  json j = extra.is_object() ? extra : json::object();
  auto opt = [](const std::optional<int64_t>& v) { return v ? json(*v) : json(nullptr); };
  j["architectures"] = json::array({architecture});
  j["model_type"] = model_type;
  j["vocab_size"] = vocab_size;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["bos_token_id"] = opt(bos_token_id);
  j["pad_token_id"] = opt(pad_token_id);
  if (eos_token_is_list) {
    j["eos_token_id"] = eos_token_ids;
  } else {
    j["eos_token_id"] = eos_token_ids.empty() ? json(nullptr) : json(eos_token_ids[0]);
  }
  if (!torch_dtype.empty()) j["torch_dtype"] = torch_dtype;
  if (family == ModelFamily::gpt2) {
    j["n_embd"] = hidden_size;
    j["n_layer"] = num_hidden_layers;
    j["n_head"] = num_attention_heads;
    j["n_positions"] = max_position_embeddings;
    j["n_inner"] = intermediate_size == 4 * hidden_size ? json(nullptr) : json(intermediate_size);
    j["activation_function"] = hidden_act;
    j["layer_norm_epsilon"] = norm_eps;
    return j;
  }
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = norm_eps;
  j["hidden_act"] = hidden_act;
  // transformers < 5 reads rope_theta; 5 reads rope_parameters (and converts rope_theta).
  j["rope_theta"] = rope_theta;
  j["rope_scaling"] = nullptr;
  if (family == ModelFamily::llama) {
    j["attention_bias"] = attention_bias;
    j["mlp_bias"] = mlp_bias;
  } else if (family == ModelFamily::mistral) {
    j["sliding_window"] = opt(sliding_window);
  } else {
    j["use_sliding_window"] = sliding_window.has_value();
    j["sliding_window"] = opt(sliding_window);
    j["max_window_layers"] = max_window_layers;
  }
  return j;
}

void save_hf_config(const ModelConfig& c, const std::string& path) {
  write_file_atomic(path, c.to_json().dump(2) + "\n", "hf_config");
}

}  // namespace ftune
