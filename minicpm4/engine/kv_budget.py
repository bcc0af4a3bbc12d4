"""Admission by KV-cache memory: the running requests' keys and values must fit a budget, so a busy server makes
requests wait instead of running out of memory.

The cache's pages are committed as tokens are written (lazy_memory.py), so RAM follows what requests use. The
budget bounds the worst case: each running request reserves the slots it may fill, its prompt plus its
max_new_tokens (within the context), at the bytes one token takes in every layer (keys, values, and for InfLLM
v2 the pre-RoPE keys and the compressed keys C1, C2). A request waits in the queue while the reservations
beside it leave too little; one that could never fit the whole budget is refused (InputError, a 400 through
`serve`). The prefix cache has a budget of its own (--prefix-cache-gb).
"""

from __future__ import annotations

import torch

from minicpm4.errors import InputError


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bytes_per_token(config, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
    """KV-cache bytes one token takes across all layers: keys and values (int8: a byte a value plus an fp32 scale
    per KV head, quant/kv8.py), plus InfLLM v2's pre-RoPE keys (use_nope) and compressed keys (one C1 kernel per
    kernel_stride tokens, one C2 per 4x that), which stay in the compute dtype."""
    rows = config.num_hidden_layers * config.num_key_value_heads
    per_key = rows * config.head_dim * torch.empty((), dtype=dtype).element_size()
    kv = 2 * rows * (config.head_dim + 4) if kv_dtype == "int8" else 2 * per_key
    sc = config.sparse_config  # a dict, every key filled (config.ModelConfig)
    n = 0.0 if sc is None else 1.25 / sc["kernel_stride"] + (1.0 if sc["use_nope"] else 0.0)
    return int(kv + per_key * n + 0.5)


class KVBudget:
    def __init__(self, config, dtype: torch.dtype, gb: float | None, kv_dtype: str = "auto"):
        """gb: the budget in GiB; None: 80% of the memory available now (Linux), else unlimited."""
        self.token_bytes = bytes_per_token(config, dtype, kv_dtype)
        if gb is None:
            avail = available_bytes()
            self.bytes = int(0.8 * avail) if avail is not None else None
        else:
            self.bytes = int(gb * 2**30)
        self.used = 0  # tokens reserved by running requests

    @property
    def tokens(self) -> int | None:
        return None if self.bytes is None else self.bytes // self.token_bytes

    def check(self, need: int) -> None:
        """InputError when a request reserving `need` tokens could never run (alone it exceeds the budget)."""
        if self.tokens is not None and need > self.tokens:
            raise InputError(f"prompt + max_tokens = {need} tokens need {need * self.token_bytes / 2**30:.2f} GiB "
                             f"of KV cache, more than the budget of {self.bytes / 2**30:.2f} GiB "
                             f"({self.tokens} tokens; --kv-cache-gb)")

    def fits(self, need: int) -> bool:
        return self.tokens is None or self.used + need <= self.tokens

    def take(self, need: int) -> None:
        self.used += need

    def free(self, need: int) -> None:
        self.used -= need
