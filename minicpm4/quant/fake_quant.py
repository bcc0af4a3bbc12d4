"""Fake quantization for quantization-aware training: a straight-through-estimator parametrization of nn.Linear.

Every nn.Linear weight W but lm_head's gets a parametrization (torch.nn.utils.parametrize) computing

    W_used = W + stopgrad(Q(W) - W)          Q = primitives.fake_quantize (ternary absmean group 32, or int4)

so the forward pass runs the quantized weight and the gradient reaches the float master weight W unchanged
(round() has zero gradient almost everywhere). Q is the very function export applies, so the exported model
computes what was trained (up to the packed format's 8-bit ternary group scale / bf16 int4 scale).

The master weight lives at `<linear>.parametrizations.weight.original`; `plain_names` / `parametrized_names` map a
state dict between those names and the plain `<linear>.weight` of an HF model directory.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.utils import parametrize

from minicpm4.quant.primitives import fake_quantize, ste

MODES = ("ternary", "int4")
TERNARY_GROUP = 32  # BitCPM4: group 32 beat 64 and per-channel; the packed kernel's group
ORIGINAL = ".parametrizations.weight.original"


class FakeQuant(nn.Module):
    """Parametrization W -> W + stopgrad(Q(W) - W); with `enabled` False the identity (the float model)."""

    def __init__(self, mode: str, group_size: int):
        super().__init__()
        self.mode, self.group_size, self.enabled = mode, group_size, True

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        ternary = self.mode == "ternary"
        return ste(w, fake_quantize(w, 4, TERNARY_GROUP if ternary else self.group_size, True, ternary))


def group_of(mode: str, group_size: int) -> int:
    return TERNARY_GROUP if mode == "ternary" else group_size


def quantized_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]


def attach(model: nn.Module, mode: str, group_size: int = 128) -> list[str]:
    """Put FakeQuant on the weight of every nn.Linear but lm_head; returns their names."""
    names = quantized_names(model)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", FakeQuant(mode, group_size))
    return names


def remove(model: nn.Module) -> None:
    """Drop the FakeQuant parametrizations, leaving the float master weights in place."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


@contextlib.contextmanager
def bypassed(model: nn.Module):
    """Within the block the parametrized model computes with its float master weights."""
    fqs = [m for m in model.modules() if isinstance(m, FakeQuant)]
    for m in fqs:
        m.enabled = False
    try:
        yield model
    finally:
        for m in fqs:
            m.enabled = True


def plain_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A parametrized model's state dict with `<linear>.weight` names (what an HF directory stores)."""
    return {k.removesuffix(ORIGINAL) + ".weight" if k.endswith(ORIGINAL) else k: v for k, v in state.items()}


def parametrized_names(state: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """The inverse of plain_names for the parametrized linears `names`."""
    renamed = {f"{n}.weight": f"{n}{ORIGINAL}" for n in names}
    return {renamed.get(k, k): v for k, v in state.items()}
