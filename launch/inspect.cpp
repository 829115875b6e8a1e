// `ftune inspect FILE [--verbose]`: a readable summary of a checkpoint (io/checkpoint.h).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "io/checkpoint.h"
#include "launch/commands.h"

namespace ftune::cli {

CLI::App* add_inspect_command(CLI::App& app, InspectArgs& a) {
  CLI::App* c = app.add_subcommand(
      "inspect", "summarize an ftune checkpoint (.h5): step, model, optimizer state, recipe");
  c->add_option("file", a.file, "the checkpoint file")->required();
  c->add_flag("--verbose,-v", a.verbose, "also list every tensor's name, dtype and shape");
  return c;
}

int cmd_inspect(const InspectArgs& a) {
  const std::string text = describe_checkpoint(a.file, a.verbose);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

}  // namespace ftune::cli
