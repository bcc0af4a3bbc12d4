"""InfLLM v2 block selection (stages 0-1c of minicpm4-model.md §3): which key blocks each query attends to.

No parameters: keys are mean-pooled into kernels, queries score the kernels, the scores are max-pooled
onto blocks, and every query keeps its top-k blocks plus the init blocks and a local window.

    C1[j]  = mean K[s*j : s*j + ks]                      (fine kernels, s = kernel_stride, ks = kernel_size)
    C2[j]  = mean K[4s*j : 4s*j + 4ks]                   (coarse kernels, only for the softmax normaliser)
    p_h[j] = exp(q_h.C1[j]/sqrt(d) - logsumexp_j' q_h.C2[j']/sqrt(d))    over kernels entirely <= t
    S[j]   = sum of p_h[j] over the G query heads of a KV group
    B[b]   = max S[j], j in [r*b - 1, r*b + r - 1]  (r = block_size/s: the kernels overlapping block b)
    B[b]   = +inf for b < init_blocks and qb - window/block <= b <= qb   (qb = t // block_size)
    topk_idx = top min(topk + window/block, n_blocks) blocks, ascending, blocks > qb -> -1

Selection is computed a chunk of queries at a time, so memory is O(chunk * n_kernels), never O(T * S).
In `select_blocks` blocks after the query's own block score -inf instead of their literal 0: they are
dropped afterwards anyway, so this only decides exact ties (a past block whose score underflowed to 0)
in favour of a block the query can see.
"""

from __future__ import annotations

import math

import torch

from minicpm4.config import SparseConfig, as_config

SELECT_CHUNK = 256  # queries scored at once in stage 1
# Stage-1 matmuls see kernel counts rounded up to a multiple of this: oneDNN caches a compiled bf16 matmul per
# shape (~0.6 MB each, kept), so a count growing by one per chunk or per decode step would pile them up.
KERNEL_BUCKET = 256


