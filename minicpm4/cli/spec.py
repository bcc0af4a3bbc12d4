"""`minicpm4 frspec`: the FR-Spec vocabulary (most frequent token ids of a corpus) for an EAGLE draft's head."""

from __future__ import annotations

import click

from minicpm4.cli.options import MODEL_HELP


@click.command()
@click.option("--model", "model_path", default=None, help=MODEL_HELP + " (its tokenizer and EOS ids are used).")
@click.option("--corpus", "corpus", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file to count tokens in (repeatable).")
@click.option("--size", default=32768, show_default=True, help="Token ids to keep (EOS ids always included).")
@click.option("-o", "--out", "out_path", required=True, help="Output file, e.g. freq_32768.pt.")
def frspec(model_path, corpus, size, out_path):
    """Count token frequencies in CORPUS and save the SIZE most frequent ids (an FR-Spec draft vocabulary)."""
    from minicpm4.io.loader import load
    from minicpm4.spec.frspec import build_vocab, save_vocab
    model, tok = load(model_path, dtype="bf16")
    eos = set(model.config.eos_token_ids) | set(tok.eos_token_ids)
    ids, counts = build_vocab(corpus, tok.encode, model.config.vocab_size, size, eos)
    covered = float(counts[ids].sum()) / max(1, int(counts.sum()))
    click.echo(f"{save_vocab(ids, out_path)}: {ids.numel()} ids covering {covered:.1%} of "
               f"{int(counts.sum())} corpus tokens")


def register(cli: click.Group) -> None:
    cli.add_command(frspec)
