"""The engine on a thread of its own, fed by asyncio handlers: what the OpenAI server runs on.

One engine thread owns the Engine (which is not thread-safe) and loops: take new requests from a
thread-safe inbox, run engine.step() (continuous batching over every running request), and hand each
produced token to the asyncio queue of the request's stream. Handlers only validate and build requests
(Engine.make_request reads nothing mutable), put them in the inbox, and flag cancellations.

Admission control: at most `max_slots` requests run and `max_queue` more wait; past that submit() raises
QueueFull, which the server answers with 429. Metrics (queue length, running requests, tokens, time to
first token) are kept here and rendered in Prometheus text format.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from minicpm4.engine.engine import Engine, Generation, Request, StopFn
from minicpm4.engine.sampling import SamplingParams


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class Stream:
    """A submitted request as the handler sees it: `async for token in stream`, then `stream.generation`."""
    req: Request
    loop: asyncio.AbstractEventLoop
    tokens: asyncio.Queue = field(default_factory=asyncio.Queue)
    error: BaseException | None = None

    @property
    def generation(self) -> Generation:
        return self.req.out

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        token = await self.tokens.get()
        if token is None:
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        return token


@dataclass
class Metrics:
    requests: dict[str, int] = field(default_factory=dict)  # by finish reason
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the prefix cache served (not prefilled)
    generated_tokens: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0
    ttft_buckets: dict[float, int] = field(default_factory=lambda: dict.fromkeys((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), 0))
    rate: float = 0.0  # generated tokens per second over the last few seconds
    _window: list[tuple[float, int]] = field(default_factory=list)

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self._window = [(t, k) for t, k in self._window if now - t < 5.0] + [(now, n)]
        span = now - self._window[0][0]
        self.rate = sum(k for _, k in self._window) / span if span > 0.5 else 0.0

    def finished(self, g: Generation) -> None:
        reason = g.finish_reason or "error"
        self.requests[reason] = self.requests.get(reason, 0) + 1
        self.prompt_tokens += g.prompt_len
        self.cached_tokens += g.cached_tokens
        if g.token_ids:
            self.ttft_sum += g.prefill_s
            self.ttft_count += 1
            for b in self.ttft_buckets:
                self.ttft_buckets[b] += g.prefill_s <= b


class AsyncEngine:
    def __init__(self, engine: Engine, max_queue: int = 64):
        if getattr(engine, "_served_by", None) is not None:
            raise RuntimeError("this engine already runs under another AsyncEngine; give each server its own LLM")
        engine._served_by = self
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue[Stream] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[int, Stream] = {}
        self._outstanding = 0  # submitted and not yet finished
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="minicpm4-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def queued(self) -> int:
        return max(self._outstanding - self.engine.running, 0)

    def submit(self, prompt: list[int], params: SamplingParams, stop_fn: StopFn | None = None,
               generator: torch.Generator | None = None) -> Stream:
        """Queue a request from the event loop; InputError for a bad prompt, QueueFull past the limits.
        generator: sample from this stream instead of a fresh one seeded with params.seed (a continued sample)."""
        req = self.engine.make_request(prompt, params, stop_fn)
        if generator is not None:
            req.generator = generator
        with self._lock:
            if self._outstanding >= self.engine.max_slots + self.max_queue:
                raise QueueFull(f"{self._outstanding} requests are running or queued; try again later")
            self._outstanding += 1
        stream = Stream(req, asyncio.get_running_loop())
        self._inbox.put(stream)
        self._wake.set()
        return stream

    def cancel(self, stream: Stream) -> None:
        self.engine.cancel(stream.req)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine._served_by = None

    # ---- engine thread ----
    def _loop(self) -> None:
        while not self._stop:
            while not self._inbox.empty():
                s = self._inbox.get()
                self._streams[s.req.id] = s
                self.engine.enqueue(s.req)
            if not self.engine.has_work:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a bug, not bad input: fail the running requests, keep serving
                self._fail_all(e)
                continue
            for req, token in events:
                s = self._streams[req.id]
                s.loop.call_soon_threadsafe(s.tokens.put_nowait, token)
            if events:
                self.metrics.tokens(len(events))
            self._finish_done()

    def _finish_done(self) -> None:
        for rid, s in list(self._streams.items()):
            if s.req.finished:
                self._close(rid, s)

    def _close(self, rid: int, s: Stream) -> None:
        del self._streams[rid]
        with self._lock:
            self._outstanding -= 1
        self.metrics.finished(s.req.out)
        s.loop.call_soon_threadsafe(s.tokens.put_nowait, None)

    def _fail_all(self, e: Exception) -> None:
        self.engine.reset()
        for rid, s in list(self._streams.items()):
            s.error = RuntimeError(f"engine failure: {type(e).__name__}: {e}")
            self._close(rid, s)

    def _pool_lines(self) -> list[str]:
        pool = self.engine.prefix_cache
        if pool is None:
            return []
        return ["# TYPE minicpm4_prefix_cache_blocks gauge", f"minicpm4_prefix_cache_blocks {len(pool)}",
                "# TYPE minicpm4_prefix_cache_bytes gauge", f"minicpm4_prefix_cache_bytes {pool.nbytes}",
                "# TYPE minicpm4_prefix_cache_evicted_blocks_total counter",
                f"minicpm4_prefix_cache_evicted_blocks_total {pool.evicted}"]

    def prometheus(self) -> str:
        m = self.metrics
        lines = [
            "# TYPE minicpm4_queue_length gauge", f"minicpm4_queue_length {self.queued}",
            "# TYPE minicpm4_running_requests gauge", f"minicpm4_running_requests {self.running}",
            "# TYPE minicpm4_prompt_tokens_total counter", f"minicpm4_prompt_tokens_total {m.prompt_tokens}",
            "# TYPE minicpm4_prompt_cached_tokens_total counter", f"minicpm4_prompt_cached_tokens_total {m.cached_tokens}",
            # the share of finished requests' prompt tokens served from the prefix cache
            "# TYPE minicpm4_prefix_cache_hit_rate gauge",
            f"minicpm4_prefix_cache_hit_rate {m.cached_tokens / m.prompt_tokens if m.prompt_tokens else 0.0:.4f}",
            *self._pool_lines(),
            "# TYPE minicpm4_generated_tokens_total counter", f"minicpm4_generated_tokens_total {m.generated_tokens}",
            "# TYPE minicpm4_generation_tokens_per_second gauge", f"minicpm4_generation_tokens_per_second {m.rate:.3f}",
            "# TYPE minicpm4_requests_total counter",
            *(f'minicpm4_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(m.requests.items())),
            "# TYPE minicpm4_time_to_first_token_seconds histogram",
            *(f'minicpm4_time_to_first_token_seconds_bucket{{le="{b:g}"}} {n}' for b, n in m.ttft_buckets.items()),
            f'minicpm4_time_to_first_token_seconds_bucket{{le="+Inf"}} {m.ttft_count}',
            f"minicpm4_time_to_first_token_seconds_sum {m.ttft_sum:.6f}",
            f"minicpm4_time_to_first_token_seconds_count {m.ttft_count}",
        ]
        return "\n".join(lines) + "\n"
