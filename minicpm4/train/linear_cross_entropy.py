"""The output head and token cross-entropy in one pass over chunks of tokens (the training loss's fast path).

    loss = sum_t [logsumexp(h_t W^T) - (h_t W^T)[y_t]]      over targets y_t != IGNORE      h [N, H], W [V, H]

The plain path (`reference_loss`) materialises fp32 logits [N, V], runs log_softmax over them, and in backward
reads and writes that [N, V] tensor twice more (log_softmax backward, the cast back to bf16); with a 49k
vocabulary and a small body, that memory traffic is a large share of a CPU training step. Here each chunk of
rows computes its logits, log-sum-exp and loss, and turns the logits in place into the gradient of the summed loss
with respect to them, softmax - onehot (zero rows for ignored targets), stored once in the compute dtype. Two
matmuls then give dL/dh = G W and dL/dW = G^T h. The loss is a scalar, so those gradients are computed in forward
and backward only scales them by the incoming gradient.

The compute dtype is the autocast dtype when autocast is on (bf16; never fp16 on CPU), else h's dtype; logits,
log-sum-exp and dL/dW accumulate in fp32, as the plain path's autocast matmul and fp32 log_softmax do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of positions that carry no loss (masked SFT tokens, padding), as in F.cross_entropy
CHUNK = 128  # rows per chunk: [128, 49152] fp32 logits = 24 MiB in flight (64-128 measured fastest)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, chunk: int):
        x, w = h.to(dtype), weight.to(dtype)
        n = x.shape[0]
        grad_logits = torch.empty(n, w.shape[0], dtype=dtype, device=h.device)  # G [N, V]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            y = labels[s:s + chunk]
            valid = y != IGNORE
            safe = torch.where(valid, y, 0)[:, None]
            logits = (x[s:s + chunk] @ w.T).float()  # [c, V]
            target = logits.gather(1, safe)[:, 0]
            peak = logits.amax(dim=-1, keepdim=True)
            probs = logits.sub_(peak).exp_()  # in place: exp(logit - max), [c, V]
            total = probs.sum(dim=-1, keepdim=True)
            loss += ((peak + total.log())[:, 0] - target).mul(valid).sum()  # logsumexp - target logit
            probs.mul_(valid[:, None] / total)  # softmax; ignored rows become 0
            probs.scatter_add_(1, safe, -valid[:, None].to(probs.dtype))  # - onehot(target)
            grad_logits[s:s + chunk] = probs
        ctx.save_for_backward(grad_logits @ w, (grad_logits.T @ x).float())
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out).to(ctx.h_dtype), (grad_w * grad_out).to(ctx.w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Summed cross-entropy of (h @ weight^T) against labels (IGNORE = no loss). h [..., H], labels [...]."""
    on = torch.is_autocast_enabled(h.device.type)
    dtype = torch.get_autocast_dtype(h.device.type) if on else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.flatten(0, -2), weight, labels.flatten(), dtype, chunk)


def reference_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The plain path: fp32 logits of the (autocast) matmul, then F.cross_entropy summed."""
    logits = F.linear(h, weight).float()
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=IGNORE, reduction="sum")
