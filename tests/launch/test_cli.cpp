// The ftune executable: `version`, `smoke`, and `generate` on a tiny model folder (a random GPT-2
// saved by ftune next to the tokenizer fixtures), its output against the library, and the exit
// codes for bad input (1) and bad usage (2).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/allocator.h"
#include "data/chat_template.h"
#include "data/tokenizer.h"
#include "io/hf_config.h"
#include "models/generate.h"
#include "models/transformer.h"
#include "tests/test_util.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test_util::quote;
using test_util::slurp;

struct Result {
  int rc = -1;
  std::string out, err;
};

class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("ftune_test_cli_" + std::to_string(::getpid()));
    fs::create_directories(root_);
    // gpt2 tokenizer fixture (byte-level, ChatML chat_template) + a random GPT-2 of its vocab
    const fs::path tok_src = fs::path(FTUNE_SOURCE_DIR) / "tests/fixtures/tokenizers/gpt2";
    model_dir_ = root_ / "gpt2";
    fs::create_directories(model_dir_);
    for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
      fs::copy_file(tok_src / f, model_dir_ / f);
    Tokenizer tok = Tokenizer::from_folder(model_dir_.string());
    nlohmann::json j = {{"architectures", {"GPT2LMHeadModel"}},
                        {"model_type", "gpt2"},
                        {"n_embd", 32},
                        {"n_head", 4},
                        {"n_layer", 2},
                        {"n_positions", 128},
                        {"vocab_size", tok.vocab_size()},
                        {"eos_token_id", *tok.eos_id()},
                        {"bos_token_id", *tok.eos_id()},
                        {"tie_word_embeddings", true}};
    Transformer m(parse_hf_config(j, "test"));
    m.init_random(5, 0.3);
    m.save_pretrained(model_dir_.string());
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }

  static Result run(const std::vector<std::string>& args) {
    std::string cmd = quote(FTUNE_BINARY);
    for (const auto& a : args) cmd += " " + quote(a);
    const fs::path out = root_ / "stdout", err = root_ / "stderr";
    cmd += " >" + quote(out.string()) + " 2>" + quote(err.string());
    const int status = std::system(cmd.c_str());
    Result r;
    r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.out = slurp(out);
    r.err = slurp(err);
    return r;
  }

  // What `ftune generate` should print for these prompts: the library's generation, decoded.
  static std::vector<std::string> expected(const std::vector<std::vector<int32_t>>& prompts,
                                           GenerateOptions o) {
    Tokenizer tok = Tokenizer::from_folder(model_dir_.string());
    auto m = Transformer::from_pretrained(model_dir_.string());
    o.stop_token_ids = {*tok.eos_id()};
    o.pad_token_id = *tok.eos_id();
    std::vector<std::string> texts;
    for (const auto& ids : generate(*m, prompts, o)) texts.push_back(tok.decode(ids, true));
    return texts;
  }

  static std::vector<int32_t> encode(const std::string& text) {
    return Tokenizer::from_folder(model_dir_.string()).encode(text, true);
  }

  static inline fs::path root_, model_dir_;
};

TEST_F(Cli, VersionSmokeAndUsage) {
  Result v = run({"version"});
  EXPECT_EQ(v.rc, 0);
  EXPECT_EQ(v.out.rfind("ftune ", 0), 0u) << v.out;
  Result vf = run({"--version"});
  EXPECT_EQ(vf.rc, 0);
  EXPECT_EQ(vf.out, v.out);
  Result s = run({"smoke"});
  EXPECT_EQ(s.rc, 0) << s.err;
  EXPECT_NE(s.out.find("loss"), std::string::npos);
  Result h = run({"--help"});
  EXPECT_EQ(h.rc, 0);
  EXPECT_NE(h.out.find("generate"), std::string::npos);
  EXPECT_EQ(run({"generate", "--help"}).rc, 0);
  EXPECT_EQ(run({}).rc, 2);
  Result bogus = run({"bogus"});
  EXPECT_EQ(bogus.rc, 2);
  EXPECT_FALSE(bogus.err.empty());
}

TEST_F(Cli, GenerateGreedyPrintsTheLibrarysText) {
  Result r = run({"generate", "--model", model_dir_.string(), "--prompt", "hello world",
                  "--max-new-tokens", "12"});
  ASSERT_EQ(r.rc, 0) << r.err;
  GenerateOptions o;
  o.max_new_tokens = 12;
  EXPECT_EQ(r.out, expected({encode("hello world")}, o)[0] + "\n");
}

