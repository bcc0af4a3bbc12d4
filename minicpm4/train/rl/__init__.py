"""Reinforcement learning with chunk-wise rollout (MiniCPM4 technical report, Algorithm 1): the RL objective of the
training loop (objective.py, `minicpm4 train rl`) and the building blocks it calls.

    advantages        GRPO group advantages                  loss            the clipped policy loss (one function)
    garble            the garble filter (keep / drop, reason) dynamic_sampling  drop all-equal groups, refill
    reward            Reward, the format reward              math_reward     boxed / final answer, checked with sympy
    sandbox           run a program under limits, no network code_reward     fraction of tests passed
    rollout           chunk-wise rollout on a backend        remote          the backend of OpenAI-compatible servers
    logprobs          a batch's per-token log-probs (learner)
    reference         the KL reference model, refreshed every N steps
    batch             groups -> padded tensors -> the loss   chain_tasks     long-tailed arithmetic word problems
    task_source       seekable prompts with answers, rewards objective       RL, the Objective of `train rl`
"""
