// The recipe commands of the ftune executable: validate, ls, cp.
#include "launch/recipe_commands.h"

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "launch/recipe.h"

namespace ftune::cli {

namespace fs = std::filesystem;

namespace {

struct BuiltIn {
  std::string name;  // file name without .yaml
  fs::path path;
  std::string description;  // the first comment line
};

std::vector<BuiltIn> builtins() {
  const fs::path dir = builtin_recipes_dir();
  std::error_code ec;
  FTUNE_CHECK(fs::is_directory(dir, ec), "[recipes] no built-in recipes folder `", dir.string(),
              "` (set FTUNE_RECIPES_DIR)");
  std::vector<BuiltIn> r;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".yaml" || !e.is_regular_file()) continue;
    BuiltIn b{e.path().stem().string(), e.path(), ""};
    std::ifstream in(e.path());
    for (std::string line; std::getline(in, line);) {
      const size_t h = line.find_first_not_of(" \t");
      if (h == std::string::npos) continue;
      if (line[h] != '#') break;
      const size_t t = line.find_first_not_of("# \t", h);
      if (t == std::string::npos) continue;
      b.description = line.substr(t);
      break;
    }
    r.push_back(std::move(b));
  }
  std::sort(r.begin(), r.end(), [](const BuiltIn& a, const BuiltIn& b) { return a.name < b.name; });
  return r;
}

}  // namespace

CLI::App* add_validate_command(CLI::App& app, RecipeArgs& args) {
  CLI::App* c = app.add_subcommand(
      "validate",
      "check a recipe: every unknown key, type error, missing file and conflict, "
      "each with file:line:column");
  c->add_option("file", args.file, "the recipe (YAML)")->required();
  c->add_option("overrides", args.overrides, "overrides as for run: a.b=value, ~a.b");
  return c;
}

CLI::App* add_ls_command(CLI::App& app) {
  return app.add_subcommand("ls", "list the built-in recipes");
}

CLI::App* add_cp_command(CLI::App& app, RecipeArgs& args) {
  CLI::App* c = app.add_subcommand("cp", "copy a built-in recipe to edit it");
  c->add_option("name", args.name, "a name from `ftune ls` (.yaml optional)")->required();
  c->add_option("dest", args.dest, "the file or folder to copy to")->required();
  return c;
}

int cmd_validate(const RecipeArgs& args) {
  const auto diags = Recipe::check(args.file, args.overrides);
  for (const auto& d : diags) std::printf("%s\n", d.str().c_str());
  if (diags.empty()) {
    std::printf("%s: ok\n", args.file.c_str());
    return 0;
  }
  std::printf("%s: %zu problem%s\n", args.file.c_str(), diags.size(), diags.size() == 1 ? "" : "s");
  return 1;
}

int cmd_ls() {
  const auto all = builtins();
  size_t w = 0;
  for (const auto& b : all) w = std::max(w, b.name.size());
  for (const auto& b : all)
    std::printf("%-*s  %s\n", int(w), b.name.c_str(), b.description.c_str());
  return 0;
}

int cmd_cp(const RecipeArgs& args) {
  std::string name = args.name;
  if (name.size() > 5 && name.compare(name.size() - 5, 5, ".yaml") == 0)
    name.resize(name.size() - 5);
  const auto all = builtins();
  auto it = std::find_if(all.begin(), all.end(), [&](const BuiltIn& b) { return b.name == name; });
  if (it == all.end()) {
    std::string names;
    for (const auto& b : all) names += (names.empty() ? "" : ", ") + b.name;
    FTUNE_THROW("[recipes] no built-in recipe `", args.name, "` (built-in: ", names, ")");
  }
  std::error_code ec;
  fs::path dest = args.dest;
  if (fs::is_directory(dest, ec)) dest /= name + ".yaml";
  FTUNE_CHECK(!fs::exists(dest, ec), "[recipes] `", dest.string(),
              "` already exists; not overwriting it");
  FTUNE_CHECK(dest.parent_path().empty() || fs::is_directory(dest.parent_path(), ec),
              "[recipes] no folder `", dest.parent_path().string(), "` to copy into");
  fs::copy_file(it->path, dest, ec);
  FTUNE_CHECK(!ec, "[recipes] cannot copy `", it->path.string(), "` to `", dest.string(),
              "`: ", ec.message());
  std::printf("copied %s to %s\n", it->path.filename().string().c_str(), dest.string().c_str());
  return 0;
}

}  // namespace ftune::cli
