// Recipe loading: YAML -> RecipeNode tree (with marks), overrides, ${...} interpolation, and the
// resolved YAML. The schema (keys, types, files, conflicts) is in recipe_schema.cpp.
#include "launch/recipe.h"

#include <unistd.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "launch/recipe_tree.h"

namespace ftune {

namespace fs = std::filesystem;

std::string Diagnostic::str() const {
  if (line <= 0) return str_cat(file, ": ", message);
  return str_cat(file, ":", line, ":", column, ": ", message);
}

namespace {

std::string join_diagnostics(const std::vector<Diagnostic>& d) {
  std::string s = "[recipe] " + std::to_string(d.size()) +
                  (d.size() == 1 ? " problem" : " problems") + " in the recipe:";
  for (const auto& x : d) s += "\n  " + x.str();
  return s;
}

}  // namespace

void sort_diagnostics(const std::string& file, std::vector<Diagnostic>& d) {
  // the recipe's own lines first, in order; then the command line's
  std::stable_sort(d.begin(), d.end(), [&](const Diagnostic& x, const Diagnostic& y) {
    auto key = [&](const Diagnostic& a) {
      return std::make_tuple(a.file != file, a.line, a.column);
    };
    return key(x) < key(y);
  });
}

RecipeError::RecipeError(std::vector<Diagnostic> d)
    : Error(join_diagnostics(d)), diagnostics(std::move(d)) {}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1])});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

const RecipeEntry* RecipeNode::entry(const std::string& key) const {
  for (const auto& e : entries)
    if (e.key == key) return &e;
  return nullptr;
}
const RecipeNode* RecipeNode::find(const std::string& key) const {
  const RecipeEntry* e = entry(key);
  return e ? &e->value : nullptr;
}
RecipeNode* RecipeNode::find(const std::string& key) {
  for (auto& e : entries)
    if (e.key == key) return &e.value;
  return nullptr;
}

