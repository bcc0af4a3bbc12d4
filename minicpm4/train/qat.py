"""Quantization-aware training (BitCPM4's ternary QAT, and int4) of a float checkpoint: an objective of the one loop.

Every nn.Linear but lm_head computes with its fake-quantized weight through the straight-through estimator
(quant/fake_quant.py), so the forward pass runs the weights export will write and the gradient reaches the fp32
master weights. The loss is language modelling's (language_modeling.py): next-token cross-entropy over windows of
seq_len tokens drawn at random offsets of the training text (one seeded generator, saved in checkpoints, so an
interrupted run resumes onto the same batches); the last 5% of the text is held out and its loss evaluated before
the first step (also with the float weights), every eval_every steps and at the end. All parameters train in one
AdamW group; the rate is re-warmed from 0 (BitCPM4 found re-warmup critical when QAT starts from a trained model),
held, and decayed linearly over the last 20% of the steps (the qat task's WSD defaults, train_config.py).

With task qat, trainer.train(cfg) runs it (`minicpm4 train qat`): the run lives in OUT.qat-run (checkpoints,
metrics) until the export to OUT = cfg.out_dir (ternary: packed ternary checkpoint; int4: GPTQ layout, group
qat.group_size, symmetric) with OUT/qat_history.json, the held-out curve; rerunning it resumes. A state file of the
QAT loop before issue 15 (OUT.qat-state.pt) resumes too.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from minicpm4.config import PRESETS
from minicpm4.corpus import kjv_text
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.fileio import atomic_write_text
from minicpm4.io.loader import load, save_pretrained
from minicpm4.quant.fake_quant import (attach, bypassed, group_of, parametrized_names, plain_names,
                                       quantized_names, remove)
from minicpm4.quant.gptq_format import save_quantized
from minicpm4.quant.primitives import quantize_int
from minicpm4.quant.ternary_format import save_ternary
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.checkpoint import list_checkpoints, rng_state, save_checkpoint, write_model_dir
from minicpm4.train.language_modeling import LanguageModeling
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.metrics import MetricsLog, read_metrics
from minicpm4.train.objective import Objective
from minicpm4.train.train_config import TrainConfig


def split_tokens(ids: list[int], seq_len: int, held_out_frac: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token tensors: the last held_out_frac of the text (at least two windows) is held out."""
    n_eval = max(int(len(ids) * held_out_frac), 2 * seq_len)
    if len(ids) < n_eval + 4 * seq_len:
        raise ConfigError(f"the text has {len(ids)} tokens; QAT with seq_len {seq_len} needs at least "
                          f"{n_eval + 4 * seq_len}")
    t = torch.tensor(ids, dtype=torch.long)
    return t[:-n_eval], t[-n_eval:]


class RandomWindows:
    """Batches of windows at random offsets of one token stream. The global batch's batch_size offsets come from
    one generator seeded with `seed` (its state is the loader's state); each process takes its share."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.tokens, self.seq_len, self.batch_size, self.rank, self.world = tokens, seq_len, batch_size, rank, world
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids": windows [B, T], "labels": the next token of each position, IGNORE at the last}."""
        idx = torch.randint(0, len(self.tokens) - self.seq_len, (self.batch_size,), generator=self.gen)
        per = self.batch_size // self.world
        x = torch.stack([self.tokens[i:i + self.seq_len] for i in idx[self.rank * per:(self.rank + 1) * per].tolist()])
        return {"input_ids": x, "labels": torch.cat([x[:, 1:], torch.full_like(x[:, :1], IGNORE)], dim=1)}

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])


