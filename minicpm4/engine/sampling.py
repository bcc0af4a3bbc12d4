"""Sampling parameters and the logits -> next-token rule (greedy, temperature, top-k, top-p, min-p, repetition).

The order matches Hugging Face's generate: repetition penalty, then temperature, top-k, top-p, min-p.
Every filter works on one row of fp32 logits [V]; the engine calls it per sequence so rows can use
different settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minicpm4.errors import InputError

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64 bits; signed ones are what every client can send


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 -> greedy (argmax)
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    min_p: float = 0.0  # 0 -> off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0  # 1 -> off; CTRL-style, over prompt and generated tokens
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None -> the model's eos ids
    ignore_eos: bool = False
    extra_stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None -> off; k -> the chosen token's log-probability and the top k (k <= 20)

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0),
            ("temperature", self.temperature >= 0),
            ("top_k", self.top_k >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("min_p", 0 <= self.min_p <= 1),
            ("repetition_penalty", self.repetition_penalty > 0),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20),
            ("seed", self.seed is None or 0 <= self.seed <= MAX_SEED),
        ]
        for name, ok in checks:
            if not ok:
                raise InputError(f"invalid sampling parameter {name}={getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits [V]; seen: 1-D ids. Positive logits are divided by the penalty, negative ones multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    ids = seen.unique()
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p on fp32 logits [V]; removed tokens get -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= p.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    if p.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor,
                 generator: torch.Generator | None) -> int:
    """One next token from fp32 logits [V]."""
    logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(logits.argmax())
    probs = filter_logits(logits, p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
