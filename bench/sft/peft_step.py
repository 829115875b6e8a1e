#!/usr/bin/env python3
"""The SFT step of bench/bench_sft.cpp in PyTorch + transformers + PEFT (CPU), for comparison.

One optimizer step: forward of LlamaForCausalLM (attn_implementation="sdpa", torch's fastest CPU
attention), cross-entropy over every position, backward, clip_grad_norm_(1.0), torch.optim.AdamW
(lr 1e-3, weight decay 0.01 on matrices and none on vectors, as ftune's decay_groups; default
implementation), zero_grad(set_to_none=True). LoRA through peft: LoraConfig(r, lora_alpha=2r,
target_modules="all-linear", lora_dropout=--lora-dropout, 0 by default), which adapts every projection of the blocks and not
lm_head, as ftune's "all-linear". Random ids/labels of the same shapes as bench_sft.

Prints one JSON line with bench_sft's keys: ms_per_step (median of --steps after --warmup),
tokens_per_s, peak_rss_mib (ru_maxrss: the process's high-water mark, python and torch included;
rss_base_mib is the RSS after the imports, before the model exists), trainable, adamw_state_mib
(the bytes of every tensor in the optimizer state). Threads: torch.set_num_threads(OMP_NUM_THREADS,
default 2). One configuration per process, like bench_sft.

  python3 bench/sft/peft_step.py [--model DIR | --layers 4 --d 512 --heads 8 --kv-heads 8
      --ffn 1376 --vocab 2048] [--seq 256] [--batch 8] [--lora-r 8 (0: full)] [--steps 8]
      [--warmup 2] [--lora-dropout 0]
"""
import argparse
import json
import os
import resource
import statistics
import time


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1376)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--dtype", default="f32", help="f32 | bf16 (the model is loaded in it)")
    ap.add_argument("--ckpt", type=int, default=0, help="1: gradient checkpointing")
    ap.add_argument("--tie", type=int, default=1)
    a = ap.parse_args()
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    rss_base = rss_mib()

    if a.model:
        model = LlamaForCausalLM.from_pretrained(a.model, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    else:
        cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.d, intermediate_size=a.ffn,
                          num_hidden_layers=a.layers, num_attention_heads=a.heads,
                          num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq, 512),
                          rms_norm_eps=1e-5, tie_word_embeddings=bool(a.tie), hidden_act="silu")
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
    dev = torch.device(a.device)
    tdt = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = model.to(device=dev, dtype=tdt)
    if a.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    attn_impl = model.config._attn_implementation
    base_params = sum(p.numel() for p in model.parameters())
    mc = model.config

    if a.lora_r > 0:
        from peft import LoraConfig, get_peft_model
        lc = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=a.targets,
                        lora_dropout=a.lora_dropout, bias="none", task_type="CAUSAL_LM")
        model = get_peft_model(model, lc)
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    n_train = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=1e-3)

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, mc.vocab_size, (a.batch, a.seq), generator=g).to(dev)
    labels = torch.randint(0, mc.vocab_size, (a.batch * a.seq,), generator=g).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = []
    for s in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.view(a.batch * a.seq, mc.vocab_size).float(), labels)
        if not torch.isfinite(loss).item():
            raise RuntimeError("non-finite loss")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = (time.perf_counter() - t0) * 1e3
        if s >= a.warmup:
            ms.append(t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    state_bytes = sum(v.numel() * v.element_size() for st in opt.state.values()
                      for v in st.values() if torch.is_tensor(v))
    med = statistics.median(ms)
    tps = a.batch * a.seq / (med / 1e3)
    gemm_params = base_params - (0 if a.tie else mc.vocab_size * mc.hidden_size)
    flops_tok = 6.0 * gemm_params + 6.0 * mc.num_hidden_layers * a.seq * mc.hidden_size
    print(json.dumps({
        "impl": "torch+peft" if a.lora_r > 0 else "torch",
        "model": a.model or "random", "layers": mc.num_hidden_layers, "d": mc.hidden_size,
        "vocab": mc.vocab_size, "params": base_params,
        "mode": "lora" if a.lora_r > 0 else "full", "lora_r": a.lora_r,
        "lora_dropout": a.lora_dropout, "trainable": n_train,
        "seq": a.seq, "batch": a.batch, "ms_per_step": med,
        "tokens_per_s": a.batch * a.seq / (med / 1e3), "peak_rss_mib": peak,
        "rss_base_mib": rss_base, "adamw_state_mib": state_bytes / (1024.0 * 1024.0),
        "threads": torch.get_num_threads(), "attn_implementation": attn_impl,
        "device": a.device, "dtype": a.dtype, "activation_checkpointing": bool(a.ckpt),
        "peak_gpu_mib": (torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else None,
        "mfu_vs_989tflops": (tps * flops_tok / 989e12) if dev.type == "cuda" else None,
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