namespace {

// ---------------------------------------------------------------- YAML -> tree

struct Origin {
  std::string file;
  int line_base = 0;  // command line: the override's index; the YAML text is one line
  int col_base = 0;   // command line: where the value starts in the argument
  bool command_line = false;
};

RecipeLoc loc_of(const YAML::Mark& m, const Origin& o, const RecipeLoc& fallback) {
  if (m.is_null()) return fallback;
  if (o.command_line) return {o.file, o.line_base, o.col_base + m.column + 1};
  return {o.file, m.line + 1, m.column + 1};
}

RecipeNode convert(const YAML::Node& n, const Origin& o, const RecipeLoc& fallback,
                   std::vector<Diagnostic>& diags) {
  RecipeNode r;
  r.loc = loc_of(n.Mark(), o, fallback);
  switch (n.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null:
      r.kind = RecipeNode::Kind::Null;
      break;
    case YAML::NodeType::Scalar:
      r.kind = RecipeNode::Kind::Scalar;
      r.text = n.Scalar();
      r.quoted = n.Tag() == "!";  // yaml-cpp tags quoted scalars "!", plain ones "?"
      break;
    case YAML::NodeType::Sequence:
      r.kind = RecipeNode::Kind::Seq;
      for (const auto& item : n) r.items.push_back(convert(item, o, r.loc, diags));
      break;
    case YAML::NodeType::Map:
      r.kind = RecipeNode::Kind::Map;
      for (auto it = n.begin(); it != n.end(); ++it) {
        RecipeEntry e;
        e.key_loc = loc_of(it->first.Mark(), o, r.loc);
        if (!it->first.IsScalar()) {
          diags.push_back(make_diag(e.key_loc, "a key must be a plain name, not a list or map"));
          continue;
        }
        e.key = it->first.Scalar();
        e.value = convert(it->second, o, e.key_loc, diags);
        if (const RecipeEntry* first = r.entry(e.key)) {
          diags.push_back(
              make_diag(e.key_loc, str_cat("duplicate key `", e.key, "` (first at ",
                                           first->key_loc.line, ":", first->key_loc.column, ")")));
          continue;
        }
        r.entries.push_back(std::move(e));
      }
      break;
  }
  return r;
}

// ---------------------------------------------------------------- overrides

std::vector<std::string> split_dotted(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

bool is_index(const std::string& s) {
  return !s.empty() && s.size() < 9 && std::all_of(s.begin(), s.end(), ::isdigit);
}

std::string join_path(const std::vector<std::string>& parts, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; ++i) s += (i ? "." : "") + parts[i];
  return s;
}

void apply_override(RecipeNode& root, const std::string& arg, int index,
                    std::vector<Diagnostic>& diags) {
  const RecipeLoc at{"<command line>", index, 1};
  auto fail = [&](int col, const std::string& msg) {
    diags.push_back(Diagnostic{at.file, index, col, str_cat("override `", arg, "`: ", msg)});
  };
  const bool del = !arg.empty() && arg[0] == '~';
  const size_t eq = arg.find('=');
  if (!del && eq == std::string::npos) {
    fail(1, "expected key=value (set) or ~key (delete)");
    return;
  }
  const std::string key =
      del ? arg.substr(1, eq == std::string::npos ? std::string::npos : eq - 1) : arg.substr(0, eq);
  const auto parts = split_dotted(key);
  for (const auto& p : parts)
    if (p.empty() || p.find_first_of(" \t") != std::string::npos) {
      fail(1, str_cat("bad key `", key, "`: dotted names like optimizer.lr"));
      return;
    }
  if (del && eq != std::string::npos) {
    fail(int(eq) + 1, "~key deletes a key and takes no value");
    return;
  }

  RecipeNode value;
  if (!del) {
    Origin o{at.file, index, int(eq) + 1, true};
    try {
      value =
          convert(YAML::Load(arg.substr(eq + 1)), o, RecipeLoc{at.file, index, int(eq) + 2}, diags);
    } catch (const YAML::Exception& e) {
      fail(int(eq) + 2 + std::max(0, e.mark.column), "bad YAML value: " + e.msg);
      return;
    }
  }

  RecipeNode* cur = &root;
  for (size_t i = 0; i + 1 <= parts.size(); ++i) {
    const bool last = i + 1 == parts.size();
    const std::string& p = parts[i];
    if (cur->kind == RecipeNode::Kind::Seq) {
      if (!is_index(p) || std::stoul(p) >= cur->items.size()) {
        fail(1, str_cat("`", join_path(parts, i), "` is a list of ", cur->items.size(), " items; `",
                        p, "` is not an index of it"));
        return;
      }
      const size_t k = std::stoul(p);
      if (last) {
        if (del)
          cur->items.erase(cur->items.begin() + long(k));
        else
          cur->items[k] = std::move(value);
        return;
      }
      cur = &cur->items[k];
      continue;
    }
    if (cur->kind == RecipeNode::Kind::Null && !del) {  // `lora:` with nothing: becomes a map
      cur->kind = RecipeNode::Kind::Map;
    }
    if (cur->kind != RecipeNode::Kind::Map) {
      fail(1, str_cat("`", join_path(parts, i), "` is a single value, not a section"));
      return;
    }
    auto it = std::find_if(cur->entries.begin(), cur->entries.end(),
                           [&](const RecipeEntry& e) { return e.key == p; });
    if (last) {
      if (del) {
        if (it == cur->entries.end()) {
          fail(2, str_cat("cannot delete `", key, "`: the recipe has no such key"));
          return;
        }
        cur->entries.erase(it);
      } else if (it != cur->entries.end()) {
        it->value = std::move(value);
      } else {
        cur->entries.push_back(RecipeEntry{p, at, std::move(value)});
      }
      return;
    }
    if (it == cur->entries.end()) {
      if (del) {
        fail(2, str_cat("cannot delete `", key, "`: the recipe has no `", join_path(parts, i + 1),
                        "`"));
        return;
      }
      RecipeNode section;
      section.kind = RecipeNode::Kind::Map;
      section.loc = at;
      cur->entries.push_back(RecipeEntry{p, at, std::move(section)});
      it = cur->entries.end() - 1;
    }
    cur = &it->value;
  }
}

// ---------------------------------------------------------------- interpolation

void collect_paths(const RecipeNode& n, const std::string& prefix, std::vector<std::string>& out) {
  if (!prefix.empty()) out.push_back(prefix);
  if (n.kind == RecipeNode::Kind::Map)
    for (const auto& e : n.entries)
      collect_paths(e.value, prefix.empty() ? e.key : prefix + "." + e.key, out);
}

class Interpolator {
 public:
  Interpolator(RecipeNode& root, std::vector<Diagnostic>& diags) : root_(root), diags_(diags) {}

