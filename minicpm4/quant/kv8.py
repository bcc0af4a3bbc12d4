"""The int8 KV cache's rounding (llama.cpp's q8_0 cache type, one scale per row): a cached key or value row x of
head_dim D (one token, one KV head) is stored as D int8 values and one fp32 scale,

    s = max_d |x_d| / 127,     q_d = round_half_even(x_d * (1 / s)),  q_d in -127..127  (q = 0, s = 0 for x = 0)
    x_d ~ q_d * s,             |x_d - q_d * s| <= s / 2

in fp32 from the row as the model computed it (bf16 or fp32). csrc/decode_stack.h quantizes with the same fp32
operations (std::nearbyint rounds half to even), so both give the same bits. D + 4 bytes a row: 68 against bf16's
128 at D = 64 (0.53x), 132 against 256 at D = 128. The kernels (csrc/dense_attention.h, sparse_attention.h) read
q and s in place: a dot product with the int8 row times s, and P V with each probability times its row's s.
`dequantize` is their reference: the model's Python layers attend to q * s rounded to the compute dtype.
"""

from __future__ import annotations

import torch

from minicpm4.errors import ConfigError

KV_DTYPES = ("auto", "int8")  # "auto": the model's compute dtype


def check_kv_dtype(name: str) -> str:
    """name if it is a KV cache dtype this package has; ConfigError naming it otherwise."""
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r}: expected one of {', '.join(KV_DTYPES)}")
    return name


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (q int8 [..., D], s fp32 [...]) as in the module docstring."""
    xf = x.float()
    s = xf.abs().amax(-1) / 127
    inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
    return torch.round(xf * inv[..., None]).clamp_(-127, 127).to(torch.int8), s


def dequantize(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q int8 [..., D], s fp32 [...] -> q * s in `dtype` [..., D] (fp32 product, rounded once)."""
    return (q.float() * s[..., None]).to(dtype)
