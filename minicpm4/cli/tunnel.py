"""`minicpm4 tunnel`: muP / standard-parametrisation proxy sweeps over learning rates (minicpm4.train.tunnel)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from minicpm4.cli.train import SET_HELP


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
