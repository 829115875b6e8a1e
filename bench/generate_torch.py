#!/usr/bin/env python3
"""The peer of bench/bench_generate.cpp: transformers' sampling warpers and generate() on the same
shapes, on the CPU, so the two can be run side by side (bench/results/cpu_generate.md).

  OMP_NUM_THREADS=2 python3 bench/generate_torch.py [--quick]
"""
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

QUICK = "--quick" in sys.argv


def median_ms(reps, f):
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        t.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(t)


def bench_sampling(reps):
    vocab = 151936
    print(f"## warpers + softmax + multinomial (greedy: argmax), vocab {vocab} (median of {reps})\n")
    print("| batch | greedy | temperature 1 | top_k 50 | top_p 0.9 | top_k 50 + top_p 0.9 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for b in (1, 8):
        g = torch.Generator().manual_seed(1)
        logits = torch.randn(b, vocab, generator=g) * 3.0
        ids = torch.zeros(b, 1, dtype=torch.long)
        cells = [median_ms(reps, lambda: torch.argmax(logits, dim=-1))]
        for warpers in ([TemperatureLogitsWarper(1.0)], [TopKLogitsWarper(50)],
                        [TopPLogitsWarper(0.9)], [TopKLogitsWarper(50), TopPLogitsWarper(0.9)]):
            procs = LogitsProcessorList(warpers)

            def draw():
                s = procs(ids, logits)
                torch.multinomial(torch.softmax(s, dim=-1), 1)
            cells.append(median_ms(reps, draw))
        print(f"| {b} |" + "".join(f" {c:.2f} ms |" for c in cells))
    print()


def bench_generate(new_tokens):
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                      num_key_value_heads=4, num_hidden_layers=8, max_position_embeddings=2048,
                      vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    print(f"## generate, random Llama (hidden 512, 8 layers, 8 heads / 4 kv, vocab 32000), greedy, "
          f"{new_tokens} new tokens, no stop token\n")
    print("| prompts (lengths) | prefill + first token | decode tokens/s (all rows) |")
    print("| --- | --- | --- |")
    for lens in ([128], [128, 100, 64, 32]):
        g = torch.Generator().manual_seed(7)
        L = max(lens)
        ids = torch.zeros(len(lens), L, dtype=torch.long)
        mask = torch.zeros(len(lens), L, dtype=torch.long)
        for r, n in enumerate(lens):
            ids[r, L - n:] = torch.randint(3, 32000, (n,), generator=g)
            mask[r, L - n:] = 1
        kw = dict(attention_mask=mask, do_sample=False, eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new_tokens, **kw)  # warm-up
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, **kw)
            prefill = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, **kw)
            total = (time.perf_counter() - t0) * 1e3
        rate = len(lens) * (new_tokens - 1) / ((total - prefill) / 1e3)
        print(f"| {len(lens)} ({', '.join(map(str, lens))}) | {prefill:.1f} ms | {rate:.0f} |")
    print()


if __name__ == "__main__":
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    bench_sampling(5 if QUICK else 30)
    bench_generate(16 if QUICK else 128)
