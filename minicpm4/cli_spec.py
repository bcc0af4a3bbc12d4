"""`minicpm4 frspec` (FR-Spec vocabulary from a corpus) and `minicpm4 train draft` (EAGLE draft training)."""

from __future__ import annotations

import click
from pathlib import Path

from minicpm4.cli import MODEL_HELP


@click.command()
@click.option("--model", "model_path", default=None, help=MODEL_HELP + " (its tokenizer and EOS ids are used).")
@click.option("--corpus", "corpus", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text file to count tokens in (repeatable).")
@click.option("--size", default=32768, show_default=True, help="Token ids to keep (EOS ids always included).")
@click.option("-o", "--out", "out_path", required=True, help="Output file, e.g. freq_32768.pt.")
def frspec(model_path, corpus, size, out_path):
    """Count token frequencies in CORPUS and save the SIZE most frequent ids (an FR-Spec draft vocabulary)."""
    from minicpm4.frspec import build_vocab, save_vocab
    from minicpm4.loader import load
    model, tok = load(model_path, dtype="bf16")
    eos = set(model.config.eos_token_ids) | set(tok.eos_token_ids)
    ids, counts = build_vocab(corpus, tok.encode, model.config.vocab_size, size, eos)
    covered = float(counts[ids].sum()) / max(1, int(counts.sum()))
    click.echo(f"{save_vocab(ids, out_path)}: {ids.numel()} ids covering {covered:.1%} of "
               f"{int(counts.sum())} corpus tokens")


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
    from minicpm4.draft_training import DraftTrainArgs, train_draft
    from minicpm4.frspec import load_vocab
    from minicpm4.loader import load
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
    from minicpm4.draft_training import self_distill
    from minicpm4.fileio import atomic_write_text
    from minicpm4.loader import load
    target, tok = load(model_path, dtype="bf16")
    target.fuse_projections()
    tokens: list[int] = []
    for path in data:
        with open(path, encoding="utf-8", errors="replace") as f:
            tokens += tok.encode(f.read())
    seqs = self_distill(target, tokens, prompt_len, new_tokens, count, batch_size,
                        log=lambda m: click.echo(m, err=True))
    atomic_write_text(Path(out_path), "\n".join(tok.decode(s) for s in seqs) + "\n")
    click.echo(f"{out_path}: {len(seqs)} sequences of {prompt_len} + {new_tokens} tokens")


def register(cli: click.Group) -> None:
    cli.add_command(frspec)
    cli.commands["train"].add_command(draft)
    cli.commands["train"].add_command(draft_data)
