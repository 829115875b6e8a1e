// Recipes: interpolation, overrides, deletion, the resolved YAML, the typed SftConfig, the corpus
// of broken recipes in broken_recipes/ (each names the diagnostics it must get, line:column and
// message), the built-in recipes, and `ftune validate` / `ls` / `cp` through the executable.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <tuple>

#include "launch/recipe.h"
#include "tests/test_util.h"

namespace ftune {
namespace {

namespace fs = std::filesystem;
using test_util::quote;
using test_util::slurp;

void write(const fs::path& p, const std::string& text) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << text;
}

std::string all(const std::vector<Diagnostic>& d) {
  std::string s;
  for (const auto& x : d) s += x.str() + "\n";
  return s;
}

// Runs the test body in a folder holding tiny stand-ins for the files recipes name: a model
// folder (config.json with 4096 positions, weights, tokenizer), JSONL files, an empty folder and
// a folder with only a config.json. Relative paths in recipes resolve against it.
class RecipeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = fs::temp_directory_path() / ("ftune_test_recipe_" + std::to_string(::getpid()));
    fs::remove_all(root_);
    write(root_ / "model/config.json",
          R"({"model_type": "llama", "max_position_embeddings": 4096})");
    write(root_ / "model/model.safetensors", "");
    write(root_ / "model/tokenizer.json", "{}");
    write(root_ / "config_only/config.json", "{}");
    write(root_ / "config_only/tokenizer.json", "{}");
    write(root_ / "train.jsonl", "{\"text\": \"a\"}\n");
    write(root_ / "eval.jsonl", "{\"text\": \"b\"}\n");
    fs::create_directories(root_ / "empty_dir");
  }
  static void TearDownTestSuite() { fs::remove_all(root_); }
  void SetUp() override {
    old_cwd_ = fs::current_path();
    fs::current_path(root_);
  }
  void TearDown() override { fs::current_path(old_cwd_); }

  // Diagnostics of YAML text written to a file of the temp folder.
  static std::vector<Diagnostic> check(const std::string& yaml,
                                       const std::vector<std::string>& overrides = {}) {
    write(root_ / "r.yaml", yaml);
    return Recipe::check((root_ / "r.yaml").string(), overrides);
  }
  static Recipe load(const std::string& yaml, const std::vector<std::string>& overrides = {}) {
    write(root_ / "r.yaml", yaml);
    return Recipe::load((root_ / "r.yaml").string(), overrides);
  }

  static inline fs::path root_;
  fs::path old_cwd_;
};

const char* kMinimal = "model:\n  path: model\ndataset:\n  path: train.jsonl\n";

TEST_F(RecipeTest, MinimalRecipeGetsTheDefaults) {
  Recipe r = load(kMinimal);
  EXPECT_TRUE(r.validate().empty());
  EXPECT_EQ(r.method(), "sft");
  const SftConfig c = r.to_sft_config();
  const SftConfig d;
  EXPECT_EQ(c.model.path, "model");
  EXPECT_EQ(c.dataset.path, "train.jsonl");
  EXPECT_EQ(c.output_dir, d.output_dir);
  EXPECT_EQ(c.optimizer.lr, d.optimizer.lr);
  EXPECT_EQ(c.batch_size, d.batch_size);
  EXPECT_EQ(c.max_steps, d.max_steps);
  EXPECT_FALSE(c.lora.enabled);
  EXPECT_FALSE(c.eval_generate.has_value());
  EXPECT_EQ(c.recipe_file, (root_ / "r.yaml").string());
  EXPECT_EQ(c.resolved_yaml, kMinimal);
}

