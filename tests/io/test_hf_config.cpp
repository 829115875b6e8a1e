#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "io/file_util.h"
#include "io/hf_config.h"
#include "io_test_util.h"

using namespace ftune;
using namespace ftune::test;
using json = nlohmann::json;

namespace {

std::string fixture(const std::string& name) {
  return std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/configs/" + name;
}
json fixture_json(const std::string& name) {
  return json::parse(read_text_file(fixture(name), "test"));
}

ModelConfig parse(const json& j, const HfConfigOptions& opt = {}) {
  return parse_hf_config(j, "cfg.json", opt);
}

void expect_same(const ModelConfig& a, const ModelConfig& b) {
  EXPECT_EQ(a.family, b.family);
  EXPECT_EQ(a.architecture, b.architecture);
  EXPECT_EQ(a.model_type, b.model_type);
  EXPECT_EQ(a.vocab_size, b.vocab_size);
  EXPECT_EQ(a.hidden_size, b.hidden_size);
  EXPECT_EQ(a.intermediate_size, b.intermediate_size);
  EXPECT_EQ(a.num_hidden_layers, b.num_hidden_layers);
  EXPECT_EQ(a.num_attention_heads, b.num_attention_heads);
  EXPECT_EQ(a.num_key_value_heads, b.num_key_value_heads);
  EXPECT_EQ(a.head_dim, b.head_dim);
  EXPECT_EQ(a.max_position_embeddings, b.max_position_embeddings);
  EXPECT_EQ(a.norm_eps, b.norm_eps);
  EXPECT_EQ(a.hidden_act, b.hidden_act);
  EXPECT_EQ(a.rope_theta, b.rope_theta);
  EXPECT_EQ(a.tie_word_embeddings, b.tie_word_embeddings);
  EXPECT_EQ(a.attention_bias, b.attention_bias);
  EXPECT_EQ(a.attention_out_bias, b.attention_out_bias);
  EXPECT_EQ(a.mlp_bias, b.mlp_bias);
  EXPECT_EQ(a.sliding_window, b.sliding_window);
  EXPECT_EQ(a.max_window_layers, b.max_window_layers);
  EXPECT_EQ(a.bos_token_id, b.bos_token_id);
  EXPECT_EQ(a.pad_token_id, b.pad_token_id);
  EXPECT_EQ(a.eos_token_ids, b.eos_token_ids);
  EXPECT_EQ(a.eos_token_is_list, b.eos_token_is_list);
  EXPECT_EQ(a.torch_dtype, b.torch_dtype);
  EXPECT_EQ(a.extra, b.extra);
}

// to_json -> parse gives the same config; so does save -> load.
void expect_round_trip(const ModelConfig& c, const HfConfigOptions& opt = {}) {
  expect_same(parse(c.to_json(), opt), c);
  TempDir dir;
  save_hf_config(c, dir.file("config.json"));
  expect_same(load_hf_config(dir.file("config.json"), opt), c);
  EXPECT_FALSE(std::filesystem::exists(dir.file("config.json.tmp")));
}

}  // namespace

