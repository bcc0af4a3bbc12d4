"""Generation engine: token ids in, token ids out. It knows nothing about text or chat templates.

A call prefills each prompt in chunks into its own row of a preallocated KV cache (no padding tokens are
ever computed), then decodes all unfinished rows together, one token per row per step. Rows at different
lengths are handled by position-based masking (see kv_cache.py). Stopping: eos ids, max_new_tokens, the
context limit, and an optional per-request `stop_fn(generated_ids) -> bool` that the text layer uses for
stop strings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from minicpm4.errors import InputError
from minicpm4.kv_cache import KVCache, bucketed
from minicpm4.model import MiniCPM4ForCausalLM
from minicpm4.sampling import SamplingParams, sample_token

StopFn = Callable[[list[int]], bool]


@dataclass
class Generation:
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or stop_fn) or "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_per_s(self) -> float:
        # the first token comes out of prefill; the rest are decode steps
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    stop_fn: StopFn | None
    generator: torch.Generator | None
    out: Generation
    seen: torch.Tensor  # prompt + generated ids, for the repetition penalty

    @property
    def length(self) -> int:  # tokens in the cache
        return self.out.prompt_len + len(self.out.token_ids) - 1


class Engine:
    def __init__(self, model: MiniCPM4ForCausalLM, prefill_chunk: int = 512, max_len: int | None = None):
        self.model = model.eval()
        self.config = model.config
        self.prefill_chunk = prefill_chunk
        self.max_len = max_len or self.config.max_position_embeddings
        self.dtype = next(model.parameters()).dtype
        self._cache: KVCache | None = None

    # ---- public API ----
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stop_fns: Sequence[StopFn | None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (lists of token ids) of any lengths; returns one Generation per prompt."""
        rows = self._rows(prompts, params, stop_fns)
        for _ in self._run(rows):
            pass
        return [r.out for r in rows]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               stop_fn: StopFn | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time; the Generation is the iterator's return value."""
        rows = self._rows([prompt], params, [stop_fn])
        for _, token in self._run(rows):
            yield token
        return rows[0].out

    # ---- internals ----
    def _rows(self, prompts, params, stop_fns) -> list[_Row]:
        if not prompts:
            raise InputError("no prompts given")
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        fns = list(stop_fns) if stop_fns is not None else [None] * len(prompts)
        if len(plist) != len(prompts) or len(fns) != len(prompts):
            raise InputError("need one SamplingParams and one stop_fn per prompt")
        rows = []
        for prompt, p, fn in zip(prompts, plist, fns):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise InputError("prompt is empty (0 tokens)")
            bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
            if bad:
                raise InputError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
            if len(prompt) >= self.max_len:
                raise InputError(f"prompt of {len(prompt)} tokens does not fit the context of {self.max_len} tokens")
            stop_ids = set() if p.ignore_eos else set(p.stop_token_ids if p.stop_token_ids is not None
                                                      else self.config.eos_token_ids)
            gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            rows.append(_Row(prompt, p, stop_ids | set(p.extra_stop_token_ids), fn, gen,
                             Generation(len(prompt)), torch.tensor(prompt)))
        return rows

    def _cache_for(self, batch: int, length: int) -> KVCache:
        """Reuse one preallocated cache while it is big enough.

        Zero-filled once: masked slots of a shorter row may still be read by the batched matmul with weight 0,
        and 0 * NaN from uninitialised memory would poison the output. Later calls only leave finite values.
        """
        c = self._cache
        if c is None or c.batch_size < batch or c.max_len < length or c.k.dtype != self.dtype:
            # whole buckets of slots, so that later requests of similar lengths reuse this buffer
            self._cache = c = KVCache(self.config, batch, min(self.max_len, bucketed(length)), self.dtype)
        return c

    def _accept(self, row: _Row, token: int) -> None:
        out = row.out
        out.token_ids.append(token)
        if row.params.repetition_penalty != 1.0:
            row.seen = torch.cat([row.seen, torch.tensor([token])])
        if token in row.stop_ids or (row.stop_fn is not None and row.stop_fn(out.token_ids)):
            out.finish_reason = "stop"
        elif len(out.token_ids) >= row.params.max_new_tokens or row.length + 1 >= self.max_len:
            out.finish_reason = "length"

    @torch.inference_mode()
    def _run(self, rows: list[_Row]) -> Iterator[tuple[int, int]]:
        need = max(len(r.prompt) + r.params.max_new_tokens for r in rows)
        cache = self._cache_for(len(rows), min(need, self.max_len))
        for i, row in enumerate(rows):
            t0 = time.perf_counter()
            logits = self._prefill(row.prompt, cache.rows(slice(i, i + 1)))
            if row.params.max_new_tokens == 0:
                row.out.finish_reason = "length"
                continue
            token = sample_token(logits, row.params, row.seen, row.generator)
            row.out.prefill_s = time.perf_counter() - t0
            self._accept(row, token)
            yield i, token
        while True:
            active = [i for i, r in enumerate(rows) if r.out.finish_reason is None]
            if not active:
                return
            lo, hi = active[0], active[-1] + 1
            t0 = time.perf_counter()
            # rows lo..hi-1 step together; a finished row inside the range keeps feeding its last token at one
            # fixed position past its sequence (so it writes only that slot) and its output is ignored.
            window = rows[lo:hi]
            ids = torch.tensor([[r.out.token_ids[-1]] for r in window])
            pos = torch.tensor([[r.length] for r in window])
            logits = self.model(ids, positions=pos, cache=cache.rows(slice(lo, hi)))[:, -1]  # [B, V]
            dt = time.perf_counter() - t0
            for i in active:
                row = rows[i]
                token = sample_token(logits[i - lo], row.params, row.seen, row.generator)
                row.out.decode_s += dt
                self._accept(row, token)
                yield i, token

    def _prefill(self, prompt: list[int], cache: KVCache) -> torch.Tensor:
        """Run the prompt through the model in chunks; return fp32 logits [V] of its last token."""
        ids = torch.tensor(prompt)[None]
        logits = None
        for p0 in range(0, len(prompt), self.prefill_chunk):
            chunk = ids[:, p0:p0 + self.prefill_chunk]
            pos = torch.arange(p0, p0 + chunk.shape[1])[None]
            logits = self.model(chunk, positions=pos, cache=cache, logits_to_keep=1)
        return logits[0, -1]
