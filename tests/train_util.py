"""Helpers for the training tests: a small byte-level BPE tokenizer trained on real text (a vocabulary of a few
hundred keeps the tiny models' softmax cheap), token shards made from that text, and a tiny TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.shard_writer import tokenize_to_shards
from minicpm4.train.train_config import TrainConfig

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "dim_model_base": 16, "max_position_embeddings": 512}


def small_tokenizer(text: str, vocab_size: int = 400) -> Tokenizer:
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([text], trainer)
    return Tokenizer(backend, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True})


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]


def make_shards(tmp: Path, text: str, tokenizer: Tokenizer) -> Path:
    """Half the paragraphs as a .txt file, the other half as JSONL documents; returns the shard directory."""
    paras = paragraphs(text)
    half = len(paras) // 2
    (tmp / "a.txt").write_text("\n\n".join(paras[:half]))
    (tmp / "b.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[half:]))
    return tokenize_to_shards([str(tmp / "a.txt"), str(tmp / "b.jsonl")], tokenizer, tmp / "shards").parent


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out_dir=str(out), model="tiny", model_overrides=dict(TINY_MODEL), seq_len=32,
                batch_size=4, micro_batch_size=2, steps=10, warmup_steps=2, decay_steps=3, lr=1e-2, dtype="fp32",
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def bench_items(text: str, n: int = 12) -> list[dict]:
    """ScalingBench-style items from real paragraphs: 8 words of question, the next 8 as the answer, and the
    answers of the two following items as the other choices (the answer is choice 1)."""
    pairs = [(" ".join(p.split()[:8]), " ".join(p.split()[8:16])) for p in paragraphs(text)[:n]]
    answers = [a for _, a in pairs]
    return [{"question": q, "answer": a, "label": 1,
             "choices": [answers[(i + 1) % n], a, answers[(i + 2) % n]]} for i, (q, a) in enumerate(pairs)]
