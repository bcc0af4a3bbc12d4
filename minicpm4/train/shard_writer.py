"""Text files -> memory-mapped token shards plus a JSON index (`minicpm4 data tokenize`).

Layout of an output directory:

    index.json        {"format": 1, "dtype": "uint16", "vocab_size", "eos_token_id", "shards": [...]}
    00000.bin ...     raw little-endian token ids, one shard per input file; every document is
                      [BOS if the tokenizer adds it] + tokens + [EOS], documents back to back
    00000.json ...    that shard's record (source path, size, mtime, tokens, documents)
    tokenizer/        the tokenizer, saved so training can write complete HF model directories

uint16 holds ids < 65536, so it is used when the vocabulary fits, uint32 otherwise (halves disk and page cache
for most vocabularies). Input files are tokenized in parallel, one file per worker task. Every file is written to a
temp name and renamed, and a shard whose record matches its source (path, size, mtime) is not redone, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from minicpm4.children import die_with_parent
from minicpm4.errors import InputError
from minicpm4.fileio import atomic_write, atomic_write_text
from minicpm4.text.tokenizer import Tokenizer

INDEX = "index.json"
FORMAT = 1
SUFFIXES = (".txt", ".jsonl", ".parquet")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for every non-blank line of a JSONL file; bad JSON -> InputError naming it."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON ({e})") from None


def read_documents(path: Path, text_field: str = "text") -> Iterator[str]:
    """The documents of one file.

    .txt: the whole file is one document. .jsonl: one JSON object per line, its `text_field` string.
    .parquet: the `text_field` column (needs pyarrow).
    """
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text
    elif suffix == ".jsonl":
        for n, row in jsonl_rows(path):
            text = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise InputError(f"{path}:{n}: no string field {text_field!r}")
            yield text
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise InputError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        for batch in pf.iter_batches(columns=[text_field]):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))
    else:
        raise InputError(f"{path}: unsupported input type (use {', '.join(SUFFIXES)})")


def _source_record(path: Path) -> dict:
    st = path.stat()
    return {"source": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_worker_tokenizer: Tokenizer | None = None


def _init_pool_worker(tokenizer_dir: str, parent: int) -> None:
    die_with_parent(parent)  # spawned workers hold their task pipe's both ends: they would outlive a kill -9 of us
    _init_worker(tokenizer_dir)


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.from_dir(tokenizer_dir)


def _tokenize_file(task: tuple[int, str, str, str, str]) -> dict:
    """Worker: one input file -> NNNNN.bin and NNNNN.json in out_dir; returns the shard record."""
    i, src, out_dir, text_field, dtype_name = task
    tok, path, out = _worker_tokenizer, Path(src), Path(out_dir)
    dtype = np.dtype(dtype_name)
    eos = tok.eos_token_id
    chunks, documents = [], 0
    for text in read_documents(path, text_field):
        ids = tok.encode(text, add_special_tokens=True)
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        chunks.append(np.asarray(ids, dtype=dtype))
        documents += 1
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    name = f"{i:05d}"
    atomic_write(out / f"{name}.bin", lambda p: tokens.tofile(p))
    record = {"file": f"{name}.bin", "tokens": int(tokens.size), "documents": documents, **_source_record(path)}
    atomic_write_text(out / f"{name}.json", json.dumps(record) + "\n")
    return record


def _done(out: Path, i: int, src: Path) -> dict | None:
    """The existing record of shard i when it was made from this very file (same path, size and mtime)."""
    meta = out / f"{i:05d}.json"
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    same = all(record.get(k) == v for k, v in _source_record(src).items())
    return record if same and (out / record["file"]).is_file() else None


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given, directories expanded to their supported files (sorted, so shard numbers are stable)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            if p.suffix.lower() not in SUFFIXES:
                raise InputError(f"{p}: unsupported input type (use {', '.join(SUFFIXES)})")
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or directory")
    if not files:
        raise InputError(f"no {', '.join(SUFFIXES)} files in {', '.join(inputs)}")
    return files


def tokenize_to_shards(inputs: list[str], tokenizer: Tokenizer, out_dir: str | os.PathLike, workers: int = 1,
                       text_field: str = "text", log=None) -> Path:
    """Tokenize every input file into out_dir (see the module docstring); returns the index path."""
    files = expand_inputs(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "tokenizer"
    tokenizer.save(tok_dir)
    dtype = token_dtype(tokenizer.vocab_size)
    records: dict[int, dict] = {}
    todo = []
    for i, src in enumerate(files):
        if (record := _done(out, i, src)) is not None:
            records[i] = record
        else:
            todo.append((i, str(src), str(out), text_field, dtype.name))
    if log and records:
        log(f"{len(records)} of {len(files)} shards already done, skipped")
    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
        with ctx.Pool(min(workers, len(todo)), initializer=_init_pool_worker,
                      initargs=(str(tok_dir), os.getpid())) as pool:
            for record, task in zip(pool.imap(_tokenize_file, todo), todo):
                records[task[0]] = record
                if log:
                    log(f"{task[1]}: {record['documents']} documents, {record['tokens']} tokens")
    else:
        _init_worker(str(tok_dir))
        for task in todo:
            records[task[0]] = record = _tokenize_file(task)
            if log:
                log(f"{task[1]}: {record['documents']} documents, {record['tokens']} tokens")
    shards = [records[i] for i in range(len(files))]
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
             "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id,
             "tokenizer": "tokenizer", "tokens": sum(s["tokens"] for s in shards),
             "documents": sum(s["documents"] for s in shards), "shards": shards}
    atomic_write_text(out / INDEX, json.dumps(index, indent=1) + "\n")
    return out / INDEX