  void walk(RecipeNode& n, const std::string& path) {
    if (n.kind == RecipeNode::Kind::Scalar) {
      if (n.interp_state == 0) resolve(n, path);
    } else if (n.kind == RecipeNode::Kind::Map) {
      for (auto& e : n.entries) walk(e.value, path.empty() ? e.key : path + "." + e.key);
    } else if (n.kind == RecipeNode::Kind::Seq) {
      for (size_t i = 0; i < n.items.size(); ++i) walk(n.items[i], path + "." + std::to_string(i));
    }
  }

 private:
  struct Piece {
    bool ref;
    std::string text;  // literal text, or the referenced dotted path
  };

  // Splits "a ${x.y} b" into pieces; "\${" is a literal "${". False on an unterminated ${.
  static bool split(const std::string& s, std::vector<Piece>& out, std::string& err) {
    std::string lit;
    for (size_t i = 0; i < s.size(); ++i) {
      if (s[i] == '\\' && s.compare(i + 1, 2, "${") == 0) {
        lit += "${";
        i += 2;
      } else if (s.compare(i, 2, "${") == 0) {
        const size_t close = s.find('}', i + 2);
        if (close == std::string::npos) {
          err = "unterminated `${` (write \\${ for a literal one)";
          return false;
        }
        if (!lit.empty()) out.push_back({false, lit});
        lit.clear();
        std::string ref = s.substr(i + 2, close - i - 2);
        ref.erase(0, ref.find_first_not_of(' '));
        ref.erase(ref.find_last_not_of(' ') + 1);
        out.push_back({true, ref});
        i = close;
      } else {
        lit += s[i];
      }
    }
    if (!lit.empty()) out.push_back({false, lit});
    return true;
  }

  void fail(RecipeNode& n, const std::string& msg) {
    if (!msg.empty()) diags_.push_back(make_diag(n.loc, msg));
    n.kind = RecipeNode::Kind::Invalid;
    n.interp_state = 2;
  }

  static void mark_done(RecipeNode& n) {
    n.interp_state = 2;
    for (auto& i : n.items) mark_done(i);
    for (auto& e : n.entries) mark_done(e.value);
  }

  // The node at dotted `ref`, resolving interpolations met on the way; null + message if none.
  RecipeNode* lookup(const std::string& ref, std::string& err) {
    const auto parts = split_dotted(ref);
    RecipeNode* cur = &root_;
    for (size_t i = 0; i < parts.size(); ++i) {
      if (cur->kind == RecipeNode::Kind::Scalar && cur->interp_state != 2) {
        if (cur->interp_state == 1) {
          err = cycle_message(join_path(parts, i));
          return nullptr;
        }
        resolve(*cur, join_path(parts, i));
      }
      const std::string& p = parts[i];
      RecipeNode* next = nullptr;
      if (cur->kind == RecipeNode::Kind::Map) {
        next = cur->find(p);
      } else if (cur->kind == RecipeNode::Kind::Seq && is_index(p) &&
                 std::stoul(p) < cur->items.size()) {
        next = &cur->items[std::stoul(p)];
      }
      if (!next) {
        err = str_cat("unknown reference `${", ref, "}`");
        std::vector<std::string> paths;
        collect_paths(root_, "", paths);
        std::string best;
        size_t best_d = 3;
        for (const auto& c : paths) {
          size_t d = edit_distance(c, ref);
          if (d < best_d) best_d = d, best = c;
        }
        if (!best.empty()) err += str_cat(": did you mean `${", best, "}`?");
        return nullptr;
      }
      cur = next;
    }
    if (cur->kind == RecipeNode::Kind::Scalar && cur->interp_state == 1) {
      err = cycle_message(ref);
      return nullptr;
    }
    // resolve the target's subtree before it is used (it may itself refer on)
    if (cur->interp_state != 2) walk(*cur, ref);
    if (cur->kind == RecipeNode::Kind::Invalid) {
      err.clear();  // already reported where it failed
      return nullptr;
    }
    return cur;
  }

