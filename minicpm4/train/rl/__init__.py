"""Reinforcement learning with chunk-wise rollout (MiniCPM4 technical report, Algorithm 1): the building blocks
an RL objective of the training loop calls.

    advantages        GRPO group advantages                  loss            the clipped policy loss (one function)
    garble            the garble filter (keep / drop, reason) dynamic_sampling  drop all-equal groups, refill
    reward            Reward, the format reward              math_reward     boxed / final answer, checked with sympy
    sandbox           run a program under limits, no network code_reward     fraction of tests passed
    rollout           chunk-wise rollout through the Engine  logprobs        a batch's per-token log-probs (learner)
    reference         the KL reference model, refreshed every N steps
"""
