"""Prefix cache: the keys and values of finished prefill chunks, kept after their request ends and copied into
the cache row of any later request whose prompt starts with the same tokens (vLLM's automatic prefix caching,
llama.cpp's cache_prompt, SGLang's RadixAttention), so a chat turn or an agent step prefills only what is new.

Exactness decides the block size. The engine prefills a prompt in chunks at fixed offsets [0, c), [c, 2c), ...
(c = prefill_chunk), and the float rounding of a token's keys depends on the chunk it was computed in: a matmul
over 512 rows does not round a row as one over 64 rows does (checked on the int4, bf16 and fp32 paths). So a
block is one whole prefill chunk, stored right after its forward returns, and a request that reuses n blocks
resumes prefill at chunk n: every chunk it computes is the chunk it would have computed without the cache, on
bit-identical keys, so it samples exactly the same tokens. For the same reason only prompt chunks are stored,
never the keys of generated tokens (a decode step computes one row at a time); the next chat turn reuses the
previous prompt's whole chunks and prefills the rest of it, the reply and the new message.

InfLLM v2's compressed keys (C1, C2) are not stored: loading blocks resets the row's `covered` to 0, so they are
pooled again from the copied keys when next needed. Pooling is a per-kernel mean (sparse/select.compress_keys),
the same values whether pooled at once or chunk by chunk. With use_nope the pre-RoPE keys they are pooled from
are stored and copied like the keys.

Keys: block i of a prompt is keyed by a hash chain, H_i = blake2b(H_{i-1} || tokens of block i), so one key
names the whole prefix up to the block's end; a lookup also compares the tokens, so a hash collision cannot
serve a wrong block. Memory: least recently used blocks are evicted past `budget_bytes`, leaves first: a use
touches a chain from its last block to its first, so a block is always more recent than its descendants and
eviction never strands a chain's tail behind an evicted head. Blocks are copied
into a request's own row on admission (the engine's thread, between steps), so a running request never reads
a pool block and eviction can never pull one from under it.
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
    tokens: tuple[int, ...]
    parent: bytes  # the key of the block before it (b"" for the first)
    k: torch.Tensor  # [layers, kv_heads, block_size, head_dim]
    v: torch.Tensor
    k_nope: torch.Tensor | None  # pre-RoPE keys (sparse use_nope), same shape, else None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.k_nope) if t is not None)


def chain_keys(prompt: Sequence[int], block_size: int) -> list[bytes]:
    """The hash-chain key of each whole block of `prompt`."""
    ids = np.asarray(prompt, dtype=np.int64)
    keys, prev = [], b""
    for i in range(len(ids) // block_size):
        prev = hashlib.blake2b(prev + ids[i * block_size:(i + 1) * block_size].tobytes(), digest_size=16).digest()
        keys.append(prev)
    return keys


class PrefixCache:
    def __init__(self, block_size: int, budget_bytes: int):
        self.block_size = block_size
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

    def match(self, prompt: Sequence[int], keys: list[bytes]) -> list[Block]:
        """The longest run of cached blocks that `prompt` starts with, leaving at least one prompt token to
        prefill (its logits give the first sampled token). keys: chain_keys(prompt)."""
        found, parent = [], b""
        b = self.block_size
        for i, key in enumerate(keys[:(len(prompt) - 1) // b]):
            blk = self.blocks.get(key)
            if blk is None or blk.parent != parent or blk.tokens != tuple(prompt[i * b:(i + 1) * b]):
                break
            found.append(blk)
            parent = key
        self._touch(keys[:len(found)])
        return found

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a chain's blocks used, its first block last (most recent): see the module docstring."""
        for key in reversed(keys):
            if key in self.blocks:
                self.blocks.move_to_end(key)

    def load(self, blocks: list[Block], cache: KVCache, row: int) -> int:
        """Copy `blocks` into slots [0, n * block_size) of cache row `row`; returns the tokens loaded."""
        b = self.block_size
        comp = cache.compressed
        if comp is not None:  # C1/C2 of this row belong to whatever it held before: pool them again
            comp.covered[:, row] = 0
        for i, blk in enumerate(blocks):
            cache.k[:, row, :, i * b:(i + 1) * b] = blk.k
            cache.v[:, row, :, i * b:(i + 1) * b] = blk.v
            if blk.k_nope is not None and comp is not None and comp.k_nope is not None:
                comp.k_nope[:, row, :, i * b:(i + 1) * b] = blk.k_nope
        return len(blocks) * b

    def store(self, prompt: Sequence[int], keys: list[bytes], index: int, cache: KVCache, row: int) -> None:
        """Keep block `index` of `prompt`, just prefilled into cache row `row` (slots [index*b, (index+1)*b))."""
        key = keys[index]
        if key in self.blocks:
            self._touch(keys[:index + 1])
            return
        b = self.block_size
        lo, hi = index * b, (index + 1) * b
        comp = cache.compressed
        nope = comp.k_nope[:, row, :, lo:hi].clone() if comp is not None and comp.k_nope is not None else None
        blk = Block(tuple(prompt[lo:hi]), keys[index - 1] if index else b"", cache.k[:, row, :, lo:hi].clone(),
                    cache.v[:, row, :, lo:hi].clone(), nope)
        if blk.nbytes > self.budget_bytes:
            return
        self.blocks[key] = blk
        self.nbytes += blk.nbytes
        self._touch(keys[:index])
        while self.nbytes > self.budget_bytes:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes
            self.evicted += 1
