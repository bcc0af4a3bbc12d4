"""The training loop shared by pretraining and SFT: `train(config)` (the CLI is a thin wrapper around it).

One optimizer step: the global batch (batch_size sequences over all processes) is split into micro-batches
of micro_batch_size; each runs forward under bf16 autocast (fp32 master weights), and its summed token
cross-entropy is scaled by world / (target tokens in the global batch) before backward, so after DDP's gradient
average the gradient is exactly that of the mean loss over every target token of the global batch, whatever
the split over processes and micro-batches. Then: global grad-norm clipping, the WSD rate per muP group, AdamW.
With mtp_depth > 0 the multi-token-prediction heads (mtp.py) add their weighted losses, each scaled the same way by
its own global target count; the logged `loss` stays the next-token loss, `mtp_loss` is the mean over depths.

Checkpoints (checkpoint.py) every save_every steps, at the end, and when SIGINT/SIGTERM arrives (the step in
flight finishes first; all ranks agree through an all-reduce so they stop at the same step).
"""

from __future__ import annotations

import functools
import gc
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minicpm4.config import PRESETS, ModelConfig, preset
from minicpm4.errors import CheckpointError, ConfigError
from minicpm4.io.loader import load, merge_overrides
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train import guards, mtp as mtp_heads, process_group as pg
from minicpm4.train.checkpoint import (check_compatible, list_checkpoints, load_checkpoint, rng_state,
                                       save_checkpoint, set_rng_state)
from minicpm4.train.linear_cross_entropy import IGNORE
from minicpm4.train.metrics import MetricsLog, progress_bar
from minicpm4.train.mup import init_weights, param_groups
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


def prepare(cfg: TrainConfig, rank: int, world: int):
    """Everything that can fail on bad input, before any compute: (model, tokenizer, loader, accumulation)."""
    accum = cfg.accumulation(world)
    model, tokenizer, fresh = None, None, cfg.model in PRESETS  # a preset is built once the vocabulary is known
    if not fresh:
        model, tokenizer = load(cfg.model, dtype="fp32", config_overrides=cfg.model_overrides or None)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_dir(cfg.tokenizer)
    if cfg.task == "pretrain":
        from minicpm4.train.token_loader import DecayMix, PackedLoader, TokenShards
        shards = TokenShards(cfg.data)
        tokenizer = tokenizer or Tokenizer.from_dir(shards.tokenizer_dir)
        if cfg.length_buckets:  # the long-context stage: one document per row, rows of similar length
            from minicpm4.train.length_buckets import BucketLoader
            loader = BucketLoader(shards, cfg.seq_len, cfg.batch_size, cfg.length_buckets, cfg.seed, rank, world)
        else:
            loader = PackedLoader(shards, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world)
        data_vocab = shards.vocab_size
        if cfg.decay_data:
            extra = TokenShards(cfg.decay_data)
            decay = PackedLoader(extra, cfg.seq_len, cfg.batch_size, cfg.seed + 1, rank, world)
            loader = DecayMix(loader, decay, cfg.decay_mix, cfg.steps - cfg.decay_steps)
            data_vocab = max(data_vocab, extra.vocab_size)
    else:
        if tokenizer is None:
            raise ConfigError("sft needs a tokenizer: start from a model directory or set tokenizer")
        from minicpm4.train.chat_data import ChatLoader
        loader = ChatLoader(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.seed, rank, world,
                            cfg.tool_format)
        data_vocab = tokenizer.vocab_size
    if fresh:
        special = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
                   "eos_token_id": tokenizer.eos_token_id}
        mc = ModelConfig.from_dict(merge_overrides(preset(cfg.model).to_dict(), {**special, **cfg.model_overrides}))
        torch.manual_seed(cfg.seed)
        model = MiniCPM4ForCausalLM(mc)
        init_weights(model, cfg.init_std, cfg.mup)
    if cfg.longrope_from:  # LongRoPE factors stretching the trained length to max_position_embeddings
        from minicpm4.train.longrope import extend_rope
        extend_rope(model, cfg.longrope_from)
    if data_vocab > model.config.vocab_size:
        raise ConfigError(f"the data's vocabulary ({data_vocab}) is larger than the model's vocab_size "
                          f"({model.config.vocab_size})")
    cfg.check_model(model.config)
    if cfg.mtp_depth:
        mtp_heads.attach(model, cfg.mtp_depth, cfg.init_std, cfg.mup, cfg.seed)
    return model.train(), tokenizer, loader, accum


