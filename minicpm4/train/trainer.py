"""The one training loop: `train(config)` runs pretraining, SFT, QAT, RL and EAGLE draft training, each an
Objective (objective.py) that says what trains on which batches towards which loss; the CLI is a thin wrapper.

One optimizer step: the objective's global batch (over all processes) is split into cfg.accumulation(world)
micro-batches; each runs forward under bf16 autocast (fp32 master weights; dtype=fp32: none) and backward with its
share of the global objective, gradients synchronised on the last one only (DDP no_sync / FSDP2). Then: global
grad-norm clipping, the WSD rate (schedule.py) on each parameter group's base_lr, AdamW.

Every cfg.eval_every steps (and before the first step, and at the last) the objective's held-out evaluation joins
the step's metrics record (OUT/metrics.jsonl every log_every steps; a line to `log` every print_every steps and at
each evaluation). Checkpoints (checkpoint.py) every save_every steps, at the end, and when SIGINT/SIGTERM arrives
(the step in flight finishes first; all ranks agree through an all-reduce so they stop at the same step). A run
that completes all cfg.steps ends with the objective's finish() (e.g. QAT's export).
"""

from __future__ import annotations

import gc
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.train import guards, process_group as pg
from minicpm4.train.checkpoint import (check_compatible, list_checkpoints, load_checkpoint, rng_state,
                                       save_checkpoint, set_rng_state)
from minicpm4.train.language_modeling import LanguageModeling
from minicpm4.train.metrics import MetricsLog, progress_bar
from minicpm4.train.objective import Objective
from minicpm4.train.qat import QAT
from minicpm4.train.rl.objective import RL
from minicpm4.train.schedule import wsd_factor
from minicpm4.train.train_config import TrainConfig


