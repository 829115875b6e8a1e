// SFT datasets: each JSONL format against independently tokenized pieces (fixture tokenizers),
// masking, truncation, bad lines, the held-out split, packing invariants and the loader's
// order, rank partition and exact save/restore.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <numeric>
#include <set>

#include "core/error.h"
#include "data/chat_template.h"
#include "data/sft_dataset.h"

using namespace ftune;
using json = nlohmann::json;
using Ids = std::vector<int32_t>;
using Mask = std::vector<uint8_t>;

namespace {

Tokenizer load_tok(const std::string& name) {
  return Tokenizer::from_folder(std::string(FTUNE_SOURCE_DIR) + "/tests/fixtures/tokenizers/" +
                                name);
}

// Writes `lines` (one per row, verbatim) to a fresh file under the test temp dir.
std::string write_jsonl(const std::string& name, const std::vector<std::string>& lines) {
  std::string path = testing::TempDir() + "ftune_sft_" + name + ".jsonl";
  std::ofstream f(path, std::ios::binary);
  for (auto& l : lines) f << l << "\n";
  return path;
}

Ids cat(std::initializer_list<Ids> parts) {
  Ids out;
  for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

Mask mask_of(std::initializer_list<std::pair<size_t, uint8_t>> runs) {
  Mask out;
  for (auto [n, v] : runs) out.insert(out.end(), n, v);
  return out;
}

bool is_prefix(const Ids& p, const Ids& full) {
  return p.size() <= full.size() && std::equal(p.begin(), p.end(), full.begin());
}

SftExample one(const std::string& name, const std::string& line, const Tokenizer& tok,
               SftDatasetOptions opt = {}) {
  SftDataStats st;
  auto ex = load_sft_jsonl(write_jsonl(name, {line}), tok, opt, &st);
  EXPECT_EQ(ex.size(), 1u);
  EXPECT_EQ(st.lines, 1);
  return ex.empty() ? SftExample{} : ex[0];
}

std::string error_of(const std::string& name, const std::vector<std::string>& lines,
                     const Tokenizer& tok, SftDatasetOptions opt = {}) {
  try {
    load_sft_jsonl(write_jsonl(name, lines), tok, opt);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

// ---------------------------------------------------------------------------------- formats

TEST(SftDataset, TextGetsBosFromThePostProcessorAndEos) {
  Tokenizer tok = load_tok("llama3");  // post-processor "<|begin_of_text|> $A"
  const std::string text = "The cat sat on the mat.";
  SftExample ex = one("text_llama3", json{{"text", text}}.dump(), tok);
  Ids body = tok.encode(text, false);
  EXPECT_EQ(ex.ids, cat({{*tok.bos_id()}, body, {*tok.eos_id()}}));
  EXPECT_EQ(ex.train_mask, mask_of({{1, 0}, {body.size() + 1, 1}}));
  EXPECT_EQ(ex.line, 1);

  Tokenizer g = load_tok("gpt2");  // no bos added; token 0 is never a target
  SftExample eg = one("text_gpt2", json{{"text", text}}.dump(), g);
  Ids gb = g.encode(text, false);
  EXPECT_EQ(eg.ids, cat({gb, {*g.eos_id()}}));
  EXPECT_EQ(eg.train_mask, mask_of({{1, 0}, {gb.size(), 1}}));

  SftDatasetOptions no_eos;
  no_eos.add_eos = false;
  EXPECT_EQ(one("text_noeos", json{{"text", text}}.dump(), g, no_eos).ids, gb);
}

TEST(SftDataset, PromptCompletionMasksThePrompt) {
  Tokenizer tok = load_tok("llama3");
  const std::string prompt = "Question: what is the capital of France?\n";
  const std::string completion = "Paris is the capital.";
  Ids p = tok.encode(prompt, false), c = tok.encode(completion, false);
  ASSERT_EQ(tok.encode(prompt + completion, false), cat({p, c}));  // the pieces tokenize apart
  std::string line = json{{"prompt", prompt}, {"completion", completion}}.dump();
  SftExample ex = one("pc", line, tok);
  EXPECT_EQ(ex.ids, cat({{*tok.bos_id()}, p, c, {*tok.eos_id()}}));
  EXPECT_EQ(ex.train_mask, mask_of({{1 + p.size(), 0}, {c.size() + 1, 1}}));

  SftDatasetOptions all;
  all.train_on_input = true;
  SftExample ea = one("pc_all", line, tok, all);
  EXPECT_EQ(ea.ids, ex.ids);
  EXPECT_EQ(ea.train_mask, mask_of({{1, 0}, {ex.ids.size() - 1, 1}}));
}

TEST(SftDataset, PromptCompletionTokenAcrossTheBoundaryIsATarget) {
  Tokenizer tok = load_tok("gpt2");
  // The prompt's trailing space merges into the completion's first token (" Paris").
  Ids head = tok.encode("Answer:", false), tail = tok.encode(" Paris", false);
  ASSERT_EQ(tok.encode("Answer: Paris", false), cat({head, tail}));
  ASSERT_NE(tok.encode("Answer: ", false), head);
  SftExample ex =
      one("pc_cross", json{{"prompt", "Answer: "}, {"completion", "Paris"}}.dump(), tok);
  EXPECT_EQ(ex.ids, cat({head, tail, {*tok.eos_id()}}));
  EXPECT_EQ(ex.train_mask, mask_of({{head.size(), 0}, {tail.size() + 1, 1}}));
}

TEST(SftDataset, AlpacaWithAndWithoutInput) {
  Tokenizer tok = load_tok("llama3");
  const std::string with_input =
      "Below is an instruction that describes a task, paired with an input that provides "
      "further context. Write a response that appropriately completes the request.\n\n"
      "### Instruction:\nTranslate to French.\n\n### Input:\nGood morning\n\n### Response:\n";
  const std::string no_input =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
  struct Case {
    json rec;
    std::string prompt, output;
  } cases[] = {
      {{{"instruction", "Translate to French."}, {"input", "Good morning"}, {"output", "Bonjour"}},
       with_input, "Bonjour"},
      {{{"instruction", "Say hi."}, {"input", ""}, {"output", "Hi there!"}}, no_input, "Hi there!"},
      {{{"instruction", "Say hi."}, {"input", nullptr}, {"output", "Hi"}}, no_input, "Hi"},
      {{{"instruction", "Say hi."}, {"output", "Hello"}}, no_input, "Hello"},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.rec.dump());
    Ids p = tok.encode(c.prompt, false), o = tok.encode(c.output, false);
    ASSERT_EQ(tok.encode(c.prompt + c.output, false), cat({p, o}));
    SftExample ex = one("alpaca", c.rec.dump(), tok);
    EXPECT_EQ(ex.ids, cat({{*tok.bos_id()}, p, o, {*tok.eos_id()}}));
    EXPECT_EQ(ex.train_mask, mask_of({{1 + p.size(), 0}, {o.size() + 1, 1}}));
  }
}

TEST(SftDataset, MessagesChatmlOnlyAssistantTurnsAreTargets) {
  Tokenizer tok = load_tok("qwen2");  // chatml with Qwen's default system prompt, no bos
  json msgs = json::array({{{"role", "user"}, {"content", "Hi"}},
                           {{"role", "assistant"}, {"content", "Hello there"}},
                           {{"role", "user"}, {"content", "And you?"}},
                           {{"role", "assistant"}, {"content", "Fine."}}});
  // The rendering written out by hand, in the pieces that are and are not trained on.
  const std::string p0 =
      "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi"
      "<|im_end|>\n<|im_start|>assistant\n";
  const std::string a0 = "Hello there<|im_end|>";
  const std::string p1 = "\n<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\n";
  const std::string a1 = "Fine.<|im_end|>";
  const std::string p2 = "\n";
  Ids t[5] = {tok.encode(p0, false), tok.encode(a0, false), tok.encode(p1, false),
              tok.encode(a1, false), tok.encode(p2, false)};
  SftExample ex = one("msg_chatml", json{{"messages", msgs}}.dump(), tok);
  EXPECT_EQ(ex.ids, cat({t[0], t[1], t[2], t[3], t[4]}));
  EXPECT_EQ(ex.train_mask, mask_of({{t[0].size(), 0},
                                    {t[1].size(), 1},
                                    {t[2].size(), 0},
                                    {t[3].size(), 1},
                                    {t[4].size(), 0}}));
  SftDatasetOptions all;
  all.train_on_input = true;
  SftExample ea = one("msg_chatml_all", json{{"messages", msgs}}.dump(), tok, all);
  EXPECT_EQ(ea.ids, ex.ids);
  EXPECT_EQ(ea.train_mask, mask_of({{1, 0}, {ex.ids.size() - 1, 1}}));
  // A named template overrides the tokenizer's: plain chatml has no default system turn.
  SftDatasetOptions named;
  named.chat_template = "chatml";
  SftExample en = one("msg_chatml_named", json{{"messages", msgs}}.dump(), tok, named);
  EXPECT_EQ(en.ids, tok.encode(ChatTemplate::by_name("chatml")
                                   .render({{"user", "Hi"},
                                            {"assistant", "Hello there"},
                                            {"user", "And you?"},
                                            {"assistant", "Fine."}})
                                   .text,
                               false));
}

TEST(SftDataset, MessagesLlama3BosOnceFromTheTemplate) {
  Tokenizer tok = load_tok("llama3");
  json msgs = json::array({{{"role", "system"}, {"content", "Be brief."}},
                           {{"role", "user"}, {"content", "Name a color."}},
                           {{"role", "assistant"}, {"content", " Blue. "}}});
  const std::string pre =
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
      "<|start_header_id|>user<|end_header_id|>\n\nName a color.<|eot_id|>"
      "<|start_header_id|>assistant<|end_header_id|>\n\n";
  const std::string target = "Blue.<|eot_id|>";  // llama3 trims the content
  Ids a = tok.encode(pre, false), b = tok.encode(target, false);
  SftExample ex = one("msg_llama3", json{{"messages", msgs}}.dump(), tok);
  EXPECT_EQ(ex.ids, cat({a, b}));
  EXPECT_EQ(std::count(ex.ids.begin(), ex.ids.end(), *tok.bos_id()), 1);
  EXPECT_EQ(ex.ids[0], *tok.bos_id());
  EXPECT_EQ(ex.train_mask, mask_of({{a.size(), 0}, {b.size(), 1}}));
  EXPECT_EQ(ex.ids.back(), *tok.token_to_id("<|eot_id|>"));  // no extra eos for messages
}

// SentencePiece tokenizers (Llama 2, Mistral, Zephyr): the text is tokenized whole, so the
// pieces cannot be tokenized apart; the targets must decode to exactly the assistant turns.
TEST(SftDataset, MessagesSentencePieceTargetsDecodeToTheAssistantTurns) {
  struct Case {
    const char* tok;
    const char* eos;
  } cases[] = {{"sp_legacy", "</s>"}, {"sp_metaspace", "</s>"}, {"sp_metaspace_split", "</s>"}};
  json msgs = json::array({{{"role", "user"}, {"content", "hello friend"}},
                           {{"role", "assistant"}, {"content", "good day to you"}},
                           {{"role", "user"}, {"content", "and more"}},
                           {{"role", "assistant"}, {"content", "that is all"}}});
  for (auto& c : cases) {
    SCOPED_TRACE(c.tok);
    Tokenizer tok = load_tok(c.tok);
    ChatTemplate tmpl = ChatTemplate::from_config(tok.config());
    std::string text = tmpl.render({{"user", "hello friend"},
                                    {"assistant", "good day to you"},
                                    {"user", "and more"},
                                    {"assistant", "that is all"}})
                           .text;
    SftExample ex = one(std::string("msg_") + c.tok, json{{"messages", msgs}}.dump(), tok);
    EXPECT_EQ(ex.ids, tok.encode(text, false));
    EXPECT_LE(std::count(ex.ids.begin(), ex.ids.end(), *tok.bos_id()), 2);  // the template's
    // Runs of targets, decoded.
    std::vector<std::string> runs;
    for (size_t i = 0; i < ex.ids.size();) {
      if (!ex.train_mask[i]) {
        ++i;
        continue;
      }
      size_t j = i;
      while (j < ex.ids.size() && ex.train_mask[j]) ++j;
      runs.push_back(tok.decode(std::span(ex.ids).subspan(i, j - i)));
      i = j;
    }
    ASSERT_EQ(runs.size(), 2u);
    auto strip = [](std::string s) {
      while (!s.empty() && s.front() == ' ') s.erase(s.begin());
      return s;
    };
    EXPECT_EQ(strip(runs[0]).substr(0, 15), "good day to you");
    EXPECT_EQ(strip(runs[1]).substr(0, 11), "that is all");
    EXPECT_NE(runs[0].find(c.eos), std::string::npos);
    EXPECT_NE(runs[1].find(c.eos), std::string::npos);
  }
}

TEST(SftDataset, ConversationalPromptCompletionUsesTheTemplate) {
  Tokenizer tok = load_tok("qwen2");
  json rec = {{"prompt", json::array({{{"role", "user"}, {"content", "Hi"}}})},
              {"completion", json::array({{{"role", "assistant"}, {"content", "Hey"}}})}};
  SftExample pc = one("pc_conv", rec.dump(), tok);
  json m = {{"messages", json::array({{{"role", "user"}, {"content", "Hi"}},
                                      {{"role", "assistant"}, {"content", "Hey"}}})}};
  SftExample ms = one("pc_conv_msgs", m.dump(), tok);
  EXPECT_EQ(pc.ids, ms.ids);
  EXPECT_EQ(pc.train_mask, ms.train_mask);
  // An assistant turn inside the prompt is not a target.
  json rec2 = {{"prompt", json::array({{{"role", "user"}, {"content", "a"}},
                                       {{"role", "assistant"}, {"content", "b"}},
                                       {{"role", "user"}, {"content", "c"}}})},
               {"completion", json::array({{{"role", "assistant"}, {"content", "d"}}})}};
  SftExample e2 = one("pc_conv2", rec2.dump(), tok);
  const std::string target = "d<|im_end|>";
  Ids tt = tok.encode(target, false);
  int64_t n = std::accumulate(e2.train_mask.begin(), e2.train_mask.end(), int64_t(0));
  EXPECT_EQ(n, int64_t(tt.size()));
  Ids nl = tok.encode("\n", false);
  ASSERT_GE(e2.ids.size(), tt.size() + nl.size());
  size_t at = e2.ids.size() - nl.size() - tt.size();
  EXPECT_TRUE(std::equal(tt.begin(), tt.end(), e2.ids.begin() + int64_t(at)));
  for (size_t i = 0; i < tt.size(); ++i) EXPECT_EQ(e2.train_mask[at + i], 1);
}

TEST(SftDataset, AutoDetectsEachFormatAndExplicitFormatIsHonored) {
  Tokenizer tok = load_tok("qwen2");
  std::string m = json{{"messages", {{{"role", "user"}, {"content", "x"}},
                                     {{"role", "assistant"}, {"content", "y"}}}}}
                      .dump();
  std::string pc = json{{"prompt", "x"}, {"completion", "y"}}.dump();
  std::string al = json{{"instruction", "x"}, {"output", "y"}}.dump();
  std::string tx = json{{"text", "xy"}, {"id", 3}}.dump();  // extra keys are ignored
  SftDatasetOptions o;
  for (auto [line, fmt] : {std::pair{m, SftFormat::messages}, {pc, SftFormat::prompt_completion},
                           {al, SftFormat::alpaca}, {tx, SftFormat::text}}) {
    SftDatasetOptions f;
    f.format = fmt;
    EXPECT_EQ(one("auto", line, tok, o).ids, one("explicit", line, tok, f).ids);
    EXPECT_EQ(detect_sft_format(json::parse(line), "x"), fmt);
  }
  EXPECT_EQ(sft_format_from_name("alpaca"), SftFormat::alpaca);
  EXPECT_EQ(sft_format_from_name("auto"), SftFormat::auto_detect);
  EXPECT_STREQ(sft_format_name(SftFormat::prompt_completion), "prompt_completion");
  EXPECT_THROW(sft_format_from_name("sharegpt"), Error);
}

// ---------------------------------------------------------------------------------- truncation

TEST(SftDataset, TruncationRightLeftDropAndStats) {
  Tokenizer tok = load_tok("gpt2");
  const std::string prompt = "one two three four five ";
  const std::string completion = "six seven eight nine ten eleven twelve";
  std::string line = json{{"prompt", prompt}, {"completion", completion}}.dump();
  SftDatasetOptions full_opt;
  SftExample full = one("trunc_full", line, tok, full_opt);
  const int64_t n = int64_t(full.ids.size());
  ASSERT_GT(n, 8);
  const int64_t max_len = n - 3;

  SftDatasetOptions right;
  right.max_seq_len = max_len;
  SftDataStats st;
  auto r = load_sft_jsonl(write_jsonl("trunc_r", {line, line}), tok, right, &st);
  ASSERT_EQ(r.size(), 2u);
  EXPECT_EQ(r[0].ids, Ids(full.ids.begin(), full.ids.begin() + max_len));
  EXPECT_EQ(r[0].train_mask, Mask(full.train_mask.begin(), full.train_mask.begin() + max_len));
  EXPECT_EQ(st.truncated, 2);
  EXPECT_EQ(st.examples, 2);
  EXPECT_EQ(st.tokens, 2 * max_len);
  EXPECT_EQ(st.target_tokens,
            2 * std::accumulate(r[0].train_mask.begin(), r[0].train_mask.end(), int64_t(0)));

  SftDatasetOptions left = right;
  left.truncation = "left";
  SftExample l = one("trunc_l", line, tok, left);
  EXPECT_EQ(l.ids, Ids(full.ids.end() - max_len, full.ids.end()));
  Mask lm(full.train_mask.end() - max_len, full.train_mask.end());
  lm[0] = 0;  // the first kept token has nothing before it
  EXPECT_EQ(l.train_mask, lm);

  SftDatasetOptions drop = right;
  drop.truncation = "drop";
  std::string short_line = json{{"prompt", "a "}, {"completion", "b"}}.dump();
  auto d = load_sft_jsonl(write_jsonl("trunc_d", {line, short_line, line}), tok, drop, &st);
  ASSERT_EQ(d.size(), 1u);
  EXPECT_EQ(d[0].line, 2);
  EXPECT_EQ(st.dropped, 2);
  EXPECT_EQ(st.truncated, 0);
  EXPECT_EQ(st.lines, 3);

  // Right truncation inside the prompt leaves nothing to train on: skipped and counted.
  SftDatasetOptions tiny;
  tiny.max_seq_len = 3;
  auto t = load_sft_jsonl(write_jsonl("trunc_t", {line, short_line}), tok, tiny, &st);
  EXPECT_EQ(st.no_targets, 1);
  ASSERT_EQ(t.size(), 1u);
  EXPECT_EQ(t[0].line, 2);

  SftDatasetOptions bad;
  bad.truncation = "middle";
  EXPECT_THROW(load_sft_jsonl(write_jsonl("trunc_bad", {line}), tok, bad), Error);
}

// ---------------------------------------------------------------------------------- bad lines

TEST(SftDataset, BadLinesNameFileAndLine) {
  Tokenizer tok = load_tok("qwen2");
  const std::string good = json{{"messages", {{{"role", "user"}, {"content", "x"}},
                                              {{"role", "assistant"}, {"content", "y"}}}}}
                               .dump();
  struct Case {
    std::string name, line, expect;
    SftFormat format = SftFormat::auto_detect;
  } cases[] = {
      {"invalid_json", "{\"messages\": [", "invalid JSON"},
      {"missing_key", R"({"prompt": "x"})", "missing key \"completion\"",
       SftFormat::prompt_completion},
      {"wrong_type", R"({"text": 5})", "\"text\" must be a string, not a number", SftFormat::text},
      {"wrong_type_content", R"({"messages": [{"role": "user", "content": ["x"]}]})",
       "\"content\" must be a string, not a list"},
      {"empty_messages", R"({"messages": []})", "\"messages\" is empty"},
      {"bad_role", R"({"messages": [{"role": "robot", "content": "x"}]})", "role \"robot\""},
      {"no_role", R"({"messages": [{"content": "x"}]})", "has no \"role\""},
      {"no_assistant", R"({"messages": [{"role": "user", "content": "x"}]})",
       "no assistant message"},
      {"not_object", R"([1, 2])", "must hold a JSON object"},
      {"mixed_pc", R"({"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]})",
       "both be strings or both be lists", SftFormat::prompt_completion},
      {"alpaca_input", R"({"instruction": "x", "input": 3, "output": "y"})",
       "\"input\" must be a string", SftFormat::alpaca},
  };
  for (auto& c : cases) {
    SCOPED_TRACE(c.name);
    SftDatasetOptions o;
    o.format = c.format == SftFormat::auto_detect ? SftFormat::messages : c.format;
    // Line 1 good (for the format), line 2 blank, line 3 bad, line 4 good.
    std::string ok = good;
    if (o.format == SftFormat::prompt_completion) ok = R"({"prompt": "a", "completion": "b"})";
    if (o.format == SftFormat::text) ok = R"({"text": "a"})";
    if (o.format == SftFormat::alpaca) ok = R"({"instruction": "a", "output": "b"})";
    std::string path = testing::TempDir() + "ftune_sft_bad_" + c.name + ".jsonl";
    std::string msg = error_of("bad_" + c.name, {ok, "   ", c.line, ok}, tok, o);
    EXPECT_NE(msg.find(path + ":3"), std::string::npos) << msg;
    EXPECT_NE(msg.find(c.expect), std::string::npos) << msg;
    EXPECT_NE(msg.find("[sft_dataset]"), std::string::npos) << msg;
  }
  // Auto detection names the keys it saw.
  std::string msg = error_of("bad_keys", {R"({"question": "x", "answer": "y"})"}, tok);
  EXPECT_NE(msg.find(":1"), std::string::npos) << msg;
  EXPECT_NE(msg.find("question"), std::string::npos) << msg;
  // The first bad line is the one reported, whatever the thread count.
  std::vector<std::string> many(3000, good);
  many[1700] = "{";
  many[2900] = R"({"messages": []})";
  msg = error_of("bad_many", many, tok);
  EXPECT_NE(msg.find(":1701: invalid JSON"), std::string::npos) << msg;
  // A template the recipe names that does not exist, or a role the template refuses.
  SftDatasetOptions named;
  named.chat_template = "nope";
  EXPECT_NE(error_of("bad_tmpl", {good}, tok, named).find("unknown chat template"),
            std::string::npos);
  Tokenizer mistral = load_tok("sp_metaspace");
  msg = error_of("bad_alt",
                 {R"({"messages": [{"role": "system", "content": "s"},)"
                  R"( {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]})"},
                 mistral);
  EXPECT_NE(msg.find(":1: [chat_template]"), std::string::npos) << msg;
  EXPECT_THROW(load_sft_jsonl("/nonexistent/x.jsonl", tok, {}), Error);
  // A byte order mark before the first line is not an error.
  auto bom = load_sft_jsonl(write_jsonl("bom", {"\xEF\xBB\xBF" + good}), tok, {});
  EXPECT_EQ(bom.size(), 1u);
}

