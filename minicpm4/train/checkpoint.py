"""Training checkpoints: an HF model directory plus the state needed to continue exactly where a run stopped.

    OUT/checkpoints/step_0000100/model/      the objective's model directory: config.json, model.safetensors (fp32),
                                             and for a language model its tokenizer (minicpm4.load reads it)
    OUT/checkpoints/step_0000100/state.pt    step, optimizer, data position, RNG states, the run's config
    OUT/checkpoints/latest                   name of the newest complete checkpoint

A checkpoint is assembled in a temporary sibling directory and renamed into place, and `latest` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint intact and `latest` pointing
at a complete one. The oldest checkpoints beyond `keep` are deleted only after the new one is in place, and
only a finite one is written (guards.py), so rotation never trades a good checkpoint for a NaN one.
state.pt holds only tensors and plain containers, so it is read with torch.load(weights_only=True).
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from minicpm4.config import ModelConfig
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.fileio import atomic_write_text
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.guards import require_finite, rotation_victims
from minicpm4.weights import check_finite, checkpoint_files, read_state_dict, write_hf_dir

STATE = "state.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def write_model_dir(directory: Path, config: ModelConfig, model_state: dict[str, torch.Tensor],
                    tokenizer: Tokenizer) -> None:
    """A language model's checkpoint directory: the HF layout in fp32."""
    cfg = config.to_dict()
    cfg["torch_dtype"] = "float32"
    state = {k: v.detach().float().cpu() for k, v in model_state.items()}
    write_hf_dir(directory, cfg, state, tokenizer, config.tie_word_embeddings)


def save_checkpoint(out_dir: str | os.PathLike, step: int, weights: dict[str, torch.Tensor],
                    write_model: Callable[[Path], Any], train_state: dict[str, Any], keep: int = 2) -> Path:
    """Write checkpoints/step_NNNNNNN atomically and point `latest` at it; returns its path. write_model(dir) writes
    the model directory (dir does not exist yet) from `weights`, which must be finite, as the optimizer state must."""
    require_finite(f"checkpoint at step {step}", model=weights, optimizer=train_state.get("optimizer", {}))
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.", suffix=".tmp"))
    try:
        write_model(tmp / "model")
        torch.save({**train_state, "step": step}, tmp / STATE)
        if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", name + "\n")
    for old in rotation_victims([p for p in root.glob("step_*") if p.is_dir()], keep, final):
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    root = Path(out_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else []


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run's out_dir (its `latest` checkpoint)."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    latest = p / "checkpoints" / "latest"
    if latest.is_file():
        return p / "checkpoints" / latest.read_text().strip()
    raise CheckpointError(f"{p}: neither a checkpoint (no {STATE}) nor a run directory with checkpoints/latest")


def load_checkpoint(path: str | os.PathLike) -> tuple[Path, ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(checkpoint dir, model config, fp32 model state, train state), or a CheckpointError that names the bad
    checkpoint and the other checkpoints of the run, which are left untouched."""
    ckpt = resolve_checkpoint(path)
    try:
        config = ModelConfig.from_json(ckpt / "model" / "config.json")
        model_state = read_state_dict(checkpoint_files(ckpt / "model"), torch.float32)
        check_finite(model_state, "model.safetensors")  # garbage bytes under a valid header would train on as NaN
        try:
            train_state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError):
            raise CheckpointError(f"{STATE} is not a readable training state") from None
        if not isinstance(train_state, dict) or "step" not in train_state:
            raise CheckpointError(f"{STATE} holds no training state")
    except (CheckpointError, ConfigError, OSError, RuntimeError, ValueError) as e:
        others = [str(p) for p in sorted(ckpt.parent.glob("step_*")) if p.is_dir() and p != ckpt]
        hint = f"; other checkpoints kept: {', '.join(others)} (resume from one with --resume PATH)" if others else ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{ckpt}: corrupt or unreadable checkpoint ({msg}){hint}") from None
    return ckpt, config, model_state, train_state


def check_compatible(ckpt: Path, saved: ModelConfig, current: ModelConfig, saved_run: dict, run: dict) -> None:
    """The model shape and the settings that fix the data order and schedule must be those of the checkpoint."""
    a, b = saved.to_dict(), current.to_dict()
    for d in (a, b):
        d.pop("torch_dtype", None)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
        raise CheckpointError(f"{ckpt}: incompatible checkpoint: model config differs in {', '.join(diff)}")
    fixed = {"task": None, "seq_len": None, "batch_size": None, "steps": None, "seed": None, "mup": None,
             "mtp_depth": 0}  # value of a key missing from an older checkpoint's config
    fixed.update({"qat": {"qat.mode": None, "qat.group_size": None},
                  "draft": {"draft.max_windows": None},
                  "rl": {"rl.group_size": None, "rl.max_active": None, "rl.task": None,
                         "rl.task_max_steps": None}}.get(run.get("task"), {}))
    saved_run, run = _flat(saved_run), _flat(run)
    diff = [f"{k} ({saved_run.get(k, d)!r} -> {run.get(k, d)!r})" for k, d in fixed.items()
            if saved_run.get(k, d) != run.get(k, d)]
    if diff:
        raise CheckpointError(f"{ckpt}: incompatible checkpoint: run settings differ: {', '.join(diff)}")



def _flat(run: dict) -> dict:
    """A run config with its sections' keys as `section.key`."""
    out = dict(run)
    for k, v in run.items():
        if isinstance(v, dict) and k in ("qat", "draft", "rl"):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
    return out
