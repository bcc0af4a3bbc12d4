"""Arithmetic word problems in the KJV's manner, with a worked reasoning line, for `minicpm4 tunnel --bench`:
ScalingBench scores the conditional loss on reasoning + answer given the question, which the KJV verse items
(runs/kjv_corpus.py: question and answer only) cannot exercise.

    python runs/word_problems.py OUT [--train 5000] [--bench 400]
writes OUT/problems/train.txt (training text: one problem, its reasoning and answer per line) and
OUT/bench_reasoning.jsonl (held-out items: no question of them occurs in train.txt)

A problem: "Laban had 23 sheep, and Jacob gave him 9 more. How many sheep had Laban then?"; its reasoning and answer
(the item's `answer`, all of it scored): "23 and 9 make 32. So Laban had 32 sheep." (also "less" and "times"). The
choices are the same line with the result (in both places) changed to 3 wrong values near it, so multiple choice by
log-likelihood asks whether the model computes the sum, difference or product; chance is 0.25.
"""

import argparse
import json
import random
from pathlib import Path

NAMES = "Abraham Isaac Jacob Laban Esau Joseph Boaz Jesse David Nabal Job Gideon Caleb Eli Samuel Saul".split()
THINGS = "sheep goats oxen camels asses shekels talents measures".split()


def problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, reasoning + answer with {r} for the result, result)."""
    a, b = rng.sample(NAMES, 2)
    thing, op = rng.choice(THINGS), rng.choice(("add", "sub", "mul"))
    if op == "add":
        n, m = rng.randrange(2, 60), rng.randrange(2, 40)
        q = f"{a} had {n} {thing}, and {b} gave him {m} more. How many {thing} had {a} then?"
        return q, f"{n} and {m} make {{r}}. So {a} had {{r}} {thing}.", n + m
    if op == "sub":
        n = rng.randrange(12, 99)
        m = rng.randrange(2, n - 1)
        q = f"{a} had {n} {thing}, and gave {m} of them to {b}. How many {thing} were left to {a}?"
        return q, f"{n} less {m} is {{r}}. So {{r}} {thing} were left to {a}.", n - m
    n, m = rng.randrange(2, 13), rng.randrange(2, 13)
    q = f"{a} had {n} flocks, and in every flock {m} {thing}. How many {thing} had {a}?"
    return q, f"{n} times {m} is {{r}}. So {a} had {{r}} {thing}.", n * m


def wrong_results(rng: random.Random, r: int) -> list[int]:
    """3 distinct positive values near r, none equal to it (off by one or two, or by ten)."""
    pool = [v for v in {r - 10, r - 2, r - 1, r + 1, r + 2, r + 10} if v > 0 and v != r]
    return rng.sample(pool, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=5000, help="training problems")
    ap.add_argument("--bench", type=int, default=400, help="held-out items")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    seen, train = set(), []
    for _ in range(args.train):
        q, worked, r = problem(rng)
        seen.add(q)
        train.append(f"{q} {worked.format(r=r)}")
    (out / "problems").mkdir(parents=True, exist_ok=True)
    (out / "problems" / "train.txt").write_text("\n".join(train) + "\n")
    with open(out / "bench_reasoning.jsonl", "w") as f:
        made = 0
        while made < args.bench:
            q, worked, r = problem(rng)
            if q in seen:  # held out: never a training question
                continue
            seen.add(q)
            choices = [worked.format(r=v) for v in [r] + wrong_results(rng, r)]
            rng.shuffle(choices)
            answer = worked.format(r=r)
            f.write(json.dumps({"question": q, "answer": answer, "choices": choices,
                                "label": choices.index(answer)}) + "\n")
            made += 1


if __name__ == "__main__":
    main()
