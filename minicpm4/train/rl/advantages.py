"""GRPO group advantages (DeepSeekMath, Shao et al. 2024, §4.1.2, outcome supervision).

The G responses to one prompt form a group. Each response's advantage is its reward against the group's:

    A_i = (R_i - mean_j R_j) / (std_j R_j + eps)      std: the unbiased sample std (divides by G - 1), as in
                                                      TRL's and verl's GRPO; eps keeps an all-equal group finite
    A_i = R_i - mean_j R_j                            with std_normalize=False (Dr. GRPO, Liu et al. 2025)

Every token of response i gets A_i (outcome reward, no critic). A group whose rewards are all equal has A = 0
everywhere: it carries no gradient, which is why dynamic sampling drops such groups before the batch is formed.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """rewards [N, G] (N groups of G responses, float) -> advantages [N, G]."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2, got shape {tuple(rewards.shape)}")
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centred
    return centred / (r.std(dim=1, keepdim=True, unbiased=True) + eps)