TEST(HfConfig, Gpt2) {
  ModelConfig c = load_hf_config(fixture("gpt2.json"));
  EXPECT_EQ(c.family, ModelFamily::gpt2);
  EXPECT_EQ(c.architecture, "GPT2LMHeadModel");
  EXPECT_EQ(c.vocab_size, 50257);
  EXPECT_EQ(c.hidden_size, 768);
  EXPECT_EQ(c.num_hidden_layers, 12);
  EXPECT_EQ(c.num_attention_heads, 12);
  EXPECT_EQ(c.num_key_value_heads, 12);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 3072);  // n_inner absent -> 4 * n_embd
  EXPECT_EQ(c.max_position_embeddings, 1024);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_EQ(c.hidden_act, "gelu_new");
  EXPECT_TRUE(c.tie_word_embeddings);  // absent: GPT-2 ties
  EXPECT_TRUE(c.attention_bias && c.attention_out_bias && c.mlp_bias);
  EXPECT_TRUE(c.uses_layer_norm());
  EXPECT_TRUE(c.has_learned_positions());
  EXPECT_EQ(c.bos_token_id, 50256);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{50256});
  EXPECT_FALSE(c.eos_token_is_list);
  EXPECT_EQ(c.torch_dtype, "");
  EXPECT_EQ(c.extra["n_ctx"], 1024);
  EXPECT_EQ(c.extra["task_specific_params"]["text-generation"]["max_length"], 50);
  EXPECT_FALSE(c.extra.contains("n_embd"));
  EXPECT_TRUE(c.to_json()["n_inner"].is_null());
  expect_round_trip(c);
  c.intermediate_size = 1000;
  EXPECT_EQ(c.to_json()["n_inner"], 1000);
  expect_round_trip(c);
}

TEST(HfConfig, TinyLlama) {
  ModelConfig c = load_hf_config(fixture("tinyllama-1.1b-chat.json"));
  EXPECT_EQ(c.family, ModelFamily::llama);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.intermediate_size, 5632);
  EXPECT_EQ(c.num_hidden_layers, 22);
  EXPECT_EQ(c.num_attention_heads, 32);
  EXPECT_EQ(c.num_key_value_heads, 4);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.hidden_act, "silu");
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.attention_bias || c.attention_out_bias || c.mlp_bias);
  EXPECT_FALSE(c.uses_layer_norm());
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{2});
  EXPECT_EQ(c.pad_token_id, std::nullopt);
  EXPECT_EQ(c.torch_dtype, "bfloat16");
  EXPECT_EQ(c.extra["pretraining_tp"], 1);
  EXPECT_EQ(c.max_seq_len(), 2048);
  expect_round_trip(c);
}

TEST(HfConfig, Llama32RopeScalingRefused) {
  // Llama 3.x uses rope_type "llama3" frequency scaling, which ftune does not implement yet.
  expect_error([] { load_hf_config(fixture("llama-3.2-1b.json")); },
               {fixture("llama-3.2-1b.json"), "\"rope_scaling\" type 'llama3' is not supported"});
  json j = fixture_json("llama-3.2-1b.json");
  j.erase("rope_scaling");
  ModelConfig c = parse(j);
  EXPECT_EQ(c.vocab_size, 128256);
  EXPECT_EQ(c.num_hidden_layers, 16);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 8192);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.extra["attention_dropout"], 0.0);
  expect_round_trip(c);
}

TEST(HfConfig, Qwen2) {
  ModelConfig c = load_hf_config(fixture("qwen2-0.5b.json"));
  EXPECT_EQ(c.family, ModelFamily::qwen2);
  EXPECT_EQ(c.hidden_size, 896);
  EXPECT_EQ(c.num_attention_heads, 14);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.intermediate_size, 4864);
  EXPECT_EQ(c.vocab_size, 151936);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1000000.0);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-6);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_TRUE(c.attention_bias);  // q/k/v biases always
  EXPECT_FALSE(c.attention_out_bias);
  EXPECT_FALSE(c.mlp_bias);
  EXPECT_EQ(c.sliding_window, std::nullopt);  // use_sliding_window false
  EXPECT_EQ(c.max_window_layers, 24);
  EXPECT_EQ(c.max_seq_len(), 131072);
  EXPECT_EQ(c.bos_token_id, 151643);
  EXPECT_EQ(c.eos_token_ids, std::vector<int64_t>{151643});
  expect_round_trip(c);
}