// ---------------------------------------------------------------------------------- split

namespace {

std::vector<SftExample> synthetic(int64_t n, int64_t min_len, int64_t max_len, uint64_t seed) {
  std::vector<SftExample> out;
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (int64_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    int64_t len = min_len + int64_t((s >> 33) % uint64_t(max_len - min_len + 1));
    SftExample e;
    e.line = i + 1;
    for (int64_t t = 0; t < len; ++t) {
      e.ids.push_back(int32_t(i * 1000 + t));  // token identifies (example, offset)
      e.train_mask.push_back(t > 0 && ((t + i) % 3 != 0));
    }
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<int64_t> lines_of(const std::vector<SftExample>& v) {
  std::vector<int64_t> out;
  for (auto& e : v) out.push_back(e.line);
  return out;
}

}  // namespace

TEST(SftDataset, SplitIsSeededDeterministicAndDisjoint) {
  auto all = synthetic(101, 2, 5, 1);
  auto [tr, va] = split_holdout(all, 0.1, 7);
  EXPECT_EQ(va.size(), 11u);  // ceil(0.1 * 101)
  EXPECT_EQ(tr.size(), 90u);
  auto [tr2, va2] = split_holdout(all, 0.1, 7);
  EXPECT_EQ(lines_of(va), lines_of(va2));
  EXPECT_EQ(lines_of(tr), lines_of(tr2));
  std::set<int64_t> seen;
  for (int64_t l : lines_of(tr)) EXPECT_TRUE(seen.insert(l).second);
  for (int64_t l : lines_of(va)) EXPECT_TRUE(seen.insert(l).second);
  EXPECT_EQ(seen.size(), 101u);
  auto vl = lines_of(va);
  EXPECT_TRUE(std::is_sorted(vl.begin(), vl.end()));
  auto [tr3, va3] = split_holdout(all, 0.1, 8);
  EXPECT_NE(lines_of(va3), vl);
  auto [tr4, va4] = split_holdout(all, 5, 7);
  EXPECT_EQ(va4.size(), 5u);
  auto [tr5, va5] = split_holdout(all, 0.0, 7);
  EXPECT_EQ(va5.size(), 0u);
  EXPECT_EQ(tr5.size(), 101u);
  EXPECT_THROW(split_holdout(all, 101, 7), Error);
  EXPECT_THROW(split_holdout(all, 2.5, 7), Error);
  EXPECT_THROW(split_holdout(all, -0.1, 7), Error);
}

// ---------------------------------------------------------------------------------- packing

TEST(SftLoader, BestFitDecreasingByHand) {
  // Sorted 5,4,3,3,2,2,1 into 8: 5|3 (tightest), 4|3|1, 2|2.
  auto bins = pack_best_fit_decreasing({5, 4, 3, 3, 2, 2, 1}, 8);
  std::vector<std::vector<int64_t>> want = {{0, 2}, {1, 3, 6}, {4, 5}};
  EXPECT_EQ(bins, want);
  // Ties in length keep the given order; equally tight bins: the earliest.
  bins = pack_best_fit_decreasing({2, 3, 3, 2}, 5);
  want = {{1, 0}, {2, 3}};
  EXPECT_EQ(bins, want);
  EXPECT_THROW(pack_best_fit_decreasing({9}, 8), Error);
}

namespace {

// Checks every invariant of one packed batch and records which (example, offset) tokens it held.
void check_packed_batch(const SftBatch& b, const std::vector<SftExample>& ex, int64_t max_len,
                        std::map<int32_t, int>& seen_tokens, int64_t& sequences) {
  ASSERT_TRUE(b.cu_seqlens.defined());
  const int64_t B = b.ids.size(0), T = b.ids.size(1);
  EXPECT_LE(T, max_len);
  auto ids = b.ids.to_vector<int32_t>();
  auto lab = b.labels.to_vector<int64_t>();
  auto pos = b.positions.to_vector<int32_t>();
  auto cu = b.cu_seqlens.to_vector<int32_t>();
  ASSERT_GE(cu.size(), 2u);
  EXPECT_EQ(cu.front(), 0);
  EXPECT_EQ(cu.back(), B * T);
  int64_t targets = 0, tokens = 0;
  for (size_t s = 0; s + 1 < cu.size(); ++s) {
    int64_t a = cu[s], e = cu[s + 1];
    ASSERT_LT(a, e);
    ASSERT_EQ(a / T, (e - 1) / T) << "segment crosses a row";
    bool pad = ids[size_t(a)] == -1;
    if (pad) {
      // Padding: the tail of its row, labels ignored.
      EXPECT_EQ(e % T, 0);
      for (int64_t t = a; t < e; ++t) {
        EXPECT_EQ(ids[size_t(t)], -1);
        EXPECT_EQ(lab[size_t(t)], -100);
        EXPECT_LT(pos[size_t(t)], T);
        if (t > a) EXPECT_EQ(pos[size_t(t)], pos[size_t(t - 1)] + 1);
      }
      continue;
    }
    int32_t first = ids[size_t(a)];
    const SftExample& x = ex[size_t(first / 1000)];
    ASSERT_EQ(first % 1000, 0) << "a sequence starts mid-example";
    ASSERT_EQ(int64_t(x.ids.size()), e - a);
    ++sequences;
    for (int64_t t = a; t < e; ++t) {
      int64_t i = t - a;
      EXPECT_EQ(ids[size_t(t)], x.ids[size_t(i)]);
      EXPECT_EQ(pos[size_t(t)], i);
      seen_tokens[ids[size_t(t)]]++;
      ++tokens;
      int64_t want = (t + 1 < e && x.train_mask[size_t(i + 1)]) ? x.ids[size_t(i + 1)] : -100;
      EXPECT_EQ(lab[size_t(t)], want);
      targets += want != -100;
    }
  }
  EXPECT_EQ(b.num_targets, targets);
  EXPECT_EQ(b.num_tokens, tokens);
}

std::vector<std::vector<int32_t>> epoch_ids(SftLoader& l) {
  std::vector<std::vector<int32_t>> out;
  SftBatch b;
  while (l.next(b)) out.push_back(b.ids.to_vector<int32_t>());
  return out;
}

}  // namespace

TEST(SftLoader, PackingInvariants) {
  auto ex = synthetic(500, 1, 60, 3);
  int64_t total = 0;
  for (auto& e : ex) total += int64_t(e.ids.size());
  SftLoaderOptions o;
  o.batch_size = 4;
  o.max_seq_len = 64;
  o.packed = true;
  o.pad_id = -1;
  o.seed = 11;
  SftLoader l(ex, o);
  for (int epoch = 0; epoch < 2; ++epoch) {
    SCOPED_TRACE(epoch);
    std::map<int32_t, int> seen;
    int64_t seqs = 0, batches = 0;
    SftBatch b;
    while (l.next(b)) {
      check_packed_batch(b, ex, o.max_seq_len, seen, seqs);
      ++batches;
    }
    EXPECT_EQ(batches, l.batches_per_epoch());
    EXPECT_EQ(seqs, 500);
    EXPECT_EQ(int64_t(seen.size()), total);  // no token lost
    for (auto& [id, n] : seen) ASSERT_EQ(n, 1) << id;  // none duplicated
  }
  SftPackingStats ps = l.packing_stats();
  EXPECT_EQ(ps.sequences, 500);
  EXPECT_EQ(ps.tokens, total);
  EXPECT_DOUBLE_EQ(ps.fill_ratio, double(total) / double(ps.rows * 64));
  // BFD on many short items fills rows almost completely, and never needs more rows than
  // first-fit in the given order would.
  EXPECT_GT(ps.fill_ratio, 0.95);
  std::printf("[ packing ] 500 sequences, %lld tokens, %lld rows of 64: fill %.4f\n",
              static_cast<long long>(total), static_cast<long long>(ps.rows), ps.fill_ratio);
  EXPECT_GE(ps.rows, (total + 63) / 64);
}

TEST(SftLoader, UnpackedBatchesArePaddedAndLabelsShifted) {
  auto ex = synthetic(10, 2, 9, 5);
  SftLoaderOptions o;
  o.batch_size = 3;
  o.max_seq_len = 16;
  o.shuffle = false;
  o.pad_id = 7;
  SftLoader l(ex, o);
  EXPECT_EQ(l.batches_per_epoch(), 4);
  SftBatch b;
  int64_t row = 0;
  while (l.next(b)) {
    EXPECT_FALSE(b.cu_seqlens.defined());
    const int64_t B = b.ids.size(0), T = b.ids.size(1);
    auto ids = b.ids.to_vector<int32_t>();
    auto lab = b.labels.to_vector<int64_t>();
    auto pos = b.positions.to_vector<int32_t>();
    int64_t longest = 0, tokens = 0, targets = 0;
    for (int64_t r = 0; r < B; ++r, ++row) {
      const SftExample& x = ex[size_t(row)];  // no shuffle: file order
      const int64_t L = int64_t(x.ids.size());
      longest = std::max(longest, L);
      tokens += L;
      for (int64_t t = 0; t < T; ++t) {
        size_t k = size_t(r * T + t);
        EXPECT_EQ(pos[k], t);
        if (t < L) {
          EXPECT_EQ(ids[k], x.ids[size_t(t)]);
          int64_t want = t + 1 < L && x.train_mask[size_t(t + 1)] ? x.ids[size_t(t + 1)] : -100;
          EXPECT_EQ(lab[k], want);
          targets += want != -100;
        } else {
          EXPECT_EQ(ids[k], 7);
          EXPECT_EQ(lab[k], -100);
        }
      }
    }
    EXPECT_EQ(T, longest);
    EXPECT_EQ(b.num_tokens, tokens);
    EXPECT_EQ(b.num_targets, targets);
  }
  EXPECT_EQ(row, 10);
  EXPECT_EQ(l.epoch(), 1);
  // Longer than the loader's rows: refused up front.
  o.max_seq_len = 5;
  EXPECT_THROW(SftLoader(ex, o), Error);
}

// ---------------------------------------------------------------------------------- order, state

TEST(SftLoader, ShuffleDependsOnSeedAndEpochOnly) {
  auto ex = synthetic(64, 2, 4, 9);
  SftLoaderOptions o;
  o.batch_size = 4;
  o.max_seq_len = 8;
  SftLoader a(ex, o), b(ex, o);
  auto e0 = epoch_ids(a), e0b = epoch_ids(b);
  EXPECT_EQ(e0, e0b);
  auto e1 = epoch_ids(a);
  EXPECT_NE(e0, e1);  // a new permutation each epoch
  b.set_epoch(1);
  EXPECT_EQ(epoch_ids(b), e1);
  o.seed = 1;
  SftLoader c(ex, o);
  EXPECT_NE(epoch_ids(c), e0);
  // The permutation itself: a permutation, fixed by (seed, stream).
  auto p = philox_permutation(1000, 5, 3);
  auto q = p;
  std::sort(q.begin(), q.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(q[size_t(i)], i);
  EXPECT_EQ(p, philox_permutation(1000, 5, 3));
  EXPECT_NE(p, philox_permutation(1000, 6, 3));
  EXPECT_NE(p, philox_permutation(1000, 5, 4));
}

TEST(SftLoader, StateRestoreReproducesTheFollowingBatches) {
  for (bool packed : {false, true}) {
    SCOPED_TRACE(packed);
    auto ex = synthetic(200, 1, 30, 4);
    SftLoaderOptions o;
    o.batch_size = 3;
    o.max_seq_len = 32;
    o.packed = packed;
    o.seed = 99;
    SftLoader ref(ex, o);
    // The uninterrupted stream over 2.5 epochs, with the state before each batch.
    std::vector<json> states;
    std::vector<SftBatch> batches;
    for (int k = 0; k < int(2.5 * double(ref.batches_per_epoch())); ++k) {
      states.push_back(ref.state());
      SftBatch b;
      if (!ref.next(b)) {
        --k;
        states.pop_back();
        continue;
      }
      batches.push_back(b);
    }
    for (size_t cut : {size_t(0), size_t(5), batches.size() / 2 - 1, batches.size() / 2 + 1}) {
      SCOPED_TRACE(cut);
      SftLoader l(ex, o);
      l.load_state(json::parse(states[cut].dump()));  // through text, as a checkpoint stores it
      size_t k = cut;
      SftBatch b;
      while (k < batches.size()) {
        if (!l.next(b)) continue;
        ASSERT_EQ(b.ids.to_vector<int32_t>(), batches[k].ids.to_vector<int32_t>());
        ASSERT_EQ(b.labels.to_vector<int64_t>(), batches[k].labels.to_vector<int64_t>());
        ASSERT_EQ(b.positions.to_vector<int32_t>(), batches[k].positions.to_vector<int32_t>());
        if (packed)
          ASSERT_EQ(b.cu_seqlens.to_vector<int32_t>(), batches[k].cu_seqlens.to_vector<int32_t>());
        ++k;
      }
    }
    // Another dataset or seed is refused.
    SftLoader other(synthetic(199, 1, 30, 4), o);
    EXPECT_THROW(other.load_state(states[3]), Error);
    auto ex2 = ex;
    ex2[7].ids[0] += 1;
    SftLoader changed(ex2, o);
    EXPECT_THROW(changed.load_state(states[3]), Error);
    SftLoaderOptions o2 = o;
    o2.seed = 100;
    SftLoader seeded(ex, o2);
    EXPECT_THROW(seeded.load_state(states[3]), Error);
    json bad = states[3];
    bad["position"] = 1 << 20;
    SftLoader l(ex, o);
    EXPECT_THROW(l.load_state(bad), Error);
    EXPECT_THROW(l.load_state(json{{"epoch", 0}}), Error);
  }
}

TEST(SftLoader, RanksTakeEveryWorldSizeThBatch) {
  auto ex = synthetic(50, 1, 10, 2);
  for (bool packed : {false, true}) {
    for (bool drop_last : {false, true}) {
      SCOPED_TRACE(std::to_string(packed) + std::to_string(drop_last));
      SftLoaderOptions o;
      o.batch_size = 4;
      o.max_seq_len = 16;
      o.packed = packed;
      o.drop_last = drop_last;
      o.seed = 3;
      SftLoader single(ex, o);
      auto all = epoch_ids(single);
      const int W = 3;
      std::vector<std::vector<std::vector<int32_t>>> per(W);
      for (int r = 0; r < W; ++r) {
        SftLoaderOptions ro = o;
        ro.rank = r;
        ro.world_size = W;
        SftLoader l(ex, ro);
        per[size_t(r)] = epoch_ids(l);
        EXPECT_EQ(int64_t(per[size_t(r)].size()), l.batches_per_epoch());
      }
      const size_t n = all.size();
      const size_t each = drop_last ? n / W : (n + W - 1) / W;
      for (int r = 0; r < W; ++r) {
        ASSERT_EQ(per[size_t(r)].size(), each);  // equal counts: ranks step together
        for (size_t j = 0; j < each; ++j) {
          size_t g = size_t(r) + j * W;
          EXPECT_EQ(per[size_t(r)][j], all[g % n]) << "rank " << r << " batch " << j;
        }
      }
      // Without drop_last every batch is seen by some rank.
      if (!drop_last) {
        std::set<size_t> covered;
        for (int r = 0; r < W; ++r)
          for (size_t j = 0; j < each; ++j) covered.insert((size_t(r) + j * W) % n);
        EXPECT_EQ(covered.size(), n);
      }
    }
  }
  SftLoaderOptions o;
  o.rank = 2;
  o.world_size = 2;
  EXPECT_THROW(SftLoader(ex, o), Error);
  EXPECT_THROW(SftLoader({}, SftLoaderOptions{}), Error);
}

// A state saved by W ranks at any position of an epoch, its end included (15 batches: the last
// round wraps around or, with drop_last, drops), loaded by W' ranks: rank r' continues with
// global batches c + r', c + r' + W', ... of the epoch one process sees (c = the batches the W
// replicas consumed), then the next epoch from its batch r'; at the epoch's end the next call
// starts the next epoch. The converted state itself round-trips to one process.
TEST(SftLoader, StateConvertsToAnotherWorldSize) {
  auto ex = synthetic(30, 9, 12, 2);  // no two fit a row of 16: 15 batches of 2 rows
  for (bool packed : {false, true}) {
    for (bool drop_last : {false, true}) {
      SftLoaderOptions o;
      o.batch_size = 2;
      o.max_seq_len = 16;
      o.packed = packed;
      o.drop_last = drop_last;
      o.seed = 5;
      SftLoader single(ex, o);
      const auto e0 = epoch_ids(single), e1 = epoch_ids(single);
      const int64_t T = int64_t(e0.size());
      ASSERT_EQ(T % 2, 1) << "the case needs an odd number of batches per epoch";
      ASSERT_EQ(int64_t(e1.size()), T);
      ASSERT_NE(e0, e1);  // shuffled per epoch: a wrong epoch would show
      for (int W = 1; W <= 4; ++W) {
        SftLoaderOptions so = o;
        so.world_size = W;
        SftLoader saver(ex, so);
        const int64_t end = saver.batches_per_epoch();
        for (int64_t p = 0; p <= end; ++p) {
          const json st = json::parse(saver.state().dump());
          SftBatch skip;
          if (p < end) ASSERT_TRUE(saver.next(skip));
          const int64_t c = p * W;
          for (int V = 1; V <= 4; ++V) {
            for (int r = 0; r < V; ++r) {
              SCOPED_TRACE(::testing::Message() << "packed " << packed << " drop_last "
                                                << drop_last << " W " << W << " p " << p
                                                << " W' " << V << " r' " << r);
              SftLoaderOptions lo = o;
              lo.world_size = V;
              lo.rank = r;
              SftLoader l(ex, lo);
              l.load_state(st);
              std::vector<std::vector<int32_t>> want;
              if (p < end)
                for (int64_t k = 0; drop_last ? c + (k + 1) * V <= T : c + k * V < T; ++k)
                  want.push_back(e0[size_t((c + r + k * V) % T)]);
              ASSERT_EQ(epoch_ids(l), want) << "the rest of the epoch";
              EXPECT_EQ(l.epoch(), 1);
              want.clear();
              for (int64_t k = 0; k < l.batches_per_epoch(); ++k)
                want.push_back(e1[size_t((r + k * V) % T)]);
              ASSERT_EQ(epoch_ids(l), want) << "the next epoch";
              // (With drop_last, V ranks may drop the batches that one process would take.)
              if (r != 0 || (drop_last && p < end && c + V > T)) continue;
              // The converted state (an offset where c does not divide among V) resumes again.
              SftLoader again(ex, lo), one(ex, o);
              again.load_state(st);
              one.load_state(json::parse(again.state().dump()));
              want.clear();
              if (p < end)
                for (int64_t g = c; g < T; ++g) want.push_back(e0[size_t(g)]);
              ASSERT_EQ(epoch_ids(one), want) << "W' -> 1";
            }
          }
        }
      }
    }
  }
  // A position beyond the saved layout's epoch is refused.
  SftLoaderOptions o;
  o.batch_size = 2;
  o.world_size = 2;
  o.max_seq_len = 16;
  SftLoader two(ex, o);
  json st = two.state();
  st["position"] = two.batches_per_epoch() + 1;
  SftLoaderOptions o1 = o;
  o1.world_size = 1;
  SftLoader one(ex, o1);
  EXPECT_THROW(one.load_state(st), Error);
  st["position"] = 0;
  st["offset"] = 2;  // not below world_size
  EXPECT_THROW(one.load_state(st), Error);
}

// Not run by default: ./test_data --gtest_also_run_disabled_tests --gtest_filter='*Speed*'
TEST(SftDataset, DISABLED_Speed100kLines) {
  Tokenizer tok = load_tok("qwen2");
  std::vector<std::string> lines;
  for (int i = 0; i < 100000; ++i)
    lines.push_back(json{{"messages",
                          {{{"role", "user"}, {"content", "What is " + std::to_string(i) + "?"}},
                           {{"role", "assistant"},
                            {"content", "It is the number " + std::to_string(i) + "."}}}}}
                        .dump());
  std::string path = write_jsonl("speed", lines);
  auto t0 = std::chrono::steady_clock::now();
  SftDataStats st;
  auto ex = load_sft_jsonl(path, tok, {}, &st);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("[ speed ] %lld lines, %lld tokens in %.2f s\n", static_cast<long long>(st.lines),
              static_cast<long long>(st.tokens), s);
  EXPECT_EQ(ex.size(), 100000u);
}