def checkpoint_layers(model: MiniCPM4ForCausalLM) -> None:
    """Activation checkpointing: each decoder layer keeps only its input and recomputes the rest in backward."""
    from torch.utils.checkpoint import checkpoint
    for layer in model.model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def split(batch: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    parts = {k: v.chunk(n) for k, v in batch.items()}
    return [{k: parts[k][i] for k in batch} for i in range(n)]


def train(cfg: TrainConfig, resume: str | None = None, stop_after: int | None = None,
          log: Callable[[str], None] | None = None, on_step: Callable[[dict], bool] | None = None) -> dict:
    """Run (or continue, with `resume` = a checkpoint or the run's out_dir) until cfg.steps, or `stop_after`
    total steps. on_step(metrics record) -> True stops the run there, as a signal would (early stopping).
    Returns {"step", "loss", "checkpoint", "interrupted"}."""
    rank, world, device, created = pg.init_process_group()
    try:
        return _train(cfg, rank, world, device, resume, stop_after, log if rank == 0 else None, on_step)
    finally:
        if created:
            # FSDP2's hooks put the model in reference cycles that may still hold gloo work objects; freed during the
            # interpreter's final teardown they can abort the process (seen once in 60+ runs of the two-process
            # FSDP test: "terminate called without an active exception" after the last checkpoint; our likeliest
            # reading). Free them while the interpreter is whole.
            gc.collect()
            torch.distributed.destroy_process_group()


def _train(cfg, rank, world, device, resume, stop_after, log, on_step) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    if resume is None and list_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints: continue with --resume {out}, or use another out_dir")
    if rank == 0:
        guards.remove_stale_tmp(out / "checkpoints")  # left by a run killed mid-save
    model, tokenizer, loader, accum = prepare(cfg, rank, world)
    start, ckpt_state = 0, None
    if resume is not None:
        ckpt, saved_mc, state, ckpt_state = load_checkpoint(resume)
        check_compatible(ckpt, saved_mc, model.config, ckpt_state.get("config", {}), cfg.to_dict())
        if model.config.tie_word_embeddings:  # the HF file omits the tied head
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict({**state, **ckpt_state.get("mtp", {})})
        loader.load_state_dict(ckpt_state["data"])
        start = int(ckpt_state["step"])
        if log:
            log(f"resumed from {ckpt} at step {start}")
    model.to(device)
    if cfg.activation_checkpointing:
        checkpoint_layers(model)
    net = pg.wrap(model, cfg.parallel, device)
    layout = "fsdp" if pg.sharded(model) else "torch"  # how the optimizer state is keyed in checkpoints
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.init_std, cfg.mup),
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
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
        if rank == 0:
            model_state, mtp_state = mtp_heads.split_state(model_state)  # MTP heads: state.pt, not the HF model
            state = {"optimizer": opt_state, "optimizer_layout": layout, "data": loader.state_dict(),
                     "rng": rng_state(), "config": cfg.to_dict(), "mtp": mtp_state}
            path = save_checkpoint(out, step, model.config, model_state, tokenizer, state, cfg.keep_checkpoints)
            if log:
                log(f"checkpoint {path}")
        pg.barrier()
        return path

    result = {"step": start, "loss": None, "checkpoint": None, "interrupted": False}
    bad_steps = guards.NonFiniteSteps(cfg.skip_nonfinite_steps, out)
    with StopFlag() as stop, progress_bar(cfg.steps, start, rank == 0) as bar:
        t0, tokens = time.perf_counter(), 0
        for step in range(start, end):
            loss, grad_norm, n_tokens, extra = train_step(cfg, net, model, opt, loader, step, accum, world, device)
            tokens += n_tokens
            elapsed = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss, "lr": cfg.lr * lr_factor(cfg, step), "grad_norm": grad_norm,
                   "tokens": n_tokens, "tok_per_s": tokens / elapsed, **extra}
            if (step + 1) % cfg.log_every == 0 or step + 1 == end or not guards.finite_step(rec):
                metrics.write(rec)
            bad_steps.check(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / elapsed:.0f}")
            result.update(step=step + 1, loss=loss)
            halt = stop.signum is not None or (on_step is not None and bool(on_step(rec)))
            stopping = bool(pg.all_reduce_sum(torch.tensor([float(halt)])).item())
            if stopping or step + 1 == end or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                result["checkpoint"] = save(step + 1)
            if stopping:
                result["interrupted"] = True
                if log:
                    log(f"stopped at step {step + 1}; continue with --resume {out}")
                break
    metrics.close()
    return result


