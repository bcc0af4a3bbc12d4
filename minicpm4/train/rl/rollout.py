"""Chunk-wise rollout (MiniCPM4 technical report, p. 21, Algorithm 1) on a backend: the in-process Engine
(EngineBackend, the default) or OpenAI-compatible servers (remote.RemoteBackend); the bookkeeping below is the
same for both.

Every round, each active sample generates at most `chunk_tokens` new tokens:
- a sample that emits EOS (finish "stop"), or reaches `max_len` response tokens (finish "length": truncated,
  which overlong filtering drops from the loss), is finished; when all G samples of its prompt are finished the
  group goes out to training;
- an unfinished sample keeps its tokens and their log-probs, each token tagged with the policy version that
  sampled it, in the buffer, and resumes next round: prompt + generated tokens become the new prompt, which the
  engine prefills with the weights of that round, and its next chunk is sampled (and its log-probs reported) by
  the policy of that round. Buffered samples are queued before the round's new prompts.
Vanilla rollout is the same code with chunk_tokens = max_len: every sample finishes in its first round.

A training step's rollout (draw / end_step, what the objective and bench_rl run): Algorithm 1's round is one
training step, so chunk_tokens is each sample's budget per step. On the in-process engine (EngineBackend) the step
streams: the buffer's samples resume first, a new group is admitted whenever fewer than max_active samples are
unfinished (the engine's continuous batching gives each a slot as one frees), and a sample leaves the engine when
it finishes or has used its chunk_tokens for this step (then it waits in the buffer for the next step; only if
every unfinished sample has spent its budget before the batch is complete do they go on in the same step, with a
fresh budget: Algorithm 1 would train on fewer groups there, our loop trains fixed batches). A draw returns
once enough groups completed; the requests still running stay in the engine for the step's next draw. end_step()
cancels them: each keeps the tokens and log-probs it sampled (engine.cancel keeps them) and resumes next step,
re-prefilled once under the new weights. So no step waits for its longest sample, and a resumed sample is
re-prefilled once per step (when the weights have changed), not once per round. Vanilla (chunk_tokens >= max_len)
and servers (which cannot cut a request short and hand back its tokens) run whole rounds instead (refill_round;
so does settings.stream = False): a vanilla step waits for every sample it started.

Log-probs: the engine reports, per sampled token, log_softmax(logits)[token] of the model's raw logits (engine.py
_accept), the full-softmax log-probability at temperature 1. Rollout samples with temperature 1, top-p 1, no top-k,
min-p or repetition penalty (the paper's settings), so that IS the log-prob of the distribution actually sampled
from, and it is the per-chunk denominator of the importance ratio (loss.py). Other sampling settings would make the
stored log-probs wrong, so they are not offered.

Seeds: each sample owns a torch.Generator seeded from (settings.seed, its prompt key, its index in the group),
carried across chunks, so a chunk-wise rollout under an unchanged policy samples what the vanilla rollout samples,
and a sample's draws do not depend on which round or process rolls it out (under DDP, where process r takes
prompts r, r + world, ..., the samples are those of one process). A server cannot hold the
generator between requests; it is sent the seed (generator.initial_seed()) and the number of tokens already
sampled from it (len(tokens)), and our server replays that many draws first (serve/protocol.py), which is the
same stream.

Idle decode slots: in a round of n requests on an engine of S slots, each engine step offers min(n, S) slots; a slot
is busy in a step when its request gets a token in it (a request whose prefill ends gets its first token and then a
decode token in the same step: still one busy slot), so

    idle_share = 1 - busy slot-steps / (steps * min(n, S))

the share of slot-steps spent waiting (for prefill, or for the round's longest sample once the others are done).
When streaming, each engine step offers min(samples in flight, S) slots.
Only the in-process engine's steps are observable; rounds on servers report 0 steps and no idle share.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterator, Protocol, Sequence

import torch

from minicpm4.engine.engine import Engine, Request
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import InputError


@dataclass(frozen=True)
class RolloutSettings:
    group_size: int = 16  # G responses per prompt (the paper's production setting)
    chunk_tokens: int = 8192  # per round; = max_len for vanilla rollout (8k was the paper's best)
    max_len: int = 32768  # response tokens; a sample reaching it is truncated
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None  # None -> the model's eos ids
    stream: bool = True  # draw(): stream a step on the in-process engine (False: whole rounds, as on servers)

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.chunk_tokens < 1 or self.max_len < 1:
            raise InputError("group_size, chunk_tokens and max_len must be >= 1")

    @property
    def vanilla(self) -> bool:
        return self.chunk_tokens >= self.max_len


@dataclass(eq=False)
class Sample:
    key: Hashable  # the prompt's key; the G samples of a prompt share it
    index: int  # 0..G-1 within its group
    prompt: list[int]
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # generated so far
    logprobs: list[float] = field(default_factory=list)  # per token, under the policy that sampled it
    versions: list[int] = field(default_factory=list)  # per token, that policy's version
    finish_reason: str | None = None  # None: unfinished; "stop": EOS; "length": truncated at max_len

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def chunks(self) -> list[tuple[int, int, int]]:
        """(version, start, end) for each run of tokens sampled by one policy version."""
        out: list[tuple[int, int, int]] = []
        for i, v in enumerate(self.versions):
            if out and out[-1][0] == v and out[-1][2] == i:
                out[-1] = (v, out[-1][1], i + 1)
            else:
                out.append((v, i, i + 1))
        return out


@dataclass
class Group:
    key: Hashable
    prompt: list[int]
    samples: list[Sample]
    rewards: list[float] | None = None  # set by the caller's reward function


@dataclass
class RoundStats:
    version: int
    requests: int  # samples run this round (resumed + new)
    resumed: int  # of which came from the buffer
    steps: int  # engine steps
    tokens: int  # tokens sampled
    busy: int  # slot-steps that produced a token
    prefill_tokens: int  # prompt tokens prefilled (resumed samples re-prefill prompt + generated; streaming: those
    # the engine prefilled, so a request cut while it waited for a slot adds none)
    slots: int  # min(requests, engine.max_slots)
    wall_s: float
    finished: int  # samples finished this round
    buffered: int  # samples left unfinished after it
    offered: int = -1  # slot-steps offered (-1: steps * slots, a round's)

    def __post_init__(self) -> None:
        if self.offered < 0:
            self.offered = self.steps * self.slots

    @property
    def idle_share(self) -> float:
        return idle_share(self.busy, 1, self.offered)


def idle_share(busy: int, steps: int, slots: int) -> float:
    """1 - busy / (steps * slots): the share of decode slot-steps that produced no token."""
    return 1.0 - busy / (steps * slots) if steps and slots else 0.0


@dataclass
class Chunk:
    """What a backend returns for one sample's chunk."""
    token_ids: list[int]
    logprobs: list[float]  # per token: log_softmax of the raw logits of the policy that sampled it
    finish_reason: str  # "stop" (a stop token, kept as the last id), "length" (max_tokens reached), else cut short
    version: int | None = None  # the policy version the backend reports having sampled with (None: the round's)