TEST_F(RecipeTest, EveryKeyReachesTheConfig) {
  const SftConfig c = load(R"(
method: sft
output_dir: out/x
seed: 17
dtype: bf16
device: cuda:1
model: {path: model, init: pretrained, init_std: 0.05}
tokenizer: {path: model/tokenizer.json, max_seq_len: 300, chat_template: chatml}
dataset:
  path: train.jsonl
  format: messages
  train_on_input: true
  packed: true
  truncation: left
  val_size: 12
  shuffle: false
lora:
  r: 4
  alpha: 8.5
  dropout: 0.1
  use_rslora: true
  target_modules: [q_proj, o_proj]
optimizer: {name: adamw, lr: 1e-3, betas: [0.8, 0.95], eps: 1e-6, weight_decay: 0.1}
lr_scheduler: {name: linear, num_warmup_steps: 7, min_lr_ratio: 0.25}
batch_size: 3
epochs: 2
max_steps: 1e3
gradient_accumulation_steps: 4
clip_grad_norm: 0.5
log_every_n_steps: 5
eval_every_n_steps: 20
save_every_n_steps: 40
keep_last_n: 2
resume: true
max_consecutive_nan_steps: 9
allow_tf32: true
gemm_autotune: true
chunked_loss: false
early_stopping: {patience: 2, min_delta: 0.01}
eval:
  max_batches: 6
  generate: {prompts: [hi, "a: b"], max_new_tokens: 5, temperature: 0.7}
parallel: {dp: 2, tp: 4}
)")
                          .to_sft_config();
  EXPECT_EQ(c.output_dir, "out/x");
  EXPECT_EQ(c.seed, 17u);
  EXPECT_EQ(c.dtype, "bf16");
  EXPECT_EQ(c.device, "cuda:1");
  EXPECT_EQ(c.model.init_std, 0.05);
  EXPECT_EQ(c.tokenizer.path, "model/tokenizer.json");
  EXPECT_EQ(c.tokenizer.max_seq_len, 300);
  EXPECT_EQ(c.tokenizer.chat_template, "chatml");
  EXPECT_EQ(c.dataset.format, "messages");
  EXPECT_TRUE(c.dataset.train_on_input);
  EXPECT_TRUE(c.dataset.packed);
  EXPECT_EQ(c.dataset.truncation, "left");
  EXPECT_EQ(c.dataset.val_size, 12.0);
  EXPECT_FALSE(c.dataset.shuffle);
  EXPECT_TRUE(c.lora.enabled);
  EXPECT_EQ(c.lora.r, 4);
  EXPECT_EQ(c.lora.alpha, 8.5);
  EXPECT_EQ(c.lora.dropout, 0.1);
  EXPECT_TRUE(c.lora.use_rslora);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "o_proj"}));
  EXPECT_EQ(c.optimizer.lr, 1e-3);
  EXPECT_EQ(c.optimizer.beta1, 0.8);
  EXPECT_EQ(c.optimizer.beta2, 0.95);
  EXPECT_EQ(c.optimizer.eps, 1e-6);
  EXPECT_EQ(c.optimizer.weight_decay, 0.1);
  EXPECT_EQ(c.lr_scheduler.name, "linear");
  EXPECT_EQ(c.lr_scheduler.num_warmup_steps, 7);
  EXPECT_EQ(c.lr_scheduler.min_lr_ratio, 0.25);
  EXPECT_EQ(c.batch_size, 3);
  EXPECT_EQ(c.epochs, 2);
  EXPECT_EQ(c.max_steps, 1000);
  EXPECT_EQ(c.gradient_accumulation_steps, 4);
  EXPECT_EQ(c.clip_grad_norm, 0.5);
  EXPECT_EQ(c.log_every_n_steps, 5);
  EXPECT_EQ(c.eval_every_n_steps, 20);
  EXPECT_EQ(c.save_every_n_steps, 40);
  EXPECT_EQ(c.keep_last_n, 2);
  EXPECT_TRUE(c.resume);
  EXPECT_EQ(c.max_consecutive_nan_steps, 9);
  EXPECT_TRUE(c.allow_tf32);
  EXPECT_TRUE(c.gemm_autotune);
  EXPECT_FALSE(c.chunked_loss);
  EXPECT_EQ(c.early_stopping.patience, 2);
  EXPECT_EQ(c.early_stopping.min_delta, 0.01);
  EXPECT_EQ(c.eval_max_batches, 6);
  ASSERT_TRUE(c.eval_generate.has_value());
  EXPECT_EQ(c.eval_generate->prompts, (std::vector<std::string>{"hi", "a: b"}));
  EXPECT_EQ(c.eval_generate->max_new_tokens, 5);
  EXPECT_EQ(c.eval_generate->temperature, 0.7);
}

