"""Fixed-length training batches from token shards: deterministic given a seed, resumable at an exact position.

The shards of an index form one token stream (documents already separated by EOS). It is cut into windows of
seq_len + 1 tokens starting every seq_len tokens (window i covers stream[i*L : i*L + L + 1]; the extra token is
the last target), so every token is a target exactly once per epoch. Each epoch visits all windows in the order
of torch.randperm(n, Generator(seed + epoch)). A global batch is the next `batch_size` windows of that order
(crossing into the next epoch when one runs out); rank r of `world` takes rows [r*B/world, (r+1)*B/world).

The state is (epoch, position): the number of windows of the current epoch already handed out. It does not
depend on the world size, so a run may resume on a different number of processes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.train.shard_writer import FORMAT, INDEX


def check_data_state(saved: dict, mine: dict, keys: tuple[str, ...]) -> None:
    """Refuse a loader state saved for other data or settings: each of `keys` must match this run's value."""
    for key in keys:
        if saved.get(key) != mine[key]:
            raise CheckpointError(f"data state does not match this run: {key} is {saved.get(key)!r} in the "
                                  f"checkpoint, {mine[key]!r} now (different data or config?)")

class TokenShards:
    """The shards listed in an index.json, memory-mapped, read as one stream of token ids."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.index_path = path / INDEX if path.is_dir() else path
        try:
            self.index = json.loads(self.index_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{self.index_path}: cannot read token index ({e}); create it with "
                              "'minicpm4 data tokenize'") from None
        if self.index.get("format") != FORMAT:
            raise ConfigError(f"{self.index_path}: unknown index format {self.index.get('format')!r}")
        root = self.index_path.parent
        dtype = np.dtype(self.index["dtype"])
        self.maps = []
        for shard in self.index["shards"]:
            file = root / shard["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != shard["tokens"] * dtype.itemsize:
                raise ConfigError(f"{file}: expected {shard['tokens']} tokens ({shard['tokens'] * dtype.itemsize} "
                                  f"bytes), found {size} bytes; re-run 'minicpm4 data tokenize'")
            if shard["tokens"]:
                self.maps.append(np.memmap(file, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [m.size for m in self.maps])  # stream offset of each shard
        self.total = int(self.starts[-1])
        self.vocab_size = int(self.index["vocab_size"])
        self.tokenizer_dir = root / self.index.get("tokenizer", "tokenizer")

    def read(self, start: int, length: int) -> np.ndarray:
        """stream[start : start + length] as int64, gathered across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        done = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < length:
            m, offset = self.maps[shard], start + done - int(self.starts[shard])
            n = min(length - done, m.size - offset)
            out[done:done + n] = m[offset:offset + n]
            done, shard = done + n, shard + 1
        return out


class PackedLoader:
    """Global batches of windows for one rank: next_batch() -> {"input_ids", "labels"} [B/world, seq_len]."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed
        self.rank, self.world = rank, world
        self.n_windows = (shards.total - 1) // seq_len if shards.total > 1 else 0
        if self.n_windows < batch_size:
            raise ConfigError(f"{shards.index_path}: {shards.total} tokens make {self.n_windows} windows of "
                              f"seq_len {seq_len}, fewer than batch_size {batch_size}")
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None

    def _epoch_order(self) -> torch.Tensor:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.n_windows, generator=g)
        return self._order

    def next_windows(self, n: int | None = None) -> list[int]:
        """The next n (default batch_size) window indices of the global order, advancing the state."""
        n = self.batch_size if n is None else n
        picked: list[int] = []
        while len(picked) < n:
            take = min(n - len(picked), self.n_windows - self.position)
            picked += self._epoch_order()[self.position:self.position + take].tolist()
            self.position += take
            if self.position == self.n_windows:
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return picked

    def read_windows(self, windows: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.shards.read(w * self.seq_len, self.seq_len + 1) for w in windows]))

    def next_batch(self) -> dict[str, torch.Tensor]:
        local = self.batch_size // self.world
        x = self.read_windows(self.next_windows()[self.rank * local:(self.rank + 1) * local])
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def state_dict(self) -> dict:
        return {"kind": "pretrain", "epoch": self.epoch, "position": self.position, "seed": self.seed,
                "seq_len": self.seq_len, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        check_data_state(state, self.state_dict(), ("kind", "seed", "seq_len", "n_windows"))
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


class DecayMix:
    """The WSD decay-phase data mix: from optimizer step `decay_start` on, round(mix * batch_size) rows of every
    global batch come from a second (higher-quality) corpus, the rest from the main one, as MiniCPM mixes
    high-quality and SFT-style data into its decay. Same interface and rank split as PackedLoader."""

    def __init__(self, main: PackedLoader, decay: PackedLoader, mix: float, decay_start: int):
        self.main, self.decay, self.mix, self.decay_start = main, decay, mix, decay_start
        self.step = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        b, rank, world = self.main.batch_size, self.main.rank, self.main.world
        k = round(self.mix * b) if self.step >= self.decay_start else 0
        rows = [(self.main, w) for w in self.main.next_windows(b - k)] + [(self.decay, w) for w in
                                                                          self.decay.next_windows(k)]
        local = b // world
        x = torch.cat([src.read_windows([w]) for src, w in rows[rank * local:(rank + 1) * local]])
        self.step += 1
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}

    def state_dict(self) -> dict:
        return {"kind": "decay_mix", "step": self.step, "mix": self.mix, "main": self.main.state_dict(),
                "decay": self.decay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != "decay_mix" or state.get("mix") != self.mix:
            raise CheckpointError(f"data state does not match this run: saved {state.get('kind')!r} with mix "
                                  f"{state.get('mix')!r}, now decay_mix {self.mix!r}")
        self.main.load_state_dict(state["main"])
        self.decay.load_state_dict(state["decay"])
        self.step = int(state["step"])
