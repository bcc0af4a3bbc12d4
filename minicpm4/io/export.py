"""Load -> quantize -> write: the offline workflows behind `minicpm4 quantize`. They read any source the loader
reads, in fp32, and write a checkpoint directory the loader reads back (quant/gptq_format.py, quant/ternary_format.py
hold the layouts themselves)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from torch import nn

from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.io.loader import load
from minicpm4.quant.gptq import METHODS, calibrate, quantize_model_weights
from minicpm4.quant.gptq_format import calibration_batches, save_quantized
from minicpm4.quant.primitives import INT4_GROUP_SIZES
from minicpm4.quant.ternary_format import save_ternary


def quantize_checkpoint(src, out_dir, method: str = "gptq", bits: int = 4, group_size: int = 128,
                        calib_text: str | None = None, nsamples: int = 32, seq_len: int = 512,
                        symmetric: bool = True, act_order: bool = True, log=print) -> Path:
    """Load `src` (fp32), quantize every linear but lm_head with rtn / gptq / pgptq (calibrated on calib_text;
    act_order: gptq.gptq_quantize's), and write a GPTQ-layout checkpoint to out_dir. bits 8: per output channel
    (group_size ignored)."""
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if bits not in (4, 8):
        raise ConfigError(f"bits must be 4 or 8, got {bits}")
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"4-bit group size must be one of {INT4_GROUP_SIZES} (the int4 kernel's), got {group_size}")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory exists and is not empty")
    model, tok = load(src, dtype="fp32")
    linears = {nm: m for nm, m in model.named_modules() if isinstance(m, nn.Linear) and nm != "lm_head"}
    if bits == 4:
        bad = {nm: m.in_features for nm, m in linears.items() if m.in_features % group_size}
        if bad:
            ks = set(bad.values()) | {m.in_features for m in linears.values()}
            fits = [g for g in INT4_GROUP_SIZES if all(k % g == 0 for k in ks)]
            hint = f"use --group-size {max(fits)}" if fits else f"no group size in {INT4_GROUP_SIZES} divides all"
            nm = next(iter(bad))
            raise ConfigError(f"layer {nm} has {bad[nm]} inputs, not divisible by group size {group_size} "
                              f"({len(bad)} such layers); {hint}")
    if method == "rtn":
        hessians = dict.fromkeys(linears)
    else:
        if not calib_text:
            raise ConfigError(f"method {method} needs calibration text (--calib FILE)")
        batches = calibration_batches(tok, calib_text, seq_len, nsamples)
        log(f"calibrating on {sum(len(b) for b in batches)} x {batches[0].shape[1]} tokens")
        t0 = time.perf_counter()
        hessians = calibrate(model, batches, list(linears), skip_prefix=4)
        log(f"calibrated {len(hessians)} layers in {time.perf_counter() - t0:.1f}s")
    qtensors = {}
    for i, (name, acc) in enumerate(hessians.items(), 1):
        t0 = time.perf_counter()
        g = linears[name].in_features if bits == 8 else group_size
        qtensors.update(quantize_model_weights(model, {name: acc}, method, bits, g, symmetric, act_order=act_order))
        log(f"[{i}/{len(hessians)}] {name} {tuple(linears[name].weight.shape)} {method} {bits}-bit "
            f"{'per-channel' if bits == 8 else f'g{g}'}: {time.perf_counter() - t0:.2f}s")
    return save_quantized(model, qtensors, tok, out)


def export_checkpoint(src, out_dir: str | os.PathLike) -> Path:
    """Load `src` in fp32 (any source `load` reads) and write it as a packed ternary checkpoint."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory exists and is not empty")
    model, tok = load(src, dtype="fp32")
    return save_ternary(model, tok, out)
