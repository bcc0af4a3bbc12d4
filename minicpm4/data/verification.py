"""Verification by annealing (UltraClean, paper Fig. 3): is a candidate corpus worth more than the default mix?

From a trained checkpoint (its weights and AdamW state), run the WSD decay phase twice per seed:
    candidate arm   of the steps * batch_size rows, round(ratio * rows) come from the candidate, the rest from the
                    default mix (spread evenly: step s takes c(s+1) - c(s) rows, c(k) = round(ratio * B * k))
    baseline arm    the same steps on the default mix alone
Both start at the base run's peak rate and decay to min_lr_ratio over all the steps (warmup 0, decay = steps,
train/schedule.py), through the trainer's own train_step. A fixed share `heldout` of the default-mix documents
(exact duplicates dropped) is set aside before annealing: held-out loss is measured on it, and the cloze
multiple-choice eval (mc_eval.py) is built from it. Per seed the difference candidate - baseline is paired (same seed, same default-mix order);
the summary gives the mean difference, its standard error and a 95% Student-t interval over seeds.

Layout of OUT:  data/{train,heldout}.jsonl (the default-mix split), tokens/{default,candidate,heldout}/ (shards),
mc.jsonl (the questions), results.json (written atomically after every arm; a rerun skips finished arms and may
add seeds; other settings must match).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from minicpm4.data import mc_eval
from minicpm4.data.verify_report import ARMS, summarize
from minicpm4.errors import ConfigError
from minicpm4.fileio import atomic_write_text
from minicpm4.model.decoder import MiniCPM4ForCausalLM
from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train import process_group as pg
from minicpm4.train.checkpoint import load_checkpoint
from minicpm4.train.language_modeling import LanguageModeling
from minicpm4.train.mup import param_groups
from minicpm4.train.shard_writer import expand_inputs, read_documents, tokenize_to_shards
from minicpm4.train.token_loader import PackedLoader, TokenShards
from minicpm4.train.train_config import TrainConfig
from minicpm4.train.trainer import train_step


@dataclass
class VerifyJob:
    base: str  # a training checkpoint directory or a run's out_dir (its latest checkpoint)
    candidate: list[str] = field(default_factory=list)  # .txt/.jsonl/.parquet files or directories
    default_mix: list[str] = field(default_factory=list)
    out: str = "verify"
    ratio: float = 0.3  # candidate share of the annealing rows
    seeds: int = 3
    steps: int = 0  # annealing steps; 0 = the base run's decay_steps
    batch_size: int = 0  # 0 = the base run's
    seq_len: int = 0  # 0 = the base run's
    heldout: float = 0.1  # share of default-mix documents held out for evaluation
    mc_items: int = 200
    eval_tokens: int = 32768  # held-out tokens scored for the loss (at most)
    text_field: str = "text"
    threads: int = 0
    baseline_from: str = ""  # another verification's OUT: reuse its baseline arms (see reuse_baselines)

    def check(self) -> None:
        if not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"--candidate-ratio must be strictly between 0 and 1, got {self.ratio}")
        if not 0.0 < self.heldout < 1.0:
            raise ConfigError(f"--heldout must be strictly between 0 and 1, got {self.heldout}")
        for name in ("seeds", "mc_items", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("steps", "batch_size", "seq_len", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("candidate", "default_mix"):
            if not getattr(self, name):
                raise ConfigError(f"--{name.replace('_', '-')} needs at least one file or directory")
            expand_inputs(getattr(self, name))  # InputError naming a missing or unsupported path


class MixLoader:
    """Annealing batches {"input_ids", "labels"} [B, seq_len]: candidate rows as in the module doc, the rest from
    the default mix; `rows` counts the rows handed out per source."""

    def __init__(self, default: PackedLoader, candidate: PackedLoader | None, ratio: float):
        self.default, self.candidate, self.ratio = default, candidate, ratio if candidate else 0.0
        self.step, self.rows = 0, {"default": 0, "candidate": 0}

    def candidate_rows(self, step: int) -> int:
        b = self.default.batch_size
        return round(self.ratio * b * (step + 1)) - round(self.ratio * b * step)

    def next_batch(self) -> dict[str, torch.Tensor]:
        k = self.candidate_rows(self.step)
        parts = [self.default.read_windows(self.default.next_windows(self.default.batch_size - k))]
        if k:
            parts.append(self.candidate.read_windows(self.candidate.next_windows(k)))
        self.rows["default"] += self.default.batch_size - k
        self.rows["candidate"] += k
        self.step += 1
        x = torch.cat(parts)
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


@torch.no_grad()
def heldout_loss(model: MiniCPM4ForCausalLM, shards: TokenShards, seq_len: int, max_tokens: int) -> float:
    """Mean next-token cross-entropy (nats) over the first max_tokens targets of the held-out stream, fp32."""
    n = max(1, min((shards.total - 1) // seq_len, max_tokens // seq_len))
    total, count = 0.0, 0
    for start in range(0, n, 8):
        x = torch.from_numpy(np.stack([shards.read(w * seq_len, seq_len + 1) for w in range(start, min(n, start + 8))]))
        logits = model(x[:, :-1]).float()
        total += float(F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="sum"))
        count += x[:, 1:].numel()
    return total / count


def evaluate(model, tokenizer, heldout: TokenShards, items: list[dict], seq_len: int, max_tokens: int) -> dict:
    model.eval()
    return {"heldout_loss": heldout_loss(model, heldout, seq_len, max_tokens),
            **mc_eval.score_items(model, tokenizer, items)}


def load_base(base: str) -> tuple[MiniCPM4ForCausalLM, Tokenizer, dict, Path]:
    """(fp32 model in train mode, tokenizer, training state, checkpoint dir); CheckpointError when unusable."""
    ckpt, config, state, train_state = load_checkpoint(base)
    if config.tie_word_embeddings:  # the HF file omits the tied head
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = MiniCPM4ForCausalLM(config)
    model.load_state_dict(state)
    return model.train(), Tokenizer.from_dir(ckpt / "model"), train_state, ckpt


def anneal_config(job: VerifyJob, train_state: dict, data: Path, seed: int) -> TrainConfig:
    """The base run's settings with the schedule replaced by its decay phase alone."""
    run = dict(train_state.get("config") or {})
    steps = job.steps or run.get("decay_steps") or 0
    if steps <= 0:
        raise ConfigError("the base run has no decay_steps to copy: give --steps")
    batch = job.batch_size or run.get("batch_size", 8)
    micro = min(run.get("micro_batch_size", batch), batch)
    run.update(mtp_depth=0, tensorboard=False)  # the annealing arms train the main model alone, log to JSONL only
    run.update(task="pretrain", data=str(data), decay_data="", decay_mix=0.0, steps=steps, warmup_steps=0,
               decay_steps=steps, seed=seed, batch_size=batch, seq_len=job.seq_len or run.get("seq_len", 256),
               micro_batch_size=micro if batch % micro == 0 else 1, threads=job.threads, out_dir=job.out)
    return TrainConfig.from_dict(run, "annealing config")


