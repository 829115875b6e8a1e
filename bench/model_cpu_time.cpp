// Whole-model CPU timing (bench/results/cpu_model.md): forward (no grad) and forward + mean
// cross-entropy + backward of a small Llama, GPT-2 and Qwen2 (tied), B=4, T=256, f32, timed by
// the process CPU clock and keeping the minimum over --reps, so that on a shared machine time lost
// to others does not count. Run it with OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 (CPU time sums
// the threads); bench/model_torch.py is the PyTorch peer.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>

#include "core/rng.h"
#include "models/transformer.h"

using namespace ftune;

namespace {

ModelConfig bench_config(const std::string& family) {
  nlohmann::json j;
  if (family == "gpt2") {
    j = {{"architectures", {"GPT2LMHeadModel"}}, {"model_type", "gpt2"}, {"vocab_size", 8000},
         {"n_embd", 512}, {"n_layer", 4}, {"n_head", 8}, {"n_positions", 1024}};
  } else {
    const bool qwen = family == "qwen2";
    j = {{"architectures", {qwen ? "Qwen2ForCausalLM" : "LlamaForCausalLM"}},
         {"model_type", family}, {"vocab_size", 8000}, {"hidden_size", 512},
         {"intermediate_size", 1376}, {"num_hidden_layers", 4}, {"num_attention_heads", 8},
         {"num_key_value_heads", 4}, {"max_position_embeddings", 1024},
         {"tie_word_embeddings", qwen}};
  }
  return parse_hf_config(j, "bench " + family);
}

double cpu_ms() { return 1000.0 * double(std::clock()) / CLOCKS_PER_SEC; }

}  // namespace

int main(int argc, char** argv) {
  int reps = 5;
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
  const int64_t B = 4, T = 256;
  std::printf("| model | params | forward ms | forward+backward ms |\n|---|---|---|---|\n");
  for (const char* fam : {"llama", "qwen2", "gpt2"}) {
    ModelConfig c = bench_config(fam);
    Transformer m(c);
    m.init_random(1);
    Generator g(3);
    Tensor ids = randint({B, T}, g, 0, c.vocab_size);
    double fwd = 1e30, step = 1e30;
    for (int r = 0; r < reps + 1; ++r) {  // the first round warms up
      {
        NoGradGuard ng;
        const double t0 = cpu_ms();
        m.forward(ids);
        if (r > 0) fwd = std::min(fwd, cpu_ms() - t0);
      }
      m.zero_grad();
      const double t0 = cpu_ms();
      Tensor logits = m.forward(ids);
      ops::cross_entropy(logits.reshape({B * T, c.vocab_size}), ids.reshape({B * T})).backward();
      if (r > 0) step = std::min(step, cpu_ms() - t0);
    }
    std::printf("| %s B=%ld T=%ld | %ld | %.1f | %.1f |\n", fam, long(B), long(T),
                long(m.num_parameters()), fwd, step);
  }
  return 0;
}