// Without --max-new-tokens: 128, or what the model's 128 positions leave room for.
TEST_F(Cli, GenerateDefaultLengthFitsTheContext) {
  std::string prompt;
  for (int i = 0; i < 12; ++i) prompt += " hello world";
  const auto ids = encode(prompt);
  ASSERT_GT(ids.size(), 20u);
  Result r = run({"generate", "--model", model_dir_.string(), "--prompt", prompt});
  ASSERT_EQ(r.rc, 0) << r.err;
  GenerateOptions o;
  o.max_new_tokens = 128 - int64_t(ids.size()) + 1;
  EXPECT_EQ(r.out, expected({ids}, o)[0] + "\n");
}

TEST_F(Cli, GenerateBatchPrintsEachPromptInOrder) {
  Result r = run({"generate", "-m", model_dir_.string(), "-p", "The cat", "-p",
                  "a longer prompt, with more words in it", "-p", "x", "-n", "9"});
  ASSERT_EQ(r.rc, 0) << r.err;
  GenerateOptions o;
  o.max_new_tokens = 9;
  auto t = expected(
      {encode("The cat"), encode("a longer prompt, with more words in it"), encode("x")}, o);
  EXPECT_EQ(r.out, "==> prompt 0 <==\n" + t[0] + "\n\n==> prompt 1 <==\n" + t[1] +
                       "\n\n==> prompt 2 <==\n" + t[2] + "\n");
}

