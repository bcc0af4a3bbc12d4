"""The KL reference model, refreshed from the policy every N steps (MiniCPM4 report §3.2: "KL loss kept at
beta = 0.001, with a periodically refreshed reference model").

The reference starts as a frozen copy of the policy; at every step that is a multiple of `refresh_every` (> 0)
it is overwritten with the policy's current weights, so the KL term keeps the policy near a recent version of
itself instead of the initial model. refresh_every = 0: never refreshed (the usual fixed reference).
"""

from __future__ import annotations

import copy

import torch

from minicpm4.train.rl.logprobs import token_logprobs


class ReferenceModel:
    def __init__(self, policy: torch.nn.Module, refresh_every: int = 0):
        if refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {refresh_every}")
        self.model = copy.deepcopy(policy).eval().requires_grad_(False)
        self.refresh_every = refresh_every
        self.refreshed_at = 0  # the step whose policy weights the reference holds

    def maybe_refresh(self, policy: torch.nn.Module, step: int) -> bool:
        """Copy the policy's weights in when step > 0 is a multiple of refresh_every; True if it did."""
        if self.refresh_every and step > 0 and step % self.refresh_every == 0 and step != self.refreshed_at:
            self.model.load_state_dict(policy.state_dict())
            self.refreshed_at = step
            return True
        return False

    @torch.no_grad()
    def logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L-1] reference log-probs of each next token (logprobs.token_logprobs)."""
        return token_logprobs(self.model, input_ids)
