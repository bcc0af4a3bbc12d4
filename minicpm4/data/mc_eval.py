"""A small multiple-choice eval built offline from held-out text, scored by log-likelihood.

Building (`build_items`): held-out documents are split into sentences; a sentence of at least 2K words becomes a
cloze question: the question is up to `context` words of the document before the sentence plus the sentence
without its last K words, the right option is those K words, and the other options are the last K words of
random sentences from other held-out documents (K = `ending`, so every option has the same word count and
a sum of log-probabilities does not simply favour the shortest option). On KJV text this is "finish the verse".

Scoring (`score_items`): for question q and option o (token ids q_1..q_n and o_1..o_m), the option's score is
    log p(o | q) = sum_j log softmax(model(q ++ o))[n + j - 1, o_j],   j = 1..m
and the prediction is the argmax over options. Reported: accuracy, and the mean log-prob margin of the right
option over the best wrong one (a continuous measure, less noisy than accuracy on a few hundred questions).
"""

from __future__ import annotations

import random
import re

from minicpm4.train.scaling_bench import encode, score_rows

SENTENCE = re.compile(r"(?<=[.!?;:])\s+")


def sentences(text: str) -> list[list[str]]:
    return [s.split() for s in SENTENCE.split(" ".join(text.split())) if s.strip()]


def build_items(docs: list[str], n_items: int, seed: int = 0, options: int = 4, ending: int = 4,
                context: int = 24) -> list[dict]:
    """Up to n_items cloze questions {"question", "options", "answer"} (answer = index of the right option)."""
    rng = random.Random(seed)
    candidates = []  # (doc index, words before the sentence, sentence words)
    endings: list[tuple[int, str]] = []
    for d, text in enumerate(docs):
        before: list[str] = []
        for words in sentences(text):
            if len(words) >= 2 * ending:
                candidates.append((d, before[-context:], words))
                endings.append((d, " ".join(words[-ending:])))
            before = before + words
    rng.shuffle(candidates)
    items = []
    for d, before, words in candidates[:n_items]:
        right = " ".join(words[-ending:])
        pool = [e for doc, e in endings if doc != d and e != right]
        if len(set(pool)) < options - 1:
            continue
        wrong = rng.sample(sorted(set(pool)), options - 1)
        choices = wrong + [right]
        rng.shuffle(choices)
        items.append({"question": " ".join(before + words[:-ending]), "options": choices,
                      "answer": choices.index(right)})
    return items


def option_logprobs(model, tokenizer, question: str, options: list[str]) -> list[float]:
    """log p(option | question) for each option: the question encoded with BOS, each option as " " + option, all
    options in one right-padded batch (the training side's ScalingBench scorer, train/scaling_bench.py)."""
    rows = [encode(tokenizer, question, option) for option in options]
    return [logp for logp, _, _ in score_rows(model, rows, batch=len(rows))]


def score_items(model, tokenizer, items: list[dict]) -> dict:
    """{"mc_accuracy", "mc_margin", "mc_items"} of the model on the items (model in eval mode, no grad)."""
    if not items:
        return {"mc_accuracy": float("nan"), "mc_margin": float("nan"), "mc_items": 0}
    correct, margins = 0, []
    for item in items:
        s = option_logprobs(model, tokenizer, item["question"], item["options"])
        right = s[item["answer"]]
        best_wrong = max(v for i, v in enumerate(s) if i != item["answer"])
        correct += right > best_wrong
        margins.append(right - best_wrong)
    return {"mc_accuracy": correct / len(items), "mc_margin": sum(margins) / len(margins), "mc_items": len(items)}
