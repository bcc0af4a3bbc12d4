"""Prefix cache: the keys and values of finished prefill chunks, kept after their request ends and copied into
the cache row of any later request whose prompt starts with the same chunks (vLLM's automatic prefix caching,
llama.cpp's cache_prompt, SGLang's RadixAttention), so a chat turn or an agent step prefills only what is new.

Exactness decides what a block is. The float rounding of a token's keys depends on the chunk it was prefilled
in: a matmul over 512 rows does not round a row as one over 64 rows does (checked on the int4, bf16 and fp32
paths), nor as a decode step does. So a block is one whole prefill chunk, and the chunks of a prompt are a
function of its tokens alone (Engine.chunk_ends): a chunk runs from where the last one ended to right after the
chat template's reply opening (`<|im_start|>assistant\n`), the prompt's end, prefill_chunk tokens, or, once it
holds prefill_chunk / 4 tokens, a boundary token (a control token such as <|im_start|>), whichever comes first.
A request finds its prompt's chunks, in order, under their keys; those it finds are
copied, and it prefills the rest; every chunk it computes is then the chunk it computes without the cache, on
bit-identical keys, so it samples exactly the same tokens. Only prompt chunks are stored, never the keys of
generated tokens. In a chat the previous turn's prompt ends with the reply opening, which the next turn's prompt
holds at the same place, so it reuses all of the previous prompt and prefills the reply, the new message and the
template around them (what llama.cpp evaluates too), in one forward when they are short.

InfLLM v2's compressed keys (C1, C2) are not stored: loading blocks cuts the row's `covered` back to the first
block's start, so they are pooled again from the copied keys when next needed. Pooling is a per-kernel mean
(sparse/select.compress_keys), the same values whether pooled at once or chunk by chunk. With use_nope the pre-RoPE keys they are pooled from
are stored and copied like the keys.

Keys: chunk i of a prompt is keyed by a hash chain, H_i = blake2b(H_{i-1} || its tokens), so one key names the
whole prefix up to the chunk's end and how it was chunked; a lookup also compares the tokens, so a hash
collision cannot serve a wrong block. Memory: least recently used blocks are evicted past `budget_bytes`, leaves
first: a use touches a chain from its last block to its first, so a block is always more recent than its
descendants and eviction never strands a chain's tail behind an evicted head. Blocks are copied into a request's
own row on admission (the engine's thread, between steps), so a running request never reads a pool block and
eviction can never pull one from under it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from minicpm4.model.kv_cache import KVCache


@dataclass(eq=False)
class Block:
    start: int  # the chunk's first position
    tokens: tuple[int, ...]
    parent: bytes  # the key of the block before it (b"" for the first)
    kv: tuple[torch.Tensor, ...]  # the chunk's slots of KVCache.buffers(): k, v [layers, kv_heads, len(tokens),
    # head_dim] and, for an int8 cache, their scales [layers, kv_heads, len(tokens)]
    k_nope: torch.Tensor | None  # pre-RoPE keys (sparse use_nope), same shape as k, else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.kv, self.k_nope) if t is not None)


def chain_keys(prompt: Sequence[int], ends: list[int]) -> list[bytes]:
    """The hash-chain key of each prefill chunk of `prompt` (chunk i: [ends[i-1], ends[i]), ends[-1] = 0)."""
    ids = np.asarray(prompt, dtype=np.int64)
    keys, prev, lo = [], b"", 0
    for hi in ends:
        prev = hashlib.blake2b(prev + ids[lo:hi].tobytes(), digest_size=16).digest()
        keys.append(prev)
        lo = hi
    return keys


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.blocks: OrderedDict[bytes, Block] = OrderedDict()  # least recently used first
        self.nbytes = 0
        self.evicted = 0  # blocks dropped for the budget, since the start

    def __len__(self) -> int:
        return len(self.blocks)

    def clear(self) -> None:
        """Forget every block (new weights: the stored keys belong to the old ones)."""
        self.blocks.clear()
        self.nbytes = 0

    def match(self, prompt: Sequence[int], keys: list[bytes], ends: list[int], start: int = 0) -> list[Block]:
        """The cached blocks of the prompt's chunks from chunk `start` on (ends: their ends, keys: chain_keys), as
        many in a row as are cached, never the last chunk: its logits give the first sampled token."""
        found = []
        parent, lo = (keys[start - 1], ends[start - 1]) if start else (b"", 0)
        for key, hi in zip(keys[start:-1], ends[start:-1]):
            blk = self.blocks.get(key)
            if blk is None or blk.parent != parent or blk.start != lo or blk.tokens != tuple(prompt[lo:hi]):
                break
            found.append(blk)
            parent, lo = key, hi
        self._touch(keys[:start + len(found)])
        return found

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain's blocks used, its first block last (most recent): see the module docstring."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def load(self, blocks: list[Block], cache: KVCache, row: int) -> int:
        """Copy `blocks` (a prompt's first chunks, from match) into their slots of cache row `row`; returns the
        tokens loaded."""
        comp = cache.compressed
        if comp is not None and blocks:  # C1/C2 of this row past the first block's start: pool them again
            comp.covered[:, row].clamp_(max=blocks[0].start)
        for blk in blocks:
            sl = slice(blk.start, blk.start + len(blk.tokens))
            for dst, src in zip(cache.buffers(), blk.kv):
                dst[:, row, :, sl] = src
            if blk.k_nope is not None and comp is not None and comp.k_nope is not None:
                comp.k_nope[:, row, :, sl] = blk.k_nope
        return blocks[-1].start + len(blocks[-1].tokens) if blocks else 0

    def store(self, prompt: Sequence[int], keys: list[bytes], ends: list[int], index: int, cache: KVCache,
              row: int) -> None:
        """Keep chunk `index` of `prompt`, just prefilled into cache row `row` (slots [ends[index-1], ends[index]))."""
        key = keys[index]
        if key in self.blocks:
            self._touch(keys[:index + 1])
            return
        if index and keys[index - 1] not in self.blocks:  # its parent was evicted: no lookup could reach it
            return
        lo, hi = ends[index - 1] if index else 0, ends[index]
        comp = cache.compressed
        nope = comp.k_nope[:, row, :, lo:hi].clone() if comp is not None and comp.k_nope is not None else None
        blk = Block(lo, tuple(prompt[lo:hi]), keys[index - 1] if index else b"",
                    tuple(b[:, row, :, lo:hi].clone() for b in cache.buffers()), nope)
        if blk.nbytes > self.budget_bytes:
            return
        self.blocks[key] = blk
        self.nbytes += blk.nbytes
        self._touch(keys[:index])
        while self.nbytes > self.budget_bytes:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evicted += 1
