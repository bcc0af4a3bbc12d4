"""The RL policy loss as one function on tensors: GRPO with DAPO's refinements and MiniCPM4's stabilisers.

MiniCPM4 technical report, Eq. 6-8 (J = J_clip - beta * KL), with DAPO (Yu et al. 2025) and dual-clip PPO
(Ye et al. 2020). Per response token t of sample i, with the sample's advantage A_i (advantages.py):

    r_t     = exp(logp_t - old_t)                         importance ratio
    surr_t  = min(r_t * A_i, clip(r_t, 1 - eps_low, 1 + eps_high) * A_i)     clip-higher: eps_low < eps_high
    surr_t  = max(surr_t, c * A_i)        only where A_i < 0                  dual-clip (c > 1); for A_i >= 0 the
                                                                             paper's max(., c*A) would always pick
                                                                             c*A, so it applies to A_i < 0 only
    kl_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  k3 estimator of KL(pi_theta || pi_ref) (Schulman 2020),
                                                          unbiased, >= 0; GRPO's choice
    l_t     = -surr_t + beta * kl_t

    loss    = sum_{i,t} m_it * l_t / sum_{i,t} m_it                     token-level (DAPO): every token weighs the same
    loss    = mean_{i kept} [ sum_t m_it * l_t / sum_t m_it ]           sample-level (GRPO): every sample weighs the same

m_it = 1 on the response tokens of kept samples. A sample is dropped from the loss (m_i = 0) when it was truncated
at the maximum length (overlong filtering, DAPO) or garbled (garble.py), each switchable.

Per-chunk importance weights: `old_t` is the log-probability under the policy version that generated the chunk
containing token t (r_t = pi_theta / pi_theta_c(t), Eq. 8). The rollout stores, for every token, the log-prob the
sampling policy gave it (rollout.py), so passing those as `behavior_logp` IS the per-chunk weight: no extra
bookkeeping. With chunk_importance=False the ratio is taken against `prox_logp` instead, the log-probs the current
weights gave the batch before this step's updates (standard PPO's pi_old, blind to which policy sampled a chunk);
the learner recomputes those (logprobs.py).

Shapes: B samples, T response positions (right-padded). logp, behavior_logp, prox_logp, ref_logp, mask [B, T];
advantages [B] (or [B, T]); truncated, garbled [B] bool. Masked positions may hold anything (they are zeroed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LossSettings:
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO's clip-higher values
    dual_clip_c: float | None = 3.0  # None -> off; Ye et al. use 3
    token_level: bool = True  # False -> sample-level averaging
    chunk_importance: bool = True  # False -> ratio against prox_logp (needs it)
    kl_coef: float = 0.001  # 0 -> no KL term (ref_logp not needed)
    overlong_filter: bool = True
    garble_filter: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1:
            raise ValueError(f"dual_clip_c must be > 1 (or None), got {self.dual_clip_c}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")


def policy_loss(logp: torch.Tensor, behavior_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                settings: LossSettings = LossSettings(), *, prox_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, truncated: torch.Tensor | None = None,
                garbled: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (a scalar with logp's graph) and float metrics. See the module docstring for the formula."""
    s = settings
    old = behavior_logp if s.chunk_importance else prox_logp
    if old is None:
        raise ValueError("chunk_importance=False needs prox_logp (the current weights' log-probs before the update)")
    if s.kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference model's log-probs)")
    b = logp.shape[0]
    keep = torch.ones(b, dtype=torch.bool, device=logp.device)
    dropped_long = dropped_garbled = 0
    if s.overlong_filter and truncated is not None:
        dropped_long = int(truncated.sum())
        keep &= ~truncated.bool()
    if s.garble_filter and garbled is not None:
        dropped_garbled = int((garbled.bool() & keep).sum())
        keep &= ~garbled.bool()
    m = mask.bool() & keep[:, None]  # [B, T]
    adv = advantages.float()
    adv = adv[:, None].expand_as(logp) if adv.dim() == 1 else adv  # [B, T]

    delta = torch.where(m, logp - old.detach(), torch.zeros_like(logp))  # padding never reaches exp
    ratio = delta.exp()  # [B, T]
    clipped = ratio.clamp(1 - s.eps_low, 1 + s.eps_high)
    surr = torch.minimum(ratio * adv, clipped * adv)
    dual = torch.zeros_like(m)
    if s.dual_clip_c is not None:
        dual = (adv < 0) & (ratio * adv < s.dual_clip_c * adv)  # r > c: the loss is capped at -c*A
        surr = torch.where(dual, s.dual_clip_c * adv, surr)
    per_token = -surr
    kl = torch.zeros_like(logp)
    if s.kl_coef > 0:
        d = torch.where(m, ref_logp.detach() - logp, torch.zeros_like(logp))  # log(pi_ref / pi_theta)
        kl = d.exp() - d - 1
        per_token = per_token + s.kl_coef * kl

    mf = m.float()
    n_tok = mf.sum()
    if s.token_level:
        loss = (per_token * mf).sum() / n_tok.clamp(min=1)
    else:
        per_sample = (per_token * mf).sum(1) / mf.sum(1).clamp(min=1)  # [B]
        loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)

    def share(x: torch.Tensor) -> float:  # share of loss tokens where x holds
        return float((x & m).sum() / n_tok) if n_tok > 0 else 0.0

    with torch.no_grad():
        metrics = {
            "loss": float(loss.detach()), "pg_loss": float((-surr * mf).sum() / n_tok.clamp(min=1)),
            "kl": float((kl * mf).sum() / n_tok.clamp(min=1)),
            "ratio_mean": float((ratio * mf).sum() / n_tok.clamp(min=1)),
            # shares of loss tokens whose gradient the clips cut off (A < 0 below 1-eps_low, A > 0 above 1+eps_high)
            "clip_low": share((adv < 0) & (ratio < 1 - s.eps_low)),
            "clip_high": share((adv > 0) & (ratio > 1 + s.eps_high)),
            "dual_clip": share(dual),
            "tokens": float(n_tok), "samples_kept": float(keep.sum()),
            "dropped_overlong": float(dropped_long), "dropped_garbled": float(dropped_garbled),
        }
    return loss, metrics
