"""`minicpm4 data` commands in-process (click's runner): train-classifier, filter, demo helpers, bad input."""

import json

from click.testing import CliRunner
from data_corpus import SCIENCE, SPAM, sentences

from minicpm4.cli import _register_all, cli
from minicpm4.data.demo_corpus import degrade, groff_to_text, kept_quality
from minicpm4.errors import ConfigError

_register_all()


def invoke(*args, catch=False):
    return CliRunner().invoke(cli, ["data", *map(str, args)], catch_exceptions=catch)


def test_train_then_filter(tmp_path):
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(SCIENCE, 150, 1))
                                        + "{broken\n")
    (tmp_path / "neg").mkdir()
    for i in range(3):
        (tmp_path / "neg" / f"{i}.txt").write_text(sentences(SPAM, 1, i, length=20)[0])
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in sentences(SPAM, 150, 2)))
    model = tmp_path / "m.bin"
    r = invoke("train-classifier", "--pos", tmp_path / "pos.jsonl", "--neg", tmp_path / "neg", "--neg",
               tmp_path / "neg.jsonl", "--text-key", "body", "-o", model, "--dim", 16, "--bucket", 20000,
               "--epoch", 25, "--lr", 0.2, "--min-count", 1, catch=True)
    # --text-key applies to every file: pos.jsonl has "text", so all its records lack "body"
    assert isinstance(r.exception, ConfigError) and "got 0 pos, 153 neg" in str(r.exception)
    assert "[pos: 0 documents; skipped 1 malformed_json, 150 no_text_field]" in r.output
    (tmp_path / "neg.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(SPAM, 150, 2)))
    r = invoke("train-classifier", "--pos", tmp_path / "pos.jsonl", "--neg", tmp_path / "neg", "--neg",
               tmp_path / "neg.jsonl", "-o", model,
               "--dim", 16, "--bucket", 20000, "--epoch", 25, "--lr", 0.2, "--min-count", 1)
    assert r.exit_code == 0, r.output
    assert "[pos: 150 documents; skipped 1 malformed_json]" in r.output and "[neg: 153 documents]" in r.output
    assert "precision" in r.output and model.is_file() and (tmp_path / "m.bin.json").is_file()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences(SCIENCE, 5, 7) + sentences(SPAM, 4, 8)))
    r = invoke("filter", corpus, "-o", tmp_path / "out", "--classifier", model, "--json")
    report = json.loads(r.output.strip().splitlines()[-1])
    assert report["read"] == 9 and report["kept"] == 5


def test_bad_user_input_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "minicpm4.cli", "data", "filter", str(tmp_path / "missing"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: input ")
    (tmp_path / "c.jsonl").write_text('{"text": "x"}\n')
    r = invoke("filter", tmp_path / "c.jsonl", "-o", tmp_path / "o2", "--classifier", tmp_path / "nope.bin", catch=True)
    assert isinstance(r.exception, ConfigError) and "nope.bin: no such file" in str(r.exception)
    r = invoke("synth", "--track", "textbook", "--seeds", tmp_path / "c.jsonl", "-o", tmp_path / "s.jsonl",
               "--base-url", "http://127.0.0.1:9/v1", "--retries", 1, "--backoff", 0.01, catch=True)
    assert type(r.exception).__name__ == "SynthesisError" and "1 seeds failed" in str(r.exception)
    assert json.loads(r.output.strip().splitlines()[-1])["failed_seeds"] == 1


def test_demo_helpers_on_literal_text(tmp_path):
    src = ('.TH X 1\n.SH NAME\nx \\- tool\n.SH DESCRIPTION\n.B x\nprints \\fBbold\\fR words\\-and more.\n'
           '.PP\nSecond \\fIpart\\fP.\n.SH OPTIONS\nnot this\n')
    assert groff_to_text(src) == "prints bold words-and more. Second part."
    import random
    text = "one two three four five six seven eight nine ten"
    salad = degrade(text, "word_salad", random.Random(0))
    assert sorted(salad.split()) == sorted(text.split()) and salad != text
    assert degrade(text, "spam", random.Random(0)).startswith("ONE TWO THREE FOUR FIVE!!!")
    assert "Home | About" in degrade(text * 5, "web_chrome", random.Random(1)) or \
        "rights reserved" in degrade(text * 5, "web_chrome", random.Random(1))
    out = tmp_path / "f"
    (out / "kept").mkdir(parents=True)
    (out / "rejected" / "quality").mkdir(parents=True)
    (out / "kept" / "0.jsonl").write_text('{"metadata": {"label": "pos"}}\n{"metadata": {"label": "neg"}}\n')
    (out / "rejected" / "quality" / "0.jsonl").write_text('{"metadata": {"label": "pos"}}\n')
    assert kept_quality(out) == {"kept": 2, "kept_pos": 1, "precision": 0.5, "recall": 0.5}
