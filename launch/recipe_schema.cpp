// The recipe schema: every key of trainers/config.h with its YAML name, type and range, the files
// a recipe names, and the settings that conflict. docs/recipes.md is the user's copy of this.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "data/chat_template.h"
#include "launch/recipe_tree.h"

namespace ftune {

namespace fs = std::filesystem;

namespace {

using Kind = RecipeNode::Kind;
// A range check on a number: "" when fine, else what is wrong ("must be > 0").
using Check = std::function<std::string(double)>;

Check at_least(double lo) {
  return [lo](double v) { return v >= lo ? "" : str_cat("must be >= ", lo); };
}
Check positive() {
  return [](double v) { return v > 0 ? "" : std::string("must be > 0"); };
}
Check in_range(double lo, double hi, bool hi_open) {
  return [=](double v) {
    return v >= lo && (hi_open ? v < hi : v <= hi)
               ? ""
               : str_cat("must be in [", lo, ", ", hi, hi_open ? ")" : "]");
  };
}

std::string describe(const RecipeNode& n) {
  switch (n.kind) {
    case Kind::Null:
      return "nothing (null)";
    case Kind::Seq:
      return "a list";
    case Kind::Map:
      return "a section (mapping)";
    default:
      return n.quoted ? str_cat("the string \"", n.text, "\"") : str_cat("`", n.text, "`");
  }
}

// Other tools' names for our keys, for "did you mean" (axolotl, HF TrainingArguments, PEFT).
const std::map<std::string, std::string>& aliases() {
  static const std::map<std::string, std::string> m = {
      {"learning_rate", "optimizer.lr"},
      {"gradient_checkpointing", "enable_activation_checkpointing"},
      {"activation_checkpointing", "enable_activation_checkpointing"},
      {"tf32", "allow_tf32"},
      {"num_epochs", "epochs"},
      {"num_train_epochs", "epochs"},
      {"micro_batch_size", "batch_size"},
      {"per_device_train_batch_size", "batch_size"},
      {"gradient_accumulation", "gradient_accumulation_steps"},
      {"max_grad_norm", "clip_grad_norm"},
      {"warmup_steps", "lr_scheduler.num_warmup_steps"},
      {"sequence_len", "tokenizer.max_seq_len"},
      {"max_length", "tokenizer.max_seq_len"},
      {"base_model", "model.path"},
      {"lora_r", "lora.r"},
      {"lora_alpha", "lora.alpha"},
      {"lora_dropout", "lora.dropout"},
      {"lora_target_modules", "lora.target_modules"},
      {"_component_", "optimizer.name"},
      {"sample_packing", "dataset.packed"},
      {"val_set_size", "dataset.val_size"},
      {"lora_rank", "lora.r"},
      {"rank", "lora.r"},
  };
  return m;
}

class Binder;

class Section {
 public:
  Section(Binder& b, std::string path, const RecipeNode* node, bool present)
      : b_(b), path_(std::move(path)), node_(node), present_(present) {}

  bool present() const { return present_; }  // the key is in the recipe (maybe null)
  bool has(const char* key) const { return node_ && node_->find(key); }

  // The value of `key` (registered as known), or null when absent or already reported.
  const RecipeNode* value(const char* key);
  std::string full(const char* key) const { return path_.empty() ? key : path_ + "." + key; }

  void string(const char* key, std::string& out, bool nullable = false);
  void integer(const char* key, int64_t& out, const Check& check = {});
  void number(const char* key, double& out, const Check& check = {});
  void boolean(const char* key, bool& out);
  void choice(const char* key, std::string& out, const std::vector<std::string>& allowed);
  void strings(const char* key, std::vector<std::string>& out);
  Section section(const char* key);
  void finish();

 private:
  void type_error(const char* key, const RecipeNode& v, const std::string& expected);
  bool scalar(const char* key, const RecipeNode& v, const std::string& expected);

  Binder& b_;
  std::string path_;
  const RecipeNode* node_;
  bool present_;
  std::vector<std::string> known_;
};

class Binder {
 public:
  Binder(std::string file, std::vector<Diagnostic>& diags)
      : file_(std::move(file)), diags_(diags) {}

