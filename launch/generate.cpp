// `ftune generate`: sample from a HF model folder, streaming the text to stdout.
#include "models/generate.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/error.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "io/checkpoint.h"
#include "launch/commands.h"
#include "models/transformer.h"

namespace ftune::cli {

namespace fs = std::filesystem;

constexpr int64_t kDefaultMaxNewTokens = 128;

CLI::App* add_generate_command(CLI::App& app, GenerateArgs& a) {
  CLI::App* g = app.add_subcommand(
      "generate",
      "generate text from a Hugging Face model folder (config.json, model.safetensors, "
      "tokenizer.json)");
  g->add_option("--model,-m", a.model,
                "a HF model folder, an HDF5 checkpoint, or a run's output_dir (its latest "
                "checkpoint)")
      ->required();
  g->add_option("--prompt,-p", a.prompts, "a prompt (repeat for a batch)")->required();
  g->add_option("--max-new-tokens,-n", a.max_new_tokens,
                "new tokens per prompt at most (default: 128, or fewer to fit the model's "
                "context)")
      ->check(CLI::NonNegativeNumber);
  g->add_option("--temperature,-t", a.temperature, "sampling temperature; 0 is greedy")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  g->add_option("--top-k", a.top_k, "keep the k most likely tokens; 0 is off")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  g->add_option("--top-p", a.top_p,
                "nucleus sampling: keep the top tokens up to this mass; 1 is off")
      ->check(CLI::Range(0.0, 1.0))
      ->capture_default_str();
  g->add_option("--seed", a.seed, "sampling seed")->capture_default_str();
  CLI::Option* chat =
      g->add_flag("--chat", a.chat, "wrap each prompt as a user message in the chat template");
  g->add_option("--system", a.system, "with --chat: a system message")->needs(chat);
  g->add_option("--chat-template", a.chat_template,
                "a chat format instead of the one detected from tokenizer_config.json (implies "
                "--chat)")
      ->check(CLI::IsMember(ChatTemplate::names()));
  g->add_option("--device", a.device, "cpu, cuda (GPU 0) or cuda:N")
      ->check([](const std::string& d) {
        const bool ok = d == "cpu" || d == "cuda" ||
                        (d.size() > 5 && d.rfind("cuda:", 0) == 0 &&
                         d.find_first_not_of("0123456789", 5) == std::string::npos);
        return ok ? std::string() : "expected cpu, cuda or cuda:N, got '" + d + "'";
      })
      ->capture_default_str();
  g->add_option("--dtype", a.dtype, "the weights' and activations' dtype (bf16, f16: GPU only)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  return g;
}

namespace {

// eos_token_id of a generation_config.json / config.json: one id or a list.
std::vector<int32_t> read_eos_ids(const fs::path& file) {
  std::vector<int32_t> ids;
  std::ifstream in(file);
  if (!in) return ids;
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("eos_token_id")) return ids;
  const auto& e = j["eos_token_id"];
  if (e.is_number_integer()) ids.push_back(e.get<int32_t>());
  if (e.is_array())
    for (const auto& v : e)
      if (v.is_number_integer()) ids.push_back(v.get<int32_t>());
  return ids;
}

void add_unique(std::vector<int32_t>& v, std::optional<int32_t> id) {
  if (id && std::find(v.begin(), v.end(), *id) == v.end()) v.push_back(*id);
}

// Prints rows in order while the batch runs: the lowest unfinished row streams live, later rows
// are held until it is done. Text is re-decoded from all the row's ids (a byte-level token may be
// half a UTF-8 character) and nothing ending in U+FFFD is printed until the next token completes
// it.
class StreamPrinter {
 public:
  StreamPrinter(const Tokenizer& tok, size_t rows, int64_t max_new,
                const std::vector<int32_t>& stops)
      : tok_(tok), rows_(rows), max_new_(max_new), stops_(stops) {}

  void on_token(int64_t r, int32_t id) {
    start();
    Row& row = rows_[size_t(r)];
    row.ids.push_back(id);
    row.done = int64_t(row.ids.size()) == max_new_ ||
               std::find(stops_.begin(), stops_.end(), id) != stops_.end();
    if (size_t(r) == cur_) emit(false);
    while (cur_ < rows_.size() && rows_[cur_].done) advance();
  }

  // After generate: prints what is still held.
  void finish() {
    start();
    while (cur_ < rows_.size()) advance();
    std::fflush(stdout);
  }

 private:
  struct Row {
    std::vector<int32_t> ids;
    size_t printed = 0;
    bool done = false;
  };

  // The first header waits for the first token: nothing is printed when generate throws.
  void start() {
    if (!started_ && rows_.size() > 1) header(0);
    started_ = true;
  }

  void header(size_t r) { std::printf("%s==> prompt %zu <==\n", r ? "\n" : "", r); }

  void emit(bool final) {
    Row& row = rows_[cur_];
    const std::string text = tok_.decode(row.ids, /*skip_special_tokens=*/true);
    static const std::string kReplacement = "\xEF\xBF\xBD";
    const bool partial = text.size() >= 3 && text.compare(text.size() - 3, 3, kReplacement) == 0;
    if ((final || !partial) && text.size() > row.printed) {
      std::fwrite(text.data() + row.printed, 1, text.size() - row.printed, stdout);
      row.printed = text.size();
      std::fflush(stdout);
    }
  }

  void advance() {
    emit(true);
    std::printf("\n");
    if (++cur_ < rows_.size()) {
      header(cur_);
      emit(false);
    }
  }

  const Tokenizer& tok_;
  std::vector<Row> rows_;
  size_t cur_ = 0;
  bool started_ = false;
  int64_t max_new_;
  std::vector<int32_t> stops_;
};

}  // namespace

namespace {

// A removed-on-exit folder for a checkpoint exported to a HF folder.
struct TempDir {
  fs::path path;
  ~TempDir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

}  // namespace

int cmd_generate(const GenerateArgs& a_in) {
  GenerateArgs a = a_in;
  // A checkpoint (an .h5 file, or a run's output_dir) is exported to a temporary HF folder first
  // (LoRA merged, tokenizer files copied), exactly as `ftune export --format hf` writes it.
  TempDir tmp;
  const bool is_ckpt_file = fs::is_regular_file(a.model) && fs::path(a.model).extension() == ".h5";
  const bool is_run_dir = fs::is_directory(a.model) &&
                          !fs::exists(fs::path(a.model) / "config.json") &&
                          !list_checkpoints(a.model).empty();
  if (is_ckpt_file || is_run_dir) {
    tmp.path = fs::temp_directory_path() / ("ftune_generate_" + std::to_string(::getpid()));
    fs::remove_all(tmp.path);
    ExportArgs e;
    e.checkpoint = a.model;
    e.format = "hf";
    e.output = tmp.path.string();
    std::ostringstream quiet;
    std::streambuf* old = std::cout.rdbuf(quiet.rdbuf());  // the export's one-line report
    try {
      cmd_export(e);
    } catch (...) {
      std::cout.rdbuf(old);
      throw;
    }
    std::cout.rdbuf(old);
    a.model = tmp.path.string();
  }
  const fs::path dir(a.model);
  FTUNE_CHECK(fs::is_directory(dir), "[generate] model folder '", a.model,
              "' does not exist or is not a folder");
  for (const char* f : {"config.json", "tokenizer.json"})
    FTUNE_CHECK(fs::is_regular_file(dir / f), "[generate] '", (dir / f).string(),
                "' is missing (ftune generate needs the model's config and tokenizer)");

  Tokenizer tok = Tokenizer::from_folder(a.model);

  const bool chat = a.chat || !a.chat_template.empty();
  std::optional<ChatTemplate> tpl;
  if (chat) {
    if (!a.chat_template.empty()) {
      tpl = ChatTemplate::by_name(a.chat_template, tok.config());
    } else {
      FTUNE_CHECK(!tok.config().chat_template.empty(),
                  "[generate] --chat: ", (dir / "tokenizer_config.json").string(),
                  " has no chat_template; pick a format with --chat-template NAME");
      try {
        tpl = ChatTemplate::from_config(tok.config());
      } catch (const Error& e) {
        FTUNE_THROW(e.what(), "; pick a format with --chat-template NAME");
      }
    }
  }

  std::vector<std::vector<int32_t>> prompts;
  for (size_t i = 0; i < a.prompts.size(); ++i) {
    std::vector<int32_t> ids;
    if (tpl) {
      std::vector<ChatMessage> msgs;
      if (!a.system.empty()) msgs.push_back({"system", a.system});
      msgs.push_back({"user", a.prompts[i]});
      // The template writes bos itself: no post-processor on top.
      ids = tok.encode(tpl->render(msgs, /*add_generation_prompt=*/true).text, false);
    } else {
      ids = tok.encode(a.prompts[i], /*add_special_tokens=*/true);
    }
    FTUNE_CHECK(!ids.empty(), "[generate] prompt ", i,
                " encodes to no tokens (an empty prompt needs a tokenizer that adds bos)");
    prompts.push_back(std::move(ids));
  }
  size_t longest = 0;
  for (const auto& p : prompts) longest = std::max(longest, p.size());

  // The longest sequence this run needs: a sliding-window config (Mistral v0.1) loads when its
  // window does not mask anything at that length. Without -n, the default is fitted to the
  // context first (the config alone says how long it is).
  int64_t max_new = a.max_new_tokens;
  if (max_new < 0) {
    HfConfigOptions probe;
    probe.max_seq_len = int64_t(longest);
    const ModelConfig c = load_hf_config((dir / "config.json").string(), probe);
    max_new = std::clamp<int64_t>(c.max_seq_len() - int64_t(longest) + 1, 0, kDefaultMaxNewTokens);
  }
  // Where it runs, checked before the weights are read: the CPU in f32, or a GPU in any dtype.
  const DType dtype = a.dtype == "bf16" ? DType::bf16 : a.dtype == "f16" ? DType::f16 : DType::f32;
  Device device = Device::cpu();
  if (a.device == "cpu") {
    FTUNE_CHECK(dtype == DType::f32, "[generate] --dtype ", a.dtype,
                " needs --device cuda (the CPU computes in f32)");
  } else {
    FTUNE_CHECK(cuda_available(), "[generate] --device ", a.device, " but no GPU is usable here",
#ifdef FTUNE_HAVE_CUDA
                " (CUDA found no device)"
#else
                " (ftune was built without CUDA: FTUNE_CUDA=OFF)"
#endif
    );
    const int idx = a.device == "cuda" ? 0 : std::stoi(a.device.substr(5));
    FTUNE_CHECK(idx < cuda_device_count(), "[generate] --device ", a.device,
                " but this machine has ", cuda_device_count(), " GPU(s)");
    cuda::set_device(idx);
    device = Device::cuda(idx);
  }
  HfConfigOptions load_opt;
  load_opt.max_seq_len = std::max<int64_t>(1, int64_t(longest) + max_new - 1);
  std::unique_ptr<Transformer> model = Transformer::from_pretrained(a.model, load_opt);
  if (device.is_cuda() || dtype != DType::f32) model->to_(device, dtype);
  const ModelConfig& cfg = model->config();
  for (size_t i = 0; i < prompts.size(); ++i) {
    const auto& ids = prompts[i];
    for (int32_t id : ids)
      FTUNE_CHECK(id < cfg.vocab_size, "[generate] prompt ", i, " encodes to token id ", id,
                  " but the model's vocab_size is ", cfg.vocab_size, ": is ",
                  (dir / "tokenizer.json").string(), " this model's tokenizer?");
    FTUNE_CHECK(int64_t(ids.size()) <= cfg.max_seq_len(), "[generate] prompt ", i, " has ",
                ids.size(), " tokens, more than the model's maximum sequence length ",
                cfg.max_seq_len());
  }

  // Stop ids: generation_config.json's eos (transformers' generate uses it), else config.json's,
  // plus the tokenizer's eos and, in chat, the template's end-of-turn token.
  GenerateOptions opt;
  opt.max_new_tokens = max_new;
  opt.temperature = a.temperature;
  opt.top_k = a.top_k;
  opt.top_p = a.top_p;
  opt.seed = a.seed;
  std::vector<int32_t> stops = read_eos_ids(dir / "generation_config.json");
  if (stops.empty())
    for (int64_t e : cfg.eos_token_ids) stops.push_back(int32_t(e));
  add_unique(stops, tok.eos_id());
  if (tpl) {
    if (!tpl->eos_token().empty()) add_unique(stops, tok.token_to_id(tpl->eos_token()));
    if (tpl->name() == "chatml") add_unique(stops, tok.token_to_id("<|im_end|>"));
    if (tpl->name() == "llama3") add_unique(stops, tok.token_to_id("<|eot_id|>"));
  }
  opt.stop_token_ids = stops;
  // Any id in the vocabulary would do as filler; prefer the one the tokenizer or model names.
  std::optional<int32_t> pad = tok.pad_id();
  if (!pad && cfg.pad_token_id) pad = int32_t(*cfg.pad_token_id);
  if (!pad && !stops.empty()) pad = stops.front();
  opt.pad_token_id = pad && *pad >= 0 && *pad < cfg.vocab_size ? *pad : 0;

  if (a.temperature == 0.0 && (a.top_k != 0 || a.top_p != 1.0))
    std::fprintf(stderr,
                 "ftune: note: --top-k/--top-p have no effect with greedy decoding "
                 "(--temperature 0)\n");

  StreamPrinter printer(tok, prompts.size(), opt.max_new_tokens, stops);
  generate(*model, prompts, opt, [&](int64_t r, int32_t id) { printer.on_token(r, id); });
  printer.finish();
  return 0;
}

}  // namespace ftune::cli
