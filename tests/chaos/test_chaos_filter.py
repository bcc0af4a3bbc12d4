"""The data filter under kill -9 of its main process only, at random points (seeded): its pool workers and
datatrove's manager process must die with it (no process-group kill helps them here), and a rerun must give the
uninterrupted run's output.

The last input is a FIFO that nobody writes while the job runs, so its task blocks and the job is still running
whenever the kill lands; before the rerun it is replaced by a plain file with its documents."""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest
from data_corpus import SCIENCE, SMALL, SPAM, sentences

from minicpm4.data.classifier import TrainParams, train_classifier
from minicpm4.data.pipeline import FilterJob, run_job

SEED = 20


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("chaos_clf") / "model.bin"
    train_classifier(sentences(SCIENCE, 200, 1), sentences(SPAM, 200, 2), out, TrainParams(**SMALL))
    return str(out)


def descendants(pid: int) -> list[int]:
    """Live (not zombie) processes below pid, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError, ValueError):
            continue
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def outputs(out: Path) -> dict[str, list]:
    return {f"{sub}/{f.name}": [json.loads(line) for line in open(f)]
            for sub in ("kept", "rejected/quality") for f in sorted((out / sub).glob("*.jsonl"))}


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def test_kill_9_of_the_main_process_kills_its_workers_and_resume_equals_uninterrupted(tmp_path, model):
    rng = random.Random(SEED)
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(3):
        write_jsonl(inp / f"{i}.jsonl", sentences(SCIENCE, 5, 40 + i) + sentences(SPAM, 5, 50 + i))
    last = sentences(SCIENCE, 8, 60) + sentences(SPAM, 4, 61)
    out = tmp_path / "out"
    job = FilterJob([str(inp)], str(out), classifier=model, batch_size=2, workers=2)
    fork = multiprocessing.get_context("fork")
    for attempt in range(2):
        os.mkfifo(inp / "z.jsonl")
        proc = fork.Process(target=run_job, args=(job,))
        proc.start()
        deadline = time.time() + 60
        while len(descendants(proc.pid)) < 3 and time.time() < deadline:  # the manager and two workers
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0))
        below = descendants(proc.pid)
        assert len(below) >= 3, f"attempt {attempt}: expected a manager and two workers, found {below}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        deadline = time.time() + 20
        while any(alive(p) for p in below) and time.time() < deadline:
            time.sleep(0.05)
        left = [p for p in below if alive(p)]
        for p in left:  # do not leave them to the rest of the test session
            os.kill(p, signal.SIGKILL)
        assert not left, f"attempt {attempt}: processes {left} outlived the killed filter"
        (inp / "z.jsonl").unlink()
    write_jsonl(inp / "z.jsonl", last)
    report = run_job(job)  # the same job again = resume
    clean = run_job(FilterJob([str(inp)], str(tmp_path / "clean"), classifier=model, batch_size=2, workers=2))
    assert outputs(out) == outputs(tmp_path / "clean") and outputs(out)
    assert report["read"] == clean["read"] == 42
    assert not list(out.rglob("*.part"))
