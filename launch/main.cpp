// The ftune command line (CLI11). Only main() turns errors into an exit code: 0 on success, 1 when
// a command fails (bad input files, an ftune::Error), 2 for bad command-line usage.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <string>

#include "core/allocator.h"
#include "launch/commands.h"
#include "launch/recipe_commands.h"
#include "parallel/communicator.h"

int cmd_smoke();  // launch/smoke.cpp

namespace {

int cmd_version() {
  std::printf("ftune %s\n", FTUNE_VERSION);
#ifdef FTUNE_HAVE_CUDA
  std::printf("cuda: built (devices: %d)\n", ftune::cuda_device_count());
#else
  std::printf("cuda: not built\n");
#endif
#ifdef FTUNE_HAVE_MPI
  std::printf("mpi: built\n");
#else
  std::printf("mpi: not built\n");
#endif
#ifdef FTUNE_HAVE_HDF5
  std::printf("hdf5: built\n");
#else
  std::printf("hdf5: not built\n");
#endif
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"ftune " FTUNE_VERSION
               ": fine-tune LLMs (SFT, LoRA, reward, DPO, PPO, distillation)",
               "ftune"};
  app.require_subcommand(1);
  app.add_flag_callback(
      "--version",
      [] {
        cmd_version();
        throw CLI::Success();  // runs before the subcommand requirement is checked
      },
      "print the version and the backends this build has, and exit");
  CLI::App* version =
      app.add_subcommand("version", "print the version and the backends this build has");
  CLI::App* smoke =
      app.add_subcommand("smoke", "run a tiny forward/backward on the CPU and print the loss");
  ftune::cli::GenerateArgs gen_args;
  CLI::App* generate = ftune::cli::add_generate_command(app, gen_args);
  ftune::cli::RunArgs run_args;
  CLI::App* run = ftune::cli::add_run_command(app, run_args);
  ftune::cli::RecipeArgs recipe_args;
  CLI::App* validate = ftune::cli::add_validate_command(app, recipe_args);
  CLI::App* ls = ftune::cli::add_ls_command(app);
  CLI::App* cp = ftune::cli::add_cp_command(app, recipe_args);
  ftune::cli::ExportArgs export_args;
  CLI::App* exp = ftune::cli::add_export_command(app, export_args);
  ftune::cli::InspectArgs inspect_args;
  CLI::App* inspect = ftune::cli::add_inspect_command(app, inspect_args);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // help prints and succeeds; anything else is a usage error
  }
  try {
    if (*version) return cmd_version();
    if (*smoke) return cmd_smoke();
    if (*generate) return ftune::cli::cmd_generate(gen_args);
    if (*run) return ftune::cli::cmd_run(run_args);
    if (*validate) return ftune::cli::cmd_validate(recipe_args);
    if (*ls) return ftune::cli::cmd_ls();
    if (*cp) return ftune::cli::cmd_cp(recipe_args);
    if (*exp) return ftune::cli::cmd_export(export_args);
    if (*inspect) return ftune::cli::cmd_inspect(inspect_args);
    return 2;  // unreachable: a subcommand is required
  } catch (const std::exception& e) {
    // Under mpirun: names the failing rank, then takes the whole job down so no other rank waits
    // forever in a collective (docs/distributed.md, "Failure handling").
    return ftune::parallel::report_fatal_error("ftune", e.what());
  }
}