  void error(const RecipeLoc& loc, std::string msg) {
    diags_.push_back(make_diag(loc, std::move(msg)));
  }
  void error_at(const std::string& path, std::string msg) { error(loc(path), std::move(msg)); }
  RecipeLoc loc(const std::string& path) const {
    auto it = locs_.find(path);
    return it != locs_.end() ? it->second : RecipeLoc{file_, 0, 0};
  }
  std::string where(const std::string& path) const {  // " (line 7)" for messages
    RecipeLoc l = loc(path);
    if (l.line <= 0) return "";
    if (l.file != file_) return str_cat(" (", l.file, ":", l.line, ")");
    return str_cat(" (line ", l.line, ")");
  }
  bool is_set(const std::string& path) const { return locs_.count(path) > 0; }
  RecipeLoc key_loc(const std::string& path) const {
    auto it = key_locs_.find(path);
    return it != key_locs_.end() ? it->second : RecipeLoc{file_, 0, 0};
  }
  void note_key(const std::string& path, const RecipeLoc& l) { key_locs_[path] = l; }

  void register_key(const std::string& path) { known_.insert(path); }
  void note(const std::string& path, const RecipeLoc& value_loc) { locs_[path] = value_loc; }

  struct Unknown {
    std::string section, key;
    RecipeLoc loc;
    std::vector<std::string> siblings;
  };
  void unknown(Unknown u) { unknown_.push_back(std::move(u)); }

  // "did you mean" needs every known key, so unknown keys are reported at the end.
  void report_unknown() {
    for (const auto& u : unknown_) {
      const std::string path = u.section.empty() ? u.key : u.section + "." + u.key;
      std::string hint;
      // 1. another tool's name for one of our keys (learning_rate), or a near miss of one
      for (const auto& [alias, target] : aliases()) {
        const size_t d = edit_distance(u.key, alias);
        if ((d == 0 || (alias.size() >= 8 && d <= 2)) && known_.count(target)) {
          hint = target;
          break;
        }
      }
      // 2. the same name in another section (lr at the top: optimizer.lr)
      if (hint.empty())
        for (const auto& k : known_)
          if (k != path && leaf(k) == u.key) {
            hint = k;
            break;
          }
      // 3. the nearest key of this section, then of any section
      const size_t tolerance = u.key.size() / 3;
      if (hint.empty()) {
        size_t best = tolerance + 1;
        for (const auto& s : u.siblings) {
          const size_t d = edit_distance(u.key, s);
          if (d < best) best = d, hint = s;
        }
      }
      if (hint.empty()) {
        size_t best = std::min<size_t>(tolerance, 2) + 1;
        for (const auto& k : known_) {
          const size_t d = edit_distance(u.key, leaf(k));
          if (d < best && k != path) best = d, hint = k;
        }
      }
      // name a key of this section by its own name, another by its full path
      if (!u.section.empty() && hint.rfind(u.section + ".", 0) == 0)
        hint = hint.substr(u.section.size() + 1);
      std::string msg = str_cat("unknown key `", u.key, "`");
      if (!u.section.empty()) msg += str_cat(" in `", u.section, "`");
      if (!hint.empty()) {
        msg += str_cat(": did you mean `", hint, "`?");
      } else {
        msg += ": valid keys here are ";
        for (size_t i = 0; i < u.siblings.size(); ++i) msg += (i ? ", " : "") + u.siblings[i];
      }
      error(u.loc, msg);
    }
  }

  const std::string& file() const { return file_; }

 private:
  static std::string leaf(const std::string& k) {
    const size_t dot = k.rfind('.');
    return dot == std::string::npos ? k : k.substr(dot + 1);
  }

