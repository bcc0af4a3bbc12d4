"""Quantization-aware training (BitCPM4's ternary QAT, and int4) from a float checkpoint, with a minimal loop.

Every nn.Linear weight W but lm_head's gets a parametrization computing the straight-through estimator

    W_used = W + stopgrad(Q(W) - W)          Q = quant.fake_quantize (ternary absmean group 32, or int4)

so the forward pass runs the quantized weight and the gradient reaches the float master weight W unchanged
(round() has zero gradient almost everywhere). Q is the very function export applies, so the exported model
computes what was trained (up to the packed format's 8-bit ternary group scale / bf16 int4 scale).

The learning rate is re-warmed from 0 (BitCPM4 found re-warmup critical when QAT starts from a trained model),
held, and decayed linearly over the last `decay_frac` of the steps (WSD). Batches are random windows of the
training tokens; the loss on held-out tokens is measured every `eval_every` steps. Training state (weights,
AdamW moments, step, curve) is saved atomically every `save_every` steps and a rerun resumes from it.
Weights stay fp32; matmuls run under bf16 autocast.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from minicpm4.errors import ConfigError
from minicpm4.fileio import atomic_write, atomic_write_text
from minicpm4.quant.primitives import fake_quantize, ste

MODES = ("ternary", "int4")
TERNARY_GROUP = 32  # BitCPM4: group 32 beat 64 and per-channel; the packed kernel's group


@dataclass
class QATConfig:
    mode: str | None = "ternary"  # None: plain float training (the baseline the QAT run is compared with)
    steps: int = 200
    lr: float = 2e-3
    warmup: int = 20  # re-warmup steps from lr 0
    decay_frac: float = 0.2  # last fraction of steps: linear decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    batch: int = 8
    seq_len: int = 128
    weight_decay: float = 0.0
    group_size: int = 128  # int4 only (ternary uses TERNARY_GROUP)
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in (*MODES, None):
            raise ConfigError(f"QAT mode must be one of {MODES}, got {self.mode!r}")
        if self.steps < 1 or self.batch < 1 or self.seq_len < 2 or not 0 <= self.warmup <= self.steps:
            raise ConfigError(f"need steps >= 1, batch >= 1, seq_len >= 2, 0 <= warmup <= steps; got {self}")


class FakeQuant(nn.Module):
    """Parametrization W -> W + stopgrad(Q(W) - W)."""

    def __init__(self, mode: str, group_size: int):
        super().__init__()
        self.mode, self.group_size = mode, group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        ternary = self.mode == "ternary"
        return ste(w, fake_quantize(w, 4, TERNARY_GROUP if ternary else self.group_size, True, ternary))


def quantized_names(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in skip]


def attach(model: nn.Module, mode: str, group_size: int = 128) -> list[str]:
    """Put FakeQuant on the weight of every nn.Linear but lm_head; returns their names."""
    names = quantized_names(model)
    for name in names:
        parametrize.register_parametrization(model.get_submodule(name), "weight", FakeQuant(mode, group_size))
    return names


def remove(model: nn.Module) -> None:
    """Drop the FakeQuant parametrizations, leaving the float master weights in place."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def lr_at(step: int, cfg: QATConfig) -> float:
    """Warmup from 0, stable, then linear decay to min_lr_ratio over the last decay_frac of the steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = cfg.steps - max(1, int(cfg.decay_frac * cfg.steps))
    if step < decay_start or cfg.decay_frac <= 0:
        return cfg.lr
    frac = (step - decay_start + 1) / (cfg.steps - decay_start)
    return cfg.lr * (1 - (1 - cfg.min_lr_ratio) * frac)


def split_tokens(ids: list[int], seq_len: int, held_out_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token tensors: the last held_out_frac of the text (at least two windows) is held out."""
    n_eval = max(int(len(ids) * held_out_frac), 2 * seq_len)
    if len(ids) < n_eval + 4 * seq_len:
        raise ConfigError(f"the text has {len(ids)} tokens; QAT with seq_len {seq_len} needs at least "
                          f"{n_eval + 4 * seq_len}")
    t = torch.tensor(ids, dtype=torch.long)
    return t[:-n_eval], t[-n_eval:]


