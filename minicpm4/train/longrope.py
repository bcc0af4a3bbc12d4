"""LongRoPE settings for the long-context stage: per-dimension rescale factors that stretch a model trained at
`original` positions to max_position_embeddings (the model's RotaryEmbedding applies them, see model/decoder.py).

LongRoPE's observation is that the rotary dimensions need different interpolation: a fast dimension turns through
many full circles within the original window, so every angle it produces at longer range was already seen in
training and it keeps its frequency (factor 1, local word order stays sharp); a slow one never completed a circle, so
longer positions would give angles never seen, and it is interpolated by the whole ratio s = target / original.
LongRoPE searches the factors; here they come from the NTK-by-parts ramp, the search's usual starting point, over
r_i = original / wavelength_i (circles within the original window), wavelength_i = 2*pi / inv_freq_i:

    factor_i = 1                              r_i >= BETA
    factor_i = s                              r_i <= ALPHA
    factor_i = g + (1 - g) * s,  g = (r_i - ALPHA) / (BETA - ALPHA)   in between

with model/decoder.py's attention factor sqrt(1 + ln s / ln original) on cos and sin. The short factors are all 1 (what the
model did at the original length).
"""

from __future__ import annotations

import math

from minicpm4.config import ModelConfig
from minicpm4.errors import ConfigError
from minicpm4.model.decoder import RotaryEmbedding

ALPHA, BETA = 1.0, 4.0  # a dimension with >= 4 circles in the original window has seen all of its angles often


def longrope_factors(head_dim: int, theta: float, original: int, target: int) -> list[float]:
    """head_dim/2 frequency divisors (long_factor) stretching `original` positions to `target`."""
    s = target / original
    factors = []
    for i in range(head_dim // 2):
        wavelength = 2 * math.pi * theta ** (2 * i / head_dim)
        r = original / wavelength
        g = min(max((r - ALPHA) / (BETA - ALPHA), 0.0), 1.0)
        factors.append(g + (1 - g) * s)
    return factors


def longrope_scaling(mc: ModelConfig, original: int) -> dict:
    """The HF rope_scaling block that extends `mc` (trained at `original` positions) to its max_position_embeddings."""
    if mc.rope_scaling is not None:
        raise ConfigError(f"longrope_from ({original}): the model already has rope_scaling (original_max_position_"
                          f"embeddings {mc.rope_scaling.get('original_max_position_embeddings')}); drop longrope_from")
    if original >= mc.max_position_embeddings:
        raise ConfigError(f"longrope_from ({original}) must be below the model's max_position_embeddings "
                          f"({mc.max_position_embeddings}), the length it is extended to")
    return {"rope_type": "longrope", "original_max_position_embeddings": original,
            "long_factor": longrope_factors(mc.head_dim, mc.rope_theta, original, mc.max_position_embeddings),
            "short_factor": [1.0] * (mc.head_dim // 2)}


def extend_rope(model, original: int) -> None:
    """Give a built MiniCPM4ForCausalLM the LongRoPE settings: its config gains rope_scaling (saved with every
    checkpoint) and its rotary embedding is rebuilt from it (it holds no parameters, only derived buffers)."""
    mc = ModelConfig.from_dict({**model.config.to_dict(), "rope_scaling": longrope_scaling(model.config, original)})
    model.config = mc
    model.model.rotary_emb = RotaryEmbedding(mc).to(model.model.embed_tokens.weight.device)