def anneal(job: VerifyJob, arm: str, seed: int, data: dict, log=None) -> tuple[MiniCPM4ForCausalLM, dict]:
    """One arm for one seed: the annealed model and {"steps", "train_loss" (last step), "rows", "tokens"} (per
    source; tokens = rows * seq_len input tokens)."""
    model, _, train_state, _ = load_base(job.base)
    cfg = anneal_config(job, train_state, data["default"], seed)
    cfg.check_model(model.config)
    default = PackedLoader(data["default"], cfg.seq_len, cfg.batch_size, seed)
    cand = PackedLoader(data["candidate"], cfg.seq_len, cfg.batch_size, seed + 1) if arm == "candidate" else None
    loader = MixLoader(default, cand, job.ratio)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, cfg.init_std, cfg.mup),
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    base_mtp = (train_state.get("config") or {}).get("mtp_depth", 0)  # its moments include the MTP heads': skipped
    if train_state.get("optimizer_layout", "torch") == "torch" and "optimizer" in train_state and not base_mtp:
        pg.load_optimizer_state(model, opt, train_state["optimizer"])  # continue the stable phase's moments
    device, accum, loss = torch.device("cpu"), cfg.accumulation(1), float("nan")
    objective = LanguageModeling(cfg, model, None, loader)
    for step in range(cfg.steps):
        loss = train_step(cfg, model, objective, opt, step, accum, 1, device)[0]["loss"]
    if log:
        log(f"seed {seed} {arm}: {cfg.steps} steps, last loss {loss:.4f}, rows {loader.rows}")
    return model, {"steps": cfg.steps, "train_loss": loss, "rows": dict(loader.rows),
                   "tokens": {k: v * cfg.seq_len for k, v in loader.rows.items()}}


