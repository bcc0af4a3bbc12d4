"""The seam between the one training loop (trainer.py) and what a run trains: an Objective.

The loop owns what every run shares: AdamW over the objective's parameter groups, the WSD schedule (schedule.py)
on each group's `base_lr`, micro-batches with gradient sync under DDP / FSDP2, bf16 autocast, grad-norm clipping,
metrics, the evaluation cadence, atomic checkpoints with exact resume (checkpoint.py) and SIGINT/SIGTERM.
An objective says what trains, on what, towards what:

    model                   the nn.Module whose trainable parameters AdamW steps (the loop wraps it for DDP/FSDP2)
    to(device)              move the model (and whatever else the objective computes with) to the loop's device
    config                  its ModelConfig (a resumed checkpoint must match it)
    run_dir                 where checkpoints/ and metrics.jsonl go (default: cfg.out_dir)
    resume_from(resume)     the checkpoint to continue from: the caller's (pretrain, sft: explicit --resume); qat
                            and draft, whose commands resume when rerun, find their own
    param_groups()          AdamW groups, each with `base_lr`, its peak rate
    next_batch(step)        this process's share of the step's global batch: tensors whose dim 0 splits into
                            micro-batches
    counts(batch)           this process's denominators of the loss terms, [k] float64 (the loop sums them over
                            processes)
    loss(net, mb, n, world) -> (objective, sums): the micro-batch's share of the global objective, scaled so that
                            after DDP's gradient average the gradient is that of the mean over the global batch
                            (n: the global counts), and detached sums [j] for the metrics
    metrics(sums, n)        {"loss": ..., ...} from the global batch's sums and counts
    evaluate(step)          held-out metrics, every cfg.eval_every steps and at step 0 ({} when there is none)
    state_dict / load_state_dict   where the data stands (and whatever else must resume exactly); state_dict runs
                            on every process at each checkpoint (rank 0 writes it), so it may gather per-process state
    split_state(state)      (the model directory's tensors, tensors kept in state.pt instead), from the model's
                            full state dict
    save_model(dir, state)  write the checkpoint's model directory
    load_model(state, extra)  the inverse of both, on resume
    finish()                what the run produces once every step is done (an exported model), or None

Pretraining and SFT (language_modeling.py), QAT (qat.py), RL (rl/objective.py) and EAGLE draft training
(spec/draft_training.py) are objectives; trainer.objective_for builds the ones of this package from a TrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from minicpm4.config import ModelConfig
from minicpm4.train.train_config import TrainConfig


class Objective:
    model: nn.Module
    config: ModelConfig
    rerun_resumes = False  # whether resume_from finds the run's checkpoints itself (the command resumes when rerun)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.out_dir)

    def resume_from(self, resume: str | None) -> str | None:
        return resume

    def to(self, device: torch.device) -> None:
        """Move what trains (and what it reads from, if anything) to the loop's device."""
        self.model.to(device)

    def param_groups(self) -> list[dict]:
        """One group of every trainable parameter at cfg.lr and cfg.weight_decay."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return [{"params": params, "base_lr": self.cfg.lr, "lr": self.cfg.lr, "weight_decay": self.cfg.weight_decay}]

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Input tokens of this process's batch (for the tok/s metric)."""
        return int(batch["input_ids"].numel())

    def counts(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, net: nn.Module, mb: dict[str, torch.Tensor], counts: torch.Tensor,
             world: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def metrics(self, sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def split_state(self, state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        return state, {}

    def save_model(self, directory: Path, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def load_model(self, state: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict({**state, **extra})

    def finish(self) -> Path | None:
        return None
