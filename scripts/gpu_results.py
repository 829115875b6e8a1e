#!/usr/bin/env python3
"""Formats a scripts/gpu_check.sh run's files into bench/results/gpu_<device>.md.

  python3 scripts/gpu_results.py DIR [DIR2] [--out bench/results/gpu_h200.md]

DIR holds the run's $OUT files (test_cuda.log, test_trainer.log, quickstart_gpu.log, bench_gpu.md,
torch_ref.log, e2e.jsonl). With the check split over two calls (GPU_CHECK_PART=core, then e2e),
give both folders: each file is read from the first one that has it with content. Ratios are ours
over the reference in throughput (> 1: ftune faster).
"""
import argparse
import json
import os
import re


def read(dirs, name):
    for d in dirs:
        p = os.path.join(d, name)
        if os.path.exists(p) and os.path.getsize(p) > 0:
            text = open(p).read()
            # test_cuda.log of an e2e-only part holds only the run header: prefer a real one.
            if name != "test_cuda.log" or "[==========]" in text or d == dirs[-1]:
                return text
    return ""


def bench_rows(md):
    rows = {}
    for line in md.splitlines():
        if not line.startswith("| ") or line.startswith("| kernel") or line.startswith("|---"):
            continue
        c = [x.strip() for x in line.strip("|").split("|")]
        if len(c) >= 9:
            rows[c[0]] = c
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", nargs="+")
    ap.add_argument("--out", default="bench/results/gpu_h200.md")
    ap.add_argument("--date", default="")
    a = ap.parse_args()
    d = a.dir
    tc, tt, qs = read(d, "test_cuda.log"), read(d, "test_trainer.log"), read(d, "quickstart_gpu.log")
    bmd, tref = read(d, "bench_gpu.md"), read(d, "torch_ref.log")
    head = tc.splitlines()[:3]
    rows = bench_rows(bmd)
    copy_bw = re.search(r"copy bandwidth (\d+) GB/s", bmd)
    o = []
    o.append("# GPU results: %s" % (re.search(r"device: ([^;]+)", bmd).group(1) if "device:" in bmd else "GPU"))
    o.append("")
    o.append("Made by `scripts/gpu_check.sh run` on a lent machine (the device tool), formatted by")
    o.append("`scripts/gpu_results.py`. " + (a.date + ". " if a.date else "") + "Run header:")
    o.append("")
    o.append("```")
    o.extend(head)
    o.append("```")
    o.append("")
    passed = len(re.findall(r"^\[       OK \]", tc, re.M))
    failed = sorted(set(re.findall(r"^\[  FAILED  \] (\S+) \(", tc, re.M)))
    o.append("## Correctness")
    o.append("")
    o.append("- `test_cuda` (every CUDA kernel against its CPU twin): %d passed, %d failed%s." %
             (passed, len(failed), (": " + ", ".join(failed)) if failed else ""))
    tok = len(re.findall(r"^\[       OK \]", tt, re.M))
    tfail = re.findall(r"^\[  FAILED  \] (\S+) \(", tt, re.M)
    o.append("- GPU trainer, model and CLI tests (`test_launch`, `test_models`: SftRun.Gpu*, "
             "LossScaleRun.F16*, Cli.Gpu*, *Gpu*): %d passed, %d failed%s." %
             (tok, len(tfail), (": " + ", ".join(sorted(set(tfail)))) if tfail else ""))
    m = re.findall(r"eval loss: .*", qs)
    last = [l for l in qs.splitlines() if l.startswith("epoch")]
    if m:
        o.append("- `ftune run recipes/quickstart_lora.yaml device=cuda dtype=bf16`: %s; last step: `%s`." %
                 (m[-1], last[-1] if last else ""))
    steps = [l for d0 in d for l in read([d0], "test_cuda.log").splitlines()
             if re.match(r"\| [a-z_0-9]+ \| [^|]+ \| \d+ \|$", l)]
    if steps:
        o.append("- The check's steps (`gpu_check.sh`; step, exit status, seconds): " +
                 ", ".join("%s %s %ss" % tuple(c.strip() for c in l.strip("|").split("|")) for l in steps) + ".")
    o.append("")
    # End to end.
    e2e = []
    for line in read(d, "e2e.jsonl").splitlines():
        try:
            e2e.append(json.loads(line))
        except Exception:
            pass
    if e2e:
        o.append("## End to end: one SFT step, 0.5B Llama-style model, seq 2048, bf16")
        o.append("")
        o.append("Qwen2.5-0.5B's shapes (d 896, 24 layers, 14 heads of 64, 2 kv heads, ffn 4864, vocab")
        o.append("151936 tied; 494M parameters), batch 4 x 2048 tokens, random tokens; median of 4 steps after")
        o.append("2 warm-up. ftune: `bench_sft --device cuda --dtype bf16` (AdamW with f32 masters). Peer:")
        o.append("`bench/sft/peft_step.py` (transformers 5 `LlamaForCausalLM`, eager with SDPA, bf16 weights, torch")
        o.append("AdamW on them; LoRA through peft, `all-linear`, r 16). MFU: 6 x params x tokens/s (+ attention)")
        o.append("over 989 TFLOP/s dense bf16.")
        o.append("")
        o.append("| mode | act. ckpt | attention | ftune tokens/s | peer tokens/s | speed-up | ftune MFU | peer MFU | ftune peak GPU GiB | peer peak GPU GiB | ftune fwd / bwd / optim ms |")
        o.append("|---|---|---|---|---|---|---|---|---|---|---|")
        ours = {(j["mode"], bool(j.get("activation_checkpointing")),
                 j.get("attention", "ftune") + (" (unbatched qkv)" if j["mode"] == "lora" and
                                                j.get("fused_qkv") is False else "")
                 + (" (whole logits)" if j.get("chunked_loss") is False else "")
                 + (" (GEMMs autotuned)" if j.get("gemm_autotune") is True else "")
                 + (" (dropout %g)" % j["lora_dropout"] if j.get("lora_dropout") else "")
                 + (" (FTUNE_LORA_FUSED=%s)" % j["lora_fused"] if j.get("lora_fused", "auto") != "auto" else "")
                 + (" (wgmma attention, FTUNE_ATTN_WGMMA=%s)" % j["attn_wgmma"]
                    if j.get("attn_wgmma", "auto") not in ("auto", "0") else "")): j
                for j in e2e if "impl" not in j}
        peer = {(j["mode"], bool(j.get("activation_checkpointing")), j.get("lora_dropout") or 0): j
                for j in e2e if "impl" in j}
        for k, j in ours.items():
            p = peer.get(k[:2] + (j.get("lora_dropout") or 0,))
            o.append("| %s | %s | %s | %.0f | %s | %s | %.1f%% | %s | %.1f | %s | %.1f / %.1f / %.1f |" % (
                k[0], "on" if k[1] else "off", k[2], j["tokens_per_s"], "%.0f" % p["tokens_per_s"] if p else "",
                "%.2fx" % (j["tokens_per_s"] / p["tokens_per_s"]) if p else "",
                100 * (j.get("mfu_vs_989tflops") or 0), "%.1f%%" % (100 * (p.get("mfu_vs_989tflops") or 0)) if p else "",
                (j.get("peak_gpu_mib") or 0) / 1024, "%.1f" % ((p.get("peak_gpu_mib") or 0) / 1024) if p else "",
                j.get("ms_forward_loss", 0), j.get("ms_backward", 0), j.get("ms_clip_adamw", 0)))
        o.append("")
    # Attention.
    tt_rows = {}
    for line in tref.splitlines():
        mm = re.match(r"\| (d\d+ h\d+ b\d+ n\d+(?: causal)?) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", line)
        if mm:
            tt_rows[mm.group(1)] = [int(x) for x in mm.groups()[1:]]
    if tt_rows:
        o.append("## Fused attention (TFLOP/s, bf16, 16k tokens per batch)")
        o.append("")
        o.append("FlashAttention's FLOP convention (4 B H N^2 D forward, halved when causal; backward 2.5x")
        o.append("forward). ftune: `bench_gpu` (`bench/gpu/attention.cu`, the default variant; fwd also with")
        o.append("128-row blocks); torch 2.11 SDPA: `bench/gpu/torch_attention.py`.")
        o.append("")
        o.append("ftune's default (auto): 128-row forward CTAs at d128, and at d64 from 1024 queries; backward")
        o.append("variant 1 at d64 and 4 at d128 (`kernels/attention.h`). The fwd+bwd rows of those variants were")
        o.append("timed with the 64-row forward, so the default is slightly faster than shown. In brackets:")
        o.append("the original kernels (64-row forward, backward variant 0).")
        o.append("")
        o.append("| shape | ftune fwd | ftune fwd+bwd | torch flash fwd | flash fwd+bwd | cuDNN fwd | cuDNN fwd+bwd | fwd+bwd vs flash |")
        o.append("|---|---|---|---|---|---|---|---|")
        for shape, t in tt_rows.items():
            d = int(re.search(r"d(\d+)", shape).group(1))
            n = int(re.search(r"n(\d+)", shape).group(1))
            base = rows.get("attn_fwd bf16 " + shape)
            bm = rows.get("attn_fwd bf16 " + shape + " bm128")
            fb0 = rows.get("attn_fwd+bwd bf16 " + shape)
            fbv = rows.get("attn_fwd+bwd bf16 " + shape + (" bwd-v1" if d == 64 else " bwd-v4"))
            fdef = bm if (d == 128 or n >= 1024) and bm else base
            fwd = "%s (%s)" % (fdef[4], base[4]) if fdef and base else ""
            fb = fbv or fb0
            fbs = "%s (%s)" % (fb[4], fb0[4]) if fb and fb0 else ""
            ratio = "%.2fx" % (float(fb[4]) / t[1]) if fb else ""
            o.append("| %s | %s | %s | %d | %d | %d | %d | %s |" % (shape, fwd, fbs, t[0], t[1], t[2], t[3], ratio))
        o.append("")
        if any(n.endswith(" wgmma") for n in rows):
            o.append("The kernels on warpgroup MMAs (`FTUNE_ATTN_WGMMA`, the `attention_wgmma` rows; TFLOP/s):")
            o.append("")
            o.append("| shape | mma.sync fwd bm64 / bm128 | wgmma fwd bm64 / bm128 | fwd+bwd: wgmma fwd / both wgmma (bwd 1 / 2 warpgroups) | torch flash fwd / fwd+bwd | cuDNN fwd / fwd+bwd | best both-wgmma fwd+bwd vs flash |")
            o.append("|---|---|---|---|---|---|---|")
            for shape, t in tt_rows.items():
                cell = lambda name: rows[name][4] if name in rows else ""
                w1, w2 = cell("attn_fwd bf16 " + shape + " wgmma"), cell("attn_fwd bf16 " + shape + " wgmma bm128")
                p1, p2 = cell("attn_fwd bf16 " + shape + " wgmma-pipe"), cell("attn_fwd bf16 " + shape + " wgmma-pipe bm128")
                if p1 or p2:
                    w1, w2 = "%s (pipelined %s)" % (w1, p1), "%s (pipelined %s)" % (w2, p2)
                wb, wa = cell("attn_fwd+bwd bf16 " + shape + " wgmma"), cell("attn_fwd+bwd bf16 " + shape + " wgmma-all")
                wa2 = cell("attn_fwd+bwd bf16 " + shape + " wgmma-all wg2")
                wa = "%s / %s" % (wa, wa2) if wa2 else wa
                o.append("| %s | %s / %s | %s / %s | %s / %s | %d / %d | %d / %d | %s |" % (
                    shape, cell("attn_fwd bf16 " + shape), cell("attn_fwd bf16 " + shape + " bm128"), w1, w2,
                    wb, wa, t[0], t[1], t[2], t[3],
                    "%.2fx" % (max(float(x) for x in wa.split(" / ") if x) / t[1]) if wa else ""))
            o.append("")
    # LoRA.
    tl = dict(re.findall(r"\| (lora_linear [^|]+?|base GEMM [^|]+?) \| ([\d.]+) \|", tref))
    lr = [r for n, r in rows.items() if n.startswith("lora_linear")]
    if lr:
        o.append("## LoRA linear (bf16, 8192 tokens, r 16; 4096 -> 4096, and the 0.5B model's MLP shapes)")
        o.append("")
        o.append("Rows in parentheses are A/B runs of the other low-rank path (FTUNE_LORA_FUSED); their "
                 "in-binary reference is the default path.")
        o.append("")
        o.append("| case | ftune ms | in-binary reference ms (unfused) | PyTorch composition ms (autograd) | speed-up vs PyTorch |")
        o.append("|---|---|---|---|---|")
        for r in lr:
            tkey = r[0] if r[0] in tl else r[0].replace("lora_linear fwd ", "lora_linear fwd (no_grad) ")
            tkey = tkey if tkey in tl else None
            tv = float(tl[tkey]) if tkey else None
            o.append("| %s | %s | %s | %s | %s |" % (r[0], r[1], r[6], "%.4f" % tv if tv else "",
                                                    "%.2fx" % (tv / float(r[1])) if tv else ""))
        o.append("")
    # GEMM.
    g = [r for n, r in rows.items() if n.startswith("gemm")]
    if g:
        o.append("## GEMM (cuBLASLt, bf16 in, f32 accumulate)")
        o.append("")
        o.append("| shape | ftune ms | TFLOP/s | cuBLAS best ms | ratio | note |")
        o.append("|---|---|---|---|---|---|")
        for r in g:
            o.append("| %s | %s | %s | %s | %s | %s |" % (r[0], r[1], r[4], r[6], r[7], r[8]))
        o.append("")
    # Memory-bound kernels.
    mb = [r for n, r in rows.items() if not n.startswith(("gemm", "attn_fwd", "lora_linear"))]
    if mb:
        o.append("## Memory-bound kernels (GB/s against the measured copy bandwidth%s)" %
                 (", %s GB/s" % copy_bw.group(1) if copy_bw else ""))
        o.append("")
        o.append("Bytes are those that must move (each input read once, each output written once). Target:")
        o.append(">= 80% at large sizes, cross-entropy >= 70%.")
        o.append("")
        o.append("| kernel | ms | GB/s | % of copy | note |")
        o.append("|---|---|---|---|---|")
        for r in mb:
            o.append("| %s | %s | %s | %s | %s |" % (r[0], r[1], r[2], r[3], r[8]))
        o.append("")
    open(a.out, "w").write("\n".join(o) + "\n")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
