"""Warmup-stable-decay (WSD) learning-rate schedule, as a multiplier of each group's peak rate.

For optimizer step s (0-based) of S, W warmup and D decay steps, p = (s - (S - D) + 1) / D in (0, 1]:
    s < W          (s + 1) / W                                  linear warmup, reaches 1 at step W-1
    s < S - D      1                                            stable
    exponential    r ** p                                       (MiniCPM: lr halves every fixed number of steps)
    linear         1 - (1 - r) * p
    cosine         r + (1 - r) * (1 + cos(pi * p)) / 2
where r = min_lr_ratio; the last step runs at exactly r. The state is the step number alone.
"""

from __future__ import annotations

import math


def wsd_factor(step: int, steps: int, warmup: int, decay: int, shape: str = "exponential",
               min_ratio: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    decay_start = steps - decay
    if step < decay_start:
        return 1.0
    p = min(1.0, (step - decay_start + 1) / decay)
    if shape == "exponential":
        return min_ratio ** p
    if shape == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if shape == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"unknown decay shape {shape!r}")
