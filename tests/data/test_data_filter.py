"""The UltraClean filter job on datatrove: counts and reasons, bad input, formats, dedup, workers, resume."""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
from data_corpus import SCIENCE, SMALL, SPAM, sentences

from minicpm4.data.classifier import TrainParams, train_classifier
from minicpm4.data.pipeline import FilterJob, run_job
from minicpm4.errors import ConfigError


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "model.bin"
    train_classifier(sentences(SCIENCE, 300, 1), sentences(SPAM, 300, 2), out, TrainParams(**SMALL))
    return str(out)


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def kept(out):
    return [json.loads(line) for f in sorted((Path(out) / "kept").glob("*.jsonl")) for line in open(f)]


def rejected(out, step):
    return [json.loads(line) for f in sorted((Path(out) / "rejected" / step).glob("*.jsonl")) for line in open(f)]


def test_counts_reasons_and_bad_input(tmp_path, model):
    inp = tmp_path / "in"
    inp.mkdir()
    good, spam = sentences(SCIENCE, 20, 5), sentences(SPAM, 15, 6)
    write_jsonl(inp / "a.jsonl", good[:10] + spam[:5])
    (inp / "b.jsonl").write_bytes(
        b'{"text": "' + good[10].encode() + b'"}\n'
        b'{"text": "cut off\n'                        # malformed JSON
        b'{"text": "   "}\n'                          # empty document
        b'{"text": "caf\xe9 in latin-1"}\n'           # not UTF-8
        b'["a list"]\n{"body": "wrong key"}\n'        # no text field (twice)
        b'\n'                                         # a blank line is no record
        b'{"text": "' + spam[5].encode() + b'", "id": "own-id", "source": "web"}\n')
    (inp / "c.txt").write_text(good[11])
    (inp / "d.txt").write_bytes(b"\xff\xfe broken")
    report = run_job(FilterJob([str(inp)], str(tmp_path / "out"), classifier=model))
    assert report["read"] == 10 + 5 + 2 + 1
    assert report["bad_input"] == {"malformed_json": 1, "empty": 1, "not_utf8": 2, "no_text_field": 2}
    (step, reasons), = report["dropped"].items()
    assert "UltraClean" in step and reasons == {"low_quality": 6}
    docs = kept(tmp_path / "out")
    assert report["kept"] == len(docs) == 12
    assert sorted(d["text"] for d in docs) == sorted(good[:12])
    assert all(d["metadata"]["quality_score"] >= 0.5 for d in docs)
    low = rejected(tmp_path / "out", "quality")
    assert len(low) == 6 and {d["metadata"]["filter_reason"] for d in low} == {"low_quality"}
    assert all(d["metadata"]["quality_score"] < 0.5 for d in low)
    own = next(d for d in low if d["id"] == "own-id")
    assert own["metadata"]["source"] == "web"  # other fields travel in metadata
    bad = rejected(tmp_path / "out", "input")
    assert sorted(d["metadata"]["filter_reason"] for d in bad) == \
        ["empty", "malformed_json", "no_text_field", "no_text_field", "not_utf8", "not_utf8"]
    assert {d["id"] for d in bad} >= {"b.jsonl:2", "b.jsonl:4", "d.txt"}
    assert not list((tmp_path / "out").rglob("*.part"))


def test_parquet_threshold_and_heuristics(tmp_path, model):
    import pyarrow as pa
    import pyarrow.parquet as pq

    inp = tmp_path / "in"
    inp.mkdir()
    good, spam = sentences(SCIENCE, 8, 7, length=60), sentences(SPAM, 8, 8, length=60)
    pq.write_table(pa.table({"content": good + spam + [None], "n": list(range(17))}), inp / "x.parquet")
    report = run_job(FilterJob([str(inp)], str(tmp_path / "o1"), classifier=model, text_key="content"))
    assert (report["read"], report["kept"], report["bad_input"]) == (16, 8, {"empty": 1})
    assert sorted(d["metadata"]["n"] for d in kept(tmp_path / "o1")) == list(range(8))
    # threshold 0 keeps everything; a Gopher heuristic in front drops the word-salad repeats first
    assert run_job(FilterJob([str(inp)], str(tmp_path / "o2"), classifier=model, text_key="content",
                             threshold=0.0))["kept"] == 16
    # a datatrove heuristic in front of the classifier drops a document of one repeated line
    pq.write_table(pa.table({"content": ["\n".join([good[0]] * 10)], "n": [99]}), inp / "y.parquet")
    report = run_job(FilterJob([str(inp)], str(tmp_path / "o3"), classifier=model, text_key="content",
                               heuristics=("gopher_repetition",)))
    assert report["read"] == 17 and report["kept"] == 8
    (gopher, reasons), = [(s, r) for s, r in report["dropped"].items() if "Gopher" in s]
    assert reasons == {"dup_line_frac": 1}
    assert [d["metadata"]["n"] for d in rejected(tmp_path / "o3", "gopher_repetition")] == [99]