def loss_on(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over windows [B, T]."""
    logits = model(windows)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: torch.Tensor, cfg: QATConfig) -> float:
    """Loss on consecutive held-out windows (the same ones every time), at most eval_batches batches."""
    n = min(len(tokens) // cfg.seq_len, cfg.eval_batches * cfg.batch)
    windows = tokens[:n * cfg.seq_len].view(n, cfg.seq_len)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [loss_on(model, windows[i:i + cfg.batch]).item() * len(windows[i:i + cfg.batch])
                  for i in range(0, n, cfg.batch)]
    return sum(losses) / n


def train(model: nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, cfg: QATConfig,
          state_path: Path | None = None, log=print) -> list[dict]:
    """Train `model` (fp32) in place with fake quantization per cfg.mode; returns the curve
    [{step, lr, loss, eval_loss?, seconds}], led by step 0's held-out loss (and the float model's, in QAT). FakeQuant stays attached (call `remove` before export)."""
    resume = state_path is not None and state_path.is_file()
    float_loss = None if resume or not cfg.mode else eval_loss(model.eval(), eval_tokens, cfg)
    if cfg.mode:
        attach(model, cfg.mode, cfg.group_size)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    start, history = 0, []
    if resume:
        state = torch.load(state_path, weights_only=False)
        if state["config"] != dataclasses.asdict(cfg):
            raise ConfigError(f"{state_path}: saved by a run with other settings {state['config']}; delete it "
                              "to start over")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        log(f"resumed at step {start} from {state_path}")
    gen = torch.Generator().manual_seed(cfg.seed + start)  # a resumed run draws other windows: fine for SGD
    if start == 0:
        history.append({"step": 0, "eval_loss": eval_loss(model.eval(), eval_tokens, cfg)})
        model.train()
        if float_loss is not None:
            history[0]["float_eval_loss"] = float_loss
            log(f"step 0: held-out loss {float_loss:.4f} float, {history[0]['eval_loss']:.4f} with {cfg.mode} "
                "weights before QAT")
    t0 = time.perf_counter()
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = torch.randint(0, len(train_tokens) - cfg.seq_len, (cfg.batch,), generator=gen)
        windows = torch.stack([train_tokens[i:i + cfg.seq_len] for i in idx.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_on(model, windows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        row = {"step": step + 1, "lr": opt.param_groups[0]["lr"], "loss": loss.item(),
               "seconds": time.perf_counter() - t0}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            row["eval_loss"] = eval_loss(model, eval_tokens, cfg)
            model.train()
            log(f"step {step + 1}/{cfg.steps}: loss {row['loss']:.4f}, held-out {row['eval_loss']:.4f}, "
                f"lr {row['lr']:.2e}, {row['seconds']:.0f}s")
        history.append(row)
        if state_path is not None and ((step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps):
            snapshot = {"config": dataclasses.asdict(cfg), "model": model.state_dict(),
                        "optimizer": opt.state_dict(), "step": step + 1, "history": history}
            atomic_write(state_path, lambda p: torch.save(snapshot, p))
    model.eval()
    return history


def run_qat(src, out_dir: str | os.PathLike, cfg: QATConfig, text: str, log=print) -> Path:
    """Load `src` in fp32, QAT it on `text` (held-out tail for eval), export: ternary -> packed ternary
    checkpoint, int4 -> GPTQ-layout 4-bit checkpoint (group cfg.group_size, symmetric). The loss curve goes to
    <out>/qat_history.json; the resumable training state lives in <out>.qat-state.pt until export."""
    from minicpm4.errors import CheckpointError
    from minicpm4.io.loader import load
    if cfg.mode is None:
        raise ConfigError("run_qat needs a quantization mode (ternary or int4)")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out}: output directory exists and is not empty")
    model, tok = load(src, dtype="fp32")
    names = quantized_names(model)
    k_bad = [n for n in names if model.get_submodule(n).in_features %
             (TERNARY_GROUP if cfg.mode == "ternary" else cfg.group_size)]
    if k_bad:
        raise ConfigError(f"layer {k_bad[0]} has {model.get_submodule(k_bad[0]).in_features} inputs, not divisible "
                          f"by the {cfg.mode} group size")
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    train_tokens, eval_tokens = split_tokens(bos + tok.encode(text), cfg.seq_len)
    log(f"{len(train_tokens)} training tokens, {len(eval_tokens)} held out; {cfg.steps} steps x {cfg.batch} x "
        f"{cfg.seq_len} = {cfg.steps * cfg.batch * cfg.seq_len} tokens of {cfg.mode} QAT")
    state_path = out.with_name(out.name + ".qat-state.pt")
    history = train(model, train_tokens, eval_tokens, cfg, state_path, log)
    remove(model)
    if cfg.mode == "ternary":
        from minicpm4.quant.ternary_format import save_ternary
        save_ternary(model, tok, out)
    else:
        from minicpm4.quant.gptq_format import save_quantized
        from minicpm4.quant.primitives import quantize_int
        qt = {n: quantize_int(model.get_submodule(n).weight, 4, cfg.group_size, True) for n in names}
        save_quantized(model, qt, tok, out)
    atomic_write_text(out / "qat_history.json", json.dumps({"config": dataclasses.asdict(cfg),
                                                             "history": history}, indent=1) + "\n")
    state_path.unlink(missing_ok=True)
    final = next(h["eval_loss"] for h in reversed(history) if "eval_loss" in h)
    log(f"held-out loss {history[0]['eval_loss']:.4f} before QAT -> {final:.4f} after "
        f"(perplexity {math.exp(final):.2f}); wrote {out}")
    return out
