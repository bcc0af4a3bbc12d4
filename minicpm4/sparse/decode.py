"""InfLLM v2 for one query per row (a decode step): selection and attention in O(K * block + kv_len / stride).

The general path (sparse/attention.py) handles chunks of queries with per-query visibility masks over every kernel; a
decode query at position t sees every complete kernel of its row, so here stage 1 is two small matmuls against
the cached compressed keys, the max-pool is a reshape, and stage 2 reads only the selected tokens:

    s1 = q C1^T / sqrt(d)  [B, KVH, G, n1],  lse = logsumexp(q C2^T / sqrt(d))  [B, KVH, G, 1]
    S  = sum_G exp(s1 - lse)                   [B, KVH, n1]        (GQA sum)
    B[b] = max(S[4b .. 4b+3], S[4b-1])        (max-pool kernel r+1, stride r, padding 1; r = block/stride)
    forced blocks = +inf, top-K (ties to the lower block), ascending
    out = softmax(q K_sel^T / sqrt(d)) V_sel   over the selected tokens only

Stage 2 runs as fp32 scores (q and the gathered keys in fp32: bf16 products are exact there, as in SDPA's
fp32-accumulating kernel), fp32 softmax, and probabilities in v's dtype for P V, which is what SDPA's CPU flash
kernel does for bf16 too, without SDPA's per-call set-up for one query of G heads. The result is the
general path's output at that query (tests/sparse/test_sparse.py checks it).

select_one + attend_one are also the reference of the C++ step (sparse/native.py, tests/sparse/test_sparse_native.py).
"""

from __future__ import annotations

import math
import threading

import torch

from minicpm4.sparse.cache import n_kernels
from minicpm4.sparse.select import SparseConfig

