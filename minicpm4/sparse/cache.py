"""Compressed keys of a KV cache for InfLLM v2 (minicpm4-model.md §3, "KV cache for compressed keys").

Per layer and cache row: C1 (kernel_size / kernel_stride) and C2 (4x both) of the cached keys, and `covered`,
the length of the key prefix they were pooled from. The official cache keeps "tail buffers" of the keys not yet
in a kernel and pools a new kernel once a tail holds kernel_size keys; here the tail is read from the KV cache
itself (keys [n_kernels * stride, kv_len)), which is the same thing without a second copy: extending a row costs
O(new keys), so a decode step pools at most one new kernel of each size, every stride tokens.

Writes invalidate: `truncate` (called by KVCache.update) cuts `covered` to the first position a call writes, so
kernels reaching a rewritten key are pooled again when next needed. That keeps the cache right when an engine
reuses a row for a new request, feeds a dummy token to an idle row, or prefills a prompt in chunks.

With use_nope the kernels are pooled from pre-RoPE keys, which the model's cache does not hold: `k_nope` keeps
them ([layers, B, KVH, max_len, D], written by the sparse backend at every call, dense ones included, so the
switch to sparse finds them all), as the official cache does.

Buffers hold kernel counts rounded up to KERNEL_BUCKET, and `kernels` returns bucket-sized views: the stage-1
matmuls then see few distinct shapes (see sparse_select.KERNEL_BUCKET). Kernels past a row's own count are
stale; they always lie past that row's last key, so the stage-1 visibility rule ignores them.
"""

from __future__ import annotations

import torch

from minicpm4.lazy_memory import lazy_zeros, release
from minicpm4.sparse.select import KERNEL_BUCKET, SparseConfig, as_config, compress_keys


def n_kernels(length: int, size: int, stride: int) -> int:
    """Complete kernels (size, stride) in a prefix of `length` keys."""
    return (length - size) // stride + 1 if length >= size else 0


def _bucket(n: int) -> int:
    return -(-n // KERNEL_BUCKET) * KERNEL_BUCKET


class CompressedKeys:
    """C1, C2 [layers, B, KVH, N, D] and covered [layers, B] (int64) for a KVCache of max_len slots."""

    def __init__(self, cfg: SparseConfig | dict, layers: int, batch: int, kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu", _state=None):
        self.cfg = as_config(cfg)
        # (size, stride) of C1 and C2
        self.kernels_of = ((self.cfg.kernel_size, self.cfg.kernel_stride),
                           (4 * self.cfg.kernel_size, 4 * self.cfg.kernel_stride))
        if _state is not None:
            self.c, self.covered, self.k_nope = _state
            return
        # sized for max_len keys, committed by the OS as kernels are written (lazy_memory.py)
        self.c = tuple(lazy_zeros((layers, batch, kv_heads, max(KERNEL_BUCKET, _bucket(n_kernels(max_len, *ks))),
                                   head_dim), dtype, device) for ks in self.kernels_of)
        self.covered = torch.zeros(layers, batch, dtype=torch.int64, device=device)
        self.k_nope = (lazy_zeros((layers, batch, kv_heads, max_len, head_dim), dtype, device)
                       if self.cfg.use_nope else None)

    def rows(self, index: slice) -> "CompressedKeys":
        """A view over a subset of rows (shares storage, like KVCache.rows)."""
        return CompressedKeys(self.cfg, 0, 0, 0, 0, 0, self.c[0].dtype,
                              _state=(tuple(c[:, index] for c in self.c), self.covered[:, index],
                                      None if self.k_nope is None else self.k_nope[:, index]))

    def release_row(self, row: int) -> None:
        """Give row `row`'s memory back to the OS (it reads as zeros, and nothing is covered)."""
        self.covered[:, row] = 0
        for buf in (*self.c, self.k_nope):
            if buf is not None:
                release(buf[:, row])

    def write_nope(self, layer: int, positions: torch.Tensor, k: torch.Tensor, kv_len: int) -> torch.Tensor:
        """Store pre-RoPE keys k [B, KVH, T, D] at positions [B, T]; return the layer's first kv_len of them."""
        buf = self.k_nope[layer]
        buf.scatter_(2, positions[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3]), k)
        return buf[:, :, :kv_len]

    def truncate(self, layer: int, positions: torch.Tensor, contiguous_from: int | None) -> None:
        """Keys at `positions` [B, T] of `layer` are being rewritten: forget kernels that reach them."""
        cov = self.covered[layer]
        if contiguous_from is not None:
            cov.clamp_(max=contiguous_from)
        else:
            torch.minimum(cov, positions.min(1).values, out=cov)

    @torch.no_grad()
    def kernels(self, layer: int, k: torch.Tensor, kv_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(C1, C2) of `layer` for rows holding kv_lens[b] keys of k [B, KVH, >= max(kv_lens), D] (the layer's
        cache), pooling only the kernels each row lacks. Views [B, KVH, bucketed count, D]."""
        cov = self.covered[layer]
        old = cov.tolist()
        stale = [b for b, (o, n) in enumerate(zip(old, kv_lens)) if o != n]
        if len(stale) == len(old) and len(set(old)) == 1 and len(set(kv_lens)) == 1:
            groups = [(slice(None), old[0], kv_lens[0])]  # aligned rows: one pooling call for all
        else:
            groups = [(slice(b, b + 1), old[b], kv_lens[b]) for b in stale]
        for sl, have, want in groups:
            for c, (size, stride) in zip(self.c, self.kernels_of):
                lo, hi = n_kernels(min(have, want), size, stride), n_kernels(want, size, stride)
                if hi > lo:
                    c[layer, sl, :, lo:hi] = compress_keys(k[sl, :, lo * stride:(hi - 1) * stride + size], size, stride)
            cov[sl] = want
        s = max(kv_lens)
        return tuple(c[layer, :, :, :min(c.shape[3], max(KERNEL_BUCKET, _bucket(n_kernels(s, size, stride))))]
                     for c, (size, stride) in zip(self.c, self.kernels_of))
