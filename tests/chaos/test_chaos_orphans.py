"""Processes that the package starts die with the process that started them, even under kill -9 of that process
alone (no process-group kill), and even when they would not notice on their own:
  - an MCP server (agent, `serve --mcp`) that never answers the handshake: a `sleep`;
  - a synthesized solution under test (data/synth_tracks.run_python_tests) that loops;
  - spawned tokenizer workers (train/shard_writer), killed mid-file; an idle pool worker holds both ends of its
    task pipe, so it never sees an end of file.
The data filter's forked workers have their own test (test_chaos_filter.py)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

MCP = """
import asyncio
from minicpm4.serve.agent import MCPTools
asyncio.run(MCPTools(["sleep 600"], timeout=600).__aenter__())
"""
SYNTH = """
from minicpm4.data.synth_tracks import run_python_tests
run_python_tests("import time\\ntime.sleep(600)  # orphan-marker", "", timeout=600)
"""
TOKENIZE = f"""
import os, sys, tempfile
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
from train_util import small_tokenizer
from minicpm4.train.shard_writer import tokenize_to_shards
d = Path(tempfile.mkdtemp())
for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
    (d / name).write_text("The quick brown fox jumps over the lazy dog. " * 200000)  # seconds of work each
tokenize_to_shards([str(d)], small_tokenizer("some text to learn a few merges from " * 20, 300), d / "out", workers=2)
"""


def processes() -> list[tuple[int, int, str, str]]:
    """(pid, ppid, state, cmdline) of every process."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        out.append((int(stat.parent.name), int(ppid), state, cmd))
    return out


def descendants(pid: int, marker: str) -> list[int]:
    procs = processes()
    below, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for p, pp, state, _ in procs:
            if pp == parent and state != "Z" and p not in below:
                below.add(p)
                todo.append(p)
    return [p for p, _, _, cmd in procs if p in below and marker in cmd]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("script, marker, count", [(MCP, "sleep 600", 1), (SYNTH, "orphan-marker", 1),
                                                   (TOKENIZE, "multiprocessing", 2)], ids=["mcp", "synth", "tokenize"])
def test_children_die_with_a_killed_parent(script, marker, count):
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while len(found := descendants(parent.pid, marker)) < count and time.time() < deadline:
            assert parent.poll() is None, parent.stderr.read().decode()
            time.sleep(0.05)
        assert len(found) >= count, f"expected {count} child process(es) matching {marker!r}, found {found}"
        time.sleep(0.5)  # let them settle into the wait they would never leave by themselves
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 20
    while any(alive(p) for p in found) and time.time() < deadline:
        time.sleep(0.05)
    left = [p for p in found if alive(p)]
    for p in left:  # not left to the rest of the session
        os.kill(p, signal.SIGKILL)
    assert not left, f"process(es) {left} outlived their killed parent"