TEST(HfConfig, MistralSlidingWindowRule) {
  // Mistral-7B-v0.1: a 4096 window with 32768 positions. Full attention equals the window only
  // for sequences of at most 4096 tokens, so the config is refused unless max_seq_len says so.
  std::string path = fixture("mistral-7b-v0.1.json");
  expect_error([&] { load_hf_config(path); },
               {path, "sliding_window 4096 < max_position_embeddings 32768",
                "sliding-window attention is not supported", "max_seq_len <= 4096"});
  expect_error([&] { load_hf_config(path, {.max_seq_len = 4097}); },
               {"sliding_window 4096 < max_seq_len 4097"});
  ModelConfig c = load_hf_config(path, {.max_seq_len = 4096});
  EXPECT_EQ(c.family, ModelFamily::mistral);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.max_seq_len(), 4096);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.intermediate_size, 14336);
  EXPECT_FALSE(c.attention_bias || c.attention_out_bias || c.mlp_bias);
  EXPECT_EQ(c.to_json()["sliding_window"], 4096);
  expect_round_trip(c, {.max_seq_len = 4096});

  json j = fixture_json("mistral-7b-v0.1.json");
  j["sliding_window"] = nullptr;  // v0.2 and later
  ModelConfig n = parse(j);
  EXPECT_EQ(n.sliding_window, std::nullopt);
  EXPECT_TRUE(n.to_json()["sliding_window"].is_null());  // absent would mean 4096
  expect_round_trip(n);
  j["sliding_window"] = 32768;  // a window as long as the context masks nothing
  EXPECT_EQ(parse(j).max_seq_len(), 32768);
  j.erase("sliding_window");  // absent: MistralConfig's default 4096
  expect_error([&] { parse(j); }, {"sliding_window 4096"});
}

TEST(HfConfig, Qwen2SlidingWindowRule) {
  json j = fixture_json("qwen2-0.5b.json");
  j["use_sliding_window"] = true;
  j["sliding_window"] = 4096;
  j["max_window_layers"] = 21;  // layers 21..23 would use the window
  expect_error([&] { parse(j); }, {"cfg.json", "sliding_window 4096 < max_position_embeddings"});
  EXPECT_EQ(parse(j, {.max_seq_len = 4096}).sliding_window, 4096);
  j["max_window_layers"] = 24;  // no layer uses it: full attention everywhere
  EXPECT_EQ(parse(j).sliding_window, std::nullopt);
  j["layer_types"] = json::array();
  for (int i = 0; i < 24; ++i)
    j["layer_types"].push_back(i < 20 ? "full_attention" : "sliding_attention");
  expect_error([&] { parse(j); }, {"sliding-window attention is not supported"});
  j["sliding_window"] =
      131072;  // as long as the context: accepted, and round trips with layer_types
  ModelConfig w = parse(j);
  EXPECT_EQ(w.sliding_window, 131072);
  expect_round_trip(w);
  j["use_sliding_window"] = false;  // transformers drops the window then, whatever layer_types say
  EXPECT_EQ(parse(j).sliding_window, std::nullopt);
  expect_round_trip(parse(j));
}

