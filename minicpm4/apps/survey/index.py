"""The on-disk passage index: passages.jsonl, a bm25s index (bm25/) and a faiss inner-product index (dense.faiss).

manifest.json records what the index was built from: every source file's path, size and mtime, the chunking
and the embedder. `open_index` reuses the index when all of these match, and otherwise builds a new one.
A build writes into a temp folder beside the target and renames it into place, so an interrupted build
leaves the previous index (or none), never half of one.

faiss's flat inner-product index is exact search over the unit-length embeddings (cosine); at the sizes of a
local folder (thousands to a few hundred thousand passages) exact search is fast enough, and it keeps
retrieval deterministic.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from minicpm4.apps.survey.sources import Passage, list_sources, passages
from minicpm4.errors import CheckpointError

FORMAT = 2  # 2: Sphinx title suffixes dropped


def fingerprint(root: Path, files: list[Path], words: int, overlap: int, embedder_name: str) -> dict:
    stats = [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return {"format": FORMAT, "sources": str(root.resolve()), "files": stats, "chunk": [words, overlap],
            "embedder": embedder_name}


def bm25_tokens(texts: list[str], show_progress: bool = False):
    """The one tokenization BM25 uses for passages and queries: lowercase words, English stopwords removed."""
    import bm25s
    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=show_progress)


@dataclass
class SurveyIndex:
    path: Path
    passages: list[Passage]
    bm25: object  # bm25s.BM25
    dense: object  # faiss.IndexFlatIP
    manifest: dict


def open_index(sources: Path, index_dir: Path, embedder, words: int = 160, overlap: int = 32,
               log=lambda m: print(m, file=sys.stderr)) -> SurveyIndex:
    sources, index_dir = Path(sources), Path(index_dir)
    files = list_sources(sources)
    want = fingerprint(sources, files, words, overlap, embedder.name)
    manifest_path = index_dir / "manifest.json"
    if manifest_path.is_file():
        have = json.loads(manifest_path.read_text())
        if {k: v for k, v in have.items() if k in want} == want:
            return load_index(index_dir)
        log(f"[survey index {index_dir}: sources, chunking or embedder changed; rebuilding]")
    build_index(sources, files, index_dir, embedder, want, words, overlap, log)
    return load_index(index_dir)


def build_index(sources: Path, files: list[Path], index_dir: Path, embedder, manifest: dict, words: int,
                overlap: int, log) -> None:
    import bm25s
    import faiss
    from tqdm import tqdm

    rows = passages(sources, words, overlap, files)
    log(f"[survey index: {len(rows)} passages from {len(files)} files in {sources}]")
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=index_dir.parent, prefix=f".{index_dir.name}.", suffix=".tmp"))
    try:
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            for p in rows:
                f.write(json.dumps(p.as_dict(), ensure_ascii=False) + "\n")
        texts = [f"{p.title}\n{p.text}" for p in rows]  # the title carries the topic of short passages
        bm25 = bm25s.BM25()
        bm25.index(bm25_tokens(texts), show_progress=False)
        bm25.save(str(tmp / "bm25"))
        with tqdm(total=len(texts), desc="embedding passages", unit="passage", file=sys.stderr) as bar:
            vectors = embedder.embed(texts, progress=bar.update)
        dense = faiss.IndexFlatIP(vectors.shape[1])
        dense.add(vectors)
        faiss.write_index(dense, str(tmp / "dense.faiss"))
        manifest = {**manifest, "passages": len(rows), "dim": int(vectors.shape[1])}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        old = None
        if index_dir.exists():
            old = index_dir.with_name(f".{index_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(index_dir, old)
        os.replace(tmp, index_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_index(index_dir: Path) -> SurveyIndex:
    import bm25s
    import faiss

    manifest_path = index_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        rows = [Passage(**json.loads(line)) for line in open(index_dir / "passages.jsonl", encoding="utf-8")]
        bm25 = bm25s.BM25.load(str(index_dir / "bm25"))
        dense = faiss.read_index(str(index_dir / "dense.faiss"))
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{index_dir}: unreadable survey index ({e}); delete the folder to rebuild it") from None
    if len(rows) != manifest.get("passages") or dense.ntotal != len(rows):
        raise CheckpointError(f"{index_dir}: passages.jsonl has {len(rows)} rows, dense.faiss {dense.ntotal}, "
                              f"manifest.json says {manifest.get('passages')}; delete the folder to rebuild it")
    return SurveyIndex(index_dir, rows, bm25, dense, manifest)
