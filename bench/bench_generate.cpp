// Generation timings on the CPU: next-token sampling over a Qwen2-size vocabulary, and generate()
// (prefill + KV-cache decode) on a small random Llama. bench/generate_torch.py times
// transformers' generate on the same model shapes; results in bench/results/cpu_generate.md.
//   build/bench/bench_generate [--quick]
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/rng.h"
#include "io/hf_config.h"
#include "models/generate.h"
#include "models/sampling.h"

namespace {

using namespace ftune;
using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

template <class F>
double median_ms(int reps, F&& f) {
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    f();
    t.push_back(ms_since(t0));
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

void bench_sampling(int reps) {
  const int64_t vocab = 151936;
  std::printf("## sample_tokens, vocab %ld (median of %d)\n\n", long(vocab), reps);
  std::printf("| batch | greedy | temperature 1 | top_k 50 | top_p 0.9 | top_k 50 + top_p 0.9 |\n");
  std::printf("| --- | --- | --- | --- | --- | --- |\n");
  for (int64_t b : {1, 8}) {
    Generator g(1);
    Tensor logits = randn({b, vocab}, g, 0.0, 3.0);
    std::printf("| %ld |", long(b));
    for (SamplingOptions o : {SamplingOptions{0.0, 0, 1.0, 0}, SamplingOptions{1.0, 0, 1.0, 0},
                              SamplingOptions{1.0, 50, 1.0, 0}, SamplingOptions{1.0, 0, 0.9, 0},
                              SamplingOptions{1.0, 50, 0.9, 0}}) {
      uint64_t step = 0;
      double ms = median_ms(reps, [&] { sample_tokens(logits, o, step++); });
      std::printf(" %.2f ms |", ms);
    }
    std::printf("\n");
  }
  std::printf("\n");
}

void bench_generate(int64_t new_tokens) {
  nlohmann::json j = {{"architectures", {"LlamaForCausalLM"}},
                      {"model_type", "llama"},
                      {"hidden_size", 512},
                      {"intermediate_size", 1376},
                      {"num_attention_heads", 8},
                      {"num_key_value_heads", 4},
                      {"num_hidden_layers", 8},
                      {"max_position_embeddings", 2048},
                      {"vocab_size", 32000}};
  Transformer m(parse_hf_config(j, "bench"));
  m.init_random(0);
  std::printf(
      "## generate, random Llama (hidden 512, 8 layers, 8 heads / 4 kv, vocab 32000), "
      "greedy, %ld new tokens, no stop token\n\n",
      long(new_tokens));
  std::printf("| prompts (lengths) | prefill + first token | decode tokens/s (all rows) |\n");
  std::printf("| --- | --- | --- |\n");
  for (std::vector<int64_t> lens :
       {std::vector<int64_t>{128}, std::vector<int64_t>{128, 100, 64, 32}}) {
    std::vector<std::vector<int32_t>> prompts;
    Generator g(7);
    for (int64_t n : lens)
      prompts.push_back(randint({n}, g, 3, 32000, DType::i32).to_vector<int32_t>());
    GenerateOptions o;
    o.max_new_tokens = new_tokens;
    generate(m, prompts, o);  // warm-up
    Clock::time_point t0 = Clock::now(), first{};
    bool got_first = false;
    generate(m, prompts, o, [&](int64_t, int32_t) {
      if (!got_first) first = Clock::now();
      got_first = true;
    });
    const double total = ms_since(t0);
    const double prefill = std::chrono::duration<double, std::milli>(first - t0).count();
    std::string l;
    for (int64_t n : lens) l += (l.empty() ? "" : ", ") + std::to_string(n);
    std::printf("| %zu (%s) | %.1f ms | %.0f |\n", lens.size(), l.c_str(), prefill,
                double(lens.size()) * double(new_tokens - 1) / ((total - prefill) / 1000.0));
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && !std::strcmp(argv[1], "--quick");
  std::printf("threads: %d\n\n", omp_get_max_threads());
  bench_sampling(quick ? 5 : 30);
  bench_generate(quick ? 16 : 128);
  return 0;
}
