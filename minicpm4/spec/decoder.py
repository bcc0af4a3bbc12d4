"""Speculative decoding, one sequence at a time: a draft proposes a tree of tokens, the target verifies it in one
forward pass, and the longest valid path (plus one token of the target's own) is committed.

A round, with m committed tokens whose last one the target has not read yet:
  1. tree = drafter.propose(ids)                       root = ids[-1]; EAGLE-2 tree or a chain
  2. logits, features = target.forward_masked(tree)    node i at position m-1+depth(i), cache slot m-1+i, seeing the
                                                       prefix, its ancestors and itself
  3. walk from the root: at each node decide the next token from the target's logits there (`next_token`); if it
     is one of the node's children, move there and repeat, else it is the round's last token
  4. KVCache.compact moves the accepted path's slots right after the prefix; the drafter gets the path's features
Greedy: the next token is the target's argmax, so the output is plain greedy decoding's. Sampling: each emitted
token is distributed exactly as the target's (filtered) distribution p given the tokens before it:
  - deterministic candidates (EAGLE-2 top-k, q = None): sample y ~ p and follow the child equal to y. No scheme
    can accept more often: a child c may only be taken when the emitted token is c, which happens with p(c).
  - a sampled chain (draft token c ~ q): accept c with probability min(1, p(c)/q(c)), else emit a sample of
    norm(max(p - q, 0)) (Leviathan et al. 2023); P(emit y) = min(p, q)(y) + (1 - sum min(p, q)) * residual(y) = p(y).
The continuous-batching engine is not used: this loop serves batch 1, with the engine's request checks and
stopping rules (eos ids, stop_fn, max_new_tokens, context length).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from minicpm4.engine.engine import Generation, Request, StopFn, build_request, per_prompt
from minicpm4.engine.sampling import SamplingParams, apply_repetition_penalty, filter_logits
from minicpm4.errors import ConfigError, InputError
from minicpm4.io.loader import load
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.model.kv_cache import KVCache, bucketed
from minicpm4.quant import kv8
from minicpm4.model.native_stack import attach
from minicpm4.spec.chain import ChainDrafter
from minicpm4.spec.eagle import is_draft_dir, load_draft
from minicpm4.spec.frspec import load_vocab
from minicpm4.spec.tree import DraftTree, EagleDrafter, causal_mask, tree_mask

PREFILL_CHUNK = 512


@dataclass
class SpecGeneration(Generation):
    accepted: list[int] = field(default_factory=list)  # tokens committed per target verification pass
    draft_s: float = 0.0  # time in drafter.propose (all rounds)
    verify_s: float = 0.0  # time in the target's verification passes (all rounds)

    @property
    def mean_accept_length(self) -> float:
        return sum(self.accepted) / len(self.accepted) if self.accepted else 0.0


def next_token(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor, children: list[int],
               child_tokens: list[int], q: torch.Tensor | None, generator: torch.Generator | None) -> tuple[int, int]:
    """The token after a tree node and the child it matches (-1: none, the path ends).

    logits [V] fp32 at the node; children / child_tokens: the node's children and their tokens; q [N, V]: the
    tree's proposal rows (None for deterministic candidates).
    """
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        token = int(logits.argmax())
    else:
        p = filter_logits(logits, params).softmax(-1)
        if q is not None and children:  # a sampled chain: one child
            c, tok = children[0], child_tokens[0]
            u = torch.rand((), generator=generator)
            if float(u) * float(q[c, tok]) < float(p[tok]):
                return tok, c
            residual = (p - q[c]).clamp_(min=0)
            p = residual / residual.sum() if float(residual.sum()) > 0 else p
        token = int(torch.multinomial(p, 1, generator=generator))
        if q is not None:
            return token, -1
    return token, next((c for c, t in zip(children, child_tokens) if t == token), -1)


class SpeculativeDecoder:
    """Same request contract as Engine.stream/generate (token ids in and out), batch 1, with a drafter
    (EagleDrafter or ChainDrafter)."""

    def __init__(self, model: MiniCPM4ForCausalLM, drafter, max_len: int | None = None, kv_cache_dtype: str = "auto"):
        if model.config.sparse_config is not None:
            raise ConfigError("speculative decoding verifies trees with an explicit mask, which the InfLLM v2 sparse "
                              "backend does not read; load the target with sparse attention off")
        self.model, self.drafter = model.eval(), drafter
        if hasattr(drafter, "check_vocab"):
            drafter.check_vocab(model.config.vocab_size)
        self.max_len = max_len or model.config.max_position_embeddings
        self._ids = itertools.count()
        self.dtype = next(model.parameters()).dtype
        self._cache: KVCache | None = None
        self.kv_cache_dtype = kv8.check_kv_dtype(kv_cache_dtype)  # the target's cache; compact() moves int8 scales too

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stop_fns: Sequence[StopFn | None] | None = None) -> list[SpecGeneration]:
        outs = []
        for prompt, p, fn in per_prompt(prompts, params, stop_fns):
            stream = self.stream(prompt, p, fn)
            while True:
                try:
                    next(stream)
                except StopIteration as end:
                    outs.append(end.value)
                    break
        return outs

    @torch.inference_mode()
    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None,
               stop_fn: StopFn | None = None) -> Iterator[int]:
        """Yield token ids as they are committed; the SpecGeneration is the iterator's return value."""
        req = build_request(next(self._ids), prompt, params, stop_fn, self.model.config, self.max_len)
        req.out = out = SpecGeneration(len(req.prompt))
        p = req.params
        if p.logprobs is not None:
            raise InputError("logprobs are not reported by speculative decoding")
        if p.max_new_tokens == 0:
            out.finish_reason = "length"
            return out
        t0 = time.perf_counter()
        cap = min(len(req.prompt) + p.max_new_tokens, self.max_len)
        self._ensure_cache(cap + self.drafter.extra_slots)
        self.drafter.begin(cap + self.drafter.extra_slots, self.dtype)
        logits, feats = self._prefill(req.prompt)
        ids = list(req.prompt)
        token, _ = next_token(logits, p, req.seen, [], [], None, req.generator)
        out.prefill_s = time.perf_counter() - t0
        yield from self._emit(req, ids, [token])
        self.drafter.commit(ids, 0, feats)
        t1 = time.perf_counter()
        while out.finish_reason is None:
            new, path, feats = self._round(req, ids)
            m = len(ids) - 1
            out.accepted.append(len(new))
            yield from self._emit(req, ids, new)
            out.decode_s = time.perf_counter() - t1
            if out.finish_reason is None:
                self._cache.compact(m, torch.tensor(path))
                self.drafter.commit(ids, m, feats)
        return out

    # ---- pieces ----
    def _ensure_cache(self, length: int) -> None:
        c = self._cache
        if c is None or c.max_len < length or c.dtype != self.dtype:
            self._cache = KVCache(self.model.config, 1, bucketed(length), self.dtype, kv_dtype=self.kv_cache_dtype)

    def _prefill(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the prompt in chunks; return the last position's logits [V] and every position's features [n, H]."""
        feats = []
        for s in range(0, len(prompt), PREFILL_CHUNK):
            chunk = prompt[s:s + PREFILL_CHUNK]
            t = len(chunk)
            logits, h = self.model.forward_masked(torch.tensor([chunk]), torch.arange(s, s + t)[None], self._cache,
                                                  s, causal_mask(t, s)[None], logits_to_keep=1)
            feats.append(h[0])
        return logits[0, -1], torch.cat(feats)

    def _round(self, req: Request, ids: list[int]) -> tuple[list[int], list[int], torch.Tensor]:
        """One draft + verify round: (tokens to commit, accepted node indices from the root, their features)."""
        m = len(ids) - 1
        t0 = time.perf_counter()
        tree: DraftTree = self.drafter.propose(ids, req.params, req.generator)
        t1 = time.perf_counter()
        room = self._cache.max_len - m
        if len(tree) > room:  # near the end of the context: verify only the nodes that fit (ancestors first)
            tree = DraftTree(tree.tokens[:room], tree.parents[:room], None if tree.q is None else tree.q[:room])
        positions = (m + tree.depths)[None]
        logits, h = self.model.forward_masked(tree.tokens[None], positions, self._cache, m, tree_mask(tree, m)[None])
        req.out.draft_s += t1 - t0
        req.out.verify_s += time.perf_counter() - t1
        path, new, node = [0], [], 0
        tokens = tree.tokens.tolist()
        seen = req.seen  # the penalty counts committed tokens and the path's accepted draft tokens
        while True:
            kids = tree.children(node)
            if req.params.repetition_penalty != 1.0:
                seen = torch.cat([req.seen, torch.tensor([tokens[i] for i in path[1:]], dtype=torch.long)])
            token, child = next_token(logits[0, node], req.params, seen, kids, [tokens[k] for k in kids],
                                      tree.q, req.generator)
            new.append(token)
            if child < 0:
                return new, path, h[0, path]
            path.append(child)
            node = child

    def _emit(self, req: Request, ids: list[int], tokens: list[int]) -> Iterator[int]:
        """Commit tokens one by one with the engine's stopping rules; tokens after a stop are dropped."""
        for token in tokens:
            ids.append(token)
            out = req.out
            out.token_ids.append(token)
            if req.params.repetition_penalty != 1.0:
                req.seen = torch.cat([req.seen, torch.tensor([token])])
            yield token
            if token in req.stop_ids or (req.stop_fn is not None and req.stop_fn(out.token_ids)):
                out.finish_reason = "stop"
            elif len(out.token_ids) >= req.params.max_new_tokens or len(ids) >= self.max_len:
                out.finish_reason = "length"
            if out.finish_reason is not None:
                return


SPEC_KEYS = {"topk", "num_iter", "tree_size", "gamma"}


def build_speculative(target: MiniCPM4ForCausalLM, draft: str, frspec: str | None = None,
                      options: dict | None = None, max_len: int | None = None,
                      kv_cache_dtype: str = "auto") -> SpeculativeDecoder:
    """A SpeculativeDecoder for `target` from a draft path: an EAGLE draft directory (tree drafting; options topk,
    num_iter, tree_size; an FR-Spec file restricts its head) or any model load() reads (chain drafting; gamma)."""

    options = dict(options or {})
    if unknown := set(options) - SPEC_KEYS:
        raise ConfigError(f"unknown speculative option(s) {sorted(unknown)} (known: {sorted(SPEC_KEYS)})")
    if is_draft_dir(draft):
        vocab = load_vocab(frspec, target.config.vocab_size) if frspec else None
        tree = {k: int(options[k]) for k in ("topk", "num_iter", "tree_size") if k in options}
        drafter = EagleDrafter(load_draft(draft, target, vocab).fuse(), **tree)
    else:
        if frspec:
            raise ConfigError(f"--frspec applies to EAGLE drafts; {draft} is a plain model (chain draft)")
        dtype = next(target.parameters()).dtype
        drafter = ChainDrafter(attach(load(draft, dtype=dtype)[0]), int(options.get("gamma", 4)))
    return SpeculativeDecoder(target, drafter, max_len=max_len, kv_cache_dtype=kv_cache_dtype)
