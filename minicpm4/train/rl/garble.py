"""The garble filter: drop repetitive or corrupted responses from the loss (MiniCPM4 technical report, §3.2).

The report names the filter but not its rules. Ours, checked in this order, each a field of GarbleRules:

1. invalid characters: the decoded text's share of U+FFFD (a byte sequence that is not UTF-8) and C0/C1 control
   characters other than tab, newline and carriage return exceeds `max_invalid_char_share`;
2. a token run: one token id repeated more than `max_token_run` times in a row ("!!!!!!!..." or a stuck EOS-less
   loop on one token);
3. repeated n-grams: among the response's token n-grams (n = `ngram`), the share that already occurred earlier in
   the response exceeds `max_repeated_ngram_share` (a paragraph that loops). Only checked from
   `min_tokens_for_ngram` tokens on, since short answers repeat n-grams legitimately.

garble_check never raises: a response it cannot judge (no tokens) is kept. The rollout's caller decodes the text;
pass text=None to check token ids only.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class GarbleRules:
    max_invalid_char_share: float = 0.01
    max_token_run: int = 32
    ngram: int = 8
    max_repeated_ngram_share: float = 0.5
    min_tokens_for_ngram: int = 64


def invalid_char_share(text: str) -> float:
    if not text:
        return 0.0
    bad = sum(ch == "\ufffd" or (unicodedata.category(ch) == "Cc" and ch not in "\t\n\r") for ch in text)
    return bad / len(text)


def longest_run(ids: Sequence[int]) -> int:
    best = run = 0
    prev = None
    for t in ids:
        run = run + 1 if t == prev else 1
        prev = t
        best = max(best, run)
    return best


def repeated_ngram_share(ids: Sequence[int], n: int) -> float:
    """Share of the len(ids) - n + 1 n-grams that equal an earlier n-gram of the same sequence."""
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    seen, repeats = set(), 0
    for i in range(total):
        g = tuple(ids[i:i + n])
        repeats += g in seen
        seen.add(g)
    return repeats / total


def garble_check(token_ids: Sequence[int], text: str | None = None, rules: GarbleRules = GarbleRules()) -> tuple[bool, str]:
    """(keep, reason): keep is False for a garbled response, and reason names the rule and its measured value."""
    if text is not None:
        share = invalid_char_share(text)
        if share > rules.max_invalid_char_share:
            return False, f"invalid characters: {share:.3f} of the text > {rules.max_invalid_char_share}"
    run = longest_run(token_ids)
    if run > rules.max_token_run:
        return False, f"token run: one token {run} times in a row > {rules.max_token_run}"
    if len(token_ids) >= rules.min_tokens_for_ngram:
        share = repeated_ngram_share(token_ids, rules.ngram)
        if share > rules.max_repeated_ngram_share:
            return False, f"repeated {rules.ngram}-grams: {share:.3f} of them > {rules.max_repeated_ngram_share}"
    return True, "ok"
