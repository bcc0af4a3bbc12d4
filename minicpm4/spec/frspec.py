"""FR-Spec vocabulary: the N most frequent token ids of a corpus, to which a draft's LM head is restricted.

    counts[id] = occurrences of id in the tokenized corpus (each line encoded without special tokens)
    vocab      = the N ids with the highest counts (ties: the smaller id), the EOS ids forced in, sorted by count

Saved with torch.save as a 1-D int64 tensor (most frequent first), the format of FR-Spec's `freq_N.pt`. The draft
gathers these rows of the target's lm_head (spec/eagle.py, EagleDraft.bind); the target still verifies over the full
vocabulary, so outputs do not change, only the draft's head cost and its reach.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch

from minicpm4.errors import CheckpointError, InputError
from minicpm4.fileio import atomic_write


def count_tokens(lines: Iterable[str], encode: Callable[[str], list[int]], vocab_size: int,
                 batch: int = 1024) -> torch.Tensor:
    """counts [vocab_size] int64 of the token ids of every non-empty line."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    buf: list[int] = []
    for line in lines:
        if line.strip():
            buf.extend(encode(line))
        if len(buf) >= batch * 64:
            counts += torch.bincount(torch.tensor(buf), minlength=vocab_size)[:vocab_size]
            buf.clear()
    if buf:
        counts += torch.bincount(torch.tensor(buf), minlength=vocab_size)[:vocab_size]
    return counts


def top_vocab(counts: torch.Tensor, size: int, forced: Iterable[int] = ()) -> torch.Tensor:
    """The `size` most frequent ids (ties to the smaller id) with every `forced` id included, most frequent first."""
    forced = sorted({int(i) for i in forced})
    if not 0 < size <= counts.numel():
        raise InputError(f"FR-Spec size must be between 1 and the vocabulary size {counts.numel()}, got {size}")
    if len(forced) > size:
        raise InputError(f"FR-Spec size {size} is smaller than the {len(forced)} EOS ids it must keep")
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    skip = set(forced)
    rest = [i for i in order.tolist() if i not in skip][:size - len(forced)]
    ids = torch.tensor(rest + forced, dtype=torch.int64)
    return ids[torch.sort(counts[ids], descending=True, stable=True).indices]


def save_vocab(ids: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    atomic_write(path, lambda p: torch.save(ids.to(torch.int64), p))
    return path


def load_vocab(path: str | Path, vocab_size: int) -> torch.Tensor:
    """Read a freq_N.pt file (a 1-D id tensor, or a dict/list holding one) and check it against the vocabulary."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read FR-Spec vocabulary ({e})") from None
    if isinstance(obj, dict):
        obj = next((v for v in obj.values() if isinstance(v, torch.Tensor)), None)
    ids = torch.as_tensor(obj) if obj is not None else None
    if ids is None or ids.dim() != 1 or ids.is_floating_point() or ids.numel() == 0:
        raise CheckpointError(f"{path}: expected a 1-D tensor of token ids")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise CheckpointError(f"{path}: token ids outside the model's vocabulary of {vocab_size}")
    if ids.unique().numel() != ids.numel():
        raise CheckpointError(f"{path}: repeated token ids")
    return ids


def build_vocab(files: Iterable[str | Path], encode: Callable[[str], list[int]], vocab_size: int, size: int,
                eos_ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(vocab ids, counts) from text files read line by line."""
    def lines():
        for f in files:
            try:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    yield from fh
            except OSError as e:
                raise InputError(f"{f}: cannot read corpus file ({e.strerror})") from None
    counts = count_tokens(lines(), encode, vocab_size)
    return top_vocab(counts, size, eos_ids), counts
