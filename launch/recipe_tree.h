// Internal to launch/recipe*.cpp: the recipe as a tree of YAML values, each with where it came
// from (yaml-cpp's nodes lose their marks once edited, and overrides need their own origin).
#pragma once
#include <string>
#include <vector>

#include "launch/recipe.h"

namespace ftune {

struct RecipeLoc {
  std::string file;
  int line = 0, column = 0;
};

struct RecipeNode;

struct RecipeEntry;

struct RecipeNode {
  // Invalid: a value whose interpolation failed (already reported; validation skips it).
  enum class Kind { Null, Scalar, Seq, Map, Invalid };
  Kind kind = Kind::Null;
  std::string text;                  // Scalar
  bool quoted = false;               // a quoted scalar is always a string ("8" is not the number 8)
  std::vector<RecipeNode> items;     // Seq
  std::vector<RecipeEntry> entries;  // Map, in file order
  RecipeLoc loc;
  int interp_state = 0;  // 0: not looked at, 1: resolving, 2: done

  const RecipeNode* find(const std::string& key) const;
  RecipeNode* find(const std::string& key);
  const RecipeEntry* entry(const std::string& key) const;
};

struct RecipeEntry {
  std::string key;
  RecipeLoc key_loc;
  RecipeNode value;
};

struct Recipe::Tree {
  RecipeNode root;
};

inline Diagnostic make_diag(const RecipeLoc& loc, std::string msg) {
  return Diagnostic{loc.file, loc.line, loc.column, std::move(msg)};
}

// By line and column, the recipe's own before the command line's.
void sort_diagnostics(const std::string& file, std::vector<Diagnostic>& d);

// Schema + files + conflicts (recipe_schema.cpp). Appends diagnostics; fills `cfg` as far as
// the values are good.
void bind_sft_config(const RecipeNode& root, const std::string& file, SftConfig& cfg,
                     std::vector<Diagnostic>& diags);

}  // namespace ftune