 private:
  std::string file_;
  std::vector<Diagnostic>& diags_;
  std::map<std::string, RecipeLoc> locs_, key_locs_;
  std::set<std::string> known_;
  std::vector<Unknown> unknown_;
};

const RecipeNode* Section::value(const char* key) {
  if (std::find(known_.begin(), known_.end(), key) == known_.end()) known_.push_back(key);
  b_.register_key(full(key));
  if (!node_) return nullptr;
  const RecipeNode* v = node_->find(key);
  if (!v || v->kind == Kind::Invalid) return nullptr;
  b_.note(full(key), v->loc);
  b_.note_key(full(key), node_->entry(key)->key_loc);
  return v;
}

void Section::type_error(const char* key, const RecipeNode& v, const std::string& expected) {
  std::string msg = str_cat("`", full(key), "` must be ", expected, ", got ", describe(v));
  if (v.kind == Kind::Scalar && v.quoted && expected.find("string") == std::string::npos)
    msg += " (quotes make a string: remove them)";
  if (v.kind == Kind::Null)
    msg = str_cat("`", full(key), "` has no value (expected ", expected,
                  "; delete the key to use the default)");
  b_.error(v.loc, msg);
}

bool Section::scalar(const char* key, const RecipeNode& v, const std::string& expected) {
  if (v.kind == Kind::Scalar) return true;
  type_error(key, v, expected);
  return false;
}

void Section::string(const char* key, std::string& out, bool nullable) {
  const RecipeNode* v = value(key);
  if (!v) return;
  if (v->kind == Kind::Null && nullable) {
    out.clear();
    return;
  }
  if (scalar(key, *v, "a string")) out = v->text;
}

void Section::integer(const char* key, int64_t& out, const Check& check) {
  const RecipeNode* v = value(key);
  if (!v || !scalar(key, *v, "an integer")) return;
  int64_t x = 0;
  const char* s = v->text.data();
  const char* e = s + v->text.size();
  if (s != e && *s == '+') ++s;
  auto [p, ec] = std::from_chars(s, e, x);
  if (v->quoted || ec != std::errc() || p != e || s == e) {
    // 1e3 and 100.0 are whole numbers too
    char* end = nullptr;
    const double d = v->quoted ? NAN : std::strtod(v->text.c_str(), &end);
    if (v->quoted || v->text.empty() || end != v->text.c_str() + v->text.size() ||
        !std::isfinite(d) || d != std::floor(d) || std::fabs(d) > 9.0e15)
      return type_error(key, *v, "an integer");
    x = int64_t(d);
  }
  if (check) {
    const std::string why = check(double(x));
    if (!why.empty()) return b_.error(v->loc, str_cat("`", full(key), "` ", why, ", got ", x));
  }
  out = x;
}

void Section::number(const char* key, double& out, const Check& check) {
  const RecipeNode* v = value(key);
  if (!v || !scalar(key, *v, "a number")) return;
  char* end = nullptr;
  const double d = std::strtod(v->text.c_str(), &end);
  if (v->quoted || v->text.empty() || end != v->text.c_str() + v->text.size() || !std::isfinite(d))
    return type_error(key, *v, "a number");
  if (check) {
    const std::string why = check(d);
    if (!why.empty())
      return b_.error(v->loc, str_cat("`", full(key), "` ", why, ", got ", v->text));
  }
  out = d;
}

void Section::boolean(const char* key, bool& out) {
  const RecipeNode* v = value(key);
  if (!v || !scalar(key, *v, "true or false")) return;
  static const std::set<std::string> t = {"true", "True", "TRUE"}, f = {"false", "False", "FALSE"};
  if (!v->quoted && t.count(v->text))
    out = true;
  else if (!v->quoted && f.count(v->text))
    out = false;
  else
    type_error(key, *v, "true or false");
}

void Section::choice(const char* key, std::string& out, const std::vector<std::string>& allowed) {
  const RecipeNode* v = value(key);
  if (!v || !scalar(key, *v, "a string")) return;
  if (std::find(allowed.begin(), allowed.end(), v->text) != allowed.end()) {
    out = v->text;
    return;
  }
  std::string list;
  std::string best;
  size_t best_d = std::max<size_t>(2, v->text.size() / 3) + 1;
  for (const auto& a : allowed) {
    list += (list.empty() ? "" : ", ") + a;
    size_t d = edit_distance(v->text, a);
    if (d < best_d) best_d = d, best = a;
  }
  std::string msg = str_cat("`", full(key), "`: ", describe(*v), " is not one of: ", list);
  if (!best.empty()) msg += str_cat(" (did you mean `", best, "`?)");
  b_.error(v->loc, msg);
}

void Section::strings(const char* key, std::vector<std::string>& out) {
  const RecipeNode* v = value(key);
  if (!v) return;
  if (v->kind != Kind::Seq) return type_error(key, *v, "a list of strings, like [a, b]");
  std::vector<std::string> r;
  bool ok = true;
  for (const auto& item : v->items) {
    if (item.kind == Kind::Scalar) {
      r.push_back(item.text);
    } else if (item.kind != Kind::Invalid) {
      b_.error(item.loc, str_cat("`", full(key), "` must be a list of strings; this item is ",
                                 describe(item)));
      ok = false;
    }
  }
  if (ok) out = std::move(r);
}

Section Section::section(const char* key) {
  const RecipeNode* v = value(key);
  if (!v) return Section(b_, full(key), nullptr, false);
  if (v->kind == Kind::Map) return Section(b_, full(key), v, true);
  if (v->kind == Kind::Null) return Section(b_, full(key), nullptr, true);
  type_error(key, *v, "a section (keys indented below it)");
  return Section(b_, full(key), nullptr, false);
}

void Section::finish() {
  if (!node_) return;
  for (const auto& e : node_->entries)
    if (std::find(known_.begin(), known_.end(), e.key) == known_.end())
      b_.unknown({path_, e.key, e.key_loc, known_});
}

std::string cwd_note(const std::string& p) {
  if (fs::path(p).is_absolute()) return "";
  std::error_code ec;
  return str_cat(" (relative paths are resolved against the current directory, ",
                 fs::current_path(ec).string(), ")");
}

// ---------------------------------------------------------------- files

void check_files(Binder& b, const SftConfig& c) {
  std::error_code ec;
  const std::string& mp = c.model.path;
  bool model_ok = false;
  if (!mp.empty()) {
    if (!fs::exists(mp, ec)) {
      b.error_at("model.path", str_cat("model.path: no such folder `", mp, "`", cwd_note(mp)));
    } else if (!fs::is_directory(mp, ec)) {
      b.error_at("model.path", str_cat("model.path: `", mp,
                                       "` is not a folder (a Hugging Face model folder holding "
                                       "config.json)"));
    } else if (!fs::is_regular_file(fs::path(mp) / "config.json", ec)) {
      b.error_at("model.path", str_cat("model.path: `", mp, "` has no config.json"));
    } else {
      model_ok = true;
      if (c.model.init == "pretrained" &&
          !fs::is_regular_file(fs::path(mp) / "model.safetensors", ec) &&
          !fs::is_regular_file(fs::path(mp) / "model.safetensors.index.json", ec))
        b.error_at("model.path",
                   str_cat("model.path: `", mp,
                           "` has no model.safetensors (nor model.safetensors.index.json); "
                           "set model.init: random to train from scratch"));
    }
  }
  const std::string& tp = c.tokenizer.path;
  if (!tp.empty()) {
    if (!fs::exists(tp, ec))
      b.error_at("tokenizer.path",
                 str_cat("tokenizer.path: no such file or folder `", tp, "`", cwd_note(tp)));
    else if (fs::is_directory(tp, ec) && !fs::is_regular_file(fs::path(tp) / "tokenizer.json", ec))
      b.error_at("tokenizer.path", str_cat("tokenizer.path: `", tp, "` has no tokenizer.json"));
  } else if (model_ok && !fs::is_regular_file(fs::path(mp) / "tokenizer.json", ec)) {
    b.error_at("model.path", str_cat("model.path: `", mp,
                                     "` has no tokenizer.json; set tokenizer.path to the "
                                     "tokenizer's file or folder"));
  }
  for (const char* key : {"dataset.path", "dataset.val_path"}) {
    const std::string& p = std::string(key) == "dataset.path" ? c.dataset.path : c.dataset.val_path;
    if (p.empty()) continue;
    if (!fs::exists(p, ec))
      b.error_at(key, str_cat(key, ": no such file `", p, "`", cwd_note(p)));
    else if (!fs::is_regular_file(p, ec))
      b.error_at(key, str_cat(key, ": `", p, "` is not a file (a JSONL file is expected)"));
  }
  // the model's context length bounds max_seq_len
  if (model_ok && b.is_set("tokenizer.max_seq_len")) {
    try {
      std::ifstream in(fs::path(mp) / "config.json");
      const auto j = nlohmann::json::parse(in);
      for (const char* k : {"max_position_embeddings", "n_positions"})
        if (j.contains(k) && j[k].is_number_integer()) {
          const int64_t n = j[k].get<int64_t>();
          if (c.tokenizer.max_seq_len > n)
            b.error_at("tokenizer.max_seq_len",
                       str_cat("tokenizer.max_seq_len is ", c.tokenizer.max_seq_len,
                               " but the model (", mp, "/config.json) has ", k, " = ", n));
          break;
        }
    } catch (const std::exception&) {
      // a broken config.json is reported when the model loads, with the JSON error
    }
  }
}

// ---------------------------------------------------------------- conflicts

void check_conflicts(Binder& b, const SftConfig& c, bool lora_present) {
  const bool has_val = !c.dataset.val_path.empty() || c.dataset.val_size > 0;
  if (c.attention.backend == "cudnn" && c.device == "cpu")
    b.error_at("attention.backend", str_cat("attention.backend: cudnn needs device: cuda",
                                            b.where("device"), " (cuDNN runs on the GPU)"));
  if (c.dtype == "f16" && c.parallel.zero == 1)
    b.error_at("parallel.zero",
               str_cat("parallel.zero: 1 with dtype: f16", b.where("dtype"),
                       " is not supported yet (ZeRO-1's f16 gradient shards would underflow when "
                       "the loss scale is divided out); use dtype: bf16, or zero: 0"));
  if (lora_present && c.model.init == "random")
    b.error(b.key_loc("lora"),
            str_cat("LoRA needs pretrained weights, but model.init is `random`",
                    b.where("model.init"), "; drop the lora section for full training"));
  if (!c.dataset.val_path.empty() && c.dataset.val_size > 0)
    b.error_at("dataset.val_size", str_cat("give dataset.val_path", b.where("dataset.val_path"),
                                           " or dataset.val_size, not both"));
  if (c.dataset.val_size >= 1 && c.dataset.val_size != std::floor(c.dataset.val_size))
    b.error_at("dataset.val_size",
               str_cat("dataset.val_size >= 1 is a count of examples; ", c.dataset.val_size,
                       " is not a whole number (a fraction must be < 1)"));
  if (c.eval_every_n_steps > 0 && !has_val)
    b.error_at("eval_every_n_steps",
               "eval_every_n_steps needs a held-out split: set "
               "dataset.val_path or dataset.val_size");
  if (c.early_stopping.patience > 0 && !has_val)
    b.error_at("early_stopping.patience",
               "early stopping watches the eval loss and needs a "
               "held-out split: set dataset.val_path or "
               "dataset.val_size");
  if (c.max_steps == -1 && c.epochs == 0)
    b.error_at(b.is_set("epochs") ? "epochs" : "max_steps",
               "nothing to train: epochs is 0 and max_steps is -1 (set one of them)");
  if (c.output_dir.empty())
    b.error_at(b.is_set("output_dir") ? "output_dir" : "resume",
               c.resume ? "resume: true needs output_dir (where the checkpoints are)"
                        : "output_dir must not be empty");
  if (c.max_steps > 0 && c.lr_scheduler.num_warmup_steps >= c.max_steps)
    b.error_at("lr_scheduler.num_warmup_steps",
               str_cat("lr_scheduler.num_warmup_steps (", c.lr_scheduler.num_warmup_steps,
                       ") must be less than max_steps (", c.max_steps, ")", b.where("max_steps")));
  if (lora_present) {
    const auto& t = c.lora.target_modules;
    if (t.empty())
      b.error_at("lora.target_modules",
                 "lora.target_modules is empty: name modules (q_proj, v_proj, ...) or all-linear");
    else if (t.size() > 1 && std::find(t.begin(), t.end(), "all-linear") != t.end())
      b.error_at("lora.target_modules",
                 "`all-linear` already names every linear module; give it "
                 "alone");
  }
}

// `loss_scale: dynamic | none | <number>` (a number: a fixed scale), `loss_scale_init`,
// `loss_scale_growth_interval` (trainers/loss_scaler.h). The scale is an f32 value, as torch's.
void bind_loss_scale(Binder& b, Section& top, SftConfig& c) {
  const Check f32_scale = [](double v) {
    return v > 0 && v <= 3.4028234663852886e38 ? ""
                                                : std::string("must be > 0 and at most 3.4e38 "
                                                              "(the largest f32)");
  };
  bool fixed_number = false;
  if (const RecipeNode* v = top.value("loss_scale")) {
    char* end = nullptr;
    const double d = v->kind == Kind::Scalar ? std::strtod(v->text.c_str(), &end) : NAN;
    const bool is_number = v->kind == Kind::Scalar && !v->quoted && !v->text.empty() &&
                           end == v->text.c_str() + v->text.size();
    if (v->kind == Kind::Scalar && (v->text == "dynamic" || v->text == "none")) {
      c.loss_scale = v->text;
    } else if (is_number && std::isfinite(d) && f32_scale(d).empty()) {
      c.loss_scale = "fixed";
      c.loss_scale_init = d;
      fixed_number = true;
    } else if (is_number) {
      b.error(v->loc, str_cat("`loss_scale` ", f32_scale(d), ", got ", v->text));
    } else {
      b.error(v->loc, str_cat("`loss_scale` must be dynamic, none or a number (a fixed scale), "
                              "got ", describe(*v)));
    }
  }
  const bool init_set = top.has("loss_scale_init");
  top.number("loss_scale_init", c.loss_scale_init, f32_scale);
  top.integer("loss_scale_growth_interval", c.loss_scale_growth_interval, at_least(1));
  if (fixed_number && init_set)
    b.error_at("loss_scale_init", str_cat("give `loss_scale: <number>`", b.where("loss_scale"),
                                          " or loss_scale_init, not both"));
  const std::string mode = c.loss_scale != "auto" ? c.loss_scale
                           : c.dtype == "f16"     ? std::string("dynamic")
                                                  : std::string("none");
  const char* why_off = c.loss_scale == "none" ? "loss_scale is none"
                                               : "loss scaling is off for dtype f32 and bf16";
  for (const char* key : {"loss_scale_init", "loss_scale_growth_interval"}) {
    if (!top.has(key)) continue;
    if (mode == "none")
      b.error_at(key, str_cat("`", key, "` has no effect: ", why_off,
                              " (set loss_scale: dynamic to scale the loss)"));
    else if (mode == "fixed" && std::string(key) == "loss_scale_growth_interval")
      b.error_at(key, str_cat("`", key, "` needs loss_scale: dynamic; a number in loss_scale",
                              b.where("loss_scale"), " is a fixed scale"));
  }
}

}  // namespace

void bind_sft_config(const RecipeNode& root, const std::string& file, SftConfig& c,
                     std::vector<Diagnostic>& diags) {
  std::vector<Diagnostic> found;
  Binder b(file, found);
  Section top(b, "", &root, true);

  std::string method = "sft";
  top.choice("method", method, {"sft"});
  top.string("output_dir", c.output_dir);
  int64_t seed = 0;
  top.integer("seed", seed, at_least(0));
  c.seed = uint64_t(seed);
  top.choice("dtype", c.dtype, {"f32", "bf16", "f16"});
  top.boolean("enable_activation_checkpointing", c.enable_activation_checkpointing);
  top.boolean("allow_tf32", c.allow_tf32);
  top.boolean("gemm_autotune", c.gemm_autotune);
  top.boolean("chunked_loss", c.chunked_loss);
  if (const RecipeNode* d = top.value("device"); d && d->kind == Kind::Scalar) {
    const std::string& s = d->text;
    const bool ok = s == "cpu" || s == "cuda" ||
                    (s.rfind("cuda:", 0) == 0 && s.size() > 5 &&
                     std::all_of(s.begin() + 5, s.end(), ::isdigit));
    if (ok)
      c.device = s;
    else
      b.error(d->loc, str_cat("`device`: ", describe(*d), " is not cpu, cuda or cuda:N"));
  } else if (d) {
    b.error(d->loc, str_cat("`device` must be cpu, cuda or cuda:N, got ", describe(*d)));
  }

  Section model = top.section("model");
  model.string("path", c.model.path);
  model.choice("init", c.model.init, {"pretrained", "random"});
  model.number("init_std", c.model.init_std, positive());
  model.finish();
  if (!model.has("path"))
    b.error(b.key_loc("model"), "missing required key `model.path` (a Hugging Face model folder)");

  Section tok = top.section("tokenizer");
  tok.string("path", c.tokenizer.path, true);
  tok.integer("max_seq_len", c.tokenizer.max_seq_len, at_least(2));
  {
    std::vector<std::string> allowed = {"", "auto"};
    for (const auto& n : ChatTemplate::names()) allowed.push_back(n);
    if (const RecipeNode* v = tok.value("chat_template"); v && v->kind == Kind::Null) {
      c.tokenizer.chat_template.clear();
    } else if (v) {
      std::string t;
      Section(tok).choice("chat_template", t, allowed);
      c.tokenizer.chat_template = t;
    }
  }
  tok.finish();

  Section data = top.section("dataset");
  data.string("path", c.dataset.path);
  data.choice("format", c.dataset.format,
              {"auto", "text", "prompt_completion", "messages", "alpaca"});
  data.boolean("train_on_input", c.dataset.train_on_input);
  data.boolean("packed", c.dataset.packed);
  data.choice("truncation", c.dataset.truncation, {"right", "left", "drop"});
  data.string("val_path", c.dataset.val_path, true);
  data.number("val_size", c.dataset.val_size, at_least(0));
  data.boolean("shuffle", c.dataset.shuffle);
  data.finish();
  if (!data.has("path"))
    b.error(b.key_loc("dataset"), "missing required key `dataset.path` (a JSONL file)");

  Section lora = top.section("lora");
  c.lora.enabled = lora.present();
  lora.integer("r", c.lora.r, positive());
  lora.number("alpha", c.lora.alpha, positive());
  lora.number("dropout", c.lora.dropout, in_range(0, 1, true));
  lora.boolean("use_rslora", c.lora.use_rslora);
  if (const RecipeNode* v = lora.value("target_modules");
      v && v->kind == Kind::Scalar && v->text == "all-linear")
    c.lora.target_modules = {"all-linear"};  // PEFT's spelling: a string, not a list
  else
    Section(lora).strings("target_modules", c.lora.target_modules);
  lora.finish();

  Section opt = top.section("optimizer");
  opt.choice("name", c.optimizer.name, {"adamw"});
  opt.number("lr", c.optimizer.lr, positive());
  if (const RecipeNode* v = opt.value("betas")) {
    if (v->kind != Kind::Seq || v->items.size() != 2) {
      b.error(v->loc, str_cat("`optimizer.betas` must be a list of two numbers like "
                              "[0.9, 0.999], got ",
                              v->kind == Kind::Seq ? str_cat("a list of ", v->items.size())
                                                   : describe(*v)));
    } else {
      double* dst[2] = {&c.optimizer.beta1, &c.optimizer.beta2};
      for (int i = 0; i < 2; ++i) {
        const RecipeNode& it = v->items[size_t(i)];
        char* end = nullptr;
        const double d = it.kind == Kind::Scalar ? std::strtod(it.text.c_str(), &end) : NAN;
        if (it.kind == Kind::Invalid) continue;
        if (it.kind != Kind::Scalar || it.quoted || it.text.empty() ||
            end != it.text.c_str() + it.text.size() || !std::isfinite(d))
          b.error(it.loc, str_cat("`optimizer.betas` must hold numbers, got ", describe(it)));
        else if (d < 0 || d >= 1)
          b.error(it.loc, str_cat("`optimizer.betas` must be in [0, 1), got ", it.text));
        else
          *dst[i] = d;
      }
    }
  }
  opt.number("eps", c.optimizer.eps, positive());
  opt.number("weight_decay", c.optimizer.weight_decay, at_least(0));
  opt.finish();

  Section sched = top.section("lr_scheduler");
  sched.choice("name", c.lr_scheduler.name, {"constant", "linear", "cosine"});
  sched.integer("num_warmup_steps", c.lr_scheduler.num_warmup_steps, at_least(0));
  sched.number("min_lr_ratio", c.lr_scheduler.min_lr_ratio, in_range(0, 1, false));
  sched.finish();

  top.integer("batch_size", c.batch_size, positive());
  top.integer("epochs", c.epochs, at_least(0));
  top.integer("max_steps", c.max_steps, [](double v) {
    return v == -1 || v >= 1 ? "" : std::string("must be >= 1, or -1 (epochs decide)");
  });
  top.integer("gradient_accumulation_steps", c.gradient_accumulation_steps, at_least(1));
  top.number("clip_grad_norm", c.clip_grad_norm, at_least(0));
  top.integer("log_every_n_steps", c.log_every_n_steps, at_least(1));
  top.integer("eval_every_n_steps", c.eval_every_n_steps, at_least(0));
  top.integer("save_every_n_steps", c.save_every_n_steps, at_least(0));
  top.integer("keep_last_n", c.keep_last_n, at_least(0));
  top.boolean("resume", c.resume);
  top.integer("max_consecutive_nan_steps", c.max_consecutive_nan_steps, at_least(1));
  bind_loss_scale(b, top, c);

  Section es = top.section("early_stopping");
  es.integer("patience", c.early_stopping.patience, at_least(0));
  es.number("min_delta", c.early_stopping.min_delta, at_least(0));
  es.finish();

  Section ev = top.section("eval");
  ev.integer("max_batches", c.eval_max_batches, at_least(0));
  Section gen = ev.section("generate");
  if (gen.present()) {
    EvalGenerateSection g;
    gen.strings("prompts", g.prompts);
    if (const RecipeNode* p = gen.has("prompts") ? gen.value("prompts") : nullptr;
        p && p->kind == Kind::Seq && p->items.empty())
      b.error(p->loc, "eval.generate.prompts is empty");
    else if (!gen.has("prompts"))
      b.error(b.key_loc("eval.generate"), "eval.generate needs prompts: [...]");
    gen.integer("max_new_tokens", g.max_new_tokens, positive());
    gen.number("temperature", g.temperature, at_least(0));
    c.eval_generate = std::move(g);
  } else {  // register the keys for suggestions
    EvalGenerateSection g;
    gen.strings("prompts", g.prompts);
    gen.integer("max_new_tokens", g.max_new_tokens);
    gen.number("temperature", g.temperature);
  }
  gen.finish();
  ev.finish();

  Section par = top.section("parallel");
  par.integer("dp", c.parallel.dp, at_least(0));
  par.integer("tp", c.parallel.tp, at_least(1));
  par.integer("zero", c.parallel.zero, in_range(0, 1, false));
  par.number("bucket_mb", c.parallel.bucket_mb, positive());
  par.choice("backend", c.parallel.backend, {"auto", "mpi", "nccl"});
  par.finish();

  Section attn = top.section("attention");
  attn.choice("backend", c.attention.backend, {"ftune", "cudnn"});
  attn.finish();

  top.value("vars");  // free-form values for ${vars.x}; not checked
  top.finish();
  b.report_unknown();

  check_conflicts(b, c, lora.present());
  check_files(b, c);

  sort_diagnostics(file, found);
  diags.insert(diags.end(), found.begin(), found.end());
}

}  // namespace ftune
