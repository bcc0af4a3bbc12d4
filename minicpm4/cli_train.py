"""`minicpm4 train pretrain|sft`, `minicpm4 data tokenize` and `minicpm4 tunnel`, registered by `register`: thin
wrappers over minicpm4.train (trainer.train, shard_writer.tokenize_to_shards, tunnel.sweep)."""

from __future__ import annotations

import json
from pathlib import Path

import click

SET_HELP = "Override one setting, key=value (value parsed as JSON, else a string); repeatable."
RESUME_HELP = "Continue a run: a checkpoint directory, or with no value the run's out_dir (its latest checkpoint)."


def load_tokenizer(source: str):
    """A tokenizer from an HF directory, a .gguf file, or 'default' (the offline default model's)."""
    from minicpm4.errors import ConfigError
    from minicpm4.tokenizer import Tokenizer
    if source == "default":
        from minicpm4.default_model import default_model_dir
        source = str(default_model_dir())
    path = Path(source)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        from minicpm4.gguf_file import read_gguf
        return Tokenizer.from_gguf(read_gguf(path))
    raise ConfigError(f"{source}: not a model directory or .gguf file to read a tokenizer from")


@click.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--tokenizer", "tokenizer_src", default="default", show_default=True,
              help="HF directory or .gguf whose tokenizer to use ('default': the default model's).")
@click.option("-o", "--out", "out_dir", required=True, help="Output directory (index.json + shards).")
@click.option("--workers", default=1, show_default=True, help="Files tokenized in parallel.")
@click.option("--text-field", default="text", show_default=True, help="JSONL field / Parquet column of the text.")
def tokenize(inputs, tokenizer_src, out_dir, workers, text_field):
    """Tokenize INPUTS (.txt, .jsonl, .parquet files or directories) into memory-mapped token shards."""
    from minicpm4.train.shard_writer import tokenize_to_shards
    index = tokenize_to_shards(list(inputs), load_tokenizer(tokenizer_src), out_dir, workers, text_field,
                               log=lambda m: click.echo(m, err=True))
    summary = json.loads(index.read_text())
    click.echo(f"{index}: {summary['documents']} documents, {summary['tokens']} tokens ({summary['dtype']})")


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


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


@click.command()
@click.option("--config", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Base TrainConfig (data, steps, schedule, preset model) as JSON or TOML.")
@click.option("--set", "overrides", multiple=True, help=SET_HELP)
@click.option("--widths", default="64,128,256", show_default=True, help="Proxy hidden sizes.")
@click.option("--lrs", default="0.001,0.003,0.01,0.03,0.1", show_default=True, help="Learning rates to try.")
@click.option("--params", default="mup,sp", show_default=True, help="Parametrisations: mup, sp or both.")
@click.option("--coord-lr", type=float, default=0.01, show_default=True, help="Rate of the coordinate check.")
@click.option("--coord-steps", type=int, default=10, show_default=True, help="Steps of the coordinate check (0: off).")
@click.option("--bench", "bench_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="ScalingBench-style items (JSONL: question, answer, choices, label) scored after every run.")
@click.option("-o", "--out", "out_dir", required=True, help="Report directory (results, summary, plot).")
def tunnel(config, overrides, widths, lrs, params, coord_lr, coord_steps, bench_path, out_dir):
    """ModelTunnel-style search: best learning rate per proxy width under muP and standard parametrisation."""
    from minicpm4.errors import ConfigError
    from minicpm4.train.train_config import TrainConfig
    from minicpm4.train.tunnel import PARAMETRISATIONS, coordinate_check, sweep, write_report
    cfg = TrainConfig.load(config, list(overrides), task="pretrain")
    chosen = [p.strip() for p in params.split(",") if p.strip()]
    if not chosen or any(p not in PARAMETRISATIONS for p in chosen):
        raise ConfigError(f"--params must list some of {', '.join(PARAMETRISATIONS)}, got {params!r}")
    ws = [int(w) for w in _floats(widths)]
    log = lambda m: click.echo(m, err=True)  # noqa: E731
    out = Path(out_dir)
    bench = None
    if bench_path:
        from minicpm4.train.scaling_bench import read_items
        bench = read_items(bench_path)
    results = sweep(cfg, ws, _floats(lrs), chosen, work=out / "runs", log=log, bench=bench)
    coord = coordinate_check(cfg, ws, coord_lr, coord_steps, chosen, out / "coord") if coord_steps else None
    click.echo(json.dumps(write_report(out, results, coord)))


def register(cli: click.Group) -> None:
    cli.add_command(tunnel)
    cli.commands["train"].add_command(pretrain)
    cli.commands["train"].add_command(sft)
    cli.commands["data"].add_command(tokenize)
