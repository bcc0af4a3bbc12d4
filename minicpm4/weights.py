"""Safetensors checkpoints: read (single file or sharded index) into the model, and write atomically.

Names are the Hugging Face ones, so no rename table is needed for MiniCPM4 or Llama checkpoints.
Every tensor is checked against the model's own shapes, and every float tensor for NaN and infinities (random
bytes under a valid header, which would otherwise load and generate garbage), before anything is assigned;
every failure names the file and the tensor. MINICPM4_SKIP_FINITE_CHECK=1 skips the finiteness check.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from minicpm4.errors import CheckpointError
from minicpm4.fileio import atomic_write, atomic_write_text

# Buffers that checkpoints may carry but the model recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory: model.safetensors, or the shards named in the index."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}")
        return files
    if (directory / "pytorch_model.bin").is_file():
        raise CheckpointError(f"{directory}: only pytorch_model.bin found; convert it to safetensors first")
    raise CheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json")


def read_state_dict(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    # disable=None: the bar shows only on a terminal
    with tqdm(desc="loading weights", unit="tensor", disable=None, leave=False) as bar:
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name.endswith(IGNORED_SUFFIXES):
                            continue
                        t = f.get_tensor(name)
                        state[name] = t.to(dtype) if t.is_floating_point() else t
                        bar.update()
            except (SafetensorError, OSError, RuntimeError) as e:
                raise CheckpointError(f"{path}: cannot read safetensors file, it may be truncated "
                                      f"or corrupt ({e})") from None
    return state


def first_nonfinite(tensors: dict) -> str | None:
    """Name of the first floating-point tensor holding a NaN or an infinity (nested dicts and lists are walked,
    as in an optimizer state), else None. A sum is one pass without a temporary and is finite whenever every
    element is (NaN and inf propagate); only a non-finite sum, which finite values can also overflow to, is
    checked element-wise."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and value.numel() and not math.isfinite(value.sum()) \
                    and not bool(torch.isfinite(value).all()):
                return str(name)
        elif isinstance(value, (dict, list, tuple)):
            inner = first_nonfinite(value if isinstance(value, dict) else dict(enumerate(value)))
            if inner is not None:
                return f"{name}.{inner}"
    return None


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    if os.environ.get("MINICPM4_SKIP_FINITE_CHECK") == "1":
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # memory-bound sums: more threads add little, and stall when a core is busy
    try:
        bad = first_nonfinite(state)
    finally:
        torch.set_num_threads(threads)
    if bad is not None:
        raise CheckpointError(f"{source}: tensor {bad} holds NaN or infinite values; the weights are corrupt "
                              f"(set MINICPM4_SKIP_FINITE_CHECK=1 to load them anyway)")


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Assign `state` to `model`'s parameters after checking names and shapes; tied heads may be absent."""
    expected = dict(model.state_dict())
    tied = getattr(model.config, "tie_word_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{source}: tensor(s) missing from checkpoint: {', '.join(missing[:5])}{more}")
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise CheckpointError(f"{source}: unexpected tensor(s) for this config: {', '.join(unexpected[:5])}{more}")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {name} has shape {tuple(state[name].shape)}, "
                                  f"config.json implies {tuple(ref.shape)}")
    check_finite(state, source)
    model.load_state_dict(state, strict=False, assign=True)
    if tied:  # assign=True replaced the embedding Parameter; re-tie the head to it
        model.lm_head.weight = model.model.embed_tokens.weight


def save_state_dict(state: dict[str, torch.Tensor], directory: Path, tied: bool) -> None:
    """Write model.safetensors (tied lm_head omitted, as HF does)."""
    tensors = {k: v.detach().contiguous() for k, v in state.items() if not (tied and k == "lm_head.weight")}
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))


def write_hf_dir(out: Path, config: dict, state: dict[str, torch.Tensor], tokenizer, tied: bool) -> Path:
    """config.json, model.safetensors and tokenizer files (`tokenizer.save(dir)`; none when tokenizer is None) into
    `out` (absent or empty), through a temporary sibling directory renamed into place at the end."""
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        save_state_dict(state, tmp, tied)
        if tokenizer is not None:
            tokenizer.save(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
