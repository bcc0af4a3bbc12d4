"""A reward with its reason, the format reward, and the guard that keeps any reward from raising.

The MiniCPM4 report (§3.2): "reward is 0 for wrong format"; math correctness by rules + SymPy (math_reward.py),
code by the fraction of tests passed (code_reward.py). Every reward function here is wrapped in `never_raises`:
bad model output (or a bug the output triggers) gives Reward(0, reason), never an exception in the trainer.

Format rules (format_reward):
- any kind: the text is a str, not empty after stripping, and has no U+FFFD or NUL character; a `<think>` opened
  is closed;
- "math": a final answer can be extracted (extract_answer: the last \\boxed{...} (or \\fbox) with balanced
  braces, else the last "#### X", "the answer is X" or "Answer: X");
- "code": a closed fenced code block (```python ... ``` or ``` ... ```).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable

ANSWER_LINE = re.compile(r"(?:^####|the answer is|answer:)[ \t]*([^\n]+)", re.IGNORECASE | re.MULTILINE)
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Reward:
    value: float
    reason: str


def never_raises(fn: Callable[..., Reward]) -> Callable[..., Reward]:
    """Turn any exception the reward raises into Reward(0, "error: ...")."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs) -> Reward:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- a reward must never stop training
            return Reward(0.0, f"error: {type(e).__name__}: {e}"[:300])
    return wrapped


def extract_answer(text: str) -> str | None:
    """The final answer: the content of the last \\boxed{...} / \\fbox{...} (balanced braces), else the last
    "#### X" (GSM8K), "the answer is X" or "Answer: X" (X up to the line's end, a trailing period dropped)."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start >= 0:
        i = text.index("{", start) + 1
        depth, j = 1, i
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth == 0 and text[i:j - 1].strip():
            return text[i:j - 1].strip()
        return None  # an unclosed or empty box is malformed, not a fallback to the phrases below
    found = ANSWER_LINE.findall(text)
    answer = found[-1].strip().rstrip(".").strip() if found else ""
    return answer or None


def extract_code(text: str) -> str | None:
    """The last fenced code block tagged python/py (or untagged), or None."""
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(text)]
    good = [body for lang, body in blocks if lang in ("", "python", "py", "python3")]
    return good[-1] if good else None


def format_problem(text: object, kind: str) -> str | None:
    """None when the text is well-formed for `kind` ("math", "code" or "any"), else what is wrong."""
    if not isinstance(text, str):
        return f"output is {type(text).__name__}, not text"
    if not text.strip():
        return "empty output"
    if "\ufffd" in text or "\x00" in text:
        return "invalid characters in output"
    if text.count("<think>") != text.count("</think>"):
        return "unclosed <think>"
    if kind == "math":
        return None if extract_answer(text) is not None else "no final answer (\\boxed{...} or 'The answer is')"
    if kind == "code":
        return None if extract_code(text) is not None else "no closed ```python code block"
    if kind != "any":
        raise ValueError(f"unknown format kind {kind!r} (math, code, any)")
    return None


@never_raises
def format_reward(text: object, kind: str = "any") -> Reward:
    """1 for well-formed output of `kind`, 0 with the reason otherwise."""
    problem = format_problem(text, kind)
    return Reward(0.0, problem) if problem else Reward(1.0, "well-formed")
