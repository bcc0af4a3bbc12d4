"""Finished, rewarded groups -> the learner's batch of tensors, and that batch's loss under a model.

A batch of B samples, each prompt p_i (P_i tokens) + response y_i (R_i tokens), right-padded to L = max(P_i + R_i):

    input_ids     [B, L]          prompt + response, then pad_id
    mask          [B, L-1] bool   True where position j's target input_ids[j+1] is a response token
                                  (j = P_i - 1 .. P_i + R_i - 2)
    behavior_logp [B, L-1]        the rollout's log-prob of each response target (the policy of its chunk), else 0
    versions      [B, L-1] long   the policy version that sampled each response target, else -1
    truncated     [B] bool        finish "length" (overlong filtering)
    advantages    [B]             GRPO group advantages (advantages.py) of the sample's group
    garbled       [B] bool        garble.garble_check dropped it

An RL objective then calls, per update: loss, metrics = batch_loss(model, batch, settings, ref_logp=...), with
ref_logp = ReferenceModel.logprobs(batch.input_ids) when settings.kl_coef > 0, and prox_logp =
token_logprobs(model, batch.input_ids) under no_grad before the first update when settings.chunk_importance is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from minicpm4.train.rl.advantages import group_advantages
from minicpm4.train.rl.garble import GarbleRules, garble_check
from minicpm4.train.rl.logprobs import token_logprobs
from minicpm4.train.rl.loss import LossSettings, policy_loss
from minicpm4.train.rl.rollout import Group, Sample


@dataclass
class RLBatch:
    input_ids: torch.Tensor
    mask: torch.Tensor
    behavior_logp: torch.Tensor
    versions: torch.Tensor
    truncated: torch.Tensor
    advantages: torch.Tensor | None = None
    garbled: torch.Tensor | None = None
    garble_reasons: list[str] = field(default_factory=list)


def collate(samples: Sequence[Sample], pad_id: int = 0) -> RLBatch:
    """Finished samples -> RLBatch without advantages (see the module docstring for the layout)."""
    if not samples:
        raise ValueError("no samples to collate")
    length = max(len(s.prompt) + len(s.tokens) for s in samples)
    b = len(samples)
    ids = torch.full((b, length), pad_id, dtype=torch.long)
    mask = torch.zeros(b, length - 1, dtype=torch.bool)
    behavior = torch.zeros(b, length - 1)
    versions = torch.full((b, length - 1), -1, dtype=torch.long)
    for i, s in enumerate(samples):
        p, r = len(s.prompt), len(s.tokens)
        ids[i, :p + r] = torch.tensor(s.prompt + s.tokens)
        resp = slice(p - 1, p + r - 1)  # positions whose target is a response token
        mask[i, resp] = True
        behavior[i, resp] = torch.tensor(s.logprobs, dtype=torch.float32)
        versions[i, resp] = torch.tensor(s.versions, dtype=torch.long)
    return RLBatch(ids, mask, behavior, versions, torch.tensor([s.truncated for s in samples]))


def from_groups(groups: Sequence[Group], decode: Callable[[list[int]], str] | None = None,
                rules: GarbleRules = GarbleRules(), std_normalize: bool = True, pad_id: int = 0) -> RLBatch:
    """Groups with .rewards set -> RLBatch with advantages and the garble filter's verdicts.

    decode(token_ids) -> text lets the garble filter check characters too (None: token ids only)."""
    if any(g.rewards is None or len(g.rewards) != len(g.samples) for g in groups):
        raise ValueError("every group needs one reward per sample (set Group.rewards)")
    batch = collate([s for g in groups for s in g.samples], pad_id)
    batch.advantages = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32),
                                        std_normalize).flatten()  # [B], group-major like the samples
    verdicts = [garble_check(s.tokens, decode(s.tokens) if decode else None, rules)
                for g in groups for s in g.samples]
    batch.garbled = torch.tensor([not keep for keep, _ in verdicts])
    batch.garble_reasons = [reason for _, reason in verdicts]
    return batch


def batch_loss(model: torch.nn.Module, batch: RLBatch, settings: LossSettings = LossSettings(), *,
               ref_logp: torch.Tensor | None = None, prox_logp: torch.Tensor | None = None, rows_per_pass: int = 8,
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy loss of `batch` under `model` (with grad): loss.policy_loss on token_logprobs, `rows_per_pass`
    rows per forward (a DDP-wrapped model needs one forward per backward: rows_per_pass >= B)."""
    if batch.advantages is None:
        raise ValueError("the batch has no advantages (build it with from_groups)")
    logp = token_logprobs(model, batch.input_ids, rows_per_pass)  # [B, L-1]
    return policy_loss(logp, batch.behavior_logp, batch.advantages, batch.mask, settings, prox_logp=prox_logp,
                       ref_logp=ref_logp, truncated=batch.truncated, garbled=batch.garbled)
