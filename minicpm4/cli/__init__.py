"""The `minicpm4` command line: the root group and its `train` / `data` subgroups; one module per command group.

    generate  setup | generate | chat | info | convert       serve     serve | agent
    quantize  quantize                                       spec      frspec
    train     train pretrain | sft | rl | qat | draft | ...    tunnel    tunnel
    data      data tokenize | train-classifier | filter | synth | demo-corpus | demo-score | verify
    survey    survey | eval survey
    eval      eval mcp | mcp-cases | mcp-sft-data (the `eval` group lives in eval.py)
    options   the flags and helpers they share

Thin wrappers: each command parses flags into library calls. Errors the library raises for bad input
(MiniCPM4Error) are printed as one line and exit with status 2. The command modules import only click at module
level (library imports sit inside the commands), so `minicpm4 --help` never imports torch.
"""

from __future__ import annotations

import sys

import click

from minicpm4.errors import MiniCPM4Error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """MiniCPM4 on CPU: generation, chat, serving, quantization, training and data recipes."""


@cli.group("train")
def train_group():
    """Training: pretraining, SFT, RL, QAT, draft heads."""


@cli.group("data")
def data_group():
    """Data: token shards, quality classifier, filtering, synthesis."""


def _register_all() -> None:
    import importlib
    # `eval` makes the eval group; "survey" adds `eval survey` to it, so it comes after
    for name in ("generate", "serve", "quantize", "spec", "train", "tunnel", "data", "eval", "survey"):
        importlib.import_module(f"minicpm4.cli.{name}").register(cli)


def _hold_torch_to_the_forced_tier() -> None:
    """MINICPM4_ISA=<tier> forces our kernels' tier; hold torch's own kernels (ATen, oneDNN) to the same
    instruction sets, unless their variables are set already, so the command runs as on a CPU of that tier. It
    must happen before torch is imported, which the command modules defer."""
    import os
    from minicpm4.kernels import isa
    try:
        tier = isa.selected() if os.environ.get("MINICPM4_ISA") else None
    except MiniCPM4Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    for key, value in (isa.torch_environment(tier) if tier else {}).items():
        os.environ.setdefault(key, value)


def main() -> None:
    _hold_torch_to_the_forced_tier()
    _register_all()
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except MiniCPM4Error as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
