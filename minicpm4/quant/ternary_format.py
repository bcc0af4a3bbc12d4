"""Packed ternary checkpoints (our format): safetensors holding TernaryLinear's own buffers, read by `load`.

Per ternary linear `<name>` with weight W [N, K] (see quant/ternary.py for the math):

    <name>.planes   int32 [N, K/32, 2]   bit planes of the codes: plane 0 marks +1, plane 1 marks -1
    <name>.qscale   uint8 [N, K/32]      group scale in steps of the row's dscale
    <name>.dscale   bf16  [N]            the row's step (a bf16 value by construction, so stored exactly)

config.json carries quantization_config = {"quant_method": "minicpm4_ternary", "bits": 2, "group_size": 32,
"format_version": 1}. Every other tensor (embeddings, norms, an untied lm_head) is bf16 and keeps its HF name;
the embedding and head stay high precision, as in BitCPM4. A 2.25-bit weight costs 0.14x its bf16 bytes.

Export quantizes each linear but lm_head with quant.quantize_ternary (absmean, group 32), the same function QAT's
forward pass uses, so an exported QAT model computes what it was trained to compute (up to the 8-bit group
scale). Reading checks every tensor's presence, dtype and shape and names the one at fault.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from minicpm4.errors import CheckpointError
from minicpm4.quant.ternary import GROUP, TernaryLinear
from minicpm4.weights import write_hf_dir

QUANT_METHOD = "minicpm4_ternary"
FORMAT_VERSION = 1
PARTS = ("planes", "qscale", "dscale")


def quant_config() -> dict:
    return {"quant_method": QUANT_METHOD, "bits": 2, "group_size": GROUP, "format_version": FORMAT_VERSION}


def is_ternary(config: dict | None) -> bool:
    return isinstance(config, dict) and config.get("quant_method") == QUANT_METHOD


def ternary_layers(config: dict, state: dict[str, torch.Tensor], source: str) -> dict[str, TernaryLinear]:
    """Pop every `<name>.planes/qscale/dscale` from `state` and return {name: TernaryLinear}."""
    if config.get("group_size") != GROUP or config.get("bits") != 2:
        raise CheckpointError(f"{source}: quantization_config group_size={config.get('group_size')!r} "
                              f"bits={config.get('bits')!r}; packed ternary checkpoints use group_size {GROUP}, "
                              "bits 2")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: packed ternary format_version {config.get('format_version')!r} is not "
                              f"supported (this version reads {FORMAT_VERSION})")
    names = sorted({k.rpartition(".")[0] for k in state if k.rpartition(".")[2] in PARTS})
    if not names:
        raise CheckpointError(f"{source}: quantization_config says {QUANT_METHOD} but no <layer>.planes tensors "
                              "are in the checkpoint")
    return {name: _layer(name, state, source) for name in names}


def _layer(name: str, state: dict[str, torch.Tensor], source: str) -> TernaryLinear:
    missing = [p for p in PARTS if f"{name}.{p}" not in state]
    if missing:
        raise CheckpointError(f"{source}: tensor {name}.{missing[0]} missing from the packed ternary checkpoint")
    planes, qscale, dscale = (state.pop(f"{name}.{p}") for p in PARTS)
    if planes.dtype != torch.int32 or planes.dim() != 3 or planes.shape[2] != 2:
        raise CheckpointError(f"{source}: tensor {name}.planes must be int32 [N, K/{GROUP}, 2], "
                              f"got {planes.dtype} {tuple(planes.shape)}")
    n, g = planes.shape[:2]
    if qscale.dtype != torch.uint8 or tuple(qscale.shape) != (n, g):
        raise CheckpointError(f"{source}: tensor {name}.qscale must be uint8 {(n, g)} to match {name}.planes, "
                              f"got {qscale.dtype} {tuple(qscale.shape)}")
    if not dscale.is_floating_point() or tuple(dscale.shape) != (n,):
        raise CheckpointError(f"{source}: tensor {name}.dscale must be a float [{n}] to match {name}.planes, "
                              f"got {dscale.dtype} {tuple(dscale.shape)}")
    if bool((planes[..., 0] & planes[..., 1]).any()):
        raise CheckpointError(f"{source}: tensor {name}.planes marks some weights both +1 and -1 (corrupt)")
    layer = TernaryLinear(g * GROUP, n)
    layer.planes, layer.qscale, layer.dscale = planes.contiguous(), qscale.contiguous(), dscale.float()
    return layer


def ternarize(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, TernaryLinear]:
    """TernaryLinear of every nn.Linear in `model` but those named in skip (the model is not modified)."""
    return {name: TernaryLinear.from_float(m.weight) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name not in skip}


def save_ternary(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
                 layers: dict[str, TernaryLinear] | None = None) -> Path:
    """Write `model` (float, or trained with QAT) as a packed ternary checkpoint directory; layers: the packed
    layers to write (default: ternarize(model)). Written through a temporary directory renamed into place."""
    layers = ternarize(model) if layers is None else layers
    state = {k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach()
             for k, v in model.state_dict().items() if k.removesuffix(".weight") not in layers}
    for name, layer in layers.items():
        state.update({f"{name}.planes": layer.planes, f"{name}.qscale": layer.qscale,
                      f"{name}.dscale": layer.dscale.to(torch.bfloat16)})
    cfg = model.config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_config"] = quant_config()
    return write_hf_dir(Path(out_dir), cfg, state, tokenizer, model.config.tie_word_embeddings)
