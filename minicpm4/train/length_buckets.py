"""Length-bucketed batches for the long-context stage: every row is one piece of one document, and a batch holds
pieces of similar length, so few tokens are padding and no row mixes documents.

The documents are the EOS-terminated spans of the token stream (TokenShards). A document of n tokens is cut into
pieces of at most seq_len + 1 tokens starting every seq_len tokens (like token_loader's windows, the extra token is
the last target; a piece of one token has no target and is dropped). A piece of m tokens has m - 1 inputs and goes
to the first bucket whose bound is >= m - 1; `bounds` are increasing, divide seq_len and end at seq_len.

Token budget: a batch of bucket b has batch_size * (seq_len // bounds[b]) rows, so a step sees at most
batch_size * seq_len input tokens whatever the bucket (the IV2 recipe mixes 0-4K ... 24-32K buckets by tokens; the
mix here is the data's). Rows are padded at the end to the batch's longest piece rounded up to PAD_MULTIPLE (at most
to the bucket's bound), with labels IGNORE; causal attention never lets a real token see the padding after it.

Epoch e: each bucket's pieces in the order torch.randperm(Generator(seed + e)), cut into batches (a remainder too
small for a batch waits for the next epoch's shuffle), then the batches of all buckets in one shuffled order. The
state is (epoch, batches of the epoch handed out), independent of the world size; rank r takes rows
[r*R/world, (r+1)*R/world) of a batch of R rows.
"""

from __future__ import annotations

import numpy as np
import torch

from minicpm4.errors import ConfigError
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.token_loader import TokenShards, check_data_state

PAD_MULTIPLE = 64  # padded lengths come in few shapes: oneDNN keeps a compiled kernel per matmul shape


def check_bounds(bounds: list, seq_len: int) -> None:
    """Bucket bounds: increasing positive integers that divide seq_len, the last one seq_len."""
    if not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds):
        raise ConfigError(f"length_buckets must be positive integers, got {bounds!r}")
    if any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ConfigError(f"length_buckets must be increasing, got {bounds!r}")
    if bounds[-1] != seq_len:
        raise ConfigError(f"length_buckets must end at seq_len ({seq_len}), got {bounds!r}")
    if any(seq_len % b for b in bounds):
        raise ConfigError(f"each of length_buckets {bounds!r} must divide seq_len ({seq_len}): a batch of bucket "
                          "bound b holds batch_size * seq_len / b rows")


def document_pieces(shards: TokenShards, eos: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of every piece, in stream order: documents end at each EOS (and at the end of the stream)."""
    ends = [np.flatnonzero(m == eos) + int(s) + 1 for m, s in zip(shards.maps, shards.starts)]
    ends = np.concatenate(ends + [np.array([shards.total])])
    ends = np.unique(ends[ends > 0])
    doc_starts = np.concatenate([[0], ends[:-1]])
    starts, lengths = [], []
    for a, b in zip(doc_starts.tolist(), ends.tolist()):
        offsets = np.arange(a, b - 1, seq_len)  # a piece must keep >= 2 tokens
        starts.append(offsets)
        lengths.append(np.minimum(seq_len + 1, b - offsets))
    return np.concatenate(starts).astype(np.int64), np.concatenate(lengths).astype(np.int64)


class BucketLoader:
    """next_batch() -> {"input_ids", "labels"} [rows/world, padded length], rows from one length bucket."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, bounds: list[int], seed: int,
                 rank: int = 0, world: int = 1):
        check_bounds(bounds, seq_len)
        eos = shards.index.get("eos_token_id")
        if eos is None:
            raise ConfigError(f"{shards.index_path}: length_buckets need documents, but the index has no "
                              "eos_token_id to separate them")
        self.shards, self.seq_len, self.batch_size, self.bounds = shards, seq_len, batch_size, list(bounds)
        self.seed, self.rank, self.world, self.pad_id = seed, rank, world, int(eos)
        self.starts, self.lengths = document_pieces(shards, self.pad_id, seq_len)
        bucket = np.searchsorted(np.array(bounds), self.lengths - 1)  # first bound >= inputs of the piece
        self.members = [torch.from_numpy(np.flatnonzero(bucket == b)) for b in range(len(bounds))]
        self.rows = [batch_size * (seq_len // b) for b in bounds]
        if sum(len(m) // r for m, r in zip(self.members, self.rows)) == 0:
            sizes = ", ".join(f"<= {b}: {len(m)}" for b, m in zip(bounds, self.members))
            raise ConfigError(f"{shards.index_path}: no length bucket has enough pieces for one batch (pieces per "
                              f"bucket {sizes}; rows per batch {self.rows})")
        self.epoch, self.position = 0, 0
        self._order: list[torch.Tensor] | None = None

    def _epoch_batches(self) -> list[torch.Tensor]:
        """This epoch's batches, each a tensor of piece indices, in the order they are handed out."""
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            batches = []
            for members, rows in zip(self.members, self.rows):
                shuffled = members[torch.randperm(len(members), generator=g)]
                if len(shuffled) >= rows:  # (split of an empty tensor would give one empty batch)
                    batches += list(shuffled[:len(shuffled) // rows * rows].split(rows))
            self._order = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return self._order

    def next_batch(self) -> dict[str, torch.Tensor]:
        pieces = self._epoch_batches()[self.position]
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        local = len(pieces) // self.world
        mine = pieces[self.rank * local:(self.rank + 1) * local].tolist()
        longest = int(self.lengths[pieces].max()) - 1  # all ranks pad to the same length
        bound = self.bounds[int(np.searchsorted(np.array(self.bounds), longest))]
        width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, bound)
        x = torch.full((len(mine), width + 1), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(mine), width), IGNORE, dtype=torch.int64)
        for row, p in enumerate(mine):
            n = int(self.lengths[p])
            x[row, :n] = torch.from_numpy(self.shards.read(int(self.starts[p]), n))
            labels[row, :n - 1] = x[row, 1:n]
        return {"input_ids": x[:, :-1], "labels": labels}

    def state_dict(self) -> dict:
        return {"kind": "buckets", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "bounds": self.bounds, "pieces": len(self.starts)}

    def load_state_dict(self, state: dict) -> None:
        check_data_state(state, self.state_dict(), ("kind", "seed", "seq_len", "bounds", "pieces"))
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
