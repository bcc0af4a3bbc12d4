"""A dependency-free word/sentence splitter for datatrove's heuristic filters and MinHash.

datatrove maps "en" to spaCy, a ~350 MB dependency, only to split words for Gopher / FineWeb heuristics
and MinHash shingles. Its filters accept a `WordTokenizer` instance in place of a language code, so this
regex splitter (Unicode words or single punctuation marks; sentences end at . ! ? followed by space or a
newline) keeps those steps usable offline. Word counts differ slightly from spaCy's on contractions.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WordTokenizer

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


class RegexWordTokenizer(WordTokenizer):
    def __init__(self):
        super().__init__("en")

    def word_tokenize(self, text: str) -> list[str]:
        return _WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text[a:b] for a, b in self.span_tokenize(text)]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        spans, start = [], 0
        for m in _SENTENCE_END.finditer(text):
            if text[start:m.start()].strip():
                spans.append((start, m.start()))
            start = m.end()
        if text[start:].strip():
            spans.append((start, len(text)))
        return spans
