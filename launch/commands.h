// The subcommands of the ftune executable (launch/main.cpp wires them into CLI11).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace CLI {
class App;
}

namespace ftune::cli {

struct GenerateArgs {
  std::string model;  // HF model folder, HDF5 checkpoint, or a run's output_dir
  std::vector<std::string> prompts;
  int64_t max_new_tokens = -1;  // not given: 128, or fewer to fit the model's context
  double temperature = 0.0;     // 0: greedy
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
  bool chat = false;
  std::string system;         // with --chat: a system message before the prompt
  std::string chat_template;  // a name of ChatTemplate::names(); implies --chat
  std::string device = "cpu";  // cpu | cuda | cuda:N
  std::string dtype = "f32";   // f32 | bf16 | f16 (16-bit on the GPU only)
};

// Adds `generate` and its options to `app`; the parsed values land in `args`.
CLI::App* add_generate_command(CLI::App& app, GenerateArgs& args);
// Loads the model and tokenizer, generates and streams the text to stdout. Throws on bad input.
int cmd_generate(const GenerateArgs& args);

struct InspectArgs {
  std::string file;  // a checkpoint .h5
  bool verbose = false;
};

// Adds `inspect FILE [--verbose]`; prints describe_checkpoint() (launch/inspect.cpp).
CLI::App* add_inspect_command(CLI::App& app, InspectArgs& args);
int cmd_inspect(const InspectArgs& args);

}  // namespace ftune::cli

namespace ftune::cli {

struct RunArgs {
  std::string recipe;                  // a YAML file, or the name of a built-in recipe
  std::vector<std::string> overrides;  // "a.b=value", "~a.b"
};
CLI::App* add_run_command(CLI::App& app, RunArgs& args);
// Prints the resolved recipe, then trains; prints eval loss before/after at the end.
int cmd_run(const RunArgs& args);

struct ExportArgs {
  std::string checkpoint;  // an HDF5 checkpoint, or a run's output_dir (its latest checkpoint)
  std::string format = "hf";  // hf | peft
  std::string output;
  std::string base;  // LoRA checkpoints: the base model folder (default: the one it was trained on)
};
CLI::App* add_export_command(CLI::App& app, ExportArgs& args);
int cmd_export(const ExportArgs& args);

}  // namespace ftune::cli
