"""Chain drafting with a smaller model of the same vocabulary (or the target itself, which accepts everything).

The draft model reads the committed tokens with its own KV cache (slot = position, as in the engine), then
proposes `gamma` tokens one at a time: the argmax under greedy parameters, else a sample from its own filtered
distribution q (recorded in the tree so that verification can run rejection sampling against the target's p).
The proposal is a DraftTree whose nodes form one path. Drafted tokens that the target accepts are already in
the draft's cache at the right slots; `cached` mirrors which token each slot holds, so the next round re-reads
only from the first slot that disagrees with the committed tokens.
"""

from __future__ import annotations

import torch

from minicpm4.engine.sampling import SamplingParams, filter_logits
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache
from minicpm4.spec.tree import DraftTree


class ChainDrafter:
    def __init__(self, model: MiniCPM4ForCausalLM, gamma: int = 4):
        if gamma < 1:
            raise ConfigError(f"chain draft needs gamma >= 1 tokens per round, got {gamma}")
        self.model, self.gamma = model.eval(), gamma
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # the token in each cache slot, from slot 0

    @property
    def extra_slots(self) -> int:
        return self.gamma + 1

    def check_vocab(self, vocab_size: int) -> None:
        if self.model.config.vocab_size != vocab_size:
            raise ConfigError(f"chain draft vocabulary ({self.model.config.vocab_size}) differs from the target's "
                              f"({vocab_size}); the draft must share the target's tokenizer")

    def begin(self, max_len: int, dtype: torch.dtype) -> None:
        need = max_len + self.gamma + 1
        wdtype = next(self.model.parameters()).dtype
        if self.cache is None or self.cache.max_len < need:
            self.cache = KVCache(self.model.config, 1, need, wdtype)
        self.cached = []

    def commit(self, ids: list[int], start: int, features: torch.Tensor) -> None:
        """Nothing to do until the next proposal: the draft reads committed tokens itself (features unused)."""

    @torch.inference_mode()
    def propose(self, ids: list[int], params: SamplingParams, generator: torch.Generator | None) -> DraftTree:
        valid = next((i for i, (a, b) in enumerate(zip(self.cached, ids)) if a != b), min(len(self.cached), len(ids)))
        del self.cached[valid:]
        feed = ids[valid:]
        tokens, qs = [ids[-1]], [None]
        for _ in range(self.gamma):
            pos = torch.arange(len(self.cached), len(self.cached) + len(feed))[None]
            logits = self.model(torch.tensor([feed]), positions=pos, cache=self.cache, logits_to_keep=1)[0, -1]
            self.cached += feed
            if params.greedy:
                token, q = int(logits.argmax()), None
            else:
                q = filter_logits(logits, params).softmax(-1)
                token = int(torch.multinomial(q, 1, generator=generator))
            tokens.append(token)
            qs.append(q)
            feed = [token]
        q = None if params.greedy else torch.stack([qs[1]] + qs[1:])  # row 0 (the root) is never read
        return DraftTree(torch.tensor(tokens), list(range(-1, self.gamma)), q)