@dataclass
class BackendRound:
    chunks: list[Chunk]  # one per job, in order
    steps: int = 0  # engine steps and busy slot-steps (0: not observable, as through a server)
    busy: int = 0


class RolloutBackend(Protocol):
    """Where chunks are sampled: EngineBackend (in process, the default) or remote.RemoteBackend (OpenAI-compatible
    servers). run() samples each job's chunk with temperature 1, top-p 1 and nothing else, continuing the sample's
    own random stream: `generator` (seeded with generator.initial_seed()) after `len(sample.tokens)` draws."""
    vocab_size: int
    max_len: int  # context: prompt + response tokens
    max_slots: int  # requests decoded at once (0: unknown)

    def run(self, jobs: Sequence[tuple[Sample, int]], stop_token_ids: list[int] | None) -> BackendRound: ...


class EngineBackend:
    """Chunks from an Engine in this process; the engine runs on the policy model object itself."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.vocab_size, self.max_len, self.max_slots = engine.config.vocab_size, engine.max_len, engine.max_slots

        self.live: dict[Request, tuple[Sample, int]] = {}  # submitted and not yet finished (streaming)
        self.prefilled = 0  # prompt tokens the engine prefilled for requests that left `live`

    def run(self, jobs, stop_token_ids) -> BackendRound:
        reqs = self.submit(jobs, stop_token_ids)
        steps, busy = 0, 0
        while self.live:
            busy += self.poll()[1]
            steps += 1
        return BackendRound([_chunk(r) for r in reqs], steps, busy)

    def submit(self, jobs: Sequence[tuple[Sample, int]], stop_token_ids: list[int] | None) -> list[Request]:
        """Queue each job (sample, at most n tokens) on the engine; they run from the next poll() on."""
        reqs = []
        for smp, n in jobs:
            params = SamplingParams(max_new_tokens=n, temperature=1.0, top_p=1.0, logprobs=0,
                                    stop_token_ids=stop_token_ids)
            req = self.engine.make_request(smp.prompt + smp.tokens, params)
            req.generator = smp.generator  # the sample's own stream, continued from its last chunk
            self.engine.enqueue(req)
            self.live[req] = (smp, n)
            reqs.append(req)
        return reqs

    def poll(self) -> tuple[list[tuple[Sample, int, Chunk]], int, int]:
        """One engine step: (the jobs that finished in it with their chunks, busy slots, offered slots)."""
        offered = min(len(self.live), self.max_slots)
        events = self.engine.step()
        ended = [r for r in self.live if r.finished]
        self.prefilled += sum(r.prefilled - r.out.cached_tokens for r in ended)
        done = [(*self.live.pop(r), _chunk(r)) for r in ended]
        return done, len({r.id for r, _ in events}), offered

    def halt(self) -> list[tuple[Sample, int, Chunk]]:
        """Cancel every job still running; each chunk holds the tokens (and log-probs) it sampled so far."""
        for r in self.live:
            self.engine.cancel(r)
        self.engine.step()  # releases the cancelled requests' slots (nothing else is queued)
        self.prefilled += sum(r.prefilled - r.out.cached_tokens for r in self.live)  # a waiting one: none
        out = [(*job, _chunk(r)) for r, job in self.live.items()]
        self.live.clear()
        return out


def _chunk(r: Request) -> Chunk:
    return Chunk(r.out.token_ids, [lp for lp, _ in r.out.logprobs], r.out.finish_reason)


def sample_seed(seed: int, key: Hashable, index: int) -> int:
    """A 63-bit seed from (seed, key, index), the same in every process (Python's hash() of a str is not)."""
    return int.from_bytes(hashlib.blake2b(repr((seed, key, index)).encode(), digest_size=8).digest(), "big") >> 1


class ChunkRollout:
    """Runs rounds on a backend (an Engine is wrapped in EngineBackend), keeping unfinished samples (buffer) and
    finished ones of incomplete groups."""

    def __init__(self, backend: RolloutBackend | Engine, settings: RolloutSettings):
        self.backend = EngineBackend(backend) if isinstance(backend, Engine) else backend
        self.s = settings
        self.buffer: list[Sample] = []
        self.finished: dict[Hashable, list[Sample]] = {}  # finished samples of groups not yet complete
        self.prompts: dict[Hashable, list[int]] = {}
        self.history: list[RoundStats] = []
        self._step: int | None = None  # the training step whose requests run on the engine (streaming)

    @property
    def active(self) -> int:
        """Samples in flight: unfinished ones in the buffer."""
        return len(self.buffer)

    def _check(self, prompts: Sequence[tuple[Hashable, Sequence[int]]]) -> None:
        """InputError for a prompt the round cannot take, before anything is queued or registered."""
        keys = [k for k, _ in prompts]
        vocab, context = self.backend.vocab_size, self.backend.max_len
        for key, prompt in prompts:
            if key in self.prompts or keys.count(key) > 1:
                raise InputError(f"prompt key {key!r} is already in flight")
            if not prompt or not all(0 <= int(t) < vocab for t in prompt):
                raise InputError(f"prompt {key!r} is empty or has a token id outside the vocabulary ({vocab})")
            if len(prompt) + self.s.max_len + 1 > context:
                raise InputError(f"prompt of {len(prompt)} tokens + max_len {self.s.max_len} does not fit the "
                                 f"engine's context of {context}")

    def _new_samples(self, key: Hashable, prompt: Sequence[int]) -> list[Sample]:
        prompt = [int(t) for t in prompt]
        self.prompts[key] = prompt
        out = []
        for i in range(self.s.group_size):
            gen = torch.Generator().manual_seed(sample_seed(self.s.seed, key, i))
            out.append(Sample(key, i, prompt, gen))
        return out

    def round(self, prompts: Sequence[tuple[Hashable, Sequence[int]]], version: int) -> list[Group]:
        """One round: the buffer's samples, then G new samples per (key, prompt ids), each for at most chunk_tokens
        tokens sampled by the backend's current weights (policy `version`, unless the backend reports the version it
        sampled with). Returns the groups completed. A bad prompt raises InputError before anything changes."""
        self._check(prompts)
        resumed = self.buffer
        todo = resumed + [smp for key, p in prompts for smp in self._new_samples(key, p)]
        self.buffer = []
        if not todo:
            return []
        jobs = [(smp, min(self.s.chunk_tokens, self.s.max_len - len(smp.tokens))) for smp in todo]
        stop = None if self.s.stop_token_ids is None else list(self.s.stop_token_ids)
        prefill = sum(len(smp.prompt) + len(smp.tokens) for smp in todo)  # resumed: prompt + generated again
        t0 = time.perf_counter()
        got = self.backend.run(jobs, stop)
        wall = time.perf_counter() - t0
        done = [smp for (smp, n), out in zip(jobs, got.chunks, strict=True) if self._apply(smp, n, out, version)]
        tokens = sum(len(c.token_ids) for c in got.chunks)
        self.history.append(RoundStats(version, len(todo), len(resumed), got.steps, tokens, got.busy, prefill,
                                       min(len(todo), self.backend.max_slots), wall, len(done), len(self.buffer)))
        return self._complete(done)

    def _apply(self, smp: Sample, n: int, out: Chunk, version: int, cut: bool = False) -> bool:
        """Append a chunk of at most n tokens to its sample; True if the sample finished, else it joins the buffer.
        cut: the chunk was cancelled by end_step (the sample is unfinished unless it reached max_len)."""
        if len(out.logprobs) != len(out.token_ids) or len(out.token_ids) > n:
            raise InputError(f"the rollout backend returned {len(out.token_ids)} tokens with "
                             f"{len(out.logprobs)} log-probs for a chunk of at most {n}")
        smp.tokens += out.token_ids
        smp.logprobs += out.logprobs
        smp.versions += [version if out.version is None else out.version] * len(out.token_ids)
        if out.finish_reason == "stop":
            smp.finish_reason = "stop"
        elif len(smp.tokens) >= self.s.max_len or (out.finish_reason != "length" and not cut):
            smp.finish_reason = "length"  # max_len, or (cancelled / context) treated as truncated
        if smp.finish_reason is None:
            self.buffer.append(smp)
            return False
        return True

    def _complete(self, done: list[Sample]) -> list[Group]:
        groups = []
        for smp in done:
            got = self.finished.setdefault(smp.key, [])
            got.append(smp)
            if len(got) == self.s.group_size:
                del self.finished[smp.key]
                groups.append(Group(smp.key, self.prompts.pop(smp.key), sorted(got, key=lambda x: x.index)))
        return groups

    def refill_round(self, prompt_source: Iterator[tuple[Hashable, Sequence[int]]], version: int,
                     max_active: int) -> list[Group]:
        """A round whose new prompts bring the unfinished samples up to max_active (whole groups of G: the decode
        slots a round fills), merged with the buffer as Algorithm 1 merges unfinished samples with new prompts."""
        free_groups = max(0, (max_active - self.active) // self.s.group_size)
        new = [p for _, p in zip(range(free_groups), prompt_source)]
        return self.round(new, version)

    def _jobs(self, samples: Sequence[Sample]) -> list[tuple[Sample, int]]:
        return [(smp, min(self.s.chunk_tokens, self.s.max_len - len(smp.tokens))) for smp in samples]

    @property
    def streaming(self) -> bool:
        """Whether draw() streams (chunk-wise on the in-process engine) rather than running whole rounds."""
        return isinstance(self.backend, EngineBackend) and not self.s.vanilla and self.s.stream

    def draw(self, prompt_source: Iterator[tuple[Hashable, Sequence[int]]], version: int, max_active: int,
             groups: int = 1) -> list[Group]:
        """Part of training step `version`'s rollout: the groups completed, at least `groups` of them unless the
        prompts ran out (streaming; see the module docstring), or one refill_round's (vanilla, or a server). Call
        end_step() when the step has its batch."""
        if not self.streaming:
            return self.refill_round(prompt_source, version, max_active)
        be, stop = self.backend, None if self.s.stop_token_ids is None else list(self.s.stop_token_ids)
        requests, resumed, prefilled0 = 0, 0, be.prefilled
        if self._step != version:  # the step's first draw: the buffer resumes first, once
            self._step, todo, self.buffer = version, self.buffer, []
            be.submit(self._jobs(todo), stop)
            requests, resumed = len(todo), sum(bool(x.tokens) for x in todo)
        got, steps, busy, offered, tokens, finished = [], 0, 0, 0, 0, 0
        t0 = time.perf_counter()
        while len(got) < groups:
            # a new group whenever fewer than max_active samples are unfinished (running, or parked in the buffer
            # with this step's budget spent): the engine queues what its slots cannot take yet
            while len(be.live) + len(self.buffer) < max_active:
                nxt = next(prompt_source, None)
                if nxt is None:
                    break
                self._check([nxt])
                new = self._new_samples(*nxt)
                be.submit(self._jobs(new), stop)
                requests += len(new)
            if not be.live and self.buffer:  # every unfinished sample spent its budget and the batch is not
                todo, self.buffer = self.buffer, []  # complete: they go on in this step, with a fresh budget
                be.submit(self._jobs(todo), stop)
                requests, resumed = requests + len(todo), resumed + len(todo)
            if not be.live:
                break
            done, b, o = be.poll()
            steps, busy, offered = steps + 1, busy + b, offered + o
            tokens += sum(len(c.token_ids) for _, _, c in done)
            ended = [smp for smp, n, c in done if self._apply(smp, n, c, version)]
            finished += len(ended)
            got += self._complete(ended)
        # prefill: tokens the engine prefilled for the requests that left it in this draw (end_step adds the rest)
        self.history.append(RoundStats(version, requests, resumed, steps, tokens, busy, be.prefilled - prefilled0,
                                       min(requests, be.max_slots), time.perf_counter() - t0, finished,
                                       len(self.buffer) + len(be.live), offered))
        return got

    def end_step(self) -> None:
        """Cancel the step's requests still running: their tokens so far join their samples, which wait in the
        buffer for the next step (a no-op for whole rounds)."""
        if self._step is None:
            return
        prefilled0 = self.backend.prefilled
        for smp, n, c in self.backend.halt():
            self._apply(smp, n, c, self._step, cut=True)  # unfinished: it would have left the engine otherwise
            if self.history:
                self.history[-1].tokens += len(c.token_ids)
        if self.history:
            self.history[-1].prefill_tokens += self.backend.prefilled - prefilled0
        self._step = None
