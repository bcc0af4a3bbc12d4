"""InfLLM v2 in C++ (csrc/sparse_attention.h, sparse_prefill.h), bf16 on CPU: the Python face of the native kernels.

    native_step    one query per row (a decode step): selection + attention for every (row, KV head) in one call;
                   reference: sparse_decode.select_one + attend_one.
    native_chunk   T queries (prefill, a chunk after a cached prefix): each query selects its own blocks and attends
                   only to them (O(T * selected keys)), 64 queries at a time sharing each block's reads, with an
                   online softmax (probabilities not rounded to bf16); reference: sparse.infllmv2_attention's
                   chunked path, which attends a chunk to the union of its queries' blocks under a mask.

Both read the selected keys and values in place (no gather copy) and keep O(selected keys) scratch per thread.
They return None where the kernels do not apply (not bf16 on CPU, autograd, GQA group over 16, head_dim over 256,
no compiler, MINICPM4_NATIVE=0); callers then run the reference. tests/sparse/test_sparse_native.py compares them.
"""

from __future__ import annotations

import torch

from minicpm4 import kernels
from minicpm4.sparse.select import SparseConfig


def _ext(q: torch.Tensor, tensors: tuple[torch.Tensor, ...], kvh: int):
    h, d = q.shape[1], q.shape[-1]
    if (any(x.dtype != torch.bfloat16 or x.device.type != "cpu" for x in tensors) or h % kvh or h // kvh > 16
            or d > 256 or torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        return None
    return kernels.native()


def _args(cfg: SparseConfig, k_sel: int) -> tuple[int, ...]:
    return cfg.kernel_size, cfg.kernel_stride, cfg.block_size, cfg.init_blocks, cfg.local_blocks, k_sel


def _last_dim_contiguous(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def native_step(q: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor,
                c1: torch.Tensor, c2: torch.Tensor, cfg: SparseConfig, k_sel: int) -> torch.Tensor | None:
    """q/qs [B, H, 1, D] (stage-2 / stage-1 queries), k/v [B, KVH, S, D], t [B] positions, c1/c2 [B, KVH, N, D]
    holding at least the kernels complete at t. Returns [B, H, 1, D] or None."""
    ext = _ext(q, (q, qs, k, v, c1, c2), k.shape[1])
    if ext is None:
        return None
    bsz, h, _, d = q.shape
    out, _ = ext.sparse_decode(q.reshape(bsz, h, d).contiguous(), qs.reshape(bsz, h, d).contiguous(),
                        *_last_dim_contiguous(k, v, c1, c2), t, *_args(cfg, k_sel))
    return out.view(bsz, h, 1, d)


def native_chunk(q: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                 c1: torch.Tensor, c2: torch.Tensor, cfg: SparseConfig, k_sel: int) -> torch.Tensor | None:
    """q/qs [B, H, T, D], k/v [B, KVH, S, D], positions [B, T] (clamped to the rows' lengths), c1/c2 pooled from
    the keys. Returns [B, H, T, D] or None."""
    ext = _ext(q, (q, qs, k, v, c1, c2), k.shape[1])
    if ext is None or cfg.block_size % 16:  # the kernel's score tiles hold whole blocks of 16 keys
        return None
    out, _ = ext.sparse_prefill(*_last_dim_contiguous(q, qs, k, v, c1, c2), positions, *_args(cfg, k_sel), False)
    return out
