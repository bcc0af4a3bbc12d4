"""Draft trees: the candidate continuations a draft proposes, and the EAGLE-2 dynamic tree built from an EAGLE draft.

A DraftTree holds N nodes in parent-before-child order. Node 0 is the root: the last committed token, which the
target has not read yet. Every other node is a draft token whose parent is the token before it. The target
verifies the whole tree in one forward pass: node i goes to position (committed length + depth(i)) and attends to
the committed prefix, to its ancestors and to itself (`tree_mask`).

EAGLE-2 (`EagleDrafter.propose`), as CPM.cu runs it for MiniCPM4 (num_iter 2, topk 10, tree_size 12):
  iteration 1: the draft reads the pairs committed since its last round and predicts the root's children; the
               top-k become candidates, scored by log-probability;
  iteration i: the top-k candidates of the newest level (by cumulative log-probability) are fed to the draft
               together, each attending to the committed draft slots, its ancestors and itself; each adds its
               top-k children, scored parent score + log p;
  finally      the best tree_size - 1 candidates by score are kept. A child never scores above its parent
               (log p <= 0), and a stable sort puts the parent first on a tie, so the kept set contains every
               kept node's ancestors: it is a tree.
Candidates are picked deterministically (top-k), so the tree carries no proposal distribution (q = None) and
sampling-mode verification samples the target and follows a matching child (spec/decoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import ConfigError
from minicpm4.spec.eagle import EagleDraft


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] token ids; tokens[0] is the root
    parents: list[int]  # [N]; parents[0] = -1, parents[i] < i
    q: torch.Tensor | None = None  # [N, V]: row i = the distribution node i's token was sampled from, or None

    def __len__(self) -> int:
        return len(self.parents)

    @property
    def depths(self) -> torch.Tensor:
        d = [0] * len(self)
        for i in range(1, len(self)):
            d[i] = d[self.parents[i]] + 1
        return torch.tensor(d)

    def children(self, i: int) -> list[int]:
        return [j for j in range(i + 1, len(self)) if self.parents[j] == i]

    def mask(self) -> torch.Tensor:
        """[N, N] bool: mask[i, j] = node j is node i or one of its ancestors."""
        n = len(self)
        m = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            m[i] |= m[self.parents[i]]
        return m


def tree_mask(tree: DraftTree, start: int) -> torch.Tensor:
    """[N, start + N] attention mask for verifying `tree` after `start` committed slots."""
    return torch.cat([torch.ones(len(tree), start, dtype=torch.bool), tree.mask()], dim=1)


def causal_mask(t: int, start: int) -> torch.Tensor:
    """[t, start + t]: new token i sees every slot up to start + i (a chain, or a prompt chunk)."""
    return torch.arange(start + t)[None, :] <= (start + torch.arange(t))[:, None]


def best_subtree(parents: list[int], scores: torch.Tensor, keep: int) -> list[int]:
    """Indices (ascending) of the `keep` best candidates by score; ties go to the earlier (a parent precedes
    its children). parents[i] = index of the candidate's parent, or -1 for a child of the root."""
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    kept = sorted(order.tolist())
    assert all(parents[i] < 0 or parents[i] in set(kept) for i in kept), "a kept candidate lost its parent"
    return kept