def prepare_data(job: VerifyJob, tokenizer: Tokenizer, log=None) -> dict:
    """Split the default mix (once), tokenize the three corpora (resumable), build the MC items (once)."""
    out = Path(job.out)
    split = {name: out / "data" / f"{name}.jsonl" for name in ("train", "heldout")}
    if not all(p.is_file() for p in split.values()):
        # exact duplicates kept once, so no held-out document is also annealed on
        docs = list(dict.fromkeys(d for f in expand_inputs(job.default_mix) for d in read_documents(f, job.text_field)))
        if len(docs) < 2:
            raise ConfigError(f"--default-mix holds {len(docs)} document(s); need at least 2 to hold some out")
        order = list(range(len(docs)))
        random.Random(0).shuffle(order)
        n_held = min(len(docs) - 1, max(1, round(job.heldout * len(docs))))
        for name, idx in (("heldout", order[:n_held]), ("train", order[n_held:])):
            atomic_write_text(split[name], "".join(json.dumps({"text": docs[i]}) + "\n" for i in sorted(idx)))
    sources = {"default": [str(split["train"])], "heldout": [str(split["heldout"])], "candidate": job.candidate}
    data = {}
    for name, inputs in sources.items():
        field_name = job.text_field if name == "candidate" else "text"
        data[name] = TokenShards(tokenize_to_shards(inputs, tokenizer, out / "tokens" / name, 1, field_name, log))
    mc_path = out / "mc.jsonl"
    if not mc_path.is_file():
        held = [d for d in read_documents(split["heldout"])]
        items = mc_eval.build_items(held, job.mc_items)
        if not items:
            raise ConfigError(f"{split['heldout']}: no cloze question can be built (needs sentences of 8+ words "
                              "in 2+ documents); raise --heldout or give more default-mix text")
        atomic_write_text(mc_path, "".join(json.dumps(it) + "\n" for it in items))
    data["items"] = [json.loads(line) for line in mc_path.read_text().splitlines() if line.strip()]
    return data


def settings(job: VerifyJob, ckpt: Path) -> dict:
    s = {k: v for k, v in asdict(job).items() if k not in ("seeds", "threads", "out", "base", "baseline_from")}
    return {**s, "base": str(ckpt.resolve())}


def reuse_baselines(job: VerifyJob, mine: dict, results: dict) -> None:
    """Copy the base evaluation and baseline arms of another verification with the same settings but the candidate
    and ratio: the baseline arm never sees the candidate, and a seed's run is deterministic (same threads)."""
    path = Path(job.baseline_from) / "results.json"
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"--baseline-from: cannot read {path} ({e})") from None
    theirs = other.get("settings", {})
    diff = sorted(k for k in mine if k not in ("candidate", "ratio") and mine[k] != theirs.get(k))
    if diff:
        raise ConfigError(f"--baseline-from: {path} has other settings ({', '.join(diff)})")
    if "base_eval" in other:
        results.setdefault("base_eval", other["base_eval"])
    for seed, run in other.get("runs", {}).items():
        if "baseline" in run and int(seed) < job.seeds:
            results["runs"].setdefault(seed, {}).setdefault("baseline", run["baseline"])


def run_verify(job: VerifyJob, log=None) -> dict:
    """Run (or resume) the verification; returns the results dict also written to OUT/results.json."""
    job.check()
    threads = torch.get_num_threads()
    if job.threads:
        torch.set_num_threads(job.threads)
    try:
        return _run(job, log)
    finally:
        torch.set_num_threads(threads)


def _run(job: VerifyJob, log) -> dict:
    model, tokenizer, train_state, ckpt = load_base(job.base)
    cfg = anneal_config(job, train_state, Path(job.out), 0)  # fails early on a bad schedule
    out = Path(job.out)
    path = out / "results.json"
    mine = settings(job, ckpt)
    results = json.loads(path.read_text()) if path.is_file() else {"settings": mine, "runs": {}}
    diff = sorted(k for k in set(mine) | set(results["settings"]) if mine.get(k) != results["settings"].get(k))
    if diff:
        raise ConfigError(f"{path} holds a verification with other settings ({', '.join(diff)}); use another -o")
    if job.baseline_from:
        reuse_baselines(job, mine, results)
    data = prepare_data(job, tokenizer, log)
    seq_len = cfg.seq_len
    for name in ("default", "candidate"):  # too little text for one batch fails here, before any annealing
        PackedLoader(data[name], seq_len, cfg.batch_size, 0)

    def save() -> None:
        results["summary"] = summarize(results["runs"])
        atomic_write_text(path, json.dumps(results, indent=1) + "\n")

    if "base_eval" not in results:
        results["base_eval"] = evaluate(model, tokenizer, data["heldout"], data["items"], seq_len, job.eval_tokens)
        save()
    for seed in range(job.seeds):
        run = results["runs"].setdefault(str(seed), {})
        for arm in ARMS:
            if arm in run:
                continue
            annealed, info = anneal(job, arm, seed, data, log)
            run[arm] = {**evaluate(annealed, tokenizer, data["heldout"], data["items"], seq_len, job.eval_tokens),
                        **info}
            save()
    save()
    return results
