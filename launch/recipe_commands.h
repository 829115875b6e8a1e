// `ftune validate`, `ftune ls`, `ftune cp`: the recipe commands (launch/recipe_commands.cpp).
#pragma once
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace ftune::cli {

struct RecipeArgs {
  std::string file;                    // validate: the recipe
  std::vector<std::string> overrides;  // validate: a.b=value / ~a.b
  std::string name, dest;              // cp
};

CLI::App* add_validate_command(CLI::App& app, RecipeArgs& args);
CLI::App* add_ls_command(CLI::App& app);
CLI::App* add_cp_command(CLI::App& app, RecipeArgs& args);

// Prints every diagnostic (stdout); 1 if any, else "FILE: ok" and 0.
int cmd_validate(const RecipeArgs& args);
// The built-in recipes with the first comment line of each.
int cmd_ls();
// Copies a built-in recipe; throws (exit 1) when it is unknown or DEST exists.
int cmd_cp(const RecipeArgs& args);

}  // namespace ftune::cli