TEST_F(Cli, GenerateSampledIsSeeded) {
  std::vector<std::string> args = {
      "generate", "-m", model_dir_.string(), "-p",  "hello",  "-n", "16", "--temperature", "1.2",
      "--top-k",  "50", "--top-p",           "0.9", "--seed", "11"};
  Result a = run(args), b = run(args);
  ASSERT_EQ(a.rc, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  GenerateOptions o;
  o.max_new_tokens = 16;
  o.temperature = 1.2;
  o.top_k = 50;
  o.top_p = 0.9;
  o.seed = 11;
  EXPECT_EQ(a.out, expected({encode("hello")}, o)[0] + "\n");
  args.back() = "12";
  EXPECT_NE(run(args).out, a.out);
}

TEST_F(Cli, GenerateChatUsesTheDetectedTemplate) {
  Result r = run({"generate", "-m", model_dir_.string(), "-p", "Hi there", "--chat", "--system",
                  "Be brief.", "-n", "8"});
  ASSERT_EQ(r.rc, 0) << r.err;
  Tokenizer tok = Tokenizer::from_folder(model_dir_.string());
  ChatTemplate tpl = ChatTemplate::from_config(tok.config());
  ASSERT_EQ(tpl.name(), "chatml");
  std::string text = tpl.render({{"system", "Be brief."}, {"user", "Hi there"}}, true).text;
  GenerateOptions o;
  o.max_new_tokens = 8;
  // chat also stops at <|im_end|>
  Tokenizer t2 = Tokenizer::from_folder(model_dir_.string());
  auto m = Transformer::from_pretrained(model_dir_.string());
  o.stop_token_ids = {*t2.eos_id(), *t2.token_to_id("<|im_end|>")};
  o.pad_token_id = *t2.eos_id();
  auto ids = generate(*m, {t2.encode(text, false)}, o)[0];
  EXPECT_EQ(r.out, t2.decode(ids, true) + "\n");
  // a named format instead
  Result z = run(
      {"generate", "-m", model_dir_.string(), "-p", "Hi", "--chat-template", "zephyr", "-n", "3"});
  EXPECT_EQ(z.rc, 0) << z.err;
}

// A sliding-window config (Mistral v0.1 style) loads when the run's length stays within the
// window, where full causal attention is exact, and is refused with the reason beyond it.
TEST_F(Cli, GenerateWithASlidingWindowModel) {
  const fs::path dir = root_ / "mistral_window";
  Tokenizer tok = Tokenizer::from_folder(model_dir_.string());
  nlohmann::json j = {{"architectures", {"MistralForCausalLM"}},
                      {"model_type", "mistral"},
                      {"hidden_size", 32},
                      {"intermediate_size", 64},
                      {"num_attention_heads", 4},
                      {"num_key_value_heads", 2},
                      {"num_hidden_layers", 1},
                      {"max_position_embeddings", 256},
                      {"sliding_window", 32},
                      {"vocab_size", tok.vocab_size()}};
  HfConfigOptions o;
  o.max_seq_len = 32;
  Transformer m(parse_hf_config(j, "test", o));
  m.init_random(3, 0.3);
  m.save_pretrained(dir.string());
  fs::copy_file(model_dir_ / "tokenizer.json", dir / "tokenizer.json");
  const auto ids = encode("hello");
  ASSERT_LT(ids.size(), 10u);
  Result ok = run({"generate", "-m", dir.string(), "-p", "hello", "-n", "20"});
  EXPECT_EQ(ok.rc, 0) << ok.err;
  // without -n: 128 does not fit the window; the default is then what does (32 - prompt + 1)
  Result fit = run({"generate", "-m", dir.string(), "-p", "hello"});
  EXPECT_EQ(fit.rc, 0) << fit.err;
  auto model = Transformer::from_pretrained(dir.string(), o);
  GenerateOptions g;
  g.max_new_tokens = 32 - int64_t(ids.size()) + 1;
  g.stop_token_ids = {*tok.eos_id()};
  g.pad_token_id = *tok.eos_id();
  EXPECT_EQ(fit.out, tok.decode(generate(*model, {ids}, g)[0], true) + "\n");
  Result too_long = run({"generate", "-m", dir.string(), "-p", "hello", "-n", "40"});
  EXPECT_EQ(too_long.rc, 1);
  EXPECT_NE(too_long.err.find("sliding_window"), std::string::npos) << too_long.err;
}

TEST_F(Cli, BadInputExitsWithOne) {
  Result missing = run({"generate", "--model", (root_ / "nope").string(), "--prompt", "x"});
  EXPECT_EQ(missing.rc, 1);
  EXPECT_NE(missing.err.find((root_ / "nope").string()), std::string::npos) << missing.err;

  const fs::path no_tok = root_ / "no_tokenizer";
  fs::create_directories(no_tok);
  fs::copy_file(model_dir_ / "config.json", no_tok / "config.json",
                fs::copy_options::overwrite_existing);
  fs::copy_file(model_dir_ / "model.safetensors", no_tok / "model.safetensors",
                fs::copy_options::overwrite_existing);
  Result nt = run({"generate", "--model", no_tok.string(), "--prompt", "x"});
  EXPECT_EQ(nt.rc, 1);
  EXPECT_NE(nt.err.find((no_tok / "tokenizer.json").string()), std::string::npos) << nt.err;

  // a tokenizer without a chat template, asked for --chat
  const fs::path no_chat = root_ / "no_chat";
  fs::create_directories(no_chat);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    fs::copy_file(model_dir_ / f, no_chat / f, fs::copy_options::overwrite_existing);
  Result nc = run({"generate", "--model", no_chat.string(), "--prompt", "x", "--chat"});
  EXPECT_EQ(nc.rc, 1);
  EXPECT_NE(nc.err.find("--chat-template"), std::string::npos) << nc.err;
  EXPECT_EQ(run({"generate", "--model", no_chat.string(), "--prompt", "x", "-n", "2"}).rc, 0);

  // a broken config.json
  const fs::path bad_cfg = root_ / "bad_config";
  fs::create_directories(bad_cfg);
  for (const char* f : {"model.safetensors", "tokenizer.json"})
    fs::copy_file(model_dir_ / f, bad_cfg / f, fs::copy_options::overwrite_existing);
  std::ofstream(bad_cfg / "config.json") << "{\"model_type\": \"bert\"}";
  Result bc = run({"generate", "--model", bad_cfg.string(), "--prompt", "x"});
  EXPECT_EQ(bc.rc, 1);
  EXPECT_NE(bc.err.find("config.json"), std::string::npos) << bc.err;

  // a tokenizer whose ids the model does not have
  const fs::path small = root_ / "small_vocab";
  {
    nlohmann::json j = {{"architectures", {"GPT2LMHeadModel"}},
                        {"model_type", "gpt2"},
                        {"n_embd", 8},
                        {"n_head", 2},
                        {"n_layer", 1},
                        {"n_positions", 16},
                        {"vocab_size", 50}};
    Transformer(parse_hf_config(j, "test")).save_pretrained(small.string());
    fs::copy_file(model_dir_ / "tokenizer.json", small / "tokenizer.json");
  }
  Result sv = run({"generate", "--model", small.string(), "--prompt", "hello world"});
  EXPECT_EQ(sv.rc, 1);
  EXPECT_NE(sv.err.find("vocab_size is 50"), std::string::npos) << sv.err;
  EXPECT_TRUE(sv.out.empty()) << sv.out;

  // a prompt longer than the model's 128 positions
  std::string long_prompt;
  for (int i = 0; i < 200; ++i) long_prompt += " hello";
  Result lp = run({"generate", "--model", model_dir_.string(), "--prompt", long_prompt});
  EXPECT_EQ(lp.rc, 1);
  EXPECT_NE(lp.err.find("maximum sequence length"), std::string::npos) << lp.err;

  // too long for the model (128 positions)
  Result tl = run({"generate", "--model", model_dir_.string(), "--prompt", "x", "-n", "500"});
  EXPECT_EQ(tl.rc, 1);
  EXPECT_NE(tl.err.find("maximum sequence length"), std::string::npos) << tl.err;
}

// --dtype bf16/f16 need a GPU; --device cuda without one (or past the last GPU) says so, before
// reading the weights.
TEST_F(Cli, GenerateDeviceAndDtypeRefusalsNameTheProblem) {
  const std::string m = model_dir_.string();
  Result bf = run({"generate", "--model", m, "-p", "x", "--dtype", "bf16"});
  EXPECT_EQ(bf.rc, 1);
  EXPECT_NE(bf.err.find("--dtype bf16 needs --device cuda"), std::string::npos) << bf.err;
  if (!cuda_available()) {
    Result g = run({"generate", "--model", m, "-p", "x", "--device", "cuda"});
    EXPECT_EQ(g.rc, 1);
    EXPECT_NE(g.err.find("no GPU is usable here"), std::string::npos) << g.err;
  } else {
    Result g = run({"generate", "--model", m, "-p", "x", "--device", "cuda:99"});
    EXPECT_EQ(g.rc, 1);
    EXPECT_NE(g.err.find("GPU(s)"), std::string::npos) << g.err;
  }
}

// On the GPU: greedy in f32 prints the CPU's text (the random model's logits differ by rounding
// only, far from a tie at these sizes), batched too; bf16 and f16 run and stop where asked.
TEST_F(Cli, GpuGenerateMatchesTheCpu) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU is present (scripts/gpu_check.sh runs this on one)";
  const std::string m = model_dir_.string();
  const std::vector<std::string> prompts = {"-p", "hello world", "-p", "The cat", "-n", "12"};
  std::vector<std::string> cpu_args = {"generate", "--model", m};
  cpu_args.insert(cpu_args.end(), prompts.begin(), prompts.end());
  Result cpu = run(cpu_args);
  ASSERT_EQ(cpu.rc, 0) << cpu.err;
  std::vector<std::string> gpu_args = cpu_args;
  gpu_args.insert(gpu_args.end(), {"--device", "cuda"});
  Result gpu = run(gpu_args);
  ASSERT_EQ(gpu.rc, 0) << gpu.err;
  EXPECT_EQ(gpu.out, cpu.out);
  for (const char* dt : {"bf16", "f16"}) {
    Result h = run({"generate", "--model", m, "-p", "hello world", "-n", "5", "--device",
                    "cuda:0", "--dtype", dt});
    EXPECT_EQ(h.rc, 0) << dt << ": " << h.err;
    EXPECT_FALSE(h.out.empty()) << dt;
  }
}