def compress_keys(k: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """Mean of complete kernels: k [B, KVH, S, D] -> [B, KVH, n, D], n = (S - kernel_size) // stride + 1.

    Kernel j covers [stride*j, stride*j + kernel_size). Summed as stride-long segments in fp32 (fp64 stays fp64),
    so a 64K key cache is pooled in O(S * D) without an unfold of kernel_size copies.
    """
    b, h, s, d = k.shape
    n = (s - kernel_size) // stride + 1 if s >= kernel_size else 0
    if n == 0:
        return k.new_zeros(b, h, 0, d)
    r = kernel_size // stride
    n_seg = n + r - 1
    acc = torch.promote_types(k.dtype, torch.float32)
    seg = k[:, :, :n_seg * stride].reshape(b, h, n_seg, stride, d).sum(3, dtype=acc)  # [B, KVH, n_seg, D]
    out = seg[:, :, :n].clone()
    for i in range(1, r):
        out += seg[:, :, i:i + n]
    return (out / kernel_size).to(k.dtype)


def compress_both(k: torch.Tensor, cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(C1, C2): fine kernels (kernel_size, kernel_stride) and coarse ones (4x size and stride)."""
    return (compress_keys(k, cfg.kernel_size, cfg.kernel_stride),
            compress_keys(k, 4 * cfg.kernel_size, 4 * cfg.kernel_stride))


def extend_compressed(compressed: tuple[torch.Tensor, torch.Tensor] | None, k: torch.Tensor,
                      cfg: SparseConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(C1, C2) of k [B, KVH, S, D], pooling only the kernels `compressed` (those of a shorter prefix of the same
    keys) lacks: a decode step completes at most one kernel of each size. Every row must hold S real keys."""
    if compressed is None:
        return compress_both(k, cfg)
    out = []
    for c, size, stride in zip(compressed, (cfg.kernel_size, 4 * cfg.kernel_size),
                               (cfg.kernel_stride, 4 * cfg.kernel_stride)):
        new = compress_keys(k[:, :, c.shape[2] * stride:], size, stride)
        out.append(torch.cat([c, new], dim=2) if new.shape[2] else c)
    return out[0], out[1]


def pad_kernels(c: torch.Tensor) -> torch.Tensor:
    """Zero-pad compressed keys [B, KVH, n, D] to a multiple of KERNEL_BUCKET kernels. The padding kernels
    start past the last key, so the visibility rule hides them from every query."""
    n = c.shape[2]
    return torch.nn.functional.pad(c, (0, 0, 0, -n % KERNEL_BUCKET)) if n % KERNEL_BUCKET else c


def n_visible(t: int, kernel_size: int, stride: int, n: int) -> int:
    """How many of the n kernels lie entirely at positions <= t."""
    return max(0, min(n, (t - kernel_size + 1) // stride + 1)) if t >= kernel_size - 1 else 0


def clamp_positions(positions: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """A query never sees keys at or past its row's length: clamp its position to kv_len - 1."""
    return torch.minimum(positions, (kv_lens - 1)[:, None])


def _chunk_block_scores(q: torch.Tensor, t: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor,
                        cfg: SparseConfig, nb: int) -> torch.Tensor:
    """Stage 1 + 1b for a chunk: q [B, H, Tc, D], t [B, Tc] -> block scores [B, KVH, Tc, nb] (forced = +inf).

    c1/c2 may be truncated to the kernels visible to the chunk's last query: the rest are invisible to all
    of it (p = 0), and only decide blocks after the chunk's last block, which callers mask themselves.
    """
    bsz, h, tc, d = q.shape
    kvh, n1, n2 = c1.shape[1], c1.shape[2], c2.shape[2]
    g = h // kvh
    sdt = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(d)
    qg = q.reshape(bsz, kvh, g * tc, d)  # the G heads of a group share one matmul
    ks, st = cfg.kernel_size, cfg.kernel_stride
    dev = q.device
    vis1 = (torch.arange(n1, device=dev) * st + ks - 1)[None, None, :] <= t[:, :, None]  # [B, Tc, n1]
    vis2 = (torch.arange(n2, device=dev) * 4 * st + 4 * ks - 1)[None, None, :] <= t[:, :, None]  # [B, Tc, n2]
    # in place over the big [B, KVH, G, Tc, n] score tensors: one fp32 copy, then no further allocations
    s2 = (qg @ c2.transpose(-1, -2)).to(sdt).view(bsz, kvh, g, tc, n2).mul_(scale)
    lse = s2.masked_fill_(~vis2[:, None, None], -math.inf).logsumexp(-1, keepdim=True)  # [B, KVH, G, Tc, 1]
    lse.nan_to_num_(neginf=math.inf)  # no visible coarse kernel: p = 0 for the query
    p = (qg @ c1.transpose(-1, -2)).to(sdt).view(bsz, kvh, g, tc, n1).mul_(scale).sub_(lse)
    p.masked_fill_(~vis1[:, None, None], -math.inf).exp_()
    score = p.sum(2)  # [B, KVH, Tc, n1]: GQA sum over the group's query heads
    # max-pool, kernel r+1, stride r, padding 1: block b takes kernels [r*b - 1, r*b + r - 1]
    r = cfg.block_size // st
    length = r * nb + 1
    padded = score.new_full((bsz, kvh, tc, length), -math.inf)
    m = min(n1, length - 1)
    padded[..., 1:1 + m] = score[..., :m]
    blocks = padded.unfold(-1, r + 1, r).amax(-1)  # [B, KVH, Tc, nb]
    b_idx = torch.arange(nb, device=dev)
    qb = (t // cfg.block_size)[:, :, None]
    forced = (b_idx < cfg.init_blocks) | ((b_idx >= qb - cfg.local_blocks) & (b_idx <= qb))  # [B, Tc, nb]
    return blocks.masked_fill(forced[:, None], math.inf)


def _prepare(q, k, positions, kv_lens, compressed, cfg):
    """Shared argument handling: config, positions [B, T] clamped to the row lengths, (C1, C2)."""
    cfg = as_config(cfg)
    bsz, _, t, _ = q.shape
    if positions is None:
        positions = torch.arange(k.shape[2] - t, k.shape[2], device=q.device).expand(bsz, t)
    if kv_lens is None:
        kv_lens = positions.max(1).values + 1
    positions = clamp_positions(positions, kv_lens)
    c1, c2 = compressed if compressed is not None else compress_both(k[:, :, :int(kv_lens.max())], cfg)
    return cfg, positions, kv_lens, c1, c2


@torch.no_grad()
def block_scores(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None,
                 cfg: SparseConfig | dict | None = None, *, kv_lens: torch.Tensor | None = None,
                 compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Stage 1 + 1b exactly as the spec states: [B, KVH, T, n_blocks] (fp32, or fp64 for fp64 inputs).

    q [B, H, T, D] and k [B, KVH, S, D] are the stage-1 inputs (pre-RoPE when use_nope). Returns every block,
    future ones included, so it is O(T * S / block_size): for inspection and tests; selection uses chunks.
    """
    cfg, positions, kv_lens, c1, c2 = _prepare(q, k, positions, kv_lens, compressed, cfg)
    nb = -(-int(kv_lens.max()) // cfg.block_size)
    return torch.cat([_chunk_block_scores(q[:, :, i:i + SELECT_CHUNK], positions[:, i:i + SELECT_CHUNK], c1, c2,
                                          cfg, nb) for i in range(0, q.shape[2], SELECT_CHUNK)], dim=2)


def select_chunk(q: torch.Tensor, t: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, cfg: SparseConfig,
                 k_sel: int) -> torch.Tensor:
    """top-k block indices [B, KVH, Tc, k_sel] (int64, ascending, -1 = none) for queries q at positions t.
    c1/c2: compressed keys, best padded by pad_kernels."""
    bsz, kvh = q.shape[0], c1.shape[1]
    qb = t // cfg.block_size  # [B, Tc]
    nb = int(qb.max()) + 1  # blocks after the chunk's last block are never kept
    slots = torch.arange(k_sel, device=q.device)
    if nb <= k_sel:  # every query keeps all of its blocks: no scoring needed
        idx = torch.where(slots <= qb[:, :, None], slots, -1)
        return idx[:, None].expand(bsz, kvh, -1, -1)
    t_max = int(t.max())
    # the kernels visible to the chunk's last query, rounded up to a bucket (c1/c2 come from pad_kernels)
    n1, n2 = (min(c.shape[2], -(-n_visible(t_max, size, stride, c.shape[2]) // KERNEL_BUCKET) * KERNEL_BUCKET)
              for c, size, stride in ((c1, cfg.kernel_size, cfg.kernel_stride),
                                      (c2, 4 * cfg.kernel_size, 4 * cfg.kernel_stride)))
    scores = _chunk_block_scores(q, t, c1[:, :, :n1], c2[:, :, :n2], cfg, nb)
    scores.masked_fill_((torch.arange(nb, device=q.device) > qb[:, :, None])[:, None], -math.inf)
    return _topk_ascending(scores, k_sel, qb)


def _topk_ascending(scores: torch.Tensor, k_sel: int, qb: torch.Tensor) -> torch.Tensor:
    """Indices of the k_sel largest scores [B, KVH, Tc, nb], ascending; blocks > qb [B, Tc] -> -1.

    Equal scores are common (adjacent blocks share the boundary kernel of the max-pool), and torch.topk
    leaves ties unspecified, so ties go to the lower block: keep every score above the k-th largest, then
    the first of those equal to it, in index order (cumsum), scattered straight into ascending slots.
    """
    kth = scores.topk(k_sel, dim=-1, sorted=False).values.amin(-1, keepdim=True)
    above, equal = scores > kth, scores == kth
    need = k_sel - above.sum(-1, keepdim=True)
    keep = above | (equal & (equal.cumsum(-1) <= need))  # exactly k_sel per row
    slot = torch.where(keep, keep.cumsum(-1) - 1, k_sel)  # column k_sel swallows the dropped blocks
    nb = scores.shape[-1]
    idx = scores.new_zeros(*scores.shape[:-1], k_sel + 1, dtype=torch.int64)
    idx.scatter_(-1, slot, torch.arange(nb, device=scores.device).expand_as(slot))
    idx = idx[..., :k_sel]
    return idx.masked_fill_(idx > qb[:, None, :, None], -1)


@torch.no_grad()
def select_blocks(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor | None,
                  cfg: SparseConfig | dict | None = None, *, kv_lens: torch.Tensor | None = None,
                  compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Stage 1c: topk_idx [B, KVH, T, K] int32, K = min(topk + window/block, n_blocks); -1 marks empty slots.

    q [B, H, T, D], k [B, KVH, S, D]: stage-1 inputs; positions [B, T] (default: the last T of S);
    kv_lens [B] (default positions.max + 1); compressed: precomputed (C1, C2) from a caller's cache.
    """
    cfg, positions, kv_lens, c1, c2 = _prepare(q, k, positions, kv_lens, compressed, cfg)
    c1, c2 = pad_kernels(c1), pad_kernels(c2)
    k_sel = cfg.n_select(-(-int(kv_lens.max()) // cfg.block_size))
    return torch.cat([select_chunk(q[:, :, i:i + SELECT_CHUNK], positions[:, i:i + SELECT_CHUNK], c1, c2, cfg, k_sel)
                      for i in range(0, q.shape[2], SELECT_CHUNK)], dim=2).to(torch.int32)
