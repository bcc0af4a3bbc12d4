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
from typing import Iterator


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
        """Stream both files; rewrite a file (atomically, streaming) only if it holds a torn or orphan line.
        Memory: the set of done seed ids and one 20-byte hash per sample, never the samples themselves."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = {json.loads(line)["seed_id"] for line in _complete_lines(self.done_path)}
        _keep_only(self.done_path, lambda line: True)

        def keep(line: str) -> bool:
            sample = json.loads(line)
            if sample.get("seed_id") not in self.done:
                self.dropped_partial += 1
                return False
            self.hashes.add(content_hash(sample))
            return True
        _keep_only(self.path, keep)

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


def _complete(line: str) -> bool:
    """A line that ends in a newline and parses as JSON (a torn last line from a kill does neither)."""
    if not line.endswith("\n"):
        return False
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _complete_lines(path: Path) -> Iterator[str]:
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            yield from (line for line in f if _complete(line))


def _keep_only(path: Path, keep) -> None:
    """Stream `path`'s complete lines through `keep` into a temp file; rename it over `path` only if a line
    went (torn, orphan), else delete it."""
    if not path.is_file():
        return
    tmp = path.with_name(f".{path.name}.recover")
    total = kept = 0
    with open(path, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
        for line in src:
            total += 1
            if _complete(line) and keep(line):
                out.write(line)
                kept += 1
    if kept == total:
        tmp.unlink()
    else:
        tmp.replace(path)
