#!/usr/bin/env python3
"""Trains the embedded default's tokenizer (assets/tiny-llama/tokenizer*.json) on assets/data/.

A byte-level BPE in the Qwen2 layout: NFC normalizer; pre-tokenizer = Qwen2's split regex
(single digits, so arithmetic sees one token per digit) then ByteLevel without a prefix space;
ByteLevel decoder and post-processor. Special tokens <|endoftext|> (id 0, also the pad),
<|im_start|> (1), <|im_end|> (2, the eos); no bos, as in Qwen2. The chat template is ChatML
without a default system prompt (shorter examples for a tiny model); ftune detects it as
"chatml".

Generation side only (ftune never needs `tokenizers` at run time). Pinned in
assets/requirements.txt. Deterministic: the BPE trainer breaks ties by pair order, so the same
corpus gives the same tokenizer.json byte for byte (checked by running twice).

  pip install -r assets/requirements.txt
  python3 assets/make_data.py && python3 assets/make_tokenizer.py
"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers import processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
OUT = os.path.join(HERE, "tiny-llama")
# An upper bound including the 3 special tokens: the trainer stops earlier (at 1746) once every
# pre-token that occurs twice is one token; config.json's vocab_size is the actual size.
VOCAB_SIZE = 2048
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
             r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                 "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def render_chatml(messages):
    # What CHAT_TEMPLATE renders; the role lines and newlines get merges like the contents do.
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def corpus():
    with open(os.path.join(DATA, "pretrain.jsonl"), encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
    for name in ("instruct_train.jsonl", "instruct_eval.jsonl"):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            for line in f:
                yield render_chatml(json.loads(line)["messages"])


def build():
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PAT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                               use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def write_json(name, obj):
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def write_model_config(vocab_size):
    # The tiny Llama (no weights here: ftune's recipes/pretrain_tiny.yaml makes them). vocab_size
    # is exactly the tokenizer's, so every row of the tied embedding is a real token.
    hidden, layers, heads, kv_heads, inter = 192, 4, 4, 2, 512
    write_json("config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads, "hidden_act": "silu",
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-05, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "initializer_range": 0.02, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0, "use_cache": True,
        "torch_dtype": "float32",
    })
    # Generation stops at <|im_end|> (end of a chat turn) or <|endoftext|> (end of a document).
    write_json("generation_config.json", {"bos_token_id": 0, "eos_token_id": [2, 0],
                                          "pad_token_id": 0, "do_sample": False,
                                          "max_new_tokens": 64})
    kv = hidden // heads * kv_heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
    n = vocab_size * hidden + layers * per_layer + hidden
    print(f"config: {n} parameters (tied embedding {vocab_size * hidden})")


def main():
    os.makedirs(OUT, exist_ok=True)
    tok = build()
    assert [tok.token_to_id(s) for s in SPECIALS] == [0, 1, 2]
    tok.save(os.path.join(OUT, "tokenizer.json"), pretty=True)
    added = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                       "rstrip": False, "single_word": False, "special": True}
             for s in SPECIALS}
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "bos_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 512,
        "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": None,
    }
    with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    special_map = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    write_json("special_tokens_map.json", special_map)

    write_model_config(tok.get_vocab_size())

    n_tok = n_chars = 0
    with open(os.path.join(DATA, "pretrain.jsonl"), encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        n_tok += len(enc.ids)
    n_chars = sum(len(t) for t in texts)
    print(f"vocab {tok.get_vocab_size()}; pretrain {n_tok} tokens, {n_chars / n_tok:.2f} chars/token")
    for name in ("instruct_train.jsonl", "instruct_eval.jsonl"):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            rows = [render_chatml(json.loads(line)["messages"]) for line in f]
        lens = [len(e.ids) for e in tok.encode_batch(rows, add_special_tokens=False)]
        print(f"{name}: {sum(lens)} tokens, mean {sum(lens) / len(lens):.1f}, max {max(lens)} "
              f"per rendered example")


if __name__ == "__main__":
    main()
