// YAML recipes (recipes/*.yaml, docs/recipes.md): load, command-line overrides, ${...}
// interpolation, validation against the schema of trainers/config.h, and the typed SftConfig.
// Every problem found is reported at once, each with file:line:column.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/error.h"
#include "trainers/config.h"

namespace ftune {

// One problem in a recipe. `file` is the recipe's path as given, or "<command line>" for an
// override, whose `line` is then the override's position (1-based) and `column` the column in it.
struct Diagnostic {
  std::string file;
  int line = 0, column = 0;  // 1-based; 0: the whole file
  std::string message;
  std::string str() const;  // "file:line:col: message"
};

// Thrown by Recipe::load / to_sft_config; what() lists every diagnostic, one a line.
struct RecipeError : Error {
  explicit RecipeError(std::vector<Diagnostic> d);
  std::vector<Diagnostic> diagnostics;
};

class Recipe {
 public:
  // Reads the YAML file, applies `overrides` in order ("a.b=value" sets a YAML-parsed value,
  // creating maps on the way; "~a.b" deletes), resolves ${a.b} interpolation and validates.
  // Throws RecipeError with every problem found.
  static Recipe load(const std::string& path, const std::vector<std::string>& overrides = {});
  // The same from YAML text; `name` is the file name diagnostics give.
  static Recipe parse(const std::string& yaml, const std::string& name,
                      const std::vector<std::string>& overrides = {});
  // Every diagnostic load() would throw with (syntax, overrides, interpolation, schema, files,
  // conflicts); empty when the recipe is good. Never throws for a bad recipe.
  static std::vector<Diagnostic> check(const std::string& path,
                                       const std::vector<std::string>& overrides = {});

  // Schema, type, file and conflict checks on the resolved recipe (files are looked at now).
  std::vector<Diagnostic> validate() const;
  // The typed recipe (recipe_file and resolved_yaml filled in). Throws RecipeError if invalid.
  SftConfig to_sft_config() const;
  ParallelSection parallel() const;  // throws RecipeError if invalid
  // The recipe after overrides and interpolation, as YAML (keys in file order, no comments):
  // loading it gives the same configuration.
  std::string resolved_yaml() const;
  const std::string& path() const { return path_; }
  const std::string& method() const { return method_; }  // "sft"

  struct Tree;  // the parsed YAML with a file:line:column per node (recipe.cpp)

 private:
  Recipe() = default;
  static Recipe build(const std::string* text, const std::string& path,
                      const std::vector<std::string>& overrides, std::vector<Diagnostic>& diags);
  static Recipe collect(const std::string* text, const std::string& path,
                        const std::vector<std::string>& overrides, std::vector<Diagnostic>& diags);
  std::string path_;
  std::string method_ = "sft";
  std::shared_ptr<Tree> tree_;
};

// Levenshtein distance (for "did you mean" suggestions).
size_t edit_distance(const std::string& a, const std::string& b);

// Folder of the built-in recipes: $FTUNE_RECIPES_DIR, else <executable dir>/../recipes when it
// exists, else the source tree's recipes/.
std::string builtin_recipes_dir();

}  // namespace ftune
