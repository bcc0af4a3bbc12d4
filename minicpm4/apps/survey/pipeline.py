"""Assembling a run from its options: the chat model (endpoint or in process), the judge, the embedder and
the index. The CLI calls these and nothing else, so every choice below is testable without click.

The default index folder is keyed by the source folder's absolute path and the embedder, under
$MINICPM4_HOME/survey_index/, so a second run over the same folder reuses the index and a source folder that
is read-only (/usr/share/doc) still works.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from minicpm4.apps.survey.chat import EndpointChat, LocalChat
from minicpm4.apps.survey.embedders import load_embedder
from minicpm4.apps.survey.index import open_index
from minicpm4.apps.survey.retrieval import Retriever
from minicpm4.io.default_model import cache_root


def default_index_dir(sources: Path, embedder_name: str) -> Path:
    key = hashlib.sha1(f"{Path(sources).resolve()}|{embedder_name}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(sources).resolve().name).strip("-") or "sources"
    return cache_root() / "survey_index" / f"{slug}-{key}"


def make_retriever(sources: Path, index_dir: Path | None = None, embed_base_url: str | None = None,
                   embed_model: str | None = None, api_key: str = "none", chunk_words: int = 160,
                   chunk_overlap: int = 32, log=print) -> Retriever:
    embedder = load_embedder(embed_base_url, embed_model, api_key)
    index_dir = Path(index_dir) if index_dir else default_index_dir(sources, embedder.name)
    return Retriever(open_index(Path(sources), index_dir, embedder, chunk_words, chunk_overlap, log), embedder)


def make_model(base_url: str | None, model_name: str | None = None, api_key: str = "none",
               model_path: str | None = None, dtype: str = "auto", int4: bool = False,
               sparse_config: dict | None = None, context: int = 8192, what: str = "--base-url"):
    """An EndpointChat when base_url is given, else the local model (InfLLM v2 on when sparse_config is set)."""
    if base_url:
        return EndpointChat(base_url, model_name, api_key, what=what)
    return LocalChat.load(model_path, dtype=dtype, int4=int4, sparse_config=sparse_config, max_len=context)