class StopFlag:
    """Set by SIGINT/SIGTERM; a second SIGINT aborts at once. Handlers are installed only in the main thread."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None,
          log: Callable[[str], None] | None = None, on_step: Callable[[dict], bool] | None = None,
          objective: Objective | None = None) -> dict:
    """Run (or continue, with `resume` = a checkpoint or the run directory) until cfg.steps, or `stop_after`
    total steps. on_step(metrics record) -> True stops the run there, as a signal would (early stopping).
    objective: default objective_for(cfg) (pretrain, sft, qat, rl; draft: spec.draft_training.train_draft).
    Returns {"step", "loss", "checkpoint", "interrupted", "output" (what the objective's finish() returned once
    every step is done)}."""
    rank, world, device, created = pg.init_process_group()
    try:
        return _train(cfg, rank, world, device, resume, stop_after, log if rank == 0 else None, on_step, objective)
    finally:
        if created:
            # FSDP2's hooks put the model in reference cycles that may still hold gloo work objects; freed during the
            # interpreter's final teardown they can abort the process (seen once in 60+ runs of the two-process
            # FSDP test: "terminate called without an active exception" after the last checkpoint; our likeliest
            # reading). Free them while the interpreter is whole.
            gc.collect()
            torch.distributed.destroy_process_group()


def _train(cfg, rank, world, device, resume, stop_after, log, on_step, objective) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    accum = cfg.accumulation(world)
    objective = objective or objective_for(cfg, rank, world, log)
    model, out = objective.model, objective.run_dir
    resume = objective.resume_from(resume)
    if resume is None and list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints: continue with --resume {out}, or use another out_dir")
    if rank == 0:
        guards.remove_stale_tmp(out / "checkpoints")  # left by a run killed mid-save
    start, ckpt_state, ckpt = 0, None, None
    if resume is not None:
        ckpt, saved_mc, state, ckpt_state = load_checkpoint(resume)
        check_compatible(ckpt, saved_mc, objective.config, ckpt_state.get("config", {}), cfg.to_dict())
        objective.load_model(state, ckpt_state.get("mtp", {}))
        objective.load_state_dict(ckpt_state["data"])
        start = int(ckpt_state["step"])
        if log:
            log(f"resumed at step {start} from {ckpt}")
    objective.to(device)
    net = pg.wrap(model, cfg.parallel, device)
    layout = "fsdp" if pg.sharded(model) else "torch"  # how the optimizer state is keyed in checkpoints
    opt = torch.optim.AdamW(objective.param_groups(), betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if ckpt_state is not None:
        if ckpt_state.get("optimizer_layout", "torch") != layout:
            raise CheckpointError(f"{resume}: optimizer state was saved with layout "
                                  f"{ckpt_state.get('optimizer_layout')!r}, this run uses {layout!r} (parallel)")
        try:
            pg.load_optimizer_state(model, opt, ckpt_state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{resume}: optimizer state does not fit this model ({e})") from None
        set_rng_state(ckpt_state["rng"])
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    metrics = MetricsLog(out / "metrics.jsonl", start, enabled=rank == 0,
                         tensorboard=out / "tensorboard" if cfg.tensorboard else None)

    def save(step: int) -> Path | None:
        path = None
        model_state, opt_state = pg.full_states(model, opt)  # every rank: a collective under FSDP
        data = objective.state_dict()  # every rank: an objective may gather per-process state (rl's rollouts)
        if rank == 0:
            files, extra = objective.split_state(model_state)
            state = {"optimizer": opt_state, "optimizer_layout": layout, "data": data,
                     "rng": rng_state(), "config": cfg.to_dict(), "mtp": extra}
            path = save_checkpoint(out, step, files, lambda d: objective.save_model(d, files), state,
                                   cfg.keep_checkpoints)
            if log:
                log(f"checkpoint {path}")
        pg.barrier()
        return path

    def report(rec: dict, evaluated: bool) -> None:
        n = rec["step"]
        if n % cfg.log_every == 0 or n == end or evaluated or not guards.finite_step(rec):
            metrics.write(rec)
        if log and (evaluated or (cfg.print_every and (n % cfg.print_every == 0 or n == end))):
            log(f"step {n}/{cfg.steps}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in rec.items()
                                                     if k not in ("step", "tokens", "tok_per_s")))

    # "checkpoint": the run's newest, so a run resumed at its last step still names the one it stands on
    result = {"step": start, "loss": None, "checkpoint": ckpt, "interrupted": False, "output": None}
    if start == 0 and cfg.eval_every:
        held_out = objective.evaluate(0)  # before any step: the starting point of the held-out curve
        if held_out:
            report({"step": 0, **held_out}, True)
    bad_steps = guards.NonFiniteSteps(cfg.skip_nonfinite_steps, out)
    with StopFlag() as stop, progress_bar(cfg.steps, start, rank == 0) as bar:
        t0, tokens = time.perf_counter(), 0
        for step in range(start, end):
            rec, n_tokens = train_step(cfg, net, objective, opt, step, accum, world, device)
            tokens += n_tokens
            elapsed = time.perf_counter() - t0
            rec = {"step": step + 1, **rec, "tokens": n_tokens, "tok_per_s": tokens / elapsed}
            evaluated = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
            if evaluated:
                rec.update(objective.evaluate(step + 1))
            report(rec, evaluated)
            bad_steps.check(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{tokens / elapsed:.0f}")
            result.update(step=step + 1, loss=rec["loss"])
            halt = stop.signum is not None or (on_step is not None and bool(on_step(rec)))
            stopping = bool(pg.all_reduce_sum(torch.tensor([float(halt)])).item())
            if stopping or step + 1 == end or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                result["checkpoint"] = save(step + 1)
            if stopping:
                result["interrupted"] = True
                if log:
                    how = "rerun the same command" if objective.rerun_resumes else f"--resume {out}"
                    log(f"stopped at step {step + 1}; continue with {how}")
                break
    metrics.close()
    if result["step"] == cfg.steps and not result["interrupted"]:
        if rank == 0:
            result["output"] = objective.finish()
        pg.barrier()
    return result


def objective_for(cfg: TrainConfig, rank: int = 0, world: int = 1,
                  log: Callable[[str], None] | None = None) -> Objective:
    """The objective of cfg.task, built from the config (loads the model, opens the data)."""
    if cfg.task in ("pretrain", "sft"):
        return LanguageModeling.from_config(cfg, rank, world)
    if cfg.task == "qat":
        return QAT.from_config(cfg, rank, world, log=log)
    if cfg.task == "rl":
        return RL.from_config(cfg, rank, world)
    raise ConfigError(f"task {cfg.task!r} has no objective in minicpm4.train (draft: minicpm4.spec.draft_training, "
                      "`minicpm4 train draft`)")


def split(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    return wsd_factor(step, cfg.steps, cfg.warmup_steps, cfg.decay_steps, cfg.decay_shape, cfg.min_lr_ratio)


def train_step(cfg: TrainConfig, net, objective: Objective, opt, step: int, accum: int, world: int,
               device) -> tuple[dict, int]:
    """One optimizer step; returns ({"loss", the objective's other metrics, "lr", "grad_norm"}, input tokens of
    the global batch)."""
    factor = lr_factor(cfg, step)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    batch = {k: v.to(device) for k, v in objective.next_batch(step).items()}
    counts = pg.all_reduce_sum(objective.counts(batch).to(device))
    if counts[0].item() == 0:
        raise ConfigError(f"step {step + 1}: the batch has no target tokens (every label masked)")
    total = None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    for i, mb in enumerate(split(batch, accum)):
        with pg.gradient_sync(net, i == accum - 1):
            with autocast:
                loss, sums = objective.loss(net, mb, counts, world)
            loss.backward()
        total = sums if total is None else total + sums
    rec = {**objective.metrics(pg.all_reduce_sum(total), counts), "lr": cfg.lr * factor}
    params = [p for g in opt.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    rec["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP
    if guards.finite_step(rec):  # a non-finite update never reaches the weights
        opt.step()
    opt.zero_grad(set_to_none=True)
    return rec, objective.tokens(batch) * world
