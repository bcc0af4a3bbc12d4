"""EAGLE draft training against a frozen target (`minicpm4 train draft`): an objective of the one training loop.

The text is cut into windows of seq_len tokens x_0..x_{T-1}. The frozen target reads each window once; a hook on
its final norm keeps the features f_t [T, H], and its argmax at each position gives y_t, the target's own next
token. Both are cached (bf16 features), so later epochs cost only the draft. The draft reads the pairs
(f_t, x_{t+1}) at positions t = 0..T-2 with causal attention and outputs g_t; the EAGLE objective is

    loss = SmoothL1(g_t, f_{t+1})  +  ce_weight * CE(lm_head(g_t / scale_width), y_{t+1})

(regression to the target's next feature, a mean over the batch's elements, plus the cross-entropy towards the token
the target would emit after x_{t+1}, a mean over the labels, which is what greedy verification accepts). With an
FR-Spec vocabulary the head and the labels are restricted to it (labels outside it are ignored). The loop
(train/trainer.py) supplies AdamW, the schedule (the draft task's WSD: warmup, then cosine decay to lr/10 until the
last step), gradient clipping at 1, and its checkpoints (OUT/checkpoints, every save_every steps and at the end);
rerunning the same command resumes, also from the checkpoint.pt of the trainer before issue 15. The result is a
draft directory (spec/eagle.py layout) in OUT.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minicpm4.config import ModelConfig
from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import CheckpointError, ConfigError, InputError
from minicpm4.io.loader import load
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.spec.eagle import SHARED, EagleDraft
from minicpm4.spec.frspec import load_vocab
from minicpm4.train.checkpoint import list_checkpoints, rng_state, save_checkpoint
from minicpm4.train.objective import Objective
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train
from minicpm4.weights import checkpoint_files, read_state_dict

LEGACY = "checkpoint.pt"  # the resume file of the draft trainer before issue 15


def windows(tokens: list[int], seq_len: int, max_windows: int) -> torch.Tensor:
    """[W, seq_len] consecutive non-overlapping windows of the token stream."""
    w = min(len(tokens) // seq_len, max_windows)
    if w < 1:
        raise InputError(f"training text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(tokens[:w * seq_len]).view(w, seq_len)


class TargetFeatures:
    """Per window: the target's final-normed hidden states [T, H] (bf16) and argmax next tokens [T], cached on the
    CPU (the target runs on its own device)."""

    def __init__(self, target: MiniCPM4ForCausalLM, data: torch.Tensor):
        self.target, self.data, self.cache = target, data, {}

    @torch.inference_mode()
    def get(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [i for i in idx if i not in self.cache]
        if todo:
            kept = []
            hook = self.target.model.norm.register_forward_hook(lambda mod, inp, out: kept.append(out))
            try:
                logits = self.target(self.data[todo].to(self.target.model.embed_tokens.weight.device))
            finally:
                hook.remove()
            for j, i in enumerate(todo):
                self.cache[i] = (kept[0][j].to(torch.bfloat16).cpu().clone(), logits[j].argmax(-1).cpu())
        feats, labels = zip(*(self.cache[i] for i in idx))
        return torch.stack(feats), torch.stack(labels)


def head_labels(draft: EagleDraft, labels: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary ids -> head rows (-100: not in the FR-Spec vocabulary)."""
    if draft.vocab is None:
        return labels
    row = torch.full((draft.config.vocab_size,), -100, dtype=torch.long)
    row[draft.vocab] = torch.arange(draft.vocab.numel())
    return row[labels]


