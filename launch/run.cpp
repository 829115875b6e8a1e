// `ftune run RECIPE [a.b=value ...]`: resolve and validate the recipe, print it, train.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "core/error.h"
#include "launch/commands.h"
#include "launch/recipe.h"
#include "parallel/communicator.h"
#include "trainers/sft.h"

namespace ftune::cli {

CLI::App* add_run_command(CLI::App& app, RunArgs& a) {
  CLI::App* r = app.add_subcommand(
      "run", "train as a recipe says: ftune run RECIPE.yaml [key.sub=value ...] [~key.sub ...]");
  r->add_option("recipe", a.recipe, "a recipe file (ftune ls lists the built-in ones)")->required();
  r->add_option("overrides", a.overrides,
                "overrides: a.b=value sets a key (the value is YAML), ~a.b deletes one");
  return r;
}

int cmd_run(const RunArgs& a) {
  // A file, else the name of a built-in recipe ("quickstart_lora" or "quickstart_lora.yaml").
  std::string file = a.recipe;
  if (!std::filesystem::exists(file)) {
    std::filesystem::path b = std::filesystem::path(builtin_recipes_dir()) / a.recipe;
    if (b.extension() != ".yaml") b += ".yaml";
    if (std::filesystem::exists(b)) file = b.string();
  }
  Recipe recipe = Recipe::load(file, a.overrides);
  SftConfig cfg = recipe.to_sft_config();
  if (cfg.recipe_file.empty()) cfg.recipe_file = recipe.path();
  if (cfg.resolved_yaml.empty()) cfg.resolved_yaml = recipe.resolved_yaml();
  // Under mpirun every rank trains; rank 0 alone prints (its trainer too).
  // The world is MPI (or single) even with parallel.backend: nccl, whose NCCL communicator the
  // trainer bootstraps over it for the gradients (checkpoints need the MPI communicator).
  std::shared_ptr<parallel::Communicator> world =
      parallel::make_world_communicator(cfg.parallel.backend == "mpi" ? "mpi" : "auto");
  if (world->rank() != 0) {
    SftTrainer(cfg, std::cout, world).train();
    return 0;
  }
  // The resolved recipe first, so a log always says exactly what ran.
  std::cout << "# recipe: " << recipe.path() << " (resolved)\n" << cfg.resolved_yaml;
  if (!cfg.resolved_yaml.empty() && cfg.resolved_yaml.back() != '\n') std::cout << "\n";
  std::cout << "# ----\n";
  std::cout.flush();
  SftTrainer trainer(cfg, std::cout, world);
  SftResult res = trainer.train();
  std::cout << "done: " << res.steps << " steps";
  if (res.skipped_steps) std::cout << " (" << res.skipped_steps << " skipped: non-finite loss)";
  if (res.early_stopped) std::cout << ", stopped early";
  std::cout << "\n";
  if (res.eval_before && res.eval_after) {
    std::printf("eval loss: %.4f -> %.4f (perplexity %.2f -> %.2f, token accuracy %.3f -> %.3f)\n",
                res.eval_before->loss, res.eval_after->loss, res.eval_before->perplexity,
                res.eval_after->perplexity, res.eval_before->accuracy, res.eval_after->accuracy);
  } else if (res.eval_after) {
    std::printf("eval loss: %.4f (perplexity %.2f, token accuracy %.3f)\n", res.eval_after->loss,
                res.eval_after->perplexity, res.eval_after->accuracy);
  }
  if (!res.last_checkpoint.empty()) std::cout << "checkpoint: " << res.last_checkpoint << "\n";
  return 0;
}

}  // namespace ftune::cli
