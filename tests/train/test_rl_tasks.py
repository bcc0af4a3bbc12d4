"""The long-tailed chain tasks: the step distribution, correct worked answers, determinism."""

import random
import re

from minicpm4.train.rl.chain_tasks import chain_task, chain_tasks, step_count
from minicpm4.train.rl.math_reward import math_reward


def test_step_counts_follow_the_power_law():
    # P(k) = k^-1.5 / sum_{j<=32} j^-1.5: P(1) = 0.442, P(k >= 10) = 0.132; 3000 draws (std ~0.009 and ~0.006)
    rng = random.Random(0)
    ks = [step_count(rng) for _ in range(3000)]
    assert 0.41 < ks.count(1) / 3000 < 0.47
    assert 0.11 < sum(k >= 10 for k in ks) / 3000 < 0.16
    assert max(ks) > 20 and min(ks) == 1


def test_worked_answers_are_correct_and_grow_with_steps():
    for task in chain_tasks(40, seed=3):
        lines = task.worked.splitlines()
        assert len(lines) == task.steps + 1  # one line per operation, then the conclusion
        for line in lines[:-1]:  # replay every step's arithmetic
            a, op, b, c = re.fullmatch(r"(\d+) (and|less|times) (\d+) (?:make|is) (\d+)\.", line).groups()
            a, b, c = int(a), int(b), int(c)
            assert c == {"and": a + b, "less": a - b, "times": a * b}[op] and c > 0
        assert math_reward(task.worked, str(task.answer)).value == 1.0
        assert math_reward(task.worked, str(task.answer + 1)).value == 0.0
    short, long = chain_task(random.Random(1), 1), chain_task(random.Random(1), 30)
    assert len(long.worked) > 10 * len(short.worked)


def test_tasks_are_deterministic():
    assert chain_tasks(5, seed=7) == chain_tasks(5, seed=7) != chain_tasks(5, seed=8)


def test_small_tasks_use_one_digit_numbers():
    # chain_small: a one-digit start and operands, additions and sales only, every count in 1..18
    for task in chain_tasks(60, seed=4, small=True):
        assert all(1 <= int(n) <= 9 for n in re.findall(r"\d+", task.question))
        for line in task.worked.splitlines()[:-1]:
            a, op, b, c = re.fullmatch(r"(\d+) (and|less) (\d) (?:make|is) (\d+)\.", line).groups()
            assert int(c) == (int(a) + int(b) if op == "and" else int(a) - int(b)) and 1 <= int(c) <= 18
        assert math_reward(task.worked, str(task.answer)).value == 1.0
