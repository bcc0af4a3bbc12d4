"""EAGLE draft training against a frozen target (`minicpm4 train draft`).

The text is cut into windows of seq_len tokens x_0..x_{T-1}. The frozen target reads each window once; a hook on
its final norm keeps the features f_t [T, H], and its argmax at each position gives y_t, the target's own next
token. Both are cached (bf16 features), so later epochs cost only the draft. The draft reads the pairs
(f_t, x_{t+1}) at positions t = 0..T-2 with causal attention and outputs g_t; the EAGLE objective is

    loss = SmoothL1(g_t, f_{t+1})  +  ce_weight * CE(lm_head(g_t / scale_width), y_{t+1})

(regression to the target's next feature, plus cross-entropy towards the token the target would emit after
x_{t+1}, which is what greedy verification accepts). With an FR-Spec vocabulary the head and the labels are
restricted to it (labels outside it are ignored). AdamW, linear warmup then cosine decay to lr/10, gradient
clipping at 1. A checkpoint (draft, optimizer, step) is written atomically every save_every steps and at the
end; rerunning the same command resumes from it. The result is a draft directory (spec/eagle.py layout).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minicpm4.engine.engine import Engine
from minicpm4.engine.sampling import SamplingParams
from minicpm4.errors import InputError
from minicpm4.fileio import atomic_write
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.spec.eagle import SHARED, EagleDraft
from minicpm4.weights import checkpoint_files, read_state_dict


@dataclass
class DraftTrainArgs:
    seq_len: int = 256
    batch_size: int = 4
    steps: int = 200
    lr: float = 1e-3
    warmup: int = 10
    ce_weight: float = 0.1
    max_windows: int = 64  # distinct windows; each costs one target forward, then stays cached
    save_every: int = 50
    seed: int = 0


def windows(tokens: list[int], seq_len: int, max_windows: int) -> torch.Tensor:
    """[W, seq_len] consecutive non-overlapping windows of the token stream."""
    w = min(len(tokens) // seq_len, max_windows)
    if w < 1:
        raise InputError(f"training text has {len(tokens)} tokens, fewer than one window of {seq_len}")
    return torch.tensor(tokens[:w * seq_len]).view(w, seq_len)


class TargetFeatures:
    """Per window: the target's final-normed hidden states [T, H] (bf16) and argmax next tokens [T], cached."""

    def __init__(self, target: MiniCPM4ForCausalLM, data: torch.Tensor):
        self.target, self.data, self.cache = target, data, {}

    @torch.inference_mode()
    def get(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        todo = [i for i in idx if i not in self.cache]
        if todo:
            kept = []
            hook = self.target.model.norm.register_forward_hook(lambda mod, inp, out: kept.append(out))
            try:
                logits = self.target(self.data[todo])
            finally:
                hook.remove()
            for j, i in enumerate(todo):
                self.cache[i] = (kept[0][j].to(torch.bfloat16).clone(), logits[j].argmax(-1))
        feats, labels = zip(*(self.cache[i] for i in idx))
        return torch.stack(feats), torch.stack(labels)


def draft_loss(draft: EagleDraft, x: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor,
               ce_weight: float) -> tuple[torch.Tensor, dict]:
    """x, labels [B, T] long; feats [B, T, H]. Returns the loss and its parts (reg, ce, top-1 agreement)."""
    b, t = x.shape
    pos = torch.arange(t - 1).expand(b, t - 1)
    logits, g = draft(x[:, 1:], feats[:, :-1], pos)
    reg = F.smooth_l1_loss(g.float(), feats[:, 1:].float())
    y = labels[:, 1:]
    if draft.vocab is not None:  # full-vocabulary ids -> head rows (-100: not in the FR-Spec vocabulary)
        row = torch.full((draft.config.vocab_size,), -100, dtype=torch.long)
        row[draft.vocab] = torch.arange(draft.vocab.numel())
        y = row[y]
    valid = y != -100
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
    acc = ((logits.argmax(-1) == y) & valid).sum() / valid.sum().clamp(min=1)
    return reg + ce_weight * ce, {"reg": float(reg.detach()), "ce": float(ce.detach()), "top1": float(acc)}


def lr_at(step: int, args: DraftTrainArgs) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def batch_indices(step: int, args: DraftTrainArgs, n: int) -> list[int]:
    """Window ids of a step: epoch-wise seeded permutations, so a resumed run sees the same batches."""
    out = []
    for j in range(args.batch_size):
        k = step * args.batch_size + j
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed + k // n))
        out.append(int(perm[k % n]))
    return out


def train_draft(target: MiniCPM4ForCausalLM, tokens: list[int], out_dir: str | Path, args: DraftTrainArgs,
                vocab: torch.Tensor | None = None, log: Callable[[str], None] = print,
                init: str | Path | None = None) -> Path:
    """init: a draft directory to start from (fine-tuning on new text) instead of the target's last layer."""
    out = Path(out_dir)
    ckpt = out / "checkpoint.pt"
    target.eval().requires_grad_(False)
    data = windows(tokens, args.seq_len, args.max_windows)
    feats = TargetFeatures(target, data)
    torch.manual_seed(args.seed)
    draft = EagleDraft.for_target(target, seed=args.seed)
    draft.bind(target, vocab)
    if init is not None:
        state = read_state_dict(checkpoint_files(Path(init)), torch.float32)
        draft.load_state_dict({k: v for k, v in state.items() if k not in SHARED})
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step = 0
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        draft.load_state_dict(state["draft"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        log(f"resumed from {ckpt} at step {step}")

    def save() -> None:
        state = {"draft": draft.state_dict(), "optimizer": opt.state_dict(), "step": step, "args": asdict(args)}
        atomic_write(ckpt, lambda p: torch.save(state, p))

    log(f"{data.shape[0]} windows of {args.seq_len} tokens; {sum(p.numel() for p in params) / 1e6:.2f}M draft "
        f"parameters; head {'full' if vocab is None else f'FR-Spec {vocab.numel()}'}")
    t0 = time.perf_counter()
    while step < args.steps:
        idx = batch_indices(step, args, data.shape[0])
        f, y = feats.get(idx)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss, parts = draft_loss(draft, data[idx], f, y, args.ce_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % 10 == 0 or step == args.steps:
            log(f"step {step}/{args.steps} loss {float(loss.detach()):.4f} reg {parts['reg']:.4f} ce {parts['ce']:.3f} "
                f"top1 {parts['top1']:.3f} ({time.perf_counter() - t0:.0f}s)")
        if step % args.save_every == 0 or step == args.steps:
            save()
    return draft.save(out)


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