class EagleDrafter:
    """Proposes EAGLE-2 trees from an EagleDraft; keeps the draft's own KV cache (slot = position t of the pair
    (feature_t, x_{t+1}); tree candidates use slots past the committed ones and are overwritten next round)."""

    def __init__(self, draft: EagleDraft, topk: int = 10, num_iter: int = 2, tree_size: int = 12):
        if topk < 1 or num_iter < 1 or tree_size < 2:
            raise ConfigError(f"draft tree needs topk >= 1, num_iter >= 1, tree_size >= 2 "
                              f"(got {topk}, {num_iter}, {tree_size})")
        self.draft, self.topk, self.num_iter, self.tree_size = draft, topk, num_iter, tree_size
        self.cache = None
        self.done = 0  # draft slots holding committed pairs
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (next tokens [k], features [k, H])

    @property
    def extra_slots(self) -> int:
        """Verification slots the target needs past the committed tokens: the tree itself."""
        return self.tree_size

    def begin(self, max_len: int, dtype: torch.dtype) -> None:
        need = max_len + (self.num_iter - 1) * self.topk
        if self.cache is None or self.cache.max_len < need or self.cache.k.dtype != dtype:
            self.cache = self.draft.new_cache(need, dtype)
        self.done, self.pending = 0, None

    def commit(self, ids: list[int], start: int, features: torch.Tensor) -> None:
        """The target now holds positions start..start+k-1 with these features [k, H]; ids = all committed tokens."""
        k = features.shape[0]
        self.pending = (torch.tensor(ids[start + 1:start + 1 + k]), features)
        self.done = start

    @torch.inference_mode()
    def propose(self, ids: list[int], params: SamplingParams, generator: torch.Generator | None) -> DraftTree:
        toks, feats = self.pending
        start, k = self.done, toks.numel()
        pos = torch.arange(start, start + k)
        logits, g = self.draft(toks[None], feats[None], pos[None], self.cache, start, causal_mask(k, start)[None])
        self.done = start + k
        base = start + k - 1  # position of the root pair; a depth-d candidate sits at base + d
        # candidates: token (head-row index), parent candidate (-1 = root), score, depth, draft input hidden
        lp = logits[0, -1].log_softmax(-1)
        top = lp.topk(min(self.topk, lp.numel()))
        cand_tok, cand_par = top.indices.tolist(), [-1] * top.indices.numel()
        scores = [top.values]
        hid = [g[0, -1]] * top.indices.numel()  # the hidden each candidate is drafted from
        slot_of: dict[int, int] = {}  # candidate -> the draft slot it was fed at
        level = list(range(len(cand_tok)))
        next_slot = self.done
        for depth in range(2, self.num_iter + 1):
            all_scores = torch.cat(scores)
            lvl_scores = all_scores[level]
            frontier = [level[i] for i in lvl_scores.topk(min(self.topk, len(level))).indices.tolist()]
            f = len(frontier)
            mask = torch.zeros(f, next_slot + f, dtype=torch.bool)
            mask[:, :self.done] = True
            for r, c in enumerate(frontier):
                a = cand_par[c]
                while a >= 0:
                    mask[r, slot_of[a]] = True
                    a = cand_par[a]
                slot_of[c] = next_slot + r
                mask[r, next_slot + r] = True
            tokens = self.draft.full_ids(torch.tensor([cand_tok[c] for c in frontier]))
            feats_in = torch.stack([hid[c] for c in frontier])
            positions = torch.full((f,), base + depth - 1)
            logits, g = self.draft(tokens[None], feats_in[None], positions[None], self.cache, next_slot, mask[None])
            next_slot += f
            lp = logits[0].log_softmax(-1)  # [f, V']
            top = lp.topk(min(self.topk, lp.shape[-1]), dim=-1)
            level = []
            for r, c in enumerate(frontier):
                for j in range(top.indices.shape[1]):
                    level.append(len(cand_tok))
                    cand_tok.append(int(top.indices[r, j]))
                    cand_par.append(c)
                    hid.append(g[0, r])
                scores.append(all_scores[c] + top.values[r])
        kept = best_subtree(cand_par, torch.cat(scores), self.tree_size - 1)
        index = {c: i + 1 for i, c in enumerate(kept)}
        tokens = self.draft.full_ids(torch.tensor([cand_tok[c] for c in kept], dtype=torch.long))
        return DraftTree(torch.cat([torch.tensor([ids[-1]]), tokens]),
                         [-1] + [index.get(cand_par[c], 0) for c in kept])