TEST_F(RecipeTest, LoraSectionTurnsLoraOn) {
  std::string y = std::string(kMinimal) + "lora:\n";
  SftConfig c = load(y).to_sft_config();
  EXPECT_TRUE(c.lora.enabled);
  EXPECT_EQ(c.lora.target_modules, LoraSection{}.target_modules);
  c = load(std::string(kMinimal) + "lora: {target_modules: all-linear}\n").to_sft_config();
  EXPECT_EQ(c.lora.target_modules, std::vector<std::string>{"all-linear"});
  EXPECT_FALSE(load(y, {"~lora"}).to_sft_config().lora.enabled);
  ParallelSection p = load(std::string(kMinimal) + "parallel: {tp: 2}\n").parallel();
  EXPECT_EQ(p.dp, 0);  // derived from the job's size
  EXPECT_EQ(p.tp, 2);
  EXPECT_EQ(p.zero, 0);
  EXPECT_EQ(p.bucket_mb, 25.0);
  SftConfig pc =
      load(std::string(kMinimal) + "parallel: {zero: 1, bucket_mb: 0.5}\n").to_sft_config();
  EXPECT_EQ(pc.parallel.zero, 1);
  EXPECT_EQ(pc.parallel.bucket_mb, 0.5);
  EXPECT_THROW(load(std::string(kMinimal) + "parallel: {zero: 2}\n"), RecipeError);
  EXPECT_THROW(load(std::string(kMinimal) + "parallel: {bucket_mb: 0}\n"), RecipeError);
  EXPECT_THROW(load(std::string(kMinimal) + "parallel: {zeros: 1}\n"), RecipeError);
  EXPECT_EQ(p.backend, "auto");
  EXPECT_EQ(load(std::string(kMinimal) + "parallel: {backend: nccl}\n").parallel().backend, "nccl");
  EXPECT_EQ(load(std::string(kMinimal) + "parallel: {backend: mpi}\n").parallel().backend, "mpi");
  EXPECT_THROW(load(std::string(kMinimal) + "parallel: {backend: gloo}\n"), RecipeError);
}

TEST_F(RecipeTest, InterpolationKeepsTypesAndSubstitutesText) {
  Recipe r = load(R"(
vars:
  steps: 40
  root: .
  name: run
  mods: [q_proj, k_proj]
  tok: {max_seq_len: 128}
model: {path: "${vars.root}/model"}
tokenizer: ${vars.tok}
dataset: {path: train.jsonl, val_path: eval.jsonl}
max_steps: ${vars.steps}
eval_every_n_steps: ${save_every_n_steps}
save_every_n_steps: ${vars.half}
output_dir: out/${vars.name}-${max_steps}
lora: {target_modules: "${vars.mods}"}
)",
                  {"vars.half=20"});
  const SftConfig c = r.to_sft_config();
  EXPECT_EQ(c.model.path, "./model");
  EXPECT_EQ(c.tokenizer.max_seq_len, 128);
  EXPECT_EQ(c.max_steps, 40);
  EXPECT_EQ(c.save_every_n_steps, 20);
  EXPECT_EQ(c.eval_every_n_steps, 20);  // a chain: eval -> save -> vars.half
  EXPECT_EQ(c.output_dir, "out/run-40");
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "k_proj"}));
  // text built from pieces is a string, even when it reads like a number
  auto d = check(std::string(kMinimal) + "vars: {a: 1, b: 2}\nbatch_size: ${vars.a}${vars.b}\n");
  ASSERT_EQ(d.size(), 1u) << all(d);
  EXPECT_EQ(d[0].line, 6);
  EXPECT_NE(d[0].message.find("got the string \"12\""), std::string::npos) << d[0].message;
  // \${ is a literal
  EXPECT_EQ(load(std::string(kMinimal) + "output_dir: a\\${b}\n").to_sft_config().output_dir,
            "a${b}");
}

TEST_F(RecipeTest, InterpolationErrorsHaveLineAndColumn) {
  auto d = check(std::string(kMinimal) + "output_dir: x/${vars.nme}\nvars: {name: a}\n");
  ASSERT_EQ(d.size(), 1u) << all(d);
  EXPECT_EQ(d[0].line, 5);
  EXPECT_EQ(d[0].column, 13);
  EXPECT_NE(d[0].message.find("did you mean `${vars.name}`"), std::string::npos) << d[0].message;
  // a self-reference, a reference to an enclosing section, an unterminated ${, a section
  // inside a string
  for (const std::string& bad :
       {"output_dir: ${output_dir}\n", "vars: {a: {b: ${vars.a}}}\n", "output_dir: ${vars\n",
        "vars: {m: {a: 1}}\noutput_dir: x${vars.m}\n"}) {
    d = check(std::string(kMinimal) + bad);
    ASSERT_EQ(d.size(), 1u) << bad << all(d);
    EXPECT_GE(d[0].line, 5) << bad;
    EXPECT_GT(d[0].column, 1) << bad;
  }
  // a value depending on a failed one is not reported again
  d = check(std::string(kMinimal) + "vars: {a: '${vars.zz}'}\noutput_dir: ${vars.a}\n");
  EXPECT_EQ(d.size(), 1u) << all(d);
}

