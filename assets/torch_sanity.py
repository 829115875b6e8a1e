#!/usr/bin/env python3
"""Checks with PyTorch (not ftune) that the assets' data is learnable and that LoRA fine-tuning
visibly helps: pretrains config.json's model from scratch on data/pretrain.jsonl for a wall-clock
budget, prints eval loss and greedy answers, LoRA-fine-tunes on data/instruct_train.jsonl (loss
on the assistant content and its <|im_end|> only), prints them again and the exact-match rate on
data/instruct_eval.jsonl. A design check for the data only; ftune's own recipes make the weights.

  pip install torch==2.15.0 transformers==5.24.0 peft==0.21.2
  python3 assets/torch_sanity.py --pretrain-s 420 --finetune-s 150 --threads 1
"""
import argparse
import json
import os
import random
import time

import peft
import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pretrain-s", type=float, default=420)
    ap.add_argument("--finetune-s", type=float, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = os.path.join(HERE, "tiny-llama")
    tok = transformers.AutoTokenizer.from_pretrained(d)
    model = transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(d))

    def jsonl(name, key):
        with open(os.path.join(HERE, "data", name), encoding="utf-8") as f:
            return [json.loads(line)[key] for line in f]

    stream = []
    for text in jsonl("pretrain.jsonl", "text"):
        stream += tok(text)["input_ids"] + [tok.pad_token_id]  # <|endoftext|> between documents
    T, B = 128, 16
    chunks = torch.tensor(stream[:len(stream) // T * T]).view(-1, T)
    train, evals = jsonl("instruct_train.jsonl", "messages"), jsonl("instruct_eval.jsonl", "messages")
    head = len(tok("<|im_start|>assistant\n")["input_ids"])

    def sft_batch(rows):
        ids, labels = [], []
        for msgs in rows:
            x, y = [], []
            for m in msgs:
                t = tok(tok.apply_chat_template([m], tokenize=False), add_special_tokens=False)
                t = t["input_ids"]
                x += t
                # Train on the assistant content and <|im_end|>, not the role header or the "\n".
                y += [-100] * head + t[head:-1] + [-100] if m["role"] == "assistant" else \
                    [-100] * len(t)
            ids.append(x)
            labels.append(y)
        n = max(map(len, ids))
        I = torch.zeros(len(ids), n, dtype=torch.long)
        Y = torch.full((len(ids), n), -100)
        M = torch.zeros(len(ids), n, dtype=torch.long)
        for i, (x, y) in enumerate(zip(ids, labels)):
            I[i, :len(x)], Y[i, :len(y)], M[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
        return I, Y, M

    def eval_loss():
        model.eval()
        tot = n = 0
        with torch.no_grad():
            for i in range(0, len(evals), 50):
                I, Y, M = sft_batch(evals[i:i + 50])
                k = (Y[:, 1:] != -100).sum().item()
                tot += model(input_ids=I, attention_mask=M, labels=Y).loss.item() * k
                n += k
        model.train()
        return tot / n

    def answer(msgs):
        text = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        p = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            o = model.generate(**p, max_new_tokens=24, do_sample=False, eos_token_id=[2, 0],
                               pad_token_id=0)
        return tok.decode(o[0, p["input_ids"].shape[1]:], skip_special_tokens=True)

    def report(tag):
        print(f"{tag}: eval loss {eval_loss():.3f}", flush=True)
        model.eval()
        for msgs in evals[:14]:
            print(f"  {msgs[-2]['content']!r} -> {answer(msgs)!r}")
        ok = sum(answer(m).strip() == m[-1]["content"] for m in evals)
        print(f"{tag}: exact match {ok}/{len(evals)}", flush=True)
        model.train()

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    t0, step = time.time(), 0
    while time.time() - t0 < args.pretrain_s:
        x = chunks[torch.randint(0, len(chunks), (B,), generator=g)]
        for pg in opt.param_groups:
            pg["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"pretrain step {step} loss {loss.item():.3f} tokens {step * B * T}", flush=True)
    report("base")

    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    rng = random.Random(0)
    t0, step = time.time(), 0
    while time.time() - t0 < args.finetune_s:
        I, Y, M = sft_batch(rng.sample(train, 16))
        loss = model(input_ids=I, attention_mask=M, labels=Y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"lora step {step} loss {loss.item():.3f}", flush=True)
    report("lora")


if __name__ == "__main__":
    main()
