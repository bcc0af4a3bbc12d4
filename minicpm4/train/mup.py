"""muP as MiniCPM applies it, computed in this one place: initialisation and per-role parameter groups.

With m = hidden_size / dim_model_base (the width multiplier over the proxy width):
    hidden matrices (q/k/v/o, gate/up/down, MTP)  init N(0, (init_std / sqrt(m))^2)   lr = base_lr / m
    token embedding, untied lm_head          init N(0, init_std^2)              lr = base_lr
    vectors (RMSNorm weights, biases)        init 1 (norms) / 0 (biases)        lr = base_lr, no weight decay
The forward-pass multipliers (embedding * scale_emb, residual branches * scale_depth / sqrt(L), final hidden
/ m before lm_head) live in the model (config.residual_scale, config.logit_scale). Embedding and head are
"vector-like" in muP terms: one of their dimensions (vocab) does not grow with width, and the explicit
multipliers above already scale them, so they keep the base init and rate.

mup=False is standard parametrisation for comparisons: every matrix at init_std and base_lr.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minicpm4.config import ModelConfig

ROLES = ("matrix", "embedding", "head", "vector")


def width_multiplier(config: ModelConfig) -> float:
    return config.hidden_size / config.dim_model_base


def param_role(name: str, p: torch.Tensor) -> str:
    if p.ndim < 2:
        return "vector"
    if name.endswith("embed_tokens.weight"):
        return "embedding"
    if name.startswith("lm_head."):
        return "head"
    return "matrix"


def role_scales(config: ModelConfig, init_std: float, mup: bool = True) -> dict[str, tuple[float, float]]:
    """(init std, lr multiplier) per role; vectors have no random init (std 0 means: ones/zeros)."""
    m = width_multiplier(config) if mup else 1.0
    return {"matrix": (init_std / math.sqrt(m), 1.0 / m), "embedding": (init_std, 1.0),
            "head": (init_std, 1.0), "vector": (0.0, 1.0)}


def init_weights(model: nn.Module, init_std: float, mup: bool = True, prefix: str = "") -> None:
    """Initialise every parameter (or those whose name starts with `prefix`) by its role (uses torch's global RNG:
    seed it first)."""
    scales = role_scales(model.config, init_std, mup)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(prefix):
                continue
            role = param_role(name, p)
            if role != "vector":
                p.normal_(0.0, scales[role][0])
            elif name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def param_groups(model: nn.Module, lr: float, weight_decay: float, init_std: float = 0.1,
                 mup: bool = True) -> list[dict]:
    """AdamW parameter groups by role. Each group carries `base_lr` (its peak rate) for the schedule."""
    scales = role_scales(model.config, init_std, mup)
    by_role: dict[str, list[nn.Parameter]] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():  # tied weights appear once (named_parameters dedups)
        if p.requires_grad:
            by_role[param_role(name, p)].append(p)
    groups = [{"params": ps, "role": r, "base_lr": lr * scales[r][1], "lr": lr * scales[r][1],
               "weight_decay": 0.0 if r == "vector" else weight_decay} for r, ps in by_role.items() if ps]
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(grouped) == len(set(grouped)) and set(grouped) == trainable, \
        "every trainable parameter must land in exactly one muP group"
    return groups