TEST_F(Cli, BadUsageExitsWithTwo) {
  const std::string m = model_dir_.string();
  for (const auto& args : std::vector<std::vector<std::string>>{
           {"generate", "--prompt", "x"},                          // no --model
           {"generate", "--model", m},                             // no --prompt
           {"generate", "--model", m, "-p", "x", "--top-p", "2"},  // out of range
           {"generate", "--model", m, "-p", "x", "--temperature", "-1"},
           {"generate", "--model", m, "-p", "x", "--top-k", "-3"},
           {"generate", "--model", m, "-p", "x", "--max-new-tokens", "ten"},
           {"generate", "--model", m, "-p", "x", "--system", "s"},  // --system needs --chat
           {"generate", "--model", m, "-p", "x", "--chat-template", "nope"},
           {"generate", "--model", m, "-p", "x", "--frobnicate"},
           {"generate", "--model", m, "-p", "x", "--device", "gpu"},
           {"generate", "--model", m, "-p", "x", "--device", "cuda:"},
           {"generate", "--model", m, "-p", "x", "--dtype", "fp8"},
       }) {
    Result r = run(args);
    std::string joined;
    for (const auto& a : args) joined += a + " ";
    EXPECT_EQ(r.rc, 2) << joined << "\n" << r.err;
    EXPECT_FALSE(r.err.empty()) << joined;
    EXPECT_TRUE(r.out.empty()) << joined;
  }
}

}  // namespace
}  // namespace ftune
