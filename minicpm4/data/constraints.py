"""Rule-verifiable instruction constraints (UltraChat v2, instruction following) and their verifier.

Each constraint renders as a sentence appended to an instruction and checks a reply by rule, with no
model in the loop: length in words, required / forbidden words, an exact number of "- " bullet lines,
a fixed closing phrase, all-lowercase, an exact number of paragraphs, a reply that is one JSON object,
no commas. `layered(rng, k)` draws up to k compatible kinds (a JSON reply admits only 2 others), so
instructions can grow one constraint at a time.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

_WORD = re.compile(r"\b\w+\b")
KEYWORDS = ("example", "because", "important", "first", "finally", "result", "reason", "step")


@dataclass(frozen=True)
class Constraint:
    kind: str
    value: object = None

    def describe(self) -> str:
        v = self.value
        words = ", ".join(repr(w) for w in v) if isinstance(v, tuple) else ""
        return {
            "max_words": "Answer in at most {v} words.",
            "min_words": "Answer in at least {v} words.",
            "include": "Use the words {words}.",
            "exclude": "Do not use the words {words}.",
            "bullets": "Format the answer as exactly {v} bullet points, each line starting with '- '.",
            "ends_with": "End your answer with the exact phrase {v!r}.",
            "lowercase": "Write the whole answer in lowercase letters.",
            "paragraphs": "Write exactly {v} paragraphs separated by blank lines.",
            "json": "Reply with a single JSON object and nothing else.",
            "no_commas": "Do not use any commas.",
        }[self.kind].format(v=v, words=words)

    def check(self, text: str) -> bool:
        v, words = self.value, [w.lower() for w in _WORD.findall(text)]
        if self.kind == "max_words":
            return len(words) <= v
        if self.kind == "min_words":
            return len(words) >= v
        if self.kind == "include":
            return all(w.lower() in words for w in v)
        if self.kind == "exclude":
            return not any(w.lower() in words for w in v)
        if self.kind == "bullets":
            lines = [ln for ln in text.strip().splitlines() if ln.strip()]
            return len(lines) == v and all(ln.lstrip().startswith("- ") for ln in lines)
        if self.kind == "ends_with":
            return text.rstrip().endswith(v)
        if self.kind == "lowercase":
            return text == text.lower()
        if self.kind == "paragraphs":
            return len([p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]) == v
        if self.kind == "json":
            try:
                return isinstance(json.loads(text), dict)
            except json.JSONDecodeError:
                return False
        if self.kind == "no_commas":
            return "," not in text
        raise ValueError(f"unknown constraint kind {self.kind!r}")


# kinds that cannot hold together (a JSON object has no bullets or paragraphs; bullets are one paragraph)
_CLASHES = {frozenset(p) for p in [("json", "bullets"), ("json", "paragraphs"), ("json", "lowercase"),
                                    ("json", "ends_with"), ("bullets", "paragraphs"), ("max_words", "min_words"),
                                    ("json", "no_commas"), ("include", "exclude")]}


def _draw(kind: str, rng: random.Random) -> Constraint:
    if kind == "max_words":
        return Constraint(kind, rng.choice([50, 80, 120]))
    if kind == "min_words":
        return Constraint(kind, rng.choice([30, 60]))
    if kind in ("include", "exclude"):
        return Constraint(kind, tuple(rng.sample(KEYWORDS, 2)))
    if kind == "bullets":
        return Constraint(kind, rng.choice([3, 4, 5]))
    if kind == "ends_with":
        return Constraint(kind, rng.choice(["Hope this helps.", "That is all.", "End of answer."]))
    if kind == "paragraphs":
        return Constraint(kind, rng.choice([2, 3]))
    return Constraint(kind)


def layered(rng: random.Random, k: int) -> list[Constraint]:
    """Up to k compatible constraints of distinct kinds, in the order they are layered onto an instruction."""
    kinds = ["max_words", "min_words", "include", "exclude", "bullets", "ends_with", "lowercase", "paragraphs",
             "json", "no_commas"]
    rng.shuffle(kinds)
    chosen: list[str] = []
    for kind in kinds:
        if len(chosen) < k and not any(frozenset((kind, c)) in _CLASHES for c in chosen):
            chosen.append(kind)
    return [_draw(kind, rng) for kind in chosen]


def failures(text: str, constraints: list[Constraint]) -> list[str]:
    """The kinds of the constraints `text` breaks (empty = compliant)."""
    return [c.kind for c in constraints if not c.check(text)]