TEST(HfConfig, FamilyDefaults) {
  ModelConfig m =
      parse({{"architectures", json::array({"MistralForCausalLM"})}, {"sliding_window", nullptr}});
  EXPECT_EQ(m.num_key_value_heads, 8);  // MistralConfig default, not = heads
  EXPECT_EQ(m.vocab_size, 32000);
  EXPECT_EQ(m.intermediate_size, 14336);
  EXPECT_EQ(m.max_position_embeddings, 131072);
  EXPECT_EQ(m.bos_token_id, 1);
  EXPECT_EQ(m.eos_token_ids, std::vector<int64_t>{2});
  ModelConfig l = parse({{"architectures", json::array({"LlamaForCausalLM"})}});
  EXPECT_EQ(l.num_key_value_heads, 32);  // None -> heads
  EXPECT_EQ(l.intermediate_size, 11008);
  EXPECT_EQ(l.max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(l.norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(l.rope_theta, 10000.0);
  EXPECT_EQ(l.head_dim, 128);
  ModelConfig q = parse({{"model_type", "qwen2"}, {"num_attention_heads", 64}});
  EXPECT_EQ(q.architecture, "Qwen2ForCausalLM");  // from model_type when architectures is absent
  EXPECT_EQ(q.num_key_value_heads, 32);           // Qwen2Config default 32 ...
  EXPECT_EQ(q.vocab_size, 151936);
  EXPECT_EQ(q.max_position_embeddings, 32768);
  EXPECT_EQ(q.bos_token_id, std::nullopt);
  EXPECT_TRUE(q.eos_token_ids.empty());
  ModelConfig k = parse({{"model_type", "qwen2"}, {"num_key_value_heads", nullptr}});
  EXPECT_EQ(k.num_key_value_heads, 32);  // ... and null -> heads
  ModelConfig g = parse({{"model_type", "gpt2"}});
  EXPECT_EQ(g.hidden_size, 768);
  EXPECT_EQ(g.vocab_size, 50257);
  EXPECT_TRUE(g.tie_word_embeddings);
}

TEST(HfConfig, TokenIdsAndDtype) {
  json j = fixture_json("tinyllama-1.1b-chat.json");
  j["eos_token_id"] = {128001, 128008, 128009};
  j["pad_token_id"] = 0;
  j.erase("torch_dtype");
  j["dtype"] = "float32";  // transformers 5 spelling
  ModelConfig c = parse(j);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
  EXPECT_TRUE(c.eos_token_is_list);
  EXPECT_EQ(c.pad_token_id, 0);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.to_json()["eos_token_id"], json({128001, 128008, 128009}));
  expect_round_trip(c);
  j["eos_token_id"] = nullptr;
  j["bos_token_id"] = nullptr;
  ModelConfig n = parse(j);
  EXPECT_TRUE(n.eos_token_ids.empty());
  EXPECT_EQ(n.bos_token_id, std::nullopt);
  expect_round_trip(n);
}

TEST(HfConfig, RopeSpellings) {
  json j = fixture_json("tinyllama-1.1b-chat.json");
  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 1e6}};  // transformers 5
  EXPECT_DOUBLE_EQ(parse(j).rope_theta, 1e6);
  j["rope_parameters"] = {{"rope_type", "yarn"}, {"factor", 4.0}};
  expect_error([&] { parse(j); }, {"\"rope_parameters\" type 'yarn' is not supported"});
  j.erase("rope_parameters");
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};  // the oldest spelling
  expect_error([&] { parse(j); }, {"'linear' is not supported"});
  j["rope_scaling"] = {{"rope_type", "default"}};
  EXPECT_DOUBLE_EQ(parse(j).rope_theta, 10000.0);
  j["rope_scaling"] = {{"full_attention", {{"rope_type", "default"}}}};
  expect_error([&] { parse(j); }, {"per layer type"});
  j["rope_scaling"] = nullptr;
  j["partial_rotary_factor"] = 0.5;
  expect_error([&] { parse(j); }, {"partial_rotary_factor 0.5 is not supported"});
}