def lr_factor(cfg: TrainConfig, step: int) -> float:
    return wsd_factor(step, cfg.steps, cfg.warmup_steps, cfg.decay_steps, cfg.decay_shape, cfg.min_lr_ratio)


def train_step(cfg, net, model, opt, loader, step, accum, world, device) -> tuple[float, float, int, dict]:
    """One optimizer step; returns (mean loss over the global batch's target tokens, grad norm, input tokens,
    extra metrics: {"mtp_loss"} with MTP heads)."""
    factor = lr_factor(cfg, step)
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    batch = {k: v.to(device) for k, v in loader.next_batch().items()}
    n_targets = pg.all_reduce_sum((batch["labels"] != IGNORE).sum().double())
    if n_targets.item() == 0:
        raise ConfigError(f"step {step + 1}: the batch has no target tokens (every label masked)")
    n_mtp = mtp_heads.target_counts(batch, cfg.mtp_depth)
    total = torch.zeros((), dtype=torch.float64, device=device)
    total_mtp = torch.zeros(cfg.mtp_depth, dtype=torch.float64, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    fused = cfg.fused_loss and not pg.sharded(model)  # FSDP2: lm_head's weight is sharded outside forward
    for i, mb in enumerate(split(batch, accum)):
        with pg.gradient_sync(net, i == accum - 1):
            with autocast:
                if fused or cfg.mtp_depth:  # fused: head + loss in chunks (linear_cross_entropy.py)
                    h = net(mb["input_ids"], segments=mb.get("segments"), hidden_only=True)
                    ce = mtp_heads.head_loss(h, model.lm_head.weight, mb["labels"], fused)
                else:
                    logits = net(mb["input_ids"], segments=mb.get("segments"))
                    ce = F.cross_entropy(logits.flatten(0, 1), mb["labels"].flatten(), ignore_index=IGNORE,
                                         reduction="sum")
                objective = ce * (world / n_targets.float())
                if cfg.mtp_depth:
                    term, sums = mtp_heads.objective(model, h, mb, n_mtp, cfg.mtp_weight, world, fused)
                    objective, total_mtp = objective + term, total_mtp + sums
            objective.backward()
        total += ce.detach().double()
    loss = (pg.all_reduce_sum(total) / n_targets).item()
    extra = {"mtp_loss": (pg.all_reduce_sum(total_mtp) / n_mtp).mean().item()} if cfg.mtp_depth else {}
    params = [p for g in opt.param_groups for p in g["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)  # FSDP: DTensor
    if guards.finite_step({"loss": loss, "grad_norm": grad_norm}):  # a non-finite update never reaches the weights
        opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm, int(batch["input_ids"].numel()) * world, extra