@pytest.mark.parametrize("dedup", ["exact", "minhash"])
def test_dedup_after_classifier(tmp_path, model, dedup):
    inp = tmp_path / "in"
    inp.mkdir()
    good = sentences(SCIENCE, 6, 9, length=40)
    write_jsonl(inp / "a.jsonl", good + [good[0], good[1]] + sentences(SPAM, 3, 10))
    write_jsonl(inp / "b.jsonl", [good[0], good[2]])
    report = run_job(FilterJob([str(inp)], str(tmp_path / "out"), classifier=model, dedup=dedup))
    texts = [d["text"] for d in kept(tmp_path / "out")]
    assert sorted(texts) == sorted(good) and report["kept"] == 6
    assert sum(report["dropped"][next(s for s in report["dropped"] if "dedup" in s.lower())].values()) == 4


def test_two_workers_match_one(tmp_path, model):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(4):
        write_jsonl(inp / f"{i}.jsonl", sentences(SCIENCE, 5, 20 + i) + sentences(SPAM, 5, 30 + i))
    one = run_job(FilterJob([str(inp)], str(tmp_path / "w1"), classifier=model, workers=1))
    two = run_job(FilterJob([str(inp)], str(tmp_path / "w2"), classifier=model, workers=2))
    assert one["kept"] == two["kept"] == 20
    assert kept(tmp_path / "w1") == kept(tmp_path / "w2")


def test_inputs_must_not_change_on_resume(tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    write_jsonl(inp / "a.jsonl", ["x"])
    run_job(FilterJob([str(inp)], str(tmp_path / "out")))
    write_jsonl(inp / "b.jsonl", ["y"])
    with pytest.raises(ConfigError, match="differ from the interrupted run"):
        run_job(FilterJob([str(inp)], str(tmp_path / "out")))
    with pytest.raises(ConfigError, match="no such file"):
        run_job(FilterJob([str(tmp_path / "nope")], str(tmp_path / "o2")))
    # an output folder inside the input folder: its files are not inputs, so a rerun is a resume
    first = run_job(FilterJob([str(inp)], str(inp / "out")))
    assert run_job(FilterJob([str(inp)], str(inp / "out"))) == first and first["read"] == 2


def _open_fifo_for_writing(path, proc, timeout=60):
    """Open the FIFO once the filter process opens it for reading (i.e. its task has started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.is_alive(), "the filter process died"
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
    raise TimeoutError("the filter never opened the FIFO")


def _run_in_own_session(job):
    os.setsid()  # so that the test can kill this process and datatrove's manager process together
    run_job(job)


def test_interrupted_run_resumes_to_the_uninterrupted_output(tmp_path, model):
    """Kill the job while its last task is half-way through a file, resume, compare with a clean run.

    The last input is a FIFO: the task reading it blocks after the lines the test wrote, so the kill
    lands mid-task deterministically (three tasks finished, one half done)."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_jsonl(inp / f"{i}.jsonl", sentences(SCIENCE, 6, 40 + i) + sentences(SPAM, 6, 50 + i))
    last = sentences(SCIENCE, 20, 60) + sentences(SPAM, 10, 61)
    lines = [json.dumps({"text": t}) + "\n" for t in last]
    os.mkfifo(inp / "z.jsonl")
    out = tmp_path / "out"
    job = FilterJob([str(inp)], str(out), classifier=model, batch_size=2)
    proc = multiprocessing.get_context("fork").Process(target=_run_in_own_session, args=(job,))
    proc.start()
    try:
        fd = _open_fifo_for_writing(inp / "z.jsonl", proc)
        os.write(fd, "".join(lines[:12]).encode())
        part = out / "kept" / "00003.jsonl.part"
        deadline = time.time() + 30
        while not part.exists() and time.time() < deadline:  # the half-done task has written output
            time.sleep(0.05)
        assert part.exists()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
    os.close(fd)
    assert sorted(p.name for p in (out / "logs" / "filter" / "completions").iterdir()) == ["00000", "00001", "00002"]
    assert not (out / "kept" / "00003.jsonl").exists()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "kept").glob("*.jsonl")}
    assert len(done) == 3

    (inp / "z.jsonl").unlink()
    (inp / "z.jsonl").write_text("".join(lines))
    report = run_job(job)  # the same job again = resume
    assert {p.name: p.stat().st_mtime_ns for p in (out / "kept").glob("*.jsonl") if p.name in done} == done
    clean = run_job(FilterJob([str(inp)], str(tmp_path / "clean"), classifier=model))
    assert kept(out) == kept(tmp_path / "clean")
    assert report["kept"] == clean["kept"] == 18 + 20 and report["read"] == clean["read"] == 36 + 30
    assert rejected(out, "quality") == rejected(tmp_path / "clean", "quality")
    assert not list(out.rglob("*.part"))