TEST_F(RecipeTest, OverridesSetCreateAndDelete) {
  const std::string y =
      std::string(kMinimal) + "optimizer:\n  lr: 1e-4\n  weight_decay: 0.1\nlora: {r: 4}\n";
  const SftConfig c =
      load(y, {"optimizer.lr=3e-4", "optimizer.betas=[0.5, 0.6]", "eval.generate.prompts=[hello]",
               "batch_size=2", "~lora", "~optimizer.weight_decay", "dataset.val_path=eval.jsonl"})
          .to_sft_config();
  EXPECT_EQ(c.optimizer.lr, 3e-4);
  EXPECT_EQ(c.optimizer.beta1, 0.5);
  EXPECT_EQ(c.optimizer.beta2, 0.6);
  EXPECT_EQ(c.optimizer.weight_decay, 0.0);  // deleted: back to the default
  ASSERT_TRUE(c.eval_generate.has_value());
  EXPECT_EQ(c.eval_generate->prompts, std::vector<std::string>{"hello"});
  EXPECT_EQ(c.batch_size, 2);
  EXPECT_FALSE(c.lora.enabled);
  EXPECT_EQ(c.dataset.val_path, "eval.jsonl");
  // later overrides win; an override can make a list item
  EXPECT_EQ(load(y, {"batch_size=2", "batch_size=5"}).to_sft_config().batch_size, 5);
  EXPECT_EQ(load(y, {"lora.target_modules=[a, b]", "lora.target_modules.1=c"})
                .to_sft_config()
                .lora.target_modules,
            (std::vector<std::string>{"a", "c"}));
}

TEST_F(RecipeTest, OverrideDiagnosticsNameTheCommandLine) {
  const std::string y = std::string(kMinimal) + "optimizer: {lr: 1e-4}\n";
  auto d = check(y, {"batch_size=8", "optimizer.lr=abc", "optimzer.lr=1", "~nope", "seed",
                     "model.path.x=1", "epochs=[1,"});
  ASSERT_EQ(d.size(), 6u) << all(d);
  // the recipe's diagnostics come first, then the command line's in order
  EXPECT_EQ(d[0].str(), "<command line>:2:14: `optimizer.lr` must be a number, got `abc`");
  EXPECT_EQ(d[1].file, "<command line>");
  EXPECT_EQ(d[1].line, 3);
  EXPECT_NE(d[1].message.find("did you mean `optimizer`?"), std::string::npos) << d[1].message;
  EXPECT_EQ(d[2].line, 4);
  EXPECT_NE(d[2].message.find("cannot delete `nope`"), std::string::npos);
  EXPECT_EQ(d[3].line, 5);
  EXPECT_NE(d[3].message.find("key=value"), std::string::npos);
  EXPECT_EQ(d[4].line, 6);
  EXPECT_NE(d[4].message.find("not a section"), std::string::npos);
  EXPECT_EQ(d[5].line, 7);
  EXPECT_NE(d[5].message.find("bad YAML value"), std::string::npos);
}

