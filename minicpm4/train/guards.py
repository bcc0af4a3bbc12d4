"""Guards that keep a failing run from destroying what it already has.

- A non-finite loss or gradient norm stops the run with TrainingDiverged (the step's update is never applied).
  With skip_nonfinite_steps = k > 0 the first k such steps are skipped instead (no update, the data moves on);
  the default is 0: stop at the first one, since a NaN is rarely transient and every later step is wasted.
- A checkpoint is written only when its weights (and optimizer state) are finite: require_finite.
- Rotation never deletes the checkpoint just written, which save_checkpoint has verified finite: rotation_victims.
- Temporary checkpoint folders and files that a killed run left behind are removed at start: remove_stale_tmp.
- metrics.jsonl stays strict JSON: non-finite floats are written as the strings "NaN", "Infinity", "-Infinity"
  (the proto3 JSON mapping's spelling) and read back as floats: json_safe / from_json_safe.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any, Callable

from minicpm4.errors import MiniCPM4Error
from minicpm4.weights import first_nonfinite

_SPELLING = {math.inf: "Infinity", -math.inf: "-Infinity"}
_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class TrainingDiverged(MiniCPM4Error):
    """The loss or the gradient norm stopped being finite."""


def finite_step(record: dict) -> bool:
    return all(math.isfinite(record[k]) for k in ("loss", "grad_norm") if record.get(k) is not None)


class NonFiniteSteps:
    """Counts non-finite steps and stops the run once more than `allowed` were seen."""

    def __init__(self, allowed: int, out_dir: Path):
        self.allowed, self.out_dir, self.seen = allowed, out_dir, 0

    def check(self, record: dict) -> None:
        if finite_step(record):
            return
        self.seen += 1
        if self.seen > self.allowed:
            raise TrainingDiverged(
                f"step {record['step']}: loss {record['loss']} and grad_norm {record['grad_norm']}, not finite "
                f"({self.seen} such step(s), skip_nonfinite_steps={self.allowed}); the run stopped without "
                f"applying the step or saving it. Checkpoints in {self.out_dir / 'checkpoints'} hold finite weights: "
                f"resume from one with a lower lr, or allow skips with --set skip_nonfinite_steps=N")


def require_finite(what: str, **states: dict) -> None:
    """TrainingDiverged naming the first non-finite tensor of any of `states` (e.g. model=..., optimizer=...)."""
    for kind, state in states.items():
        bad = first_nonfinite(state)
        if bad is not None:
            raise TrainingDiverged(f"{what}: {kind} tensor {bad} is not finite; not writing it (the previous "
                                   f"checkpoints are kept)")


def rotation_victims(checkpoints: list[Path], keep: int, newest: Path) -> list[Path]:
    """The checkpoints to delete to keep `keep` of them, oldest step first, never `newest` (the one just written,
    even when an older run left checkpoints of later steps)."""
    return [p for p in sorted(checkpoints)[:-keep] if p != newest]


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete the `.*.tmp` files and folders that an interrupted write left in `folder` (call it only while no
    other process writes there, i.e. at the start of a run); returns what was removed."""
    stale = sorted(folder.glob(".*.tmp")) if folder.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def json_safe(record: dict) -> dict:
    return {k: _spell(v) for k, v in record.items()}


def _spell(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "NaN" if math.isnan(v) else _SPELLING[v]
    return v


def from_json_safe(record: dict) -> dict:
    convert: Callable[[Any], Any] = lambda v: _FLOATS.get(v, v) if isinstance(v, str) else v  # noqa: E731
    return {k: convert(v) for k, v in record.items()}
