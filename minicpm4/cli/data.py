"""`minicpm4 data ...`: tokenize, train-classifier, filter, synth, demo-corpus, demo-score, verify (token shards,
UltraClean, UltraChat v2)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

PATHS_HELP = "File or directory (repeatable): .jsonl/.json[.gz|.zst], .parquet, or plain text (one doc per file)."


def load_tokenizer(source: str):
    """A tokenizer from an HF directory, a .gguf file, or 'default' (the offline default model's)."""
    from minicpm4.errors import ConfigError
    from minicpm4.text.tokenizer import Tokenizer
    if source == "default":
        from minicpm4.io.loader import default_model_dir
        source = str(default_model_dir())
    path = Path(source)
    if path.is_dir():
        return Tokenizer.from_dir(path)
    if path.suffix == ".gguf" and path.is_file():
        from minicpm4.io.gguf import read_gguf
        return read_gguf(path).text_tokenizer()
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


def _read_texts(paths, text_key, what):
    """All usable texts from files/dirs; bad records are counted and reported on stderr, not fatal."""
    from minicpm4.data.pipeline import list_inputs
    from minicpm4.data.records import open_records

    texts, bad = [], Counter()
    for path in list_inputs(list(paths)):
        for rec in open_records(path, text_key):
            if rec.reason:
                bad[rec.reason] += 1
            else:
                texts.append(rec.text)
    extra = ", ".join(f"{n} {r}" for r, n in sorted(bad.items()))
    click.echo(f"[{what}: {len(texts)} documents" + (f"; skipped {extra}]" if extra else "]"), err=True)
    return texts


@click.command("train-classifier")
@click.option("--pos", multiple=True, required=True, help="High-quality seed documents. " + PATHS_HELP)
@click.option("--neg", multiple=True, required=True, help="Random raw documents. " + PATHS_HELP)
@click.option("-o", "--out", required=True, help="Model path (.bin); a <out>.json sidecar is written next to it.")
@click.option("--tokenizer", default="default", show_default=True,
              help="tokenizer.json or HF dir used in preprocessing ('default' = the default model's).")
@click.option("--dim", default=256, show_default=True)
@click.option("--lr", default=0.1, show_default=True)
@click.option("--word-ngrams", default=3, show_default=True)
@click.option("--min-count", default=5, show_default=True)
@click.option("--epoch", default=3, show_default=True)
@click.option("--bucket", default=2_000_000, show_default=True,
              help="Hashed n-gram rows; model size ~ bucket*dim*4 bytes.")
@click.option("--threads", default=1, show_default=True, help="fastText threads (1 = reproducible).")
@click.option("--seed", default=0, show_default=True)
@click.option("--heldout", default=0.1, show_default=True, help="Fraction held out for the precision/recall report.")
@click.option("--threshold", default=0.5, show_default=True)
@click.option("--text-key", default="text", show_default=True)
def train_classifier(pos, neg, out, tokenizer, heldout, threshold, text_key, **params):
    """Train the UltraClean fastText classifier (paper defaults) and report held-out precision/recall."""
    from minicpm4.data.classifier import TrainParams, train_classifier as train

    report = train(_read_texts(pos, text_key, "pos"), _read_texts(neg, text_key, "neg"), out,
                   TrainParams(**params), heldout, threshold, tokenizer)
    click.echo(report.lines())
    click.echo(out)


@click.command("filter")
@click.argument("inputs", nargs=-1, required=True)
@click.option("-o", "--out", required=True, help="Output folder (kept/, rejected/, logs/); rerun to resume.")
@click.option("--classifier", default=None, help="fastText model from train-classifier (omit: heuristics/dedup only).")
@click.option("--threshold", default=0.5, show_default=True, help="Keep P(pos) >= threshold.")
@click.option("--heuristic", "heuristics", multiple=True,
              type=click.Choice(["gopher_quality", "gopher_repetition", "fineweb_quality"]),
              help="datatrove heuristic filter before the classifier (repeatable).")
@click.option("--dedup", type=click.Choice(["none", "exact", "minhash"]), default="none", show_default=True)
@click.option("--workers", default=1, show_default=True, help="Tasks run in parallel (processes).")
@click.option("--tasks", default=0, show_default=True, help="Shards; 0 = one per input file.")
@click.option("--batch-size", default=256, show_default=True, help="Documents scored per fastText call.")
@click.option("--text-key", default="text", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def filter_cmd(inputs, out, classifier, threshold, heuristics, dedup, workers, tasks, batch_size, text_key, as_json):
    """Filter INPUTS (files/dirs of JSONL, Parquet, text) with datatrove's local executor; resumable."""
    from minicpm4.data.filter_report import format_report
    from minicpm4.data.pipeline import FilterJob, run_job

    report = run_job(FilterJob(list(inputs), out, classifier, threshold, tuple(heuristics), dedup, text_key,
                               tasks, workers, batch_size))
    click.echo(json.dumps(report) if as_json else format_report(report))


@click.command("synth")
@click.option("--track", required=True, type=click.Choice(["textbook", "forum", "knowledge", "math", "code",
                                                           "instruction", "long_context", "tool_use"]))
@click.option("--seeds", multiple=True, required=True, help="Seed documents. " + PATHS_HELP)
@click.option("-o", "--out", required=True, help="Output JSONL (appended; <out>.done tracks finished seeds).")
@click.option("--base-url", required=True, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
@click.option("--model", default="default", show_default=True)
@click.option("--api-key", envvar="OPENAI_API_KEY", default="none")
@click.option("--concurrency", default=8, show_default=True, help="Requests in flight at most.")
@click.option("--retries", default=4, show_default=True, help="Retries of 429/5xx/connection errors.")
@click.option("--backoff", default=0.5, show_default=True, help="Base of the exponential backoff (s).")
@click.option("--temperature", default=0.7, show_default=True)
@click.option("--max-tokens", default=1024, show_default=True)
@click.option("--limit", default=0, show_default=True, help="Use the first N seeds (0 = all).")
@click.option("--tools", "tools_path", default=None, help="JSON list of OpenAI tool specs (tool_use).")
@click.option("--candidates", default=4, show_default=True, help="Best-of-n per constraint level (instruction).")
@click.option("--constraints", default=3, show_default=True, help="Constraint layers (instruction).")
@click.option("--retrieved", default=4, show_default=True, help="Documents around the planted one (long_context).")
@click.option("--level", default="high-school", show_default=True, help="Difficulty (math, code).")
@click.option("--run-tests", is_flag=True, help="code: execute the generated tests (trusted endpoints only).")
@click.option("--seed", default=0, show_default=True)
@click.option("--text-key", default="text", show_default=True)
def synth(track, seeds, out, base_url, model, api_key, concurrency, retries, backoff, temperature, max_tokens,
          limit, tools_path, candidates, constraints, retrieved, level, run_tests, seed, text_key):
    """Synthesize pretraining rewrites or UltraChat v2-style SFT data from seed documents (resumable)."""
    from minicpm4.data.synth_client import ClientSettings
    from minicpm4.data.synthesis import run_synthesis
    from minicpm4.data.tool_calls import load_tools

    settings = ClientSettings(base_url, model, api_key, concurrency, retries, backoff,
                              temperature=temperature, max_tokens=max_tokens)
    context = dict(tools=load_tools(tools_path) if tools_path else [], candidates=candidates,
                   constraints=constraints, retrieved=retrieved, level=level, run_tests=run_tests, seed=seed)
    report = run_synthesis(track, list(seeds), out, settings, text_key, limit, context,
                           log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(report))
    if report.get("failed_seeds"):
        from minicpm4.data.synth_client import SynthesisError
        raise SynthesisError(f"{report['failed_seeds']} seeds failed (see above); rerun the command to retry them")


@click.command("demo-corpus")
@click.option("-o", "--out", required=True, help="Output folder (seeds/, corpus/).")
@click.option("--per-source", default=400, show_default=True, help="Documents per clean source.")
@click.option("--seed", default=0, show_default=True)
def demo_corpus(out, per_source, seed):
    """Build a mixed-quality demo corpus from offline text (KJV, man pages, Debian docs, degraded copies)."""
    from minicpm4.data.demo_corpus import write_demo
    click.echo(json.dumps(write_demo(out, seed, per_source)))


@click.command("demo-score")
@click.argument("filter_out")
def demo_score(filter_out):
    """Precision/recall of a filter run over the demo corpus, against its construction labels."""
    from minicpm4.data.demo_corpus import kept_quality
    click.echo(json.dumps(kept_quality(filter_out)))


@click.command("verify")
@click.option("--base", required=True, help="Training checkpoint (or run out_dir) to anneal from.")
@click.option("--candidate", multiple=True, required=True, help="Candidate data (.txt/.jsonl/.parquet, repeatable).")
@click.option("--default-mix", multiple=True, required=True, help="Default mixture (same formats, repeatable).")
@click.option("-o", "--out", required=True, help="Output folder (results.json, splits, tokens); rerun to resume.")
@click.option("--candidate-ratio", "ratio", default=0.3, show_default=True, help="Candidate share of annealing rows.")
@click.option("--seeds", default=3, show_default=True, help="Data-order seeds per arm (paired).")
@click.option("--steps", default=0, show_default=True, help="Annealing steps (0: the base run's decay_steps).")
@click.option("--batch-size", default=0, show_default=True, help="Sequences per step (0: the base run's).")
@click.option("--seq-len", default=0, show_default=True, help="Tokens per sequence (0: the base run's).")
@click.option("--heldout", default=0.1, show_default=True, help="Share of default-mix documents held out for eval.")
@click.option("--mc-items", default=200, show_default=True, help="Cloze multiple-choice questions (at most).")
@click.option("--eval-tokens", default=32768, show_default=True, help="Held-out tokens scored for the loss.")
@click.option("--text-key", "text_field", default="text", show_default=True)
@click.option("--threads", default=0, show_default=True, help="torch threads (0: torch's default).")
@click.option("--baseline-from", default="", help="Reuse the baseline arms of another verify OUT (same settings).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def verify(as_json, **options):
    """Anneal BASE on candidate + default mix vs default mix alone; report paired differences over seeds."""
    from minicpm4.data.verification import VerifyJob, run_verify
    from minicpm4.data.verify_report import format_table

    options["candidate"], options["default_mix"] = list(options["candidate"]), list(options["default_mix"])
    results = run_verify(VerifyJob(**options), log=lambda m: click.echo(m, err=True))
    click.echo(json.dumps(results["summary"]) if as_json else format_table(results))


def register(cli: click.Group) -> None:
    group = cli.commands["data"]
    for command in (tokenize, train_classifier, filter_cmd, synth, demo_corpus, demo_score, verify):
        group.add_command(command)
