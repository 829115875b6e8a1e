#!/usr/bin/env python3
"""PyTorch peer of build/bench/model_cpu_time (bench/results/cpu_model.md).

The same models (transformers, eval-mode numerics: dropout 0, default sdpa attention), the same
batch and the same loop: forward under no_grad, then forward + mean cross-entropy + backward;
process CPU time, minimum over --reps after one warm-up round, one thread.

    python3 bench/model_torch.py [--reps 5]
"""
import argparse
import time

import torch
import transformers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)


def model(family):
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=8000, n_embd=512, n_layer=4, n_head=8,
                                          n_positions=1024, attn_pdrop=0.0, resid_pdrop=0.0, bos_token_id=0,
                                          eos_token_id=0, embd_pdrop=0.0))
    cfg, cls = (Qwen2Config, Qwen2ForCausalLM) if family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    return cls(cfg(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                   tie_word_embeddings=family == "qwen2"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    B, T, V = 4, 256, 8000
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, 1 thread")
    print("| model | params | forward ms | forward+backward ms |\n|---|---|---|---|")
    for fam in ["llama", "qwen2", "gpt2"]:
        m = model(fam)
        ids = torch.randint(0, V, (B, T))
        fwd = step = float("inf")
        for r in range(a.reps + 1):
            with torch.no_grad():
                t0 = time.process_time()
                m(ids)
                if r:
                    fwd = min(fwd, time.process_time() - t0)
            m.zero_grad()
            t0 = time.process_time()
            logits = m(ids).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, V), ids.reshape(-1)).backward()
            if r:
                step = min(step, time.process_time() - t0)
        n = sum(p.numel() for p in m.parameters())
        print(f"| {fam} B={B} T={T} | {n} | {fwd * 1e3:.1f} | {step * 1e3:.1f} |")


if __name__ == "__main__":
    main()