TEST_F(RecipeTest, ResolvedYamlRoundTrips) {
  const std::string y = R"(# comment
vars: {root: ., n: 3, quoted: "007", empty: "", odd: "a: b # c", tricky: "\\${x", list: [a, "b,c"]}
model:
  path: ${vars.root}/model
dataset:
  path: train.jsonl
  val_path: eval.jsonl
lora:
optimizer: {lr: 2e-4, betas: [0.9, 0.99]}
max_steps: ${vars.n}
eval:
  generate:
    prompts:
      - "What is 2+2?"
      - plain: no
      - - nested
output_dir: "out/${vars.quoted}"
)";
  // (prompts with a map or a list in them are bad; they are here for the printer)
  write(root_ / "r.yaml", y);
  auto first = Recipe::check((root_ / "r.yaml").string());
  ASSERT_EQ(first.size(), 2u) << all(first);
  const std::string good =
      std::regex_replace(y, std::regex("      - plain: no\n      - - nested\n"), "");
  const Recipe r = load(good);
  const std::string text = r.resolved_yaml();
  EXPECT_EQ(text.find("${vars"), std::string::npos) << text;
  write(root_ / "resolved.yaml", text);
  const Recipe again = Recipe::load((root_ / "resolved.yaml").string());
  EXPECT_EQ(again.resolved_yaml(), text);
  const SftConfig a = r.to_sft_config(), b = again.to_sft_config();
  EXPECT_EQ(a.model.path, "./model");
  EXPECT_EQ(b.model.path, a.model.path);
  EXPECT_EQ(b.output_dir, "out/007");
  EXPECT_EQ(b.max_steps, 3);
  EXPECT_EQ(b.optimizer.beta2, 0.99);
  EXPECT_TRUE(b.lora.enabled);
  EXPECT_EQ(b.eval_generate->prompts, std::vector<std::string>{"What is 2+2?"});
  // the printer on odd values, through a recipe that keeps them in vars
  const Recipe odd = load(y.substr(0, y.find("model:")) +
                          "model: {path: model}\n"
                          "dataset: {path: train.jsonl}\n");
  EXPECT_EQ(odd.resolved_yaml(), Recipe::parse(odd.resolved_yaml(), "x").resolved_yaml());
}

TEST_F(RecipeTest, ErrorListsEveryProblem) {
  try {
    load("model: {path: nope}\ndataset: {path: train.jsonl}\nbatch_size: x\nlr: 1\n");
    FAIL() << "no error";
  } catch (const RecipeError& e) {
    ASSERT_EQ(e.diagnostics.size(), 3u) << e.what();
    const std::string w = e.what();
    for (const auto& d : e.diagnostics) EXPECT_NE(w.find(d.str()), std::string::npos) << w;
    EXPECT_NE(w.find("r.yaml:1:15: model.path: no such folder `nope`"), std::string::npos) << w;
  }
  // interpolation and schema problems together
  try {
    load(std::string(kMinimal) + "output_dir: ${nope}\nbatch_size: 0\n");
    FAIL() << "no error";
  } catch (const RecipeError& e) {
    EXPECT_EQ(e.diagnostics.size(), 2u) << e.what();
  }
  // a missing recipe file, an empty one, one that is not a mapping
  EXPECT_THROW(Recipe::load((root_ / "absent.yaml").string()), RecipeError);
  auto d = Recipe::check((root_ / "absent.yaml").string());
  ASSERT_EQ(d.size(), 1u);
  EXPECT_NE(d[0].message.find("no such recipe file"), std::string::npos);
  EXPECT_EQ(check("").size(), 1u);
  EXPECT_EQ(check("# only a comment\n").size(), 1u);
  EXPECT_EQ(check("- a\n- b\n").size(), 1u);
}

// Each file of broken_recipes/ starts with lines `# expect: LINE:COL message-substring`; the
// recipe must get exactly those diagnostics.
TEST_F(RecipeTest, BrokenRecipeCorpus) {
  const fs::path dir = fs::path(FTUNE_SOURCE_DIR) / "tests/launch/broken_recipes";
  const std::regex expect_re(R"(^# expect: (\d+):(\d+) (.+)$)");
  std::set<std::string> first_messages;
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".yaml") continue;
    ++files;
    const std::string name = e.path().filename().string();
    std::istringstream in(slurp(e.path()));
    std::vector<std::tuple<int, int, std::string>> expected;
    std::smatch m;
    for (std::string line; std::getline(in, line) && std::regex_match(line, m, expect_re);)
      expected.emplace_back(std::stoi(m[1]), std::stoi(m[2]), m[3]);
    ASSERT_FALSE(expected.empty()) << name << " has no # expect: line";
    const auto diags = Recipe::check(e.path().string());
    EXPECT_EQ(diags.size(), expected.size()) << name << ":\n" << all(diags);
    for (const auto& [line, col, text] : expected) {
      bool found = false;
      for (const auto& d : diags)
        found |= d.file == e.path().string() && d.line == line && d.column == col &&
                 d.message.find(text) != std::string::npos;
      EXPECT_TRUE(found) << name << ": expected " << line << ":" << col << " " << text << "\ngot:\n"
                         << all(diags);
    }
    first_messages.insert(std::get<2>(expected[0]));
  }
  EXPECT_GE(files, 15);
  EXPECT_EQ(first_messages.size(), size_t(files));  // each file shows a different mistake
}