  std::string cycle_message(const std::string& again) {
    std::string s = "interpolation cycle: ";
    bool on = false;
    for (const auto& p : stack_) {
      if (p == again) on = true;
      if (on) s += p + " -> ";
    }
    if (!on)
      for (const auto& p : stack_) s += p + " -> ";
    return s + again;
  }

  void resolve(RecipeNode& n, const std::string& path) {
    if (n.text.find("${") == std::string::npos) {
      n.interp_state = 2;
      return;
    }
    std::vector<Piece> pieces;
    std::string err;
    if (!split(n.text, pieces, err)) return fail(n, err);
    n.interp_state = 1;
    stack_.push_back(path);
    const bool whole = pieces.size() == 1 && pieces[0].ref;
    // a reference to the node itself or to a section holding it can never end
    for (const auto& p : pieces)
      if (p.ref && (path == p.text || path.rfind(p.text + ".", 0) == 0)) {
        stack_.pop_back();
        return fail(n, str_cat("interpolation cycle: `", path, "` refers to `${", p.text,
                               "}`, which contains it"));
      }
    std::string text;
    RecipeNode whole_value;
    for (const auto& p : pieces) {
      if (!p.ref) {
        text += p.text;
        continue;
      }
      if (p.text.empty()) {
        stack_.pop_back();
        return fail(n, "empty reference `${}`");
      }
      RecipeNode* target = lookup(p.text, err);
      if (!target) {
        stack_.pop_back();
        return fail(n, err);
      }
      if (whole) {
        whole_value = *target;
      } else if (target->kind != RecipeNode::Kind::Scalar) {
        stack_.pop_back();
        return fail(n, str_cat("`${", p.text, "}` inside a string must name a single value; `",
                               p.text, "` is ",
                               target->kind == RecipeNode::Kind::Null  ? "null"
                               : target->kind == RecipeNode::Kind::Map ? "a section"
                                                                       : "a list"));
      } else {
        text += target->text;
      }
    }
    stack_.pop_back();
    if (whole) {
      const RecipeLoc loc = n.loc;
      n = std::move(whole_value);
      n.loc = loc;  // diagnostics about the value point at where it is used
    } else {
      n.text = text;
      n.quoted = true;  // text built from pieces is a string, as in OmegaConf
    }
    mark_done(n);
  }

  RecipeNode& root_;
  std::vector<Diagnostic>& diags_;
  std::vector<std::string> stack_;
};

// ---------------------------------------------------------------- tree -> YAML text

bool plain_key(const std::string& k) {
  return !k.empty() && std::all_of(k.begin(), k.end(), [](char c) {
    return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '-' || c == '.';
  });
}

std::string double_quote(const std::string& s) {
  std::string q = "\"";
  for (size_t i = 0; i < s.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c == '$' && i + 1 < s.size() && s[i + 1] == '{') {
      q += "\\\\$";  // a literal ${ must not be read as interpolation again: \${
    } else if (c == '"' || c == '\\') {
      q += '\\';
      q += char(c);
    } else if (c == '\n') {
      q += "\\n";
    } else if (c == '\t') {
      q += "\\t";
    } else if (c < 0x20 || c == 0x7f) {
      static const char* hex = "0123456789abcdef";
      q += "\\x";
      q += hex[c >> 4];
      q += hex[c & 15];
    } else {
      q += char(c);
    }
  }
  return q + "\"";
}

