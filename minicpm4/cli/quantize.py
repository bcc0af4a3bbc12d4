"""`minicpm4 quantize`: RTN / GPTQ / P-GPTQ into a GPTQ-layout checkpoint, or ternary into our packed format."""

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
        from minicpm4.io.export import export_checkpoint
        click.echo(export_checkpoint(model, out_dir))
        return
    from minicpm4.io.export import quantize_checkpoint
    text = open(calib, encoding="utf-8").read() if calib else None
    click.echo(quantize_checkpoint(model, out_dir, method, int(bits), group_size, text, nsamples, seq_len,
                                   act_order=act_order, log=lambda m: click.echo(m, err=True)))


def register(cli: click.Group) -> None:
    cli.add_command(quantize)