def draft_sums(draft: EagleDraft, x: torch.Tensor, feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x [B, T] long, feats [B, T, H], y [B, T] head-row labels (-100: none). The sums over the batch of
    [SmoothL1 over every element of g, CE over the valid labels, top-1 agreements]; the first two carry the graph."""
    b, t = x.shape
    pos = torch.arange(t - 1, device=x.device).expand(b, t - 1)
    logits, g = draft(x[:, 1:], feats[:, :-1], pos)
    reg = F.smooth_l1_loss(g.float(), feats[:, 1:].float(), reduction="sum")
    y = y[:, 1:]
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    agree = ((logits.argmax(-1) == y) & (y != -100)).sum()
    return torch.stack([reg, ce, agree.to(reg.dtype)])


def draft_counts(feats: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The denominators of draft_sums: [regression elements, valid labels], float64."""
    b, t, h = feats.shape
    return torch.tensor([b * (t - 1) * h, int((y[:, 1:] != -100).sum())], dtype=torch.float64)


def draft_loss(draft: EagleDraft, x: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
               ce_weight: float) -> tuple[torch.Tensor, dict]:
    """x, labels [B, T] long (full-vocabulary ids); feats [B, T, H]. Returns the loss and its parts (reg, ce,
    top-1 agreement), each a mean over the batch."""
    y = head_labels(draft, labels)
    sums, n = draft_sums(draft, x, feats, y), draft_counts(feats, y)
    reg, ce = sums[0] / n[0], sums[1] / max(n[1].item(), 1)
    return reg + ce_weight * ce, {"reg": float(reg.detach()), "ce": float(ce.detach()),
                                  "top1": float(sums[2] / max(n[1].item(), 1))}


def batch_indices(step: int, batch_size: int, seed: int, n: int) -> list[int]:
    """Window ids of a step: epoch-wise seeded permutations, so a resumed run sees the same batches."""
    out = []
    for j in range(batch_size):
        k = step * batch_size + j
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + k // n))
        out.append(int(perm[k % n]))
    return out


class DraftTraining(Objective):
    """The draft (fp32) trains; the target only supplies cached features and labels."""
    rerun_resumes = True

    def __init__(self, cfg: TrainConfig, target: MiniCPM4ForCausalLM, tokens: list[int],
                 vocab: torch.Tensor | None = None, log: Callable[[str], None] | None = None,
                 rank: int = 0, world: int = 1):
        if cfg.task != "draft":
            raise ConfigError(f"the draft objective needs task draft, got {cfg.task!r}")
        if cfg.parallel == "fsdp":
            raise ConfigError("draft training replicates the small draft over processes: use parallel=ddp")
        super().__init__(cfg)
        self.rank, self.world = rank, world
        target.eval().requires_grad_(False)
        self.data = windows(tokens, cfg.seq_len, cfg.draft.max_windows)
        self.features = TargetFeatures(target, self.data)
        torch.manual_seed(cfg.seed)
        draft = EagleDraft.for_target(target, seed=cfg.seed)
        draft.bind(target, vocab)
        if cfg.draft.init:
            state = read_state_dict(checkpoint_files(Path(cfg.draft.init)), torch.float32)
            draft.load_state_dict({k: v for k, v in state.items() if k not in SHARED})
        self.model = draft
        # the config as the draft directory states it (mup_denominator: the target's depth), for check_compatible
        self.config = ModelConfig.from_dict({**draft.config.to_dict(), "mup_denominator": draft.mup_denominator})
        if log:
            params = sum(p.numel() for p in draft.parameters() if p.requires_grad)
            log(f"{self.data.shape[0]} windows of {cfg.seq_len} tokens; {params / 1e6:.2f}M draft parameters; head "
                f"{'full' if vocab is None else f'FR-Spec {vocab.numel()}'}")

    @classmethod
    def from_config(cls, cfg: TrainConfig, log: Callable[[str], None] | None = None,
                    rank: int = 0, world: int = 1) -> "DraftTraining":
        """The target cfg.model in draft.target_dtype, the text files cfg.data, the FR-Spec vocabulary draft.frspec."""
        files = cfg.data if isinstance(cfg.data, list) else [cfg.data] if cfg.data else []
        if not files:
            raise ConfigError("draft training needs data: one or more text files")
        target, tok = load(cfg.model, dtype=cfg.draft.target_dtype)
        vocab = load_vocab(cfg.draft.frspec, target.config.vocab_size) if cfg.draft.frspec else None
        need = cfg.seq_len * cfg.draft.max_windows
        tokens: list[int] = []
        for path in files:
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    tokens += tok.encode(f.read(need * 8))  # a token is rarely over 8 characters
            except OSError as e:
                raise InputError(f"{path}: cannot read the training text ({e.strerror})") from None
        return cls(cfg, target, tokens, vocab, log, rank, world)

    def next_batch(self, step: int) -> dict[str, torch.Tensor]:
        idx = batch_indices(step, self.cfg.batch_size, self.cfg.seed, self.data.shape[0])
        per = len(idx) // self.world
        idx = idx[self.rank * per:(self.rank + 1) * per]
        f, y = self.features.get(idx)
        return {"ids": self.data[idx], "feats": f, "labels": head_labels(self.model, y)}

    def tokens(self, batch):
        return int(batch["ids"].numel())

    def counts(self, batch):
        return draft_counts(batch["feats"], batch["labels"])

    def loss(self, net, mb, counts, world):
        sums = draft_sums(net, mb["ids"], mb["feats"], mb["labels"])
        reg, ce = sums[0] / counts[0].float(), sums[1] / counts[1].clamp(min=1).float()
        return (reg + self.cfg.draft.ce_weight * ce) * world, sums.detach().double()

    def metrics(self, sums, counts):
        reg, ce = (sums[0] / counts[0]).item(), (sums[1] / counts[1].clamp(min=1)).item()
        return {"loss": reg + self.cfg.draft.ce_weight * ce, "reg": reg, "ce": ce,
                "top1": (sums[2] / counts[1].clamp(min=1)).item()}

    def resume_from(self, resume: str | None) -> str | None:
        """Rerunning resumes: the latest checkpoint in OUT, else an older trainer's OUT/checkpoint.pt."""
        if resume is None:
            if not list_checkpoints(self.run_dir) and (self.run_dir / LEGACY).is_file():
                import_legacy_checkpoint(self, self.run_dir / LEGACY)
            if list_checkpoints(self.run_dir):
                resume = str(self.run_dir)
        return resume

    def to(self, device: torch.device) -> None:
        """The draft, the target (whose embedding and head the draft shares) and an FR-Spec head onto `device`."""
        self.features.target.to(device)
        self.model.to(device)
        if self.model.vocab is not None:
            self.model._shared[1].to(device)

    def save_model(self, directory: Path, state) -> None:
        self.model.save(directory, {k: v.detach().cpu() for k, v in state.items()})

    def load_model(self, state, extra) -> None:
        self.model.load_state_dict(state)

    def finish(self) -> Path:
        return self.model.save(self.cfg.out_dir, {k: v.detach().cpu() for k, v in self.model.state_dict().items()})


def train_draft(cfg: TrainConfig, target: MiniCPM4ForCausalLM | None = None, tokens: list[int] | None = None,
                vocab: torch.Tensor | None = None, log: Callable[[str], None] = print,
                stop_after: int | None = None) -> dict:
    """Train (or resume: rerun with the same settings) the draft of cfg (task draft) in cfg.out_dir. target,
    tokens, vocab: given in memory instead of read per cfg (model, data, draft.frspec). Returns trainer.train's
    result; "output" is the draft directory once every step is done."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if target is None or tokens is None:
        objective = DraftTraining.from_config(cfg, log, rank, world)
    else:
        objective = DraftTraining(cfg, target, tokens, vocab, log, rank, world)
    return train(cfg, stop_after=stop_after, log=log, objective=objective)


def import_legacy_checkpoint(objective: DraftTraining, path: Path) -> Path:
    """Turn the checkpoint.pt of the draft trainer before issue 15 ({draft, optimizer, step, args}) into a checkpoint
    of the run directory (the draft's weights and AdamW moments at its step; the batches of a step are a function of
    the step, so nothing else is needed) and remove it; the run then resumes through the one checkpoint path."""
    cfg = objective.cfg
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        args, step, weights, opt_state = state["args"], int(state["step"]), state["draft"], state["optimizer"]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else repr(e)
        raise CheckpointError(f"{path}: not a readable draft checkpoint ({why})") from None
    now = {"seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "seed": cfg.seed,
           "max_windows": cfg.draft.max_windows}  # what fixes the windows and the batches of each step
    diff = [f"{k} ({args.get(k)!r} -> {v!r})" for k, v in now.items() if args.get(k) != v]
    if diff:
        raise CheckpointError(f"{path}: saved by a run with other data settings: {', '.join(diff)}; delete it to "
                              "start over")
    for group in opt_state["param_groups"]:
        group.setdefault("base_lr", cfg.lr)
    train_state = {"optimizer": opt_state, "optimizer_layout": "torch", "rng": rng_state(), "config": cfg.to_dict(),
                   "data": {}, "mtp": {}}
    ckpt = save_checkpoint(objective.run_dir, step, weights, lambda d: objective.save_model(d, weights), train_state,
                           cfg.keep_checkpoints)
    path.unlink()
    return ckpt


def self_distill(target: MiniCPM4ForCausalLM, tokens: list[int], prompt_len: int, new_tokens: int,
                 count: int, batch: int = 16, log: Callable[[str], None] = print) -> list[list[int]]:
    """Training sequences in the target's own words: `count` prompts of prompt_len tokens cut from `tokens`
    (evenly spaced), each followed by the target's greedy continuation of new_tokens (EOS ignored).

    EAGLE trains on the target's generations rather than on fixed text: at inference the draft reads tokens the
    target chose, and greedy verification accepts only the target's argmax, so that is the distribution to fit.
    """
    span = len(tokens) - prompt_len
    if span < 0 or count < 1:
        raise InputError(f"self-distillation needs >= 1 prompt of {prompt_len} tokens; the text has {len(tokens)}")
    starts = [span * i // count for i in range(count)]
    engine = Engine(target.eval(), max_len=prompt_len + new_tokens + 1, max_slots=batch)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    out = []
    for b in range(0, count, batch):
        prompts = [tokens[s:s + prompt_len] for s in starts[b:b + batch]]
        out += [p + g.token_ids for p, g in zip(prompts, engine.generate(prompts, params))]
        log(f"{len(out)}/{count} sequences")
    return out


@torch.inference_mode()
def evaluate_draft(draft: EagleDraft, target: MiniCPM4ForCausalLM, tokens: list[int], seq_len: int,
                   max_windows: int) -> dict:
    """Teacher-forced top-1 agreement of the draft with the target's next token on held-out text."""
    data = windows(tokens, seq_len, max_windows)
    f, y = TargetFeatures(target, data).get(list(range(data.shape[0])))
    _, parts = draft_loss(draft, data, f, y, 0.0)
    return parts
