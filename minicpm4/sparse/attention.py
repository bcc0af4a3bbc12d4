"""InfLLM v2 trainable sparse attention, pure PyTorch (the CPU reference; minicpm4-model.md §3).

    out = infllmv2_attention(q, k, v, positions, **sparse_config)     # q [B, H, T, D], k/v [B, KVH, S, D]

Below `dense_len` keys it is plain causal attention (SDPA). Above, each query attends, with a token-level
causal mask, to the union of the blocks its GQA group selected (sparse/select.py: init blocks, local window,
top-k by compressed-key relevance). Selection runs under no_grad, as in the paper; the attention itself is
differentiable w.r.t. q, k and v (each chunk is checkpointed, so backward memory stays O(T * D + chunk)).

Queries are processed ATTN_CHUNK at a time: the chunk's selected blocks (their union over the chunk's queries)
are gathered into [B*KVH, U*block, D] and attended with SDPA under a per-query mask, so memory is
O(chunk * selected keys) and a 64K prefill never builds a [T, S] matrix. Cost is proportional to the union:
close to topk + window blocks per query when neighbouring queries pick similar blocks, about dense causal cost
when they pick unrelated ones (iid random queries). Decode (one query) reads only its own ~K blocks.

Without autograd, bf16 on CPU, both run in C++ instead (sparse/native.py): each query selects and attends only
its own blocks (prefill: 64 queries at a time read each block of their union once and attend it as small GEMMs,
every query only over the blocks it picked), so prefill costs O(T * selected keys) whatever the queries; this
module is their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minicpm4.sparse.decode import attend_one, select_one
from minicpm4.sparse.native import native_chunk, native_step
from minicpm4.sparse.select import (SparseConfig, as_config, block_scores, clamp_positions, compress_both,
                                    compress_keys, extend_compressed, pad_kernels, select_blocks,
                                    select_chunk)

__all__ = ["SparseConfig", "compress_keys", "extend_compressed", "block_scores", "select_blocks",
           "infllmv2_attention", "dense_causal_attention", "make_backend"]

ATTN_CHUNK = 64  # queries attended at once in stage 2


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           kv_lens: torch.Tensor) -> torch.Tensor:
    """Softmax attention of each query over keys at positions <= its own (and < its row's kv_len)."""
    t, s = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if t == s and bool((positions == torch.arange(t, device=q.device)).all()) and bool((kv_lens >= s).all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    pos = clamp_positions(positions, kv_lens)
    mask = torch.arange(s, device=q.device)[None, None, None, :] <= pos[:, None, :, None]  # [B, 1, T, S]
    if not gqa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    b, kvh = k.shape[:2]
    mask = mask.expand(b, kvh, t, s).reshape(b * kvh, 1, t, s)
    return _gqa_attention(q, k.reshape(b * kvh, 1, s, -1), v.reshape(b * kvh, 1, s, -1), mask)


def _block_gather(k: torch.Tensor, v: torch.Tensor, n_blocks: int, block: int):
    """Prefill: cut keys/values into blocks once (zero-padded to whole blocks) and pick whole blocks per chunk."""
    bsz, kvh, s, d = k.shape
    kb, vb = (F.pad(x, (0, 0, 0, n_blocks * block - s)).reshape(bsz * kvh * n_blocks, block, d) for x in (k, v))
    base = torch.arange(bsz * kvh, device=k.device).view(bsz, kvh, 1) * n_blocks

    def gather(ublocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = (base + ublocks).reshape(-1)
        return tuple(x.index_select(0, flat).view(bsz * kvh, 1, -1, d) for x in (kb, vb))
    return gather


def _token_gather(k: torch.Tensor, v: torch.Tensor, block: int):
    """Decode: index the selected tokens in place, without copying the whole cache (slots past S repeat S-1)."""
    bsz, kvh, s, d = k.shape
    bi = torch.arange(bsz, device=k.device)[:, None, None]
    hi = torch.arange(kvh, device=k.device)[None, :, None]

    def gather(ublocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (ublocks[..., None] * block + torch.arange(block, device=k.device)).flatten(-2).clamp_(max=s - 1)
        return tuple(x[bi, hi, pos].view(bsz * kvh, 1, -1, d) for x in (k, v))
    return gather


def _attend_chunk(q: torch.Tensor, t: torch.Tensor, idx: torch.Tensor, gather, block: int) -> torch.Tensor:
    """Stage 2 for a chunk. q [B, H, Tc, D]; t [B, Tc] clamped positions; idx [B, KVH, Tc, K] (-1 = none);
    gather(block ids [B, KVH, U]) -> keys, values [B*KVH, 1, U*block, D]. Returns [B, H, Tc, D]."""
    bsz, h, tc, d = q.shape
    kvh = idx.shape[1]
    n_blocks = int(t.max()) // block + 1  # no query of the chunk selects a later block
    # sel[b, g, i, n]: query i of group g selected block n (column n_blocks swallows the -1 slots)
    sel = torch.zeros(bsz, kvh, tc, n_blocks + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where((idx < 0) | (idx >= n_blocks), n_blocks, idx), True)
    sel = sel[..., :n_blocks]
    union = sel.any(2)  # [B, KVH, n_blocks]
    u = int(union.sum(-1).max())
    # the union's block ids, ascending, padded with unselected blocks (fully masked below)
    ublocks = torch.argsort((~union).to(torch.int8), dim=-1, stable=True)[..., :u]  # [B, KVH, U]
    allowed = sel.gather(-1, ublocks[:, :, None, :].expand(bsz, kvh, tc, u))  # [B, KVH, Tc, U]
    k_sel, v_sel = gather(ublocks)
    key_pos = (ublocks[..., None] * block + torch.arange(block, device=q.device)).view(bsz, kvh, 1, u * block)
    mask = allowed.repeat_interleave(block, dim=-1) & (key_pos <= t[:, None, :, None])  # [B, KVH, Tc, U*block]
    return _gqa_attention(q, k_sel, v_sel, mask.view(bsz * kvh, 1, tc, u * block))


def _gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of q [B, H, T, D] over k/v [B*KVH, 1, S, D] (one KV head per batch entry); mask [B*KVH, 1, T, S].
    Returns [B, H, T, D].

    One query: its G heads become G query rows of the KV head (SDPA's enable_gqa would copy k and v G times,
    a copy that dominates a decode step). Several: enable_gqa, whose copy is amortised over the queries.
    """
    bsz, h, t, d = q.shape
    g = h * bsz // k.shape[0]
    if t == 1:
        out = F.scaled_dot_product_attention(q.reshape(-1, 1, g, d), k, v, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(q.reshape(-1, g, t, d), k, v, attn_mask=mask, enable_gqa=g > 1)
    return out.view(bsz, h, t, d)


def _lengths(positions: torch.Tensor | None, kv_lens: torch.Tensor | None, s_all: int, bsz: int, t: int,
             device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(positions [B, T], positions clamped to the rows' lengths, kv_lens [B], the longest row's length).

    A decode step's fixed cost is a few small torch ops, each ~5-30 us against a ~0.5 ms kernel at 32K, so the
    common cases skip them: without positions the queries are the last T of s_all keys (nothing to clamp); a
    row's length taken from its own positions needs no clamp either; a few positions are read as Python ints
    (one copy) rather than reduced by torch (a max over dim 1 costs ~30 us however small the tensor).
    """
    if positions is None:
        positions = torch.arange(s_all - t, s_all, device=device).expand(bsz, t)
        if kv_lens is None:
            return positions, positions, torch.full((bsz,), s_all, device=device), s_all
    if kv_lens is None:
        if positions.numel() <= 64:
            last = [max(row) + 1 for row in positions.tolist()]
            return positions, positions, torch.tensor(last, device=device), max(last)
        kv_lens = positions.amax(1) + 1
        return positions, positions, kv_lens, int(kv_lens.max())
    s = max(kv_lens.tolist()) if kv_lens.numel() <= 64 else int(kv_lens.max())
    return positions, clamp_positions(positions, kv_lens), kv_lens, s


def infllmv2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor | None = None, *,
                       topk_idx: torch.Tensor | None = None, kv_lens: torch.Tensor | None = None,
                       q_nope: torch.Tensor | None = None, k_nope: torch.Tensor | None = None,
                       compressed: tuple[torch.Tensor, torch.Tensor] | None = None,
                       config: SparseConfig | None = None, **sparse_config) -> torch.Tensor:
    """InfLLM v2 attention. q [B, H, T, D] post-RoPE queries; k/v [B, KVH, S, D] keys/values at positions [0, S).

    positions [B, T]: absolute query positions (default: the last T of S, i.e. prefill or one decode step).
    kv_lens [B]: each row's key count (default positions.max + 1); keys at or past it are never attended.
    topk_idx [B, KVH, T, K]: a precomputed selection (select_blocks); otherwise selected here, chunk by chunk.
    q_nope/k_nope: pre-RoPE q and k for stage 1 when use_nope. compressed: (C1, C2) from the caller's cache.
    config or **sparse_config: the HF sparse_config fields. Returns [B, H, T, D].
    """
    cfg = config if config is not None else as_config(sparse_config)
    bsz, h, t, d = q.shape
    positions, pos, kv_lens, s = _lengths(positions, kv_lens, k.shape[2], bsz, t, q.device)
    k, v = k[:, :, :s], v[:, :, :s]
    if 0 <= s < cfg.dense_len:
        return dense_causal_attention(q, k, v, positions, kv_lens)
    block = cfg.block_size
    n_blocks = -(-s // block)
    k_sel = cfg.n_select(n_blocks)
    if topk_idx is None:
        qs, ks = (q_nope, k_nope) if cfg.use_nope else (q, k)
        if qs is None or ks is None:
            raise ValueError("use_nope needs q_nope and k_nope (pre-RoPE q and k) for block selection")
        c1, c2 = compressed if compressed is not None else compress_both(ks[:, :, :s].detach(), cfg)
        c1, c2 = pad_kernels(c1), pad_kernels(c2)
        qs = qs.detach()
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if t == 1 and not grad:  # a decode step: sparse/decode.py's one-query path
        if topk_idx is not None:
            idx = topk_idx[:, :, 0].long()
        else:
            out = native_step(q, qs, k, v, pos[:, 0], c1, c2, cfg, k_sel)
            if out is not None:
                return out
            idx = select_one(qs, pos[:, 0], c1, c2, cfg, k_sel)
        return attend_one(q, k, v, pos[:, 0], idx, block)
    if topk_idx is None and not grad:  # the C++ kernel: each query over its own blocks, no gathers
        out = native_chunk(q, qs, k, v, pos, c1, c2, cfg, k_sel)
        if out is not None:
            return out
    gather = _token_gather(k, v, block) if t <= ATTN_CHUNK else _block_gather(k, v, n_blocks, block)
    attend = _attend_chunk
    if grad:
        # recompute each chunk's gather and attention in backward: otherwise autograd keeps every chunk's
        # gathered blocks and mask, O(T * union) in all, which is O(T * S) when queries pick unrelated blocks
        def attend(*args):
            return checkpoint(_attend_chunk, *args, use_reentrant=False)
    out = q.new_empty(q.shape)  # filled chunk by chunk (autograd records the slice copies)
    for i in range(0, t, ATTN_CHUNK):
        tc = pos[:, i:i + ATTN_CHUNK]
        if topk_idx is not None:
            idx = topk_idx[:, :, i:i + ATTN_CHUNK].long()
        else:
            with torch.no_grad():
                idx = select_chunk(qs[:, :, i:i + ATTN_CHUNK], tc, c1, c2, cfg, k_sel)
        out[:, :, i:i + ATTN_CHUNK] = attend(q[:, :, i:i + ATTN_CHUNK], tc, idx, gather, block)
    return out


def make_backend(config: SparseConfig | dict | None = None):
    """An `Attention.backend` for model/decoder.py: backend(q, k, v, ctx, layer) -> infllmv2_attention(q, k, v, ctx.positions).

    With a KV cache that keeps compressed keys (KVCache.compressed, present when the model config has a
    sparse_config with the same kernel sizes), a sparse call pools only the kernels the cache lacks; otherwise
    they are pooled from the cached keys at every call (O(S)). With use_nope the backend sets `uses_nope`, and the
    model passes nope=(q, k) before RoPE ([B, H, T, D], [B, KVH, T, D]): selection runs on those, and with a cache
    the pre-RoPE keys are kept in KVCache.compressed.k_nope.
    """
    cfg = as_config(config)

    def backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx, layer: int, nope=None) -> torch.Tensor:
        store = getattr(ctx.cache, "compressed", None)
        if store is not None and (store.cfg.kernel_size, store.cfg.kernel_stride, store.cfg.use_nope) != (
                cfg.kernel_size, cfg.kernel_stride, cfg.use_nope):
            store = None  # a cache laid out for another sparse_config: pool from the keys instead
        q_nope = k_nope = None
        if cfg.use_nope:
            q_nope, k_nope = nope
            if ctx.cache is not None:
                if store is None:
                    raise ValueError("sparse_config.use_nope with a KV cache needs the cache built from a model "
                                     "config whose sparse_config has use_nope=true (it keeps the pre-RoPE keys)")
                k_nope = store.write_nope(layer, ctx.positions, k_nope, k.shape[2])
        compressed = None
        if store is not None:
            kv_lens = (ctx.positions.max(1).values + 1).tolist()
            if cfg.dense_len < 0 or max(kv_lens) >= cfg.dense_len:
                compressed = store.kernels(layer, k if k_nope is None else k_nope, kv_lens)
        return infllmv2_attention(q, k, v, ctx.positions, config=cfg, compressed=compressed, q_nope=q_nope,
                                  k_nope=k_nope)
    backend.uses_nope = cfg.use_nope
    backend.sparse_config = cfg  # model/native_stack.py's C++ stack runs the same step
    return backend