def loss_on(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over windows [B, T]."""
    logits = model(windows)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: nn.Module, tokens: torch.Tensor, seq_len: int, batch: int, max_batches: int) -> float:
    """Loss on consecutive held-out windows (the same ones every time), at most max_batches batches, bf16 autocast."""
    n = min(len(tokens) // seq_len, max_batches * batch)
    device = next(model.parameters()).device
    windows = tokens[:n * seq_len].view(n, seq_len).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        losses = [loss_on(model, windows[i:i + batch]).item() * len(windows[i:i + batch]) for i in range(0, n, batch)]
    return sum(losses) / n


class QAT(LanguageModeling):
    def __init__(self, cfg: TrainConfig, model: nn.Module, tokenizer: Tokenizer, train_tokens: torch.Tensor,
                 eval_tokens: torch.Tensor, export: bool = False, rank: int = 0, world: int = 1,
                 log: Callable[[str], None] | None = None):
        """model: fp32, trained in place (FakeQuant stays attached unless `export`, which removes it at the end)."""
        if cfg.task != "qat":
            raise ConfigError(f"the QAT objective needs task qat, got {cfg.task!r}")
        super().__init__(cfg, model.train(), tokenizer,
                         RandomWindows(train_tokens, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world))
        self.eval_tokens, self.export, self.log = eval_tokens, export, log
        self.rerun_resumes = export  # the command's run resumes when rerun; an in-memory one takes resume= explicitly
        q = cfg.qat
        self.names = attach(model, q.mode, q.group_size) if q.mode != "float" else []

    @classmethod
    def from_config(cls, cfg: TrainConfig, rank: int = 0, world: int = 1,
                    log: Callable[[str], None] | None = None) -> "QAT":
        """cfg.model (a float model directory) in fp32 on the text file cfg.data (default: the KJV Bible), exported
        to cfg.out_dir at the end."""
        out = Path(cfg.out_dir)
        if out.exists() and any(out.iterdir()):
            raise CheckpointError(f"{out}: output directory exists and is not empty")
        if not cfg.model or cfg.model in PRESETS:
            raise ConfigError(f"qat starts from a trained float model (MODEL, or model= a directory or .gguf), not "
                              f"{cfg.model or 'nothing'!r}")
        model, tok = load(cfg.model, dtype="fp32", config_overrides=cfg.model_overrides or None)
        q = cfg.qat
        if q.mode != "float":
            group = group_of(q.mode, q.group_size)
            bad = [n for n in quantized_names(model) if model.get_submodule(n).in_features % group]
            if bad:
                raise ConfigError(f"layer {bad[0]} has {model.get_submodule(bad[0]).in_features} inputs, not "
                                  f"divisible by the {q.mode} group size {group}")
        if cfg.data:
            try:
                text = Path(cfg.data).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"data: cannot read the training text {cfg.data} ({e})") from None
        else:
            text = kjv_text()
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        train_tokens, eval_tokens = split_tokens(bos + tok.encode(text), cfg.seq_len)
        if log:
            log(f"{len(train_tokens)} training tokens, {len(eval_tokens)} held out; {cfg.steps} steps x "
                f"{cfg.batch_size} x {cfg.seq_len} = {cfg.steps * cfg.batch_size * cfg.seq_len} tokens of {q.mode} QAT")
        return cls(cfg, model, tok, train_tokens, eval_tokens, True, rank, world, log)

    @property
    def run_dir(self) -> Path:
        return Path(f"{self.cfg.out_dir}.qat-run")  # beside the export, which needs an empty directory

    @property
    def legacy_state(self) -> Path:
        out = Path(self.cfg.out_dir)
        return out.with_name(out.name + ".qat-state.pt")

    def resume_from(self, resume: str | None) -> str | None:
        """Rerunning resumes: the run directory's latest checkpoint, else an older loop's OUT.qat-state.pt."""
        if resume is None and self.export:
            if not list_checkpoints(self.run_dir) and self.legacy_state.is_file():
                import_legacy_state(self, self.legacy_state)
            if list_checkpoints(self.run_dir):
                resume = str(self.run_dir)
        return resume

    def param_groups(self) -> list[dict]:
        return Objective.param_groups(self)  # every parameter in one group, as the QAT recipe trains them

    def evaluate(self, step: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        args = (self.eval_tokens, cfg.seq_len, cfg.batch_size, cfg.qat.eval_batches)
        model.eval()
        out = {"eval_loss": eval_loss(model, *args)}
        if step == 0 and self.names:
            with bypassed(model):
                out["float_eval_loss"] = eval_loss(model, *args)
        model.train()
        return out

    def split_state(self, state):
        return plain_names(state), {}  # the checkpoint's model directory holds the float master weights

    def save_model(self, directory: Path, state) -> None:
        write_model_dir(directory, self.config, state, self.tokenizer)

    def load_model(self, state, extra) -> None:
        super().load_model(parametrized_names(state, self.names), extra)

    def finish(self) -> Path | None:
        if not self.export:
            return None
        cfg, model, tok, out = self.cfg, self.model.cpu(), self.tokenizer, Path(self.cfg.out_dir)
        if self.names:
            remove(model)
        if cfg.qat.mode == "ternary":
            save_ternary(model, tok, out)
        elif cfg.qat.mode == "int4":
            qt = {n: quantize_int(model.get_submodule(n).weight, 4, cfg.qat.group_size, True) for n in self.names}
            save_quantized(model, qt, tok, out)
        else:
            save_pretrained(model, tok, out)
        history = read_metrics(self.run_dir / "metrics.jsonl")
        atomic_write_text(out / "qat_history.json", json.dumps({"config": cfg.to_dict(), "history": history},
                                                               indent=1) + "\n")
        shutil.rmtree(self.run_dir)
        self.legacy_state.unlink(missing_ok=True)
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        if self.log and evals:
            self.log(f"held-out loss {evals[0]:.4f} before QAT -> {evals[-1]:.4f} after (perplexity "
                     f"{math.exp(evals[-1]):.2f}); wrote {out}")
        return out


def legacy_settings(old: dict) -> dict:
    """A QATConfig of the loop before issue 15 as the TrainConfig settings it meant."""
    frac = old["decay_frac"]
    return {"qat.mode": old["mode"] or "float", "steps": old["steps"], "lr": old["lr"], "warmup_steps": old["warmup"],
            "decay_steps": max(1, int(frac * old["steps"])) if frac > 0 else 0, "decay_shape": "linear",
            "min_lr_ratio": old["min_lr_ratio"], "batch_size": old["batch"], "seq_len": old["seq_len"],
            "weight_decay": old["weight_decay"], "qat.group_size": old["group_size"], "eval_every": old["eval_every"],
            "qat.eval_batches": old["eval_batches"], "save_every": old["save_every"], "seed": old["seed"]}


def import_legacy_state(objective: QAT, path: Path) -> Path:
    """Turn the state file of the QAT loop before issue 15 ({config, model, optimizer, step, history}) into a
    checkpoint of the run directory, so the run resumes through the one checkpoint path: the saved weights and AdamW
    moments at the saved step, the history as metrics.jsonl. That loop drew a resumed run's windows from a
    generator seeded with seed + step; the imported data state is that generator, so the run continues as it would
    have. Returns the checkpoint."""
    cfg = objective.cfg
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        old = legacy_settings(state["config"])
        step, model_state, opt_state, history = int(state["step"]), state["model"], state["optimizer"], state["history"]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise CheckpointError(f"{path}: not a readable QAT state ({why})") from None
    now = {k: v for k, v in {**cfg.to_dict(), **{f"qat.{k}": v for k, v in cfg.to_dict()["qat"].items()}}.items()
           if k in old}
    diff = [f"{k} ({old[k]!r} -> {now[k]!r})" for k in old if old[k] != now[k]]
    if diff:
        raise CheckpointError(f"{path}: saved by a run with other settings: {', '.join(diff)}; delete it to start over")
    for group in opt_state["param_groups"]:
        group.setdefault("base_lr", cfg.lr)
    train_state = {"optimizer": opt_state, "optimizer_layout": "torch", "rng": rng_state(), "config": cfg.to_dict(),
                   "data": {"generator": torch.Generator().manual_seed(cfg.seed + step).get_state()}, "mtp": {}}
    files = plain_names(model_state)
    ckpt = save_checkpoint(objective.run_dir, step, files, lambda d: objective.save_model(d, files), train_state,
                           cfg.keep_checkpoints)
    metrics = MetricsLog(objective.run_dir / "metrics.jsonl", 0)
    for row in history:
        metrics.write(row)
    metrics.close()
    return ckpt
