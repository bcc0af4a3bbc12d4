"""DAPO's dynamic sampling (Yu et al. 2025, §3.2): keep only groups whose rewards differ, refill to the batch size.

A group whose G rewards are all equal (all right or all wrong) has zero advantage for every response
(advantages.py), so it adds nothing but noise to the token average. The paper's objective is taken "subject to
0 < #correct < G"; with graded rewards (fraction of tests passed) the rule is "not all equal".

fill_batch draws more groups (more prompts, rolled out) until exactly `batch_groups` informative groups are in
hand; informative groups beyond the batch are carried to the next batch, never thrown away. Groups are any
objects; `rewards_of(group)` gives their rewards (default: the `.rewards` attribute).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence


def informative(rewards: Sequence[float], tol: float = 0.0) -> bool:
    """True when the rewards are not all equal (max - min > tol)."""
    return len(rewards) > 0 and max(rewards) - min(rewards) > tol


@dataclass
class FilledBatch:
    groups: list  # exactly batch_groups informative groups, or fewer if the draws ran out
    carry: list  # informative groups left over, for the next batch
    dropped: int = 0  # groups with all-equal rewards
    draws: int = 0  # calls to draw
    dropped_groups: list = field(default_factory=list)


def fill_batch(draw: Callable[[], Sequence[Any]], batch_groups: int, carry: Sequence[Any] = (),
               max_draws: int = 100, rewards_of: Callable[[Any], Sequence[float]] = lambda g: g.rewards,
               ) -> FilledBatch:
    """Take informative groups from `carry`, then from successive draw() calls, until batch_groups are in hand.

    draw() returns a list of finished groups (for example the groups a rollout round completed; it may be empty).
    Stops after max_draws calls so a task the policy always solves (or never does) cannot loop forever.
    """
    if batch_groups < 1:
        raise ValueError(f"batch_groups must be >= 1, got {batch_groups}")
    out = FilledBatch(groups=[], carry=[])
    pool = list(carry)
    while True:
        for g in pool:
            if not informative(rewards_of(g)):
                out.dropped += 1
                out.dropped_groups.append(g)
            elif len(out.groups) < batch_groups:
                out.groups.append(g)
            else:
                out.carry.append(g)
        if len(out.groups) == batch_groups or out.draws >= max_draws:
            return out
        pool = list(draw())
        out.draws += 1
