"""Raw input files -> (text, reason) records, never raising on bad content.

One parser serves the classifier's seed files and the filtering pipeline's reader, so both read a file
the same way. Formats, by file name:
- `.jsonl` / `.json` / `.ndjson` (optionally `.gz` / `.zst`): one JSON object per line, text under `text_key`;
- `.parquet`: the `text_key` column, read in record batches (memory bounded by the batch, not the file);
- anything else: plain text, one document per file.

Each record is `Record(text, meta, reason, where)`. `reason` is None for a usable document, else one of
REASONS and `text` is None: malformed JSON, a line that is not an object or lacks a string text, an empty
(whitespace-only) document, bytes that are not UTF-8. The caller counts and reports those.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import IO, Iterator

REASONS = ("malformed_json", "no_text_field", "empty", "not_utf8")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_BATCH = 1024


@dataclass
class Record:
    text: str | None
    meta: dict = field(default_factory=dict)
    reason: str | None = None
    where: str = ""  # "path:line" for jsonl, "path#row" for parquet, "path" for text
    detail: str = ""  # what was wrong, for a bad record


def file_kind(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "parquet" if name.endswith(".parquet") else "text"


def read_records(path: str, binary: IO[bytes], text_key: str = "text") -> Iterator[Record]:
    """Parse an open binary stream (decompressed already) according to `path`'s kind."""
    kind = file_kind(path)
    if kind == "jsonl":
        yield from _jsonl(path, binary, text_key)
    elif kind == "parquet":
        yield from _parquet(path, binary, text_key)
    else:
        yield _classify(path, binary.read(), None, {})


def open_binary(path: str) -> IO[bytes]:
    """Open a local file for streaming reads, decompressing .gz / .zst by suffix. Plain `open` rather than
    fsspec's local opener, which seeks to learn the size and so cannot read a named pipe."""
    from fsspec.compression import compr

    f = open(path, "rb")
    codec = "gzip" if path.endswith(".gz") else "zstd" if path.endswith(".zst") else None
    return compr[codec](f, mode="rb") if codec else f


def open_records(path: str, text_key: str = "text") -> Iterator[Record]:
    """read_records on a local file (or named pipe)."""
    with open_binary(path) as f:
        yield from read_records(path, f, text_key)


def _jsonl(path: str, binary: IO[bytes], text_key: str) -> Iterator[Record]:
    for i, raw in enumerate(binary, start=1):
        where = f"{path}:{i}"
        if not raw.strip():
            continue  # blank separator lines are not documents
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield Record(None, {"raw": raw[:200].decode("utf-8", "replace")}, "not_utf8", where, e.reason)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield Record(None, {"raw": line[:200]}, "malformed_json", where, e.msg)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
            yield Record(None, {"raw": line[:200]}, "no_text_field", where, f"no string '{text_key}'")
            continue
        text = obj.pop(text_key)
        yield _classify(where, None, text, obj)


def _parquet(path: str, binary: IO[bytes], text_key: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(binary)
    if text_key not in table.schema_arrow.names:
        yield Record(None, {}, "no_text_field", path, f"no column '{text_key}'")
        return
    row = 0
    for batch in table.iter_batches(batch_size=PARQUET_BATCH):
        for obj in batch.to_pylist():
            text = obj.pop(text_key)
            where = f"{path}#{row}"
            row += 1
            if text is not None and not isinstance(text, str):
                yield Record(None, {}, "no_text_field", where, f"'{text_key}' is {type(text).__name__}")
                continue
            yield _classify(where, None, text or "", obj)


def _classify(where: str, raw: bytes | None, text: str | None, meta: dict) -> Record:
    if raw is not None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(None, {}, "not_utf8", where, f"byte {e.start}: {e.reason}")
    if not text.strip():
        return Record(None, meta, "empty", where)
    return Record(text, meta, None, where)
