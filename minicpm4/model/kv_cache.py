"""Key/value cache: one buffer per layer, written in place.

Slot = absolute position: the key of the token at position p of row b lives at k[layer][b, :, p].
Rows of a batch may be at different lengths; attention masks keys by position, so a row never
reads slots past its own length, and stale values there are overwritten before they are visible.

kv_dtype "int8" (quant/kv8.py, llama.cpp's q8_0 cache type): k and v hold int8 rows and k_scale, v_scale
[layers, batch, kv_heads, max_len] fp32 one scale per (token, KV head) row, 0.53x the bytes of bf16 at
head_dim 64. The C++ decode stack reads them in place; `update` hands the Python layers the rows dequantized
to the compute dtype (the reference). The compressed keys of InfLLM v2 (C1, C2) stay in the compute dtype,
pooled from the dequantized keys: they are 1/16 + 1/64 of the key cache.
The buffers are lazily committed (lazy_memory.lazy_zeros): sized for every row at max_len, they cost RAM only
for the pages tokens have been written to, and release_row gives a finished request's pages back.
"""

from __future__ import annotations

import torch

from minicpm4.config import ModelConfig
from minicpm4.lazy_memory import lazy_zeros, release
from minicpm4.quant import kv8
from minicpm4.sparse.cache import CompressedKeys

# Caches are allocated in multiples of this many slots, so that requests of similar lengths reuse one buffer.
KV_BUCKET = 256


def bucketed(n: int) -> int:
    """n rounded up to a whole number of KV_BUCKET slots."""
    return -(-n // KV_BUCKET) * KV_BUCKET


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kv_dtype: str = "auto",
                 _bufs: tuple[torch.Tensor, ...] | None = None, _compressed: CompressedKeys | None = None):
        """dtype: the compute dtype (of the rows update() takes and returns); kv_dtype: "auto" (stored in dtype)
        or "int8" (quant/kv8.py)."""
        self.kv_dtype = kv8.check_kv_dtype(kv_dtype)
        self.dtype = dtype
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        store = torch.int8 if kv_dtype == "int8" else dtype
        # k, v: [layers, batch, kv_heads, max_len, head_dim]; int8: k_scale, v_scale [layers, batch, kv_heads, max_len]
        if _bufs is None:
            _bufs = (lazy_zeros(shape, store, device), lazy_zeros(shape, store, device))
            if kv_dtype == "int8":
                _bufs += (lazy_zeros(shape[:4], torch.float32, device), lazy_zeros(shape[:4], torch.float32, device))
        self.k, self.v = _bufs[:2]
        self.k_scale, self.v_scale = _bufs[2:] if len(_bufs) == 4 else (None, None)
        self.config = config
        # InfLLM v2's compressed keys (sparse/cache.py), kept in step with the keys by update()
        self.compressed = _compressed
        if _compressed is None and batch_size and config.sparse_config is not None:
            self.compressed = CompressedKeys(config.sparse_config, *shape[:4], config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def buffers(self) -> tuple[torch.Tensor, ...]:
        """Every tensor indexed [layer, row, kv_head, slot, ...]: k, v and (int8) their scales. Copying a range of
        slots copies these (engine growth, prefix-cache blocks, compact)."""
        return (self.k, self.v) if self.k_scale is None else (self.k, self.v, self.k_scale, self.v_scale)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def rows(self, index: slice) -> "KVCache":
        """A cache over a subset of rows that shares storage with this one (writes go through)."""
        return KVCache(self.config, 0, 0, self.dtype, kv_dtype=self.kv_dtype,
                       _bufs=tuple(b[:, index] for b in self.buffers()),
                       _compressed=None if self.compressed is None else self.compressed.rows(index))

    def release_row(self, row: int) -> None:
        """Give row `row`'s pages back to the OS; they read as zeros again (a no-op where the buffers are not
        lazy: then the row keeps its stale, finite values until overwritten)."""
        for b in self.buffers():
            release(b[:, row])
        if self.compressed is not None:
            self.compressed.release_row(row)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               contiguous_from: int | None, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, D] at `positions` [B, T]; return this layer's first kv_len slots (int8: rows
        dequantized to k's dtype, a copy).

        contiguous_from: when every row holds positions p0..p0+T-1, a slice write (fast path);
        otherwise a scatter by position.
        """
        if self.compressed is not None:
            self.compressed.truncate(layer, positions, contiguous_from)
        if self.k_scale is None:
            self._write((self.k[layer], self.v[layer]), (k, v), positions, contiguous_from)
            return self.k[layer, :, :, :kv_len], self.v[layer, :, :, :kv_len]
        (qk, sk), (qv, sv) = kv8.quantize(k), kv8.quantize(v)
        self._write((self.k[layer], self.v[layer]), (qk, qv), positions, contiguous_from)
        self._write((self.k_scale[layer], self.v_scale[layer]), (sk, sv), positions, contiguous_from)
        return tuple(kv8.dequantize(q[layer, :, :, :kv_len], s[layer, :, :, :kv_len], k.dtype)
                     for q, s in ((self.k, self.k_scale), (self.v, self.v_scale)))

    @staticmethod
    def _write(dsts: tuple[torch.Tensor, ...], srcs: tuple[torch.Tensor, ...], positions: torch.Tensor,
               contiguous_from: int | None) -> None:
        """dst [B, kv_heads, slots, ...] slots `positions` [B, T] = src [B, kv_heads, T, ...]."""
        for dst, src in zip(dsts, srcs):
            if contiguous_from is not None:
                dst[:, :, contiguous_from:contiguous_from + src.shape[2]] = src
            else:
                idx = positions[:, None, :].expand(-1, src.shape[1], -1)
                if src.dim() == 4:
                    idx = idx[..., None].expand(-1, -1, -1, src.shape[3])
                dst.scatter_(2, idx, src)

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Move the slots start + keep[i] to start + i in every layer and row (keep: ascending 1-D offsets).

        After tree verification the accepted path's keys sit at scattered slots; this packs them right after
        the committed prefix, so slot = position holds again. Slots past start + len(keep) become stale.
        """
        n = keep.numel()
        if n and bool((keep == torch.arange(n)).all()):  # already in place (a chain, or the first nodes)
            return
        src = start + keep
        for buf in self.buffers():  # [layers, batch, kv_heads, slots, ...]; index_select copies first
            buf[:, :, :, start:start + n] = buf.index_select(3, src)