// The built-in recipes are valid once the files they name exist (here: the stand-ins).
TEST_F(RecipeTest, BuiltInRecipesValidate) {
  const fs::path dir = fs::path(FTUNE_SOURCE_DIR) / "recipes";
  // each recipe with its paths pointed at the stand-ins
  const std::vector<std::pair<std::string, std::vector<std::string>>> cases = {
      {"quickstart_lora",
       {"model.path=model", "dataset.path=train.jsonl", "dataset.val_path=eval.jsonl"}},
      {"pretrain_tiny", {"model.path=config_only", "dataset.path=train.jsonl"}},
      {"sft_full", {"vars.model_dir=model", "dataset.path=train.jsonl"}},
      {"lora_sft",
       {"vars.model_dir=model", "dataset.path=train.jsonl", "dataset.val_path=eval.jsonl"}},
  };
  int n = 0;
  for (const auto& [name, ov] : cases) {
    const std::string path = (dir / (name + ".yaml")).string();
    ASSERT_TRUE(fs::exists(path)) << path;
    auto d = Recipe::check(path, ov);
    EXPECT_TRUE(d.empty()) << name << ":\n" << all(d);
    // and without the overrides, only missing files are reported
    for (const auto& x : Recipe::check(path))
      EXPECT_NE(x.message.find("no such"), std::string::npos) << x.str();
    ++n;
  }
  EXPECT_EQ(n, 4);
  const SftConfig q =
      Recipe::load((dir / "quickstart_lora.yaml").string(),
                   {"model.path=model", "dataset.path=train.jsonl", "dataset.val_path=eval.jsonl"})
          .to_sft_config();
  EXPECT_TRUE(q.lora.enabled);
  EXPECT_EQ(q.lora.r, 8);
  EXPECT_EQ(q.lora.alpha, 16.0);
  EXPECT_EQ(q.tokenizer.max_seq_len, 256);
  EXPECT_TRUE(q.dataset.packed);
  EXPECT_EQ(q.lr_scheduler.name, "cosine");
  ASSERT_TRUE(q.eval_generate.has_value());
  EXPECT_FALSE(q.eval_generate->prompts.empty());
  const SftConfig p = Recipe::load((dir / "pretrain_tiny.yaml").string(),
                                   {"model.path=config_only", "dataset.path=train.jsonl"})
                          .to_sft_config();
  EXPECT_EQ(p.model.init, "random");
  EXPECT_FALSE(p.lora.enabled);
  EXPECT_EQ(p.optimizer.weight_decay, 0.1);
}

TEST(EditDistance, Basics) {
  EXPECT_EQ(edit_distance("", ""), 0u);
  EXPECT_EQ(edit_distance("abc", ""), 3u);
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(edit_distance("batchsize", "batch_size"), 1u);
}

// ------------------------------------------------------------------ the executable

struct CliRun {
  int rc = -1;
  std::string out, err;
};

CliRun ftune(const std::vector<std::string>& args, const std::string& env = "") {
  const fs::path tmp =
      fs::temp_directory_path() / ("ftune_recipe_cli_" + std::to_string(::getpid()));
  fs::create_directories(tmp);
  std::string cmd = env + " " + quote(FTUNE_BINARY);
  for (const auto& a : args) cmd += " " + quote(a);
  cmd += " >" + quote((tmp / "out").string()) + " 2>" + quote((tmp / "err").string());
  const int status = std::system(cmd.c_str());
  CliRun r;
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = slurp(tmp / "out");
  r.err = slurp(tmp / "err");
  fs::remove_all(tmp);
  return r;
}

