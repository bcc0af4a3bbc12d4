"""UltraClean's text normalisation before the fastText classifier (MiniCPM4 report, pp. 11-12).

Steps, in the paper's order:
1. whitespace: trailing spaces go, runs of spaces/tabs inside a line become one space, and runs of blank
   lines become a single blank line (a paragraph break survives, "redundant" blank lines do not);
2. diacritics: NFKD, then combining marks (Unicode category Mn) are dropped ("café" -> "cafe");
3. lowercase;
4. subword tokenization, tokens joined by single spaces, so fastText's word n-grams see subword n-grams.

The paper used the DeepSeek-V2 tokenizer; we use any `tokenizers` tokenizer (default: the default model's).
Each token is written as the text span it covers (from the encoding's offsets), not as its byte-level
symbol ("Ġthe"), so the features stay readable and a split multi-byte character is not garbled.
The paper keeps `\\n \\t \\r` as tokens; a fastText example is one line, so they are written as the
two-character escapes `\\n`, `\\t`, `\\r`. Spaces carry no token of their own: the join re-adds them.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

from minicpm4.errors import ConfigError

_TRAILING_SPACE = re.compile(r"[ \t\f\v]+(?=\n|$)")
_INNER_SPACE = re.compile(r"[ \t\f\v]{2,}|[\f\v]")  # a lone tab stays: the paper keeps \t as a token
_BLANK_LINES = re.compile(r"\n(?:[ \t\f\v]*\n)+")
_ESCAPES = str.maketrans({"\n": "\\n", "\t": "\\t", "\r": "\\r"})


def normalize_whitespace(text: str) -> str:
    """Strip trailing spaces, collapse inner space runs to one space and blank-line runs to one blank line."""
    text = text.replace("\r\n", "\n")
    text = _TRAILING_SPACE.sub("", text)
    text = _BLANK_LINES.sub("\n\n", text)
    text = _INNER_SPACE.sub(" ", text)
    return text.strip()


def strip_diacritics(text: str) -> str:
    """NFKD-decompose and drop combining marks: 'naïve café' -> 'naive cafe'."""
    if text.isascii():  # nothing to decompose; skips the per-character loop for most English text
        return text
    return "".join(c for c in unicodedata.normalize("NFKD", text) if unicodedata.category(c) != "Mn")


def normalize(text: str) -> str:
    """Steps 1-3 (no tokenizer needed)."""
    return strip_diacritics(normalize_whitespace(text)).lower()


def load_backend(tokenizer: str | os.PathLike | None):
    """A `tokenizers.Tokenizer` from a tokenizer.json file or a HF directory; None/'default' = default model."""
    from tokenizers import Tokenizer

    if tokenizer in (None, "default"):
        from minicpm4.io.loader import default_model_dir  # torch: only for the default tokenizer
        tokenizer = default_model_dir()
    path = Path(tokenizer)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"tokenizer {tokenizer}: no tokenizer.json there")
    return Tokenizer.from_file(str(file))


class Preprocessor:
    """Callable text -> one line of space-joined normalised subword pieces (the classifier's input)."""

    def __init__(self, tokenizer: str | os.PathLike | None = None):
        self.tokenizer = str(tokenizer) if tokenizer not in (None, "default") else "default"
        self._backend = None  # loaded on first use: datatrove pickles steps to ship them to workers

    @property
    def backend(self):
        if self._backend is None:
            self._backend = load_backend(self.tokenizer)
        return self._backend

    def __getstate__(self):
        return {"tokenizer": self.tokenizer, "_backend": None}

    def __call__(self, text: str) -> str:
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[str]:
        normed = [normalize(t) for t in texts]
        encodings = self.backend.encode_batch(normed, add_special_tokens=False)
        return [_join_pieces(t, e.offsets) for t, e in zip(normed, encodings)]


def _join_pieces(text: str, offsets: list[tuple[int, int]]) -> str:
    """Space-join the text spans of the tokens. Byte-level tokens that split one character report
    overlapping spans ((0, 2), (1, 2)): each character is written once, with the first token that covers it."""
    pieces, covered = [], 0
    for start, end in offsets:
        if end <= covered:
            continue
        piece = text[max(start, covered):end].strip(" ").translate(_ESCAPES)
        covered = end
        if piece:
            pieces.append(piece)
    return " ".join(pieces)
