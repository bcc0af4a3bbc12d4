"""Multi-token prediction (MTP) for pretraining: extra heads that predict tokens t+2 .. t+1+D, as MiniCPM4 ([TR]
p. 16) and DeepSeek-V3 describe it. A training-only objective: the heads never enter the exported HF model.

For depth k = 1..D, with ids [B, T], labels [B, T] (labels[:, i] = token i+1) and h_0 [B, T, H]:
    x_k[i] = W_k [RMSNorm(h_{k-1}[i]) ; RMSNorm(Emb(ids[i+k]) * scale_emb)]     W_k [H, 2H], i < T-k
    h_k    = Block_k(x_k)                                                        one decoder layer, causal
    loss_k = CE(lm_head(RMSNorm_k(h_k) / logit_scale), labels[:, i+k])           target: token i+k+1
    loss   = L_NTP + mtp_weight / D * sum_k loss_k                              each loss a mean over its targets
The embedding and lm_head are the main model's (shared, as in the paper). One documented simplification: h_0 is what
the main lm_head reads (final RMSNorm, / logit_scale) rather than the residual stream before the final norm; both
are renormalised by RMSNorm before W_1, so they differ only by the final norm's per-channel weight.

Parameters live under `mtp.` on the model (a submodule added by `attach`), so DDP syncs them and the muP groups
(mup.py) cover them by role: W_k and the block's matrices are hidden matrices (lr / m), norms are vectors.
Checkpoints keep them in state.pt (`split_state`), not in the HF model directory that `minicpm4.load` reads.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4.config import ModelConfig
from minicpm4.model.decoder import AttnContext, DecoderLayer, MiniCPM4ForCausalLM, RMSNorm
from minicpm4.train.linear_cross_entropy import IGNORE, linear_cross_entropy, reference_loss
from minicpm4.train.mup import init_weights

PREFIX = "mtp."


class MTPModule(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.hidden_norm, self.embed_norm, self.norm = RMSNorm(h, eps), RMSNorm(h, eps), RMSNorm(h, eps)
        self.proj = nn.Linear(2 * h, h, bias=False)
        self.block = DecoderLayer(config, 0)  # dense attention, no cache: layer_idx is unused


class MTPHead(nn.Module):
    def __init__(self, config: ModelConfig, depth: int):
        super().__init__()
        self.layers = nn.ModuleList(MTPModule(config) for _ in range(depth))

    def forward(self, model: MiniCPM4ForCausalLM, h: torch.Tensor, input_ids: torch.Tensor,
                segments: torch.Tensor | None = None) -> list[torch.Tensor]:
        """h [B, T, H] (the main model's hidden_only output) -> [h_k as lm_head reads it, [B, T-k, H]] for k=1..D."""
        cfg = model.config
        emb = model.model.embed_tokens(input_ids)
        if cfg.scale_emb != 1.0:
            emb = emb * cfg.scale_emb
        outs = []
        for k, mod in enumerate(self.layers, start=1):
            b, t = input_ids.shape[0], input_ids.shape[1] - k
            x = mod.proj(torch.cat((mod.hidden_norm(h[:, :t]), mod.embed_norm(emb[:, k:])), dim=-1))
            if segments is not None:  # packed documents: attend within the document, positions restart
                ctx = model.packed_context(segments[:, :t])
            else:
                ctx = AttnContext(torch.arange(t, device=x.device).expand(b, t), t, None, True)
            cos, sin = model.model.rotary_emb(ctx.positions, t)
            h = mod.block(x, cos, sin, ctx, None)
            out = mod.norm(h)
            outs.append(out / cfg.logit_scale if cfg.logit_scale != 1.0 else out)
        return outs


def mtp_labels(labels: torch.Tensor, segments: torch.Tensor | None, k: int) -> torch.Tensor:
    """Targets of depth k, [B, T-k]: labels[:, i+k], IGNORE where tokens i and i+k are in different documents."""
    out = labels[:, k:]
    if segments is not None:
        t = labels.shape[1] - k
        out = torch.where(segments[:, :t] == segments[:, k:], out, IGNORE)
    return out


def target_counts(batch: dict[str, torch.Tensor], depth: int) -> torch.Tensor:
    """Targets of each depth in this process's batch, [depth] float64 (the loop sums them over processes)."""
    counts = [(mtp_labels(batch["labels"], batch.get("segments"), k) != IGNORE).sum() for k in range(1, depth + 1)]
    return torch.stack(counts).double() if counts else torch.zeros(0, dtype=torch.float64)


def objective(model: MiniCPM4ForCausalLM, h: torch.Tensor, batch: dict[str, torch.Tensor], counts: torch.Tensor,
              weight: float, world: int, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MTP term of one micro-batch's objective, sum_k weight / D * CE_k * world / counts[k] (scaled like the
    next-token loss, so DDP's gradient average gives the global batch's mean), and the detached summed CE_k [D]."""
    depth = len(model.mtp.layers)
    hs = model.mtp(model, h, batch["input_ids"], batch.get("segments"))
    ces = torch.stack([head_loss(hk, model.lm_head.weight, mtp_labels(batch["labels"], batch.get("segments"), k), fused)
                       for k, hk in enumerate(hs, start=1)])
    term = (ces * (weight / depth * world / counts.to(ces.device).float())).sum()
    return term, ces.detach().double()


def head_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, fused: bool) -> torch.Tensor:
    """Summed cross-entropy of lm_head(h) against labels: the chunked fused path or the plain one."""
    return (linear_cross_entropy if fused else reference_loss)(h, weight, labels)


def attach(model: MiniCPM4ForCausalLM, depth: int, init_std: float, mup: bool, seed: int) -> MTPHead:
    """Add `model.mtp` (muP init by role, from its own seeded RNG so the main model's RNG stream is unchanged)."""
    model.mtp = MTPHead(model.config, depth)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        init_weights(model, init_std, mup, prefix=PREFIX)
    return model.mtp


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the HF model's tensors, the MTP heads' tensors) of a model state dict."""
    main = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    return main, {k: v for k, v in state.items() if k.startswith(PREFIX)}