TEST_F(RecipeTest, ValidateCommandExitCodes) {
  write(root_ / "good.yaml", kMinimal);
  const std::string good = (root_ / "good.yaml").string();
  CliRun ok = ftune({"validate", good});
  EXPECT_EQ(ok.rc, 0) << ok.out << ok.err;
  EXPECT_EQ(ok.out, good + ": ok\n");
  CliRun bad = ftune({"validate", good, "batch_size=0", "lerning_rate=1"});
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.out.find("<command line>:1:12: `batch_size` must be > 0"), std::string::npos)
      << bad.out;
  EXPECT_NE(bad.out.find("did you mean `optimizer.lr`?"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("2 problems"), std::string::npos) << bad.out;
  const std::string broken =
      (fs::path(FTUNE_SOURCE_DIR) / "tests/launch/broken_recipes/several_mistakes.yaml").string();
  CliRun many = ftune({"validate", broken});
  EXPECT_EQ(many.rc, 1);
  EXPECT_NE(many.out.find(broken + ":12:13: "), std::string::npos) << many.out;
  CliRun missing = ftune({"validate", (root_ / "absent.yaml").string()});
  EXPECT_EQ(missing.rc, 1);
  EXPECT_NE(missing.out.find("no such recipe file"), std::string::npos) << missing.out;
  EXPECT_EQ(ftune({"validate"}).rc, 2);  // usage
}

TEST_F(RecipeTest, LsAndCp) {
  CliRun ls = ftune({"ls"});
  ASSERT_EQ(ls.rc, 0) << ls.err;
  for (const char* n : {"quickstart_lora ", "pretrain_tiny ", "sft_full ", "lora_sft "})
    EXPECT_NE(ls.out.find(n), std::string::npos) << ls.out;
  EXPECT_NE(ls.out.find("Quickstart: LoRA SFT"), std::string::npos) << ls.out;

  const fs::path dest = root_ / "copies";
  fs::create_directories(dest);
  CliRun cp = ftune({"cp", "lora_sft", dest.string()});
  EXPECT_EQ(cp.rc, 0) << cp.err;
  EXPECT_EQ(slurp(dest / "lora_sft.yaml"),
            slurp(fs::path(FTUNE_SOURCE_DIR) / "recipes/lora_sft.yaml"));
  CliRun again = ftune({"cp", "lora_sft.yaml", dest.string()});
  EXPECT_EQ(again.rc, 1);
  EXPECT_NE(again.err.find("already exists"), std::string::npos) << again.err;
  EXPECT_EQ(ftune({"cp", "sft_full.yaml", (dest / "mine.yaml").string()}).rc, 0);
  EXPECT_TRUE(fs::exists(dest / "mine.yaml"));
  CliRun unknown = ftune({"cp", "nope", dest.string()});
  EXPECT_EQ(unknown.rc, 1);
  EXPECT_NE(unknown.err.find("quickstart_lora"), std::string::npos) << unknown.err;

  // FTUNE_RECIPES_DIR replaces the built-in folder
  write(root_ / "mine/a.yaml", "# My own recipe\nmodel: {path: x}\n");
  CliRun own = ftune({"ls"}, "FTUNE_RECIPES_DIR=" + quote((root_ / "mine").string()));
  EXPECT_EQ(own.rc, 0);
  EXPECT_EQ(own.out, "a  My own recipe\n");
}

// attention.backend: ftune (default) | cudnn; cudnn needs device: cuda (cuDNN is GPU-only), and an
// unknown backend is named in the error.
TEST_F(RecipeTest, AttentionBackendKey) {
  EXPECT_EQ(load(kMinimal).to_sft_config().attention.backend, "ftune");
  const std::string cuda = std::string(kMinimal) + "device: cuda\n";
  EXPECT_EQ(load(cuda + "attention: {backend: cudnn}\n").to_sft_config().attention.backend,
            "cudnn");
  EXPECT_EQ(load(cuda + "attention: {backend: ftune}\n").to_sft_config().attention.backend,
            "ftune");
  std::string e = all(check(std::string(kMinimal) + "attention: {backend: cudnn}\n"));
  EXPECT_NE(e.find("attention.backend: cudnn needs device: cuda"), std::string::npos) << e;
  e = all(check(cuda + "attention: {backend: flash}\n"));
  EXPECT_NE(e.find("flash"), std::string::npos) << e;
  EXPECT_THROW(load(cuda + "attention: {backend: flash}\n"), RecipeError);
  EXPECT_THROW(load(cuda + "attention: {backnd: cudnn}\n"), RecipeError);
}

}  // namespace
}  // namespace ftune