TEST(HfConfig, Errors) {
  auto with = [](json j, const std::string& key, const json& v) {
    j[key] = v;
    return j;
  };
  json llama = fixture_json("tinyllama-1.1b-chat.json");
  expect_error([&] { parse(with(llama, "architectures", json::array({"GemmaForCausalLM"}))); },
               {"[hf_config] cfg.json", "architecture 'GemmaForCausalLM' is not supported",
                "GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"});
  expect_error([&] { parse(json::object()); }, {"no \"architectures\" or \"model_type\""});
  expect_error([&] { parse({{"model_type", "gemma"}}); }, {"model_type 'gemma' is not supported"});
  expect_error([&] { parse(with(llama, "model_type", "mistral")); },
               {"model_type 'mistral' does not match architecture 'LlamaForCausalLM'"});
  expect_error([&] { parse(with(llama, "architectures", "LlamaForCausalLM")); },
               {"\"architectures\" must be a non-empty list"});
  expect_error([&] { parse(with(llama, "hidden_size", "2048")); },
               {"\"hidden_size\" must be an integer, got \"2048\""});
  expect_error([&] { parse(with(llama, "hidden_size", nullptr)); }, {"got null"});
  expect_error([&] { parse(with(llama, "num_hidden_layers", 0)); }, {"must be positive"});
  expect_error([&] { parse(with(llama, "num_key_value_heads", 5)); },
               {"num_attention_heads 32 is not a multiple of num_key_value_heads 5"});
  expect_error([&] { parse(with(llama, "hidden_size", 2050)); }, {"no head_dim is given"});
  expect_error([&] { parse(with(llama, "head_dim", 63)); },
               {"head_dim 63 must be positive and even"});
  expect_error([&] { parse(with(llama, "hidden_act", "gelu")); },
               {"hidden_act 'gelu' is not supported (supported: silu)"});
  expect_error([&] { parse(with(llama, "tie_word_embeddings", 1)); }, {"must be true or false"});
  expect_error([&] { parse(with(llama, "rms_norm_eps", "x")); }, {"must be a number"});
  expect_error([&] { parse(with(llama, "eos_token_id", {1, "2"})); }, {"\"eos_token_id\" list"});
  expect_error([&] { parse(json::array()); }, {"expected a JSON object"});
  json gpt2 = fixture_json("gpt2.json");
  expect_error([&] { parse(with(gpt2, "activation_function", "relu")); },
               {"activation_function 'relu' is not supported"});
  expect_error([&] { parse(with(gpt2, "scale_attn_by_inverse_layer_idx", true)); },
               {"scale_attn_by_inverse_layer_idx=true is not supported"});
  expect_error([&] { parse(with(gpt2, "n_head", 7)); },
               {"n_embd 768 is not a multiple of n_head 7"});

  TempDir dir;
  std::ofstream(dir.file("bad.json")) << "{\"model_type\": ";
  expect_error([&] { load_hf_config(dir.file("bad.json")); },
               {dir.file("bad.json"), "not valid JSON"});
  expect_error([&] { load_hf_config(dir.file("none.json")); },
               {"cannot read", dir.file("none.json")});
  std::ofstream(dir.file("deep.json"))
      << "{\"x\":" << std::string(100000, '[') << std::string(100000, ']') << "}";
  expect_error([&] { load_hf_config(dir.file("deep.json")); }, {"nests deeper than 128 levels"});
}

// Writes each accepted fixture as ftune parsed it (<name>.input.json) and as ftune writes it
// (<name>/config.json), for tests/fixtures/check_hf_config.py to load both with transformers.
TEST(HfConfig, WritesConfigsForTransformers) {
  TempDir tmp;
  const char* env = std::getenv("FTUNE_CONFIG_OUT");
  std::string out = env && *env ? env : tmp.path();
  struct Case {
    std::string name;
    json input;
    HfConfigOptions opt;
  };
  json llama32 = fixture_json("llama-3.2-1b.json");
  llama32.erase("rope_scaling");
  std::vector<Case> cases = {{"gpt2", fixture_json("gpt2.json"), {}},
                             {"tinyllama", fixture_json("tinyllama-1.1b-chat.json"), {}},
                             {"llama32_norope", llama32, {}},
                             {"qwen2", fixture_json("qwen2-0.5b.json"), {}},
                             {"mistral_v01", fixture_json("mistral-7b-v0.1.json"), {4096}}};
  for (const auto& c : cases) {
    ModelConfig m = parse_hf_config(c.input, c.name, c.opt);
    std::filesystem::create_directories(out + "/" + c.name);
    write_file_atomic(out + "/" + c.name + ".input.json", c.input.dump(2), "test");
    save_hf_config(m, out + "/" + c.name + "/config.json");
    expect_same(load_hf_config(out + "/" + c.name + "/config.json", c.opt), m);
  }
}