_workspace = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused scratch tensor per thread (grown, never shrunk): a decode step's gathered keys and scores are
    MBs at 64K, and fresh allocations that size cost page faults and mmap calls on every layer and step."""
    bufs = _workspace.__dict__.setdefault("bufs", {})
    n = math.prod(shape)
    buf = bufs.get((name, dtype, device))
    if buf is None or buf.numel() < n:
        buf = bufs[name, dtype, device] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


@torch.no_grad()
def select_one(q: torch.Tensor, t: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, cfg: SparseConfig,
               k_sel: int) -> torch.Tensor:
    """Blocks [B, KVH, k_sel] (int64, ascending, -1 = none) for one query per row.

    q [B, H, 1, D] stage-1 queries at positions t [B] (row b's keys are [0, t_b]); c1/c2 [B, KVH, N, D] hold at
    least the kernels complete in [0, t_b]; kernels past those are ignored.
    """
    bsz, h, _, d = q.shape
    kvh = c1.shape[1]
    block, stride, r = cfg.block_size, cfg.kernel_stride, cfg.block_size // cfg.kernel_stride
    tl = t.tolist()
    n1s = [n_kernels(x + 1, cfg.kernel_size, stride) for x in tl]
    n2s = [n_kernels(x + 1, 4 * cfg.kernel_size, 4 * stride) for x in tl]
    n1, n2 = max(n1s), max(max(n2s), 1)
    nb = max(tl) // block + 1  # blocks of the longest row
    qg = q.reshape(bsz, kvh, h // kvh, d)  # the G heads of a group share one matmul
    scale = 1.0 / math.sqrt(d)
    sdt = torch.promote_types(q.dtype, torch.float32)
    # full bucket-sized matmuls (few distinct shapes), then the visible kernels only
    s2 = (qg @ c2.transpose(-1, -2))[..., :n2].to(sdt).mul_(scale)  # [B, KVH, G, n2]
    s1 = (qg @ c1.transpose(-1, -2))[..., :n1].to(sdt).mul_(scale)  # [B, KVH, G, n1]
    ragged = len(set(tl)) > 1
    if ragged or n2s[0] == 0:  # rows of different lengths: hide each row's invisible kernels
        s2.masked_fill_((torch.arange(n2, device=q.device) >= t.new_tensor(n2s)[:, None])[:, None, None], -math.inf)
    # no visible coarse kernel (lse = -inf): p = 0 for the whole row, as in the general path
    lse = s2.logsumexp(-1, keepdim=True).nan_to_num_(neginf=math.inf)  # [B, KVH, G, 1]
    score = s1.sub_(lse).exp_().sum(2)  # [B, KVH, n1]
    if ragged:
        score.masked_fill_((torch.arange(n1, device=q.device) >= t.new_tensor(n1s)[:, None])[:, None], 0.0)
    # max-pool: blocks[b] = max over kernels r*b-1 .. r*b+r-1 (scores are >= 0, so padding with 0 is neutral
    # for blocks that have a visible kernel; the others are the forced current block or future ones)
    grid = torch.nn.functional.pad(score, (0, r * nb - n1)).view(bsz, kvh, nb, r)
    blocks = grid.amax(-1)
    torch.maximum(blocks[..., 1:], grid[..., :-1, r - 1], out=blocks[..., 1:])
    for b, x in enumerate(tl):  # forced blocks; blocks past a shorter row's own are never kept
        qb = x // block
        row = blocks[b]
        row[:, :cfg.init_blocks] = math.inf
        row[:, max(qb - cfg.local_blocks, 0):qb + 1] = math.inf
        if qb + 1 < nb:
            row[:, qb + 1:] = -math.inf
    # top-k with ties to the lower block: a stable descending sort keeps equal scores in index order
    idx = blocks.sort(dim=-1, descending=True, stable=True).indices[..., :k_sel].sort(dim=-1).values
    return idx.masked_fill_(idx > (t // block)[:, None, None], -1) if ragged else idx


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: torch.Tensor, idx: torch.Tensor,
               block: int) -> torch.Tensor:
    """Stage 2 for one query per row. q [B, H, 1, D]; k/v [B, KVH, S, D]; t [B]; idx [B, KVH, K] from select_one.
    Returns [B, H, 1, D]."""
    bsz, h, _, d = q.shape
    kvh, k_sel = idx.shape[1], idx.shape[2]
    g = h // kvh
    pos = (idx[..., None] * block + torch.arange(block, device=q.device)).view(bsz, kvh, k_sel * block)
    qb = t // block
    bias = None
    if bsz == 1 and bool((idx[0, :, -1] == qb[0]).all()):
        # every head's last selected block is the query's own: cut its slots past t, nothing to mask
        pos = pos[..., :(k_sel - 1) * block + int(t[0]) % block + 1]
    else:  # empty slots (-1) and keys past a row's query become -inf scores on a clamped, duplicate slot
        bad = (idx[..., None] < 0).expand(-1, -1, -1, block).reshape(pos.shape) | (pos > t[:, None, None])
        pos = torch.where(bad, 0, pos)
        bias = torch.zeros(bad.shape, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                           device=q.device).masked_fill_(bad, -math.inf).view(bsz * kvh, 1, -1)
    n = pos.shape[-1]
    sdt = torch.promote_types(q.dtype, torch.float32)
    kg, vg = (_buffer(name, (bsz, kvh, n, d), x.dtype, x.device) for name, x in (("k", k), ("v", v)))
    for b in range(bsz):
        for j in range(kvh):
            torch.index_select(k[b, j], 0, pos[b, j], out=kg[b, j])
            torch.index_select(v[b, j], 0, pos[b, j], out=vg[b, j])
    if kg.dtype != sdt:
        kg = _buffer("k32", kg.shape, sdt, k.device).copy_(kg)
    scores = _buffer("scores", (bsz * kvh, g, n), sdt, q.device)
    qs = q.reshape(bsz * kvh, g, d).to(sdt) * (1.0 / math.sqrt(d))
    torch.bmm(qs, kg.view(bsz * kvh, n, d).transpose(1, 2), out=scores)
    if bias is not None:
        scores.add_(bias)
    # softmax in place: exp(s - max) / sum
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    scores.div_(scores.sum(-1, keepdim=True))
    p = scores if v.dtype == sdt else _buffer("p", scores.shape, v.dtype, v.device).copy_(scores)
    return torch.bmm(p, vg.view(bsz * kvh, n, d)).view(bsz, h, 1, d)

