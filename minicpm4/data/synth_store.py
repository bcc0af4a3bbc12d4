"""Resumable, deduplicated JSONL output for synthesis.

Two append-only files: `<out>` holds the samples (one JSON object per line, each with its `seed_id`) and
`<out>.done` the ids of seeds that are finished (with how many samples they gave, 0 when every candidate
was rejected). A seed's samples are appended first, then its id: a run killed in between leaves samples
whose seed is not marked done, and `open` drops those (and a torn last line) by rewriting the output
atomically, so the resumed run redoes that seed without duplicating it. Samples are deduplicated by a
hash of their content (messages or text), across runs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from minicpm4.fileio import atomic_write_text


def content_hash(sample: dict) -> str:
    body = sample.get("messages") or sample.get("text")
    return hashlib.sha1(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class SampleStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.done_path = Path(f"{self.path}.done")
        self.done: set[str] = set()
        self.hashes: set[str] = set()
        self.duplicates = 0
        self.dropped_partial = 0
        self._recover()
        self._out = open(self.path, "a", encoding="utf-8")
        self._done = open(self.done_path, "a", encoding="utf-8")

    def _recover(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {json.loads(line)["seed_id"] for line in _complete_lines(self.done_path)}
        _rewrite_if_torn(self.done_path, _complete_lines(self.done_path))
        kept = []
        for line in _complete_lines(self.path):
            sample = json.loads(line)
            if sample.get("seed_id") in self.done:
                kept.append(line)
                self.hashes.add(content_hash(sample))
            else:
                self.dropped_partial += 1
        _rewrite_if_torn(self.path, kept, force=self.dropped_partial > 0)

    def add_seed(self, seed_id: str, samples: list[dict]) -> int:
        """Append the seed's new (non-duplicate) samples, then mark the seed done; return how many were new."""
        new = 0
        for sample in samples:
            h = content_hash(sample)
            if h in self.hashes:
                self.duplicates += 1
                continue
            self.hashes.add(h)
            self._out.write(json.dumps({**sample, "seed_id": seed_id}, ensure_ascii=False) + "\n")
            new += 1
        self._out.flush()
        self._done.write(json.dumps({"seed_id": seed_id, "samples": new}) + "\n")
        self._done.flush()
        self.done.add(seed_id)
        return new

    def close(self) -> None:
        self._out.close()
        self._done.close()


def _complete_lines(path: Path) -> list[str]:
    """Lines that end in a newline and parse as JSON (a torn last line from a kill does neither)."""
    if not path.is_file():
        return []
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        if line.endswith("\n"):
            lines.append(line)
    return lines


def _rewrite_if_torn(path: Path, lines: list[str], force: bool = False) -> None:
    text = "".join(lines)
    if path.is_file() and (force or path.read_text(encoding="utf-8") != text):
        atomic_write_text(path, text)
