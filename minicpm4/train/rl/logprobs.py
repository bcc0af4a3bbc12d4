"""The learner's per-token log-probs of a batch: log_softmax(logits at temperature 1)[next token].

    token_logprobs(model, input_ids [B, L]) -> [B, L-1]     position j: log p(input_ids[j+1] | input_ids[:j+1])

With grad it is the numerator pi_theta of the loss's ratio; under torch.no_grad() it gives the prox log-probs
(the current weights before an update) or the reference model's. Batches are right-padded (batch.py), which needs no
attention mask: attention is causal, so pad tokens after a sequence never change the logits before them.
"""

from __future__ import annotations

import torch


def token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, rows_per_pass: int = 8) -> torch.Tensor:
    """input_ids [B, L] -> log p(input_ids[:, j+1] | input_ids[:, :j+1]) [B, L-1], fp32, temperature 1.

    Rows go through the model `rows_per_pass` at a time, so the fp32 logits in flight are [rows, L, V]."""
    out = []
    for s in range(0, input_ids.shape[0], rows_per_pass):
        ids = input_ids[s:s + rows_per_pass]
        logits = model(ids)[:, :-1].float()  # [b, L-1, V]
        out.append(logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0])
    return torch.cat(out)
