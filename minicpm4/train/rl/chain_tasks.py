"""Arithmetic word problems with a long-tailed number of steps: verifiable RL tasks whose worked answers have
long-tailed lengths, as reasoning tasks do (the case chunk-wise rollout is for).

A task is a chain of k operations on one herd ("Jacob had 23 sheep. He bought 9 more. Then he sold 4. ..."); its
worked answer takes one line per operation ("23 and 9 make 32.", "32 less 4 is 28.") and ends with \\boxed{result},
so its length grows linearly with k. k is drawn from a truncated power law,

    P(k) = k^-alpha / sum_{j=1..max_steps} j^-alpha        (alpha 1.5, max_steps 32: P(1) = 0.442, P(k >= 10) = 0.132)

so most answers are short and a few are many times longer. Counts stay positive, values small enough to read.
Same style as runs/word_problems.py (KJV names and goods); answers check with math_reward.

small=True (the `chain_small` RL task): a one-digit start and one-digit operands, additions and sales only, the
count kept in 1..18, so every line is a one-digit addition or a subtraction below 20 (facts a ~1M-parameter model
learns in a few hundred SFT steps; runs/rl_demo.sh). Same power-law step counts, so the same long tail.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = "Abraham Isaac Jacob Laban Esau Joseph Boaz Jesse David Nabal Job Gideon Caleb Eli Samuel Saul".split()
THINGS = "sheep goats oxen camels asses shekels talents measures".split()
INSTRUCTION = "Work it out step by step, then give the final number as \\boxed{N}."


@dataclass(frozen=True)
class ChainTask:
    question: str
    answer: int
    steps: int
    worked: str  # a correct worked answer, one line per step, ending in \boxed{answer}

    @property
    def prompt(self) -> str:
        return f"{self.question} {INSTRUCTION}"


def step_count(rng: random.Random, max_steps: int = 32, alpha: float = 1.5) -> int:
    ks = range(1, max_steps + 1)
    return rng.choices(ks, weights=[k ** -alpha for k in ks])[0]


def chain_task(rng: random.Random, steps: int, small: bool = False) -> ChainTask:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randrange(2, 10) if small else rng.randrange(5, 40)
    question, worked = [f"{name} had {value} {thing}."], []
    for i in range(steps):
        then = "He" if i == 0 else "Then he"
        if small:  # add 1..9 below 10, sell 1..min(9, value - 1) from 10 up; either in between
            op = "add" if value < 2 else "sub" if value >= 10 else rng.choice(("add", "sub"))
        else:
            op = rng.choice(("add", "sub", "double") if value < 200 else ("sub",))
        if op == "add":
            m = rng.randrange(1, 10) if small else rng.randrange(2, 30)
            question.append(f"{then} bought {m} more.")
            worked.append(f"{value} and {m} make {value + m}.")
            value += m
        elif op == "sub" and (small or value > 3):
            m = rng.randrange(1, min(value, 10)) if small else rng.randrange(1, value // 2 + 1)
            question.append(f"{then} sold {m}.")
            worked.append(f"{value} less {m} is {value - m}.")
            value -= m
        else:
            question.append(f"{then} doubled them.")
            worked.append(f"{value} times 2 is {value * 2}.")
            value *= 2
    question.append(f"How many {thing} had {name} at the end?")
    worked.append(f"So {name} had {value} {thing}. \\boxed{{{value}}}")
    return ChainTask(" ".join(question), value, steps, "\n".join(worked))


def chain_tasks(n: int, seed: int = 0, max_steps: int = 32, alpha: float = 1.5, small: bool = False) -> list[ChainTask]:
    rng = random.Random(seed)
    return [chain_task(rng, step_count(rng, max_steps, alpha), small) for _ in range(n)]
