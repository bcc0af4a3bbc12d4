"""Key/value cache: one buffer per layer, written in place.

Slot = absolute position: the key of the token at position p of row b lives at k[layer][b, :, p].
Rows of a batch may be at different lengths; attention masks keys by position, so a row never
reads slots past its own length, and stale values there are overwritten before they are visible.

The buffers are lazily committed (lazy_memory.lazy_zeros): sized for every row at max_len, they cost RAM only
for the pages tokens have been written to, and release_row gives a finished request's pages back.
"""

from __future__ import annotations

import torch

from minicpm4.config import ModelConfig
from minicpm4.lazy_memory import lazy_zeros, release
from minicpm4.sparse.cache import CompressedKeys

# Caches are allocated in multiples of this many slots, so that requests of similar lengths reuse one buffer.
KV_BUCKET = 256


def bucketed(n: int) -> int:
    """n rounded up to a whole number of KV_BUCKET slots."""
    return -(-n // KV_BUCKET) * KV_BUCKET


class KVCache:
    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 _k: torch.Tensor | None = None, _v: torch.Tensor | None = None,
                 _compressed: CompressedKeys | None = None):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # k, v: [layers, batch, kv_heads, max_len, head_dim]
        self.k = _k if _k is not None else lazy_zeros(shape, dtype, device)
        self.v = _v if _v is not None else lazy_zeros(shape, dtype, device)
        self.config = config
        # InfLLM v2's compressed keys (sparse/cache.py), kept in step with the keys by update()
        self.compressed = _compressed
        if _k is None and config.sparse_config is not None:
            self.compressed = CompressedKeys(config.sparse_config, *shape[:4], config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, index: slice) -> "KVCache":
        """A cache over a subset of rows that shares storage with this one (writes go through)."""
        return KVCache(self.config, 0, 0, _k=self.k[:, index], _v=self.v[:, index],
                       _compressed=None if self.compressed is None else self.compressed.rows(index))

    def release_row(self, row: int) -> None:
        """Give row `row`'s pages back to the OS; they read as zeros again (a no-op where the buffers are not
        lazy: then the row keeps its stale, finite values until overwritten)."""
        release(self.k[:, row])
        release(self.v[:, row])
        if self.compressed is not None:
            self.compressed.release_row(row)

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               contiguous_from: int | None, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, D] at `positions` [B, T]; return this layer's first kv_len slots.

        contiguous_from: when every row holds positions p0..p0+T-1, a slice write (fast path);
        otherwise a scatter by position.
        """
        kc, vc = self.k[layer], self.v[layer]
        if self.compressed is not None:
            self.compressed.truncate(layer, positions, contiguous_from)
        if contiguous_from is not None:
            p0, t = contiguous_from, k.shape[2]
            kc[:, :, p0:p0 + t] = k
            vc[:, :, p0:p0 + t] = v
        else:
            idx = positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            kc.scatter_(2, idx, k)
            vc.scatter_(2, idx, v)
        return kc[:, :, :kv_len], vc[:, :, :kv_len]

    def compact(self, start: int, keep: torch.Tensor) -> None:
        """Move the slots start + keep[i] to start + i in every layer and row (keep: ascending 1-D offsets).

        After tree verification the accepted path's keys sit at scattered slots; this packs them right after
        the committed prefix, so slot = position holds again. Slots past start + len(keep) become stale.
        """
        n = keep.numel()
        if n and bool((keep == torch.arange(n)).all()):  # already in place (a chain, or the first nodes)
            return
        src = start + keep
        for buf in (self.k, self.v):  # [layers, batch, kv_heads, slots, head_dim]; index_select copies first
            buf[:, :, :, start:start + n] = buf.index_select(3, src)