// A scalar as YAML: plain text stays plain (it parsed as plain, so it reads back the same),
// quoted text is double-quoted; `in_flow` also quotes plain text holding flow indicators.
std::string scalar_text(const RecipeNode& n, bool in_flow) {
  if (n.kind == RecipeNode::Kind::Null) return "null";
  if (n.quoted || n.text.empty()) return double_quote(n.text);
  if (in_flow && n.text.find_first_of(",[]{}") != std::string::npos) return double_quote(n.text);
  return n.text;
}

void emit(const RecipeNode& n, int indent, std::string& out);

bool is_leaf(const RecipeNode& n) {
  return n.kind == RecipeNode::Kind::Scalar || n.kind == RecipeNode::Kind::Null ||
         n.kind == RecipeNode::Kind::Invalid ||
         (n.kind == RecipeNode::Kind::Map && n.entries.empty()) ||
         (n.kind == RecipeNode::Kind::Seq &&
          std::all_of(n.items.begin(), n.items.end(), [](const RecipeNode& i) {
            return i.kind == RecipeNode::Kind::Scalar || i.kind == RecipeNode::Kind::Null;
          }));
}

// A leaf on the line of its key: a scalar, {} or a flow list of scalars.
std::string leaf_text(const RecipeNode& n) {
  if (n.kind == RecipeNode::Kind::Map) return "{}";
  if (n.kind == RecipeNode::Kind::Invalid) return double_quote(n.text);
  if (n.kind != RecipeNode::Kind::Seq) return scalar_text(n, false);
  std::string s = "[";
  for (size_t i = 0; i < n.items.size(); ++i) s += (i ? ", " : "") + scalar_text(n.items[i], true);
  return s + "]";
}

void emit(const RecipeNode& n, int indent, std::string& out) {
  const std::string pad(size_t(indent), ' ');
  if (n.kind == RecipeNode::Kind::Map) {
    for (const auto& e : n.entries) {
      out += pad + (plain_key(e.key) ? e.key : double_quote(e.key)) + ":";
      if (is_leaf(e.value)) {
        out += " " + leaf_text(e.value) + "\n";
      } else {
        out += "\n";
        emit(e.value, indent + 2, out);
      }
    }
  } else if (n.kind == RecipeNode::Kind::Seq) {
    for (const auto& item : n.items) {
      if (is_leaf(item)) {
        out += pad + "- " + leaf_text(item) + "\n";
      } else {
        out += pad + "-\n";
        emit(item, indent + 2, out);
      }
    }
  } else {
    out += pad + leaf_text(n) + "\n";
  }
}

}  // namespace

// ---------------------------------------------------------------- Recipe

