// `ftune export CKPT --format hf|peft -o DIR`: a checkpoint (or a run's output_dir) to a Hugging
// Face model folder (LoRA merged) or a PEFT adapter folder.
#include <CLI/CLI.hpp>
#include <filesystem>
#include <iostream>
#include <map>

#include "core/error.h"
#include "io/checkpoint.h"
#include "io/hf_config.h"
#include "launch/commands.h"
#include "models/lora.h"
#include "models/transformer.h"

namespace ftune::cli {

namespace fs = std::filesystem;

CLI::App* add_export_command(CLI::App& app, ExportArgs& a) {
  CLI::App* e = app.add_subcommand(
      "export", "write a checkpoint as a Hugging Face model folder or a PEFT adapter");
  e->add_option("checkpoint", a.checkpoint,
                "an HDF5 checkpoint, or a run's output_dir (its latest valid checkpoint)")
      ->required();
  e->add_option("--format,-f", a.format,
                "hf: config.json + model.safetensors + tokenizer files, LoRA merged; "
                "peft: adapter_config.json + adapter_model.safetensors")
      ->check(CLI::IsMember({"hf", "peft"}))
      ->capture_default_str();
  e->add_option("--output,-o", a.output, "the folder to write (created; must not hold a model)")
      ->required();
  e->add_option("--base", a.base,
                "LoRA checkpoints: the base model folder (default: the one the run trained)");
  return e;
}

namespace {

// The files a serving stack needs beside the weights, copied when the source has them.
void copy_tokenizer_files(const fs::path& from, const fs::path& to) {
  fs::path dir = fs::is_directory(from) ? from : from.parent_path();
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "generation_config.json"}) {
    if (fs::exists(dir / f)) fs::copy_file(dir / f, to / f, fs::copy_options::overwrite_existing);
  }
}

void load_named(Transformer& model, const nn::NamedTensors& src, const std::string& what) {
  for (const auto& [n, t] : src) {
    Tensor p = model.parameter(n);
    FTUNE_CHECK(p.shape() == t.shape(), "[export] ", what, ": tensor ", n, " is ", t.desc(),
                ", the model's ", p.desc());
    p.copy_(t);
  }
}

}  // namespace

int cmd_export(const ExportArgs& a) {
  std::string path = a.checkpoint;
  if (fs::is_directory(path)) {
    std::optional<std::string> latest = latest_valid_checkpoint(path);
    FTUNE_CHECK(latest, "[export] ", path, ": no valid checkpoint in this folder");
    path = *latest;
  }
  Checkpoint c = load_checkpoint(path);
  fs::path out(a.output);
  FTUNE_CHECK(!fs::exists(out / "config.json") && !fs::exists(out / "adapter_config.json"),
              "[export] ", out.string(), " already holds a model; choose an empty folder");

  std::unique_ptr<Transformer> model;
  LoraOptions lo;
  std::string base, tokenizer_dir = c.trainer_state.value("tokenizer_path", std::string());
  if (c.adapter_only) {
    const nlohmann::json& ac = c.adapter_config;
    FTUNE_CHECK(ac.is_object(), "[export] ", path, ": a LoRA checkpoint without adapter_config");
    base = a.base.empty() ? ac.value("base_model", std::string()) : a.base;
    FTUNE_CHECK(!base.empty() && fs::exists(fs::path(base) / "config.json"), "[export] ", path,
                ": the base model folder '", base, "' is not there; pass --base DIR");
    model = Transformer::from_pretrained(base);
    FTUNE_CHECK(model->config().to_json() == c.model_config, "[export] ", base,
                " is not the model ", path, " was trained on (its config differs)");
    lo.r = ac.at("r");
    lo.alpha = ac.at("alpha");
    lo.dropout = ac.at("dropout");
    lo.use_rslora = ac.at("use_rslora");
    lo.target_modules = ac.at("target_modules").get<std::vector<std::string>>();
    apply_lora(*model, lo);
    load_named(*model, c.model, path);
    if (!a.base.empty() || tokenizer_dir.empty()) tokenizer_dir = base;
  } else {
    FTUNE_CHECK(a.format == "hf", "[export] ", path,
                " holds full weights, not a LoRA adapter: use --format hf");
    model = std::make_unique<Transformer>(parse_hf_config(c.model_config, path));
    load_named(*model, c.model, path);
  }
  fs::create_directories(out);
  if (a.format == "peft") {
    save_peft_adapter(out.string(), *model, lo, base);
  } else {
    if (c.adapter_only) merge_lora(*model);
    model->save_pretrained(out.string());
    if (!tokenizer_dir.empty()) copy_tokenizer_files(tokenizer_dir, out);
    if (!fs::exists(out / "tokenizer.json"))
      std::cerr << "ftune export: warning: no tokenizer.json found at '" << tokenizer_dir
                << "' (the run's tokenizer path): " << out.string()
                << " has the weights but no tokenizer; copy the tokenizer files into it\n";
  }
  std::cout << "exported " << path << " (step " << c.step << ") as " << a.format << " to "
            << out.string() << "\n";
  return 0;
}

}  // namespace ftune::cli
