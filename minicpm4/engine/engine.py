"""Generation engine: token ids in, token ids out, with continuous batching. It knows nothing about text.

Requests come and go while others run (nano-vllm's add_request / step loop). Each request owns one slot
(row) of a preallocated KV cache. A step
  1. frees the slots of finished or cancelled requests and gives free slots to waiting requests; with a prefix
     cache (engine/prefix_cache.py), a new request's row gets the cached blocks its prompt starts with, and its
     prefill resumes after them;
  2. prefills up to `prefill_chunk` prompt tokens, chunk by chunk, request by request (a long prompt takes
     several steps, so running streams keep getting tokens meanwhile); a request whose prompt is complete
     samples its first token. A prompt's chunks depend on its tokens alone (chunk_ends): at most prefill_chunk
     tokens, ending right after a reply opening (the chat template's generation prompt) and before a boundary
     token (a control token) once long enough, so a conversation's next prompt reuses all of the last one;
  3. decodes one token for every running request in one batched forward. Rows sit at different positions;
     attention masks keys by position (see model/decoder.py), so a row never sees another row's or a stale key.
Stopping: eos ids, max_new_tokens, the context limit, and an optional per-request
`stop_fn(generated_ids) -> bool` that the text layer uses for stop strings.

generate() and stream() drive step() themselves; a server calls add_request() / cancel() and runs step()
in a loop of its own (one thread; the engine is not thread-safe).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterator, Sequence

import torch

from minicpm4.engine.prefix_cache import PrefixCache, chain_keys
from minicpm4.engine.sampling import SamplingParams, sample_token
from minicpm4.errors import InputError
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.engine.kv_budget import KVBudget, bytes_per_token
from minicpm4.engine.parked_rows import ParkedRows
from minicpm4.lazy_memory import available as lazy_memory
from minicpm4.model.kv_cache import KVCache, bucketed
from minicpm4.quant import kv8

StopFn = Callable[[list[int]], bool]


@dataclass
class Generation:
    prompt_len: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or stop_fn), "length" or "cancelled"
    prefill_s: float = 0.0  # from admission to the first token
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (not prefilled)
    decode_s: float = 0.0
    # with params.logprobs = k: per token, its log-probability under the model and the top-k (id, logprob)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    @property
    def decode_tok_per_s(self) -> float:
        # the first token comes out of prefill; the rest are decode steps
        return (len(self.token_ids) - 1) / self.decode_s if self.decode_s > 0 and len(self.token_ids) > 1 else 0.0


@dataclass(eq=False)
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: set[int]
    stop_fn: StopFn | None
    generator: torch.Generator | None
    out: Generation
    seen: torch.Tensor  # prompt + generated ids, for the repetition penalty
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    chunk_ends: list[int] = field(default_factory=list)  # where each prefill chunk ends (set on admission)
    chunks_done: int = 0
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of the chunks
    cancelled: bool = False
    _t0: float = 0.0

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    @property
    def decoding(self) -> bool:
        return self.slot >= 0 and self.prefilled == len(self.prompt) and not self.finished

    @property
    def length(self) -> int:  # tokens in the cache once the last sampled token is fed
        return self.out.prompt_len + len(self.out.token_ids) - 1


def per_prompt(prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None,
               stop_fns: Sequence[StopFn | None] | None) -> list[tuple]:
    """(prompt, SamplingParams, stop_fn) per prompt for a batch call: one params object shared, or one each."""
    if not prompts:
        raise InputError("no prompts given")
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    fns = list(stop_fns) if stop_fns is not None else [None] * len(prompts)
    if len(plist) != len(prompts) or len(fns) != len(prompts):
        raise InputError("need one SamplingParams and one stop_fn per prompt")
    return list(zip(prompts, plist, fns))


def build_request(req_id: int, prompt: Sequence[int], params: SamplingParams | None, stop_fn: StopFn | None,
                  config, max_len: int) -> Request:
    """A Request for `prompt` (token ids) checked against a model's vocabulary and a context of max_len tokens;
    InputError for an empty, out-of-vocabulary or too-long prompt. Shared by Engine and the speculative decoder."""
    p = params or SamplingParams()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise InputError("prompt is empty (0 tokens)")
    bad = [t for t in prompt if not 0 <= t < config.vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary (size {config.vocab_size})")
    if len(prompt) >= max_len:
        raise InputError(f"prompt of {len(prompt)} tokens does not fit the context of {max_len} tokens")
    stop_ids = set() if p.ignore_eos else set(p.stop_token_ids if p.stop_token_ids is not None
                                              else config.eos_token_ids)
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    return Request(req_id, prompt, p, stop_ids | set(p.extra_stop_token_ids), stop_fn, gen, Generation(len(prompt)),
                   torch.tensor(prompt))


class Engine:
    def __init__(self, model: MiniCPM4ForCausalLM, prefill_chunk: int = 512, max_len: int | None = None,
                 max_slots: int = 64, prefix_cache_gb: float = 0.0, boundary_ids: Collection[int] = (),
                 kv_cache_gb: float | None = None, reply_ids: Sequence[int] = (), kv_cache_dtype: str = "auto"):
        """prefix_cache_gb: memory for the prefix cache's blocks (one block = one prefill chunk's keys and
        values); 0 turns it off. boundary_ids: tokens a prefill chunk of at least prefill_chunk / 4 tokens
        stops before. reply_ids: the tokens that open a reply (a chat template's generation prompt); a chunk
        always ends right after them (see chunk_ends).
        kv_cache_gb: memory the running requests' keys and values may take at most (see kv_budget); None: 80%
        of the memory available at start (Linux), else no limit.
        kv_cache_dtype: "auto" (the model's dtype) or "int8" (model/kv_cache.py, quant/kv8.py)."""
        self.kv_cache_dtype = kv8.check_kv_dtype(kv_cache_dtype)
        self.model = model.eval()
        self.config = model.config
        self.prefill_chunk = prefill_chunk
        self.max_len = max_len or self.config.max_position_embeddings
        self.max_slots = max_slots  # requests holding a cache row at once; more wait in the queue
        self.dtype = next(model.parameters()).dtype
        self._cache: KVCache | None = None
        self._ids = itertools.count()
        self.waiting: deque[Request] = deque()
        self.slots: list[Request | None] = []
        self.boundary_ids = frozenset(boundary_ids)
        self.reply_ids = tuple(reply_ids)
        self.min_chunk = max(1, prefill_chunk // 4)
        self.prefix_cache = PrefixCache(int(prefix_cache_gb * 2**30)) if prefix_cache_gb > 0 else None
        self.kv_budget = KVBudget(self.config, self.dtype, kv_cache_gb, self.kv_cache_dtype)
        self.parked = ParkedRows()  # finished requests' rows kept for their next turn (engine/parked_rows.py)

    # ---- request API ----
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                    stop_fn: StopFn | None = None) -> Request:
        """Queue a prompt (token ids); raises InputError for an empty, out-of-vocabulary or too-long prompt."""
        req = self.make_request(prompt, params, stop_fn)
        self.enqueue(req)
        return req

    def make_request(self, prompt: Sequence[int], params: SamplingParams | None = None,
                     stop_fn: StopFn | None = None) -> Request:
        """Validate and build a request without touching the engine's state (safe from any thread)."""
        req = build_request(next(self._ids), prompt, params, stop_fn, self.config, self.max_len)
        self.kv_budget.check(self.reserve(req))
        return req

    def reserve(self, req: Request) -> int:
        """KV slots `req` may fill: its prompt and max_new_tokens, within the context."""
        return min(len(req.prompt) + req.params.max_new_tokens, self.max_len)

    def enqueue(self, req: Request) -> None:
        self.waiting.append(req)

    def cancel(self, req: Request) -> None:
        """Stop a request; its slot is freed at the next step and it finishes with reason "cancelled".
        Only sets a flag, so another thread may call it while step() runs."""
        req.cancelled = True

    def reset(self) -> None:
        """Drop every request and the cache (after a failed step, whose state cannot be trusted)."""
        self.waiting.clear()
        self.slots.clear()
        self._cache = None
        self.kv_budget.used = 0
        self.parked = ParkedRows()
        if self.prefix_cache is not None:  # blocks are stored only after their chunk's forward returned, but a
            self.prefix_cache.clear()      # failed step may have come from anywhere: trust nothing it touched

    def use_model(self, model: MiniCPM4ForCausalLM) -> None:
        """Run `model` from the next step on (no request may be running: rows hold the old model's keys);
        the prefix cache's blocks, the old model's keys too, are dropped."""
        self.model = model.eval()
        self.config, self.dtype = model.config, next(model.parameters()).dtype
        self.kv_budget.token_bytes = bytes_per_token(self.config, self.dtype, self.kv_cache_dtype)
        for slot in list(self.parked.rows):  # parked rows hold the old model's keys
            self._unpark(slot, release=True)
        if self.prefix_cache is not None:
            self.prefix_cache.clear()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.slots)

    # ---- batch helpers ----
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stop_fns: Sequence[StopFn | None] | None = None) -> list[Generation]:
        """Generate for a batch of prompts (lists of token ids) of any lengths; returns one Generation per prompt."""
        reqs = [self.add_request(*args) for args in per_prompt(prompts, params, stop_fns)]
        while not all(r.finished for r in reqs):
            self.step()
        return [r.out for r in reqs]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               stop_fn: StopFn | None = None) -> Iterator[int]:
        """Yield generated token ids one at a time; the Generation is the iterator's return value."""
        req = self.add_request(prompt, params, stop_fn)
        try:
            while not req.finished:
                for r, token in self.step():
                    if r is req:
                        yield token
        finally:  # a consumer that stops early cancels its request
            if not req.finished:
                self.cancel(req)
                self.step()
        return req.out

    # ---- the step ----
    @torch.inference_mode()
    def step(self) -> list[tuple[Request, int]]:
        """Admit, prefill, decode once. Returns the (request, token) pairs produced, in order."""
        self._release()
        self._admit()
        events = self._prefill()
        events += self._decode()
        self._release()
        return events

    def _release(self) -> None:
        for i, r in enumerate(self.slots):
            if r is not None and (r.finished or r.cancelled):
                if not r.finished:
                    r.out.finish_reason = "cancelled"
                self.slots[i] = None
                self.kv_budget.free(self.reserve(r))
                if self.prefix_cache is not None and r.chunks_done:  # the next turn may find its keys here
                    written = min(max(r.prefilled, r.length + 1), self.max_len)
                    self.parked.park(i, r.prompt, r.chunk_ends[:r.chunks_done], written)
                    self.kv_budget.take(written)
                else:
                    self._cache.release_row(i)  # its pages go back to the OS
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
        for r in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(r)
            r.out.finish_reason = "cancelled"

    def _unpark(self, slot: int, release: bool) -> None:
        p = self.parked.pop(slot)
        if p is not None:
            self.kv_budget.free(p.written)
            if release:
                self._cache.release_row(slot)

    def _admit(self) -> None:
        while self.waiting:
            free = [i for i in range(self.max_slots) if i >= len(self.slots) or self.slots[i] is None]
            if not free:
                return
            req = self.waiting[0]
            req.chunk_ends = req.chunk_ends or self.chunk_ends(req.prompt)
            slot, in_place = self.parked.pick(free, req.prompt, req.chunk_ends)
            need = self.reserve(req) - self.parked.written(slot)
            while not self.kv_budget.fits(need) and (old := self.parked.oldest(besides=slot)) is not None:
                self._unpark(old, release=True)
            if self.running and not self.kv_budget.fits(need):  # wait for running requests to end
                return
            self.waiting.popleft()
            self._unpark(slot, release=not in_place)
            self.kv_budget.take(self.reserve(req))
            self._ensure_cache(slot + 1, self.reserve(req))
            self.slots.extend([None] * (slot + 1 - len(self.slots)))
            self.slots[slot], req.slot, req._t0 = req, slot, time.perf_counter()
            if self.prefix_cache is not None:
                req.block_keys = chain_keys(req.prompt, req.chunk_ends)
                hit = self.prefix_cache.match(req.prompt, req.block_keys, req.chunk_ends, start=in_place)
                req.chunks_done = in_place + len(hit)
                req.prefilled = self.prefix_cache.load(hit, self._cache, slot) or (
                    req.chunk_ends[in_place - 1] if in_place else 0)
                req.out.cached_tokens = req.prefilled

    def chunk_ends(self, prompt: Sequence[int]) -> list[int]:
        """Where each prefill chunk of `prompt` ends. From the last end, a chunk runs to the first of: right after
        the reply opening (reply_ids), the prompt's end, prefill_chunk tokens, or, once it holds min_chunk
        tokens, a boundary token. Each end depends only on the tokens up to it, so two prompts sharing a prefix
        share its chunks up to where they part; the float rounding of a chunk's keys depends on the chunk, so
        this is what lets the prefix cache be exact (engine/prefix_cache.py).

        Chats: a prompt ends with the reply opening, and the next turn's prompt holds it at the same place, so
        the next turn reuses every chunk of this prompt and prefills the reply, the new message and the template
        around them, in one forward while they are under min_chunk tokens between boundaries (llama.cpp's
        cache_prompt evaluates the same tokens). A boundary ends a chunk of min_chunk or more tokens, e.g. a
        long system message: requests sharing it but not the rest reuse it too."""
        n, r = len(prompt), self.reply_ids
        hard = {n}
        if r:
            hard.update(i + len(r) for i, t in enumerate(prompt) if t == r[0] and tuple(prompt[i:i + len(r)]) == r)
        soft = {i for i, t in enumerate(prompt) if i > 0 and t in self.boundary_ids} if self.boundary_ids else set()
        ends, lo = [], 0
        for mark in sorted(hard | soft):
            while mark - lo > self.prefill_chunk:
                lo += self.prefill_chunk
                ends.append(lo)
            if mark > lo and (mark in hard or mark - lo >= self.min_chunk):
                ends.append(mark)
                lo = mark
        return ends

    def _ensure_cache(self, rows: int, length: int) -> None:
        """Make the cache hold `rows` rows of `length` slots.

        Zero-filled: masked slots of a shorter row may still be read by a batched matmul with weight 0, and
        0 * NaN from uninitialised memory would poison the output. Later writes only leave finite values.
        Where memory can be committed lazily (lazy_memory.py), the cache is made once for max_slots rows of
        max_len slots: it costs RAM only for the pages requests write, and a finished request's row gives its
        pages back (_release). Otherwise it grows, copying what it holds, rounded up (whole buckets of slots,
        rows in powers of two) so growth is rare.
        """
        c = self._cache
        same = c is not None and c.dtype == self.dtype and c.kv_dtype == self.kv_cache_dtype
        if same and c.batch_size >= rows and c.max_len >= length:
            return
        if lazy_memory():
            self._cache = KVCache(self.config, self.max_slots, bucketed(self.max_len), self.dtype,
                                  kv_dtype=self.kv_cache_dtype)
            return
        b = max(rows, c.batch_size if c is not None else 0)
        b = min(1 << (b - 1).bit_length(), self.max_slots)
        n = min(self.max_len, bucketed(max(length, c.max_len if c is not None else 0)))
        new = KVCache(self.config, b, n, self.dtype, kv_dtype=self.kv_cache_dtype)
        if same:
            for dst, src in zip(new.buffers(), c.buffers()):  # keys, values and (int8) their scales
                dst[:, :c.batch_size, :, :c.max_len] = src
        self._cache = new

    def _prefill(self) -> list[tuple[Request, int]]:
        """Up to prefill_chunk prompt tokens, oldest request first; first tokens for completed prompts.

        A prompt's chunks (chunk_ends) depend on its tokens alone, whatever else is prefilling: the step's budget
        decides only which chunks run now. So a request's prefill, and with it every token it
        generates, never depends on the requests beside it (batch invariance; greedy replies equal one-at-a-time).
        """
        events, budget = [], self.prefill_chunk
        for req in sorted((r for r in self.slots if r is not None and r.prefilled < len(r.prompt)),
                          key=lambda r: r.id):
            while req.prefilled < len(req.prompt):
                p0, p1 = req.prefilled, req.chunk_ends[req.chunks_done]
                if p1 - p0 > budget:  # next step; the step's first chunk always fits (<= prefill_chunk tokens)
                    return events
                logits = self.model(torch.tensor([req.prompt[p0:p1]]), positions=torch.arange(p0, p1)[None],
                                    cache=self._cache.rows(slice(req.slot, req.slot + 1)), logits_to_keep=1)
                if self.prefix_cache is not None:
                    self.prefix_cache.store(req.prompt, req.block_keys, req.chunk_ends, req.chunks_done, self._cache,
                                            req.slot)
                req.prefilled, req.chunks_done = p1, req.chunks_done + 1
                budget -= p1 - p0
            if req.params.max_new_tokens == 0:
                req.out.finish_reason = "length"
                continue
            token = sample_token(logits[0, -1], req.params, req.seen, req.generator)
            req.out.prefill_s = time.perf_counter() - req._t0
            self._accept(req, token, logits[0, -1])
            events.append((req, token))
        return events

    def _decode(self) -> list[tuple[Request, int]]:
        active = [r for r in self.slots if r is not None and r.decoding and r.out.token_ids and not r.cancelled]
        if not active:
            return []
        lo, hi = active[0].slot, active[-1].slot + 1
        t0 = time.perf_counter()
        # rows lo..hi-1 step together; a row in the range that is not decoding (free, or mid-prefill) is fed a
        # dummy token at a position its own later writes overwrite (its next prefill position; past a parked
        # row's data, or 0 for an empty one), and its output is ignored
        window = self.slots[lo:hi]
        ids = torch.tensor([[r.out.token_ids[-1] if r in active else 0] for r in window])
        pos = torch.tensor([[r.length if r in active else r.prefilled if r is not None
                             else min(self.parked.written(i), self.max_len - 1)] for i, r in enumerate(window, lo)])
        logits = self.model(ids, positions=pos, cache=self._cache.rows(slice(lo, hi)))[:, -1]  # [B, V]
        dt = time.perf_counter() - t0
        events = []
        for r in active:
            token = sample_token(logits[r.slot - lo], r.params, r.seen, r.generator)
            r.out.decode_s += dt
            self._accept(r, token, logits[r.slot - lo])
            events.append((r, token))
        return events

    def _accept(self, req: Request, token: int, logits: torch.Tensor) -> None:
        out = req.out
        out.token_ids.append(token)
        if req.params.logprobs is not None:  # of the model's distribution, before any sampling filter
            lp = logits.log_softmax(-1)
            top = lp.topk(req.params.logprobs) if req.params.logprobs else None
            out.logprobs.append((float(lp[token]), [] if top is None else
                                 list(zip(top.indices.tolist(), top.values.tolist()))))
        if req.params.repetition_penalty != 1.0:
            req.seen = torch.cat([req.seen, torch.tensor([token])])
        if token in req.stop_ids or (req.stop_fn is not None and req.stop_fn(out.token_ids)):
            out.finish_reason = "stop"
        elif len(out.token_ids) >= req.params.max_new_tokens or req.length + 1 >= self.max_len:
            out.finish_reason = "length"