Recipe Recipe::build(const std::string* text, const std::string& path,
                     const std::vector<std::string>& overrides, std::vector<Diagnostic>& diags) {
  Recipe r;
  r.path_ = path;
  r.tree_ = std::make_shared<Tree>();
  RecipeNode& root = r.tree_->root;
  const Origin origin{path, 0, 0, false};
  try {
    YAML::Node doc;
    if (text) {
      doc = YAML::Load(*text);
    } else {
      std::error_code ec;
      if (!fs::is_regular_file(path, ec)) {
        diags.push_back(Diagnostic{path, 0, 0,
                                   fs::exists(path, ec) ? "not a file"
                                                        : "no such recipe file (relative paths "
                                                          "are resolved against the current "
                                                          "directory)"});
        return r;
      }
      std::ifstream in(path, std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      if (!in) {
        diags.push_back(Diagnostic{path, 0, 0, "cannot read the recipe file"});
        return r;
      }
      doc = YAML::Load(ss.str());
    }
    root = convert(doc, origin, RecipeLoc{path, 1, 1}, diags);
  } catch (const YAML::Exception& e) {
    diags.push_back(Diagnostic{path, e.mark.is_null() ? 0 : e.mark.line + 1,
                               e.mark.is_null() ? 0 : e.mark.column + 1,
                               "YAML syntax error: " + e.msg});
    return r;
  }
  if (root.kind == RecipeNode::Kind::Null) {
    diags.push_back(Diagnostic{path, 0, 0, "the recipe is empty"});
    return r;
  }
  if (root.kind != RecipeNode::Kind::Map) {
    diags.push_back(make_diag(root.loc,
                              "a recipe is a mapping of keys (like `model:`), not a "
                              "single value or a list"));
    return r;
  }
  for (size_t i = 0; i < overrides.size(); ++i)
    apply_override(root, overrides[i], int(i) + 1, diags);
  Interpolator(root, diags).walk(root, "");
  if (const RecipeNode* m = root.find("method");
      m && m->kind == RecipeNode::Kind::Scalar && !m->quoted)
    r.method_ = m->text;
  return r;
}

Recipe Recipe::collect(const std::string* text, const std::string& path,
                       const std::vector<std::string>& overrides, std::vector<Diagnostic>& diags) {
  Recipe r = build(text, path, overrides, diags);
  // schema checks also run after override/interpolation problems (failed values are skipped);
  // after a syntax error there is no tree to check
  if (r.tree_->root.kind == RecipeNode::Kind::Map) {
    auto more = r.validate();
    diags.insert(diags.end(), more.begin(), more.end());
  }
  sort_diagnostics(path, diags);
  return r;
}

Recipe Recipe::load(const std::string& path, const std::vector<std::string>& overrides) {
  std::vector<Diagnostic> diags;
  Recipe r = collect(nullptr, path, overrides, diags);
  if (!diags.empty()) throw RecipeError(std::move(diags));
  return r;
}

Recipe Recipe::parse(const std::string& yaml, const std::string& name,
                     const std::vector<std::string>& overrides) {
  std::vector<Diagnostic> diags;
  Recipe r = collect(&yaml, name, overrides, diags);
  if (!diags.empty()) throw RecipeError(std::move(diags));
  return r;
}

std::vector<Diagnostic> Recipe::check(const std::string& path,
                                      const std::vector<std::string>& overrides) {
  std::vector<Diagnostic> diags;
  collect(nullptr, path, overrides, diags);
  return diags;
}

std::vector<Diagnostic> Recipe::validate() const {
  std::vector<Diagnostic> diags;
  SftConfig cfg;
  bind_sft_config(tree_->root, path_, cfg, diags);
  return diags;
}

SftConfig Recipe::to_sft_config() const {
  std::vector<Diagnostic> diags;
  SftConfig cfg;
  bind_sft_config(tree_->root, path_, cfg, diags);
  if (!diags.empty()) throw RecipeError(std::move(diags));
  cfg.recipe_file = path_;
  cfg.resolved_yaml = resolved_yaml();
  return cfg;
}

ParallelSection Recipe::parallel() const {
  std::vector<Diagnostic> diags;
  SftConfig cfg;
  bind_sft_config(tree_->root, path_, cfg, diags);
  if (!diags.empty()) throw RecipeError(std::move(diags));
  return cfg.parallel;
}

std::string Recipe::resolved_yaml() const {
  std::string out;
  emit(tree_->root, 0, out);
  return out;
}

std::string builtin_recipes_dir() {
  if (const char* env = std::getenv("FTUNE_RECIPES_DIR"); env && *env) return env;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    const fs::path dir = exe.parent_path().parent_path() / "recipes";
    if (fs::is_directory(dir, ec)) return dir.string();
  }
  return (fs::path(FTUNE_SOURCE_DIR) / "recipes").string();
}

}  // namespace ftune
