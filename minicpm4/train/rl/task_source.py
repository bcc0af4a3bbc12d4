"""The RL objective's prompts with known answers, and the reward that checks a response against one.

A TaskSource is an endless, seekable stream of verifiable tasks: task(i) is a pure function of (seed, i), so the
objective's checkpoint holds only the next index and a resumed run draws exactly the prompts an uninterrupted one
would. Held-out tasks come from a disjoint stream (key ("held-out", i) instead of i), for the reward curve.

    chain        chain_tasks.chain_task: arithmetic word problems with power-law step counts (long-tailed answers);
                 reward "math": math_reward of the response's final \\boxed{} (or "The answer is") against the answer
    chain_small  the same with one-digit numbers (chain_task(small=True)): counts stay in 1..18
"""

from __future__ import annotations

import random
from typing import Callable, Hashable

from minicpm4.text.tokenizer import Tokenizer
from minicpm4.train.rl.chain_tasks import ChainTask, chain_task, step_count
from minicpm4.train.rl.math_reward import math_reward
from minicpm4.train.rl.reward import Reward

RewardFn = Callable[[str, ChainTask], Reward]  # (decoded response, its task) -> reward; must never raise


def math_answer_reward(text: str, task: ChainTask) -> Reward:
    return math_reward(text, str(task.answer))


REWARDS: dict[str, RewardFn] = {"math": math_answer_reward}


class TaskSource:
    def __init__(self, tokenizer: Tokenizer, seed: int = 0, max_steps: int = 32, chat_template: bool = True,
                 small: bool = False):
        self.tokenizer, self.seed, self.max_steps, self.chat_template = tokenizer, seed, max_steps, chat_template
        self.small = small

    def task(self, key: Hashable) -> ChainTask:
        """Training task i (an int) or held-out task ("held-out", i); each from its own seeded stream."""
        stream = f"held-out:{key[1]}" if isinstance(key, tuple) else str(key)
        rng = random.Random(f"chain:{self.seed}:{stream}")
        return chain_task(rng, step_count(rng, self.max_steps), self.small)

    def prompt_ids(self, key: Hashable) -> list[int]:
        text = self.task(key).prompt
        if self.chat_template:  # the template writes its own special tokens
            return self.tokenizer.encode(self.tokenizer.apply_chat_template([{"role": "user", "content": text}]))
        return self.tokenizer.encode(text, add_special_tokens=True)
