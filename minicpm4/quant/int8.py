"""Int8 weight-only linear layer for CPU: per-output-row symmetric int8, in torch's int8pack layout.

    w[n, k] = q[n, k] * scale[n],     q in -127..127,  scale[n] = max_k |w[n, k]| / 127

Up to 16 activation rows run csrc/int8_gemm.h on every instruction-set tier (decode steps, draft-tree
verification: each weight read once for all rows) with integer dot products on int8 activations, each block of 32
columns of a row quantized by `quantize_activations` (llama.cpp's Q8_0); the reference is `integer_reference`, and
the activation rounding moves an output by at most sum_blocks dx / 2 * sum_{k in block} |w[n, k]| from
`dequantize()`'s x @ (q*scale)^T. More rows (prefill) run a GEMM on blocks of dequantized rows (bf16 on
avx512_bf16, fp32 elsewhere); without a compiler torch.ops.aten._weight_int8pack_mm. Int8 halves the bytes a
decode step reads from a bf16 weight, which is what bounds the default model's 49152 x 576 head.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4 import kernels


ACT_BLOCK = 32  # columns per activation scale in the integer kernels


def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> x8 int8 [M, K], dx fp32 [M, K/block]: per block of `block` columns of a row, dx = max|x| / 127
    and x8 = round_half_even(x * (1 / dx)) (0 where dx = 0), so x ~ dx * x8 within dx / 2 per element. The same
    fp32 operations as csrc/int8_gemm.h quantize_activations, so both give the same bits."""
    m, k = x.shape
    xf = x.float().view(m, k // block, block)
    dx = xf.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    x8 = torch.round(xf * inv[..., None]).clamp(-127, 127)
    return x8.view(m, k).to(torch.int8), dx


class Int8Linear(nn.Module):
    """y = x @ W^T with W held as int8 rows times one bf16 scale per row (no bias)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Int8Linear":
        """Round-to-nearest quantization of a float weight [N, K], one scale per output row."""
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
        layer = cls(w.shape[1], w.shape[0])
        layer.qweight = (w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
        layer.scales = scale
        return layer

    @classmethod
    def cat(cls, layers: list["Int8Linear"]) -> "Int8Linear":
        """One layer computing the outputs of `layers` (same input) side by side."""
        out = cls(layers[0].in_features, sum(m.out_features for m in layers))
        out.qweight = torch.cat([m.qweight for m in layers])
        out.scales = torch.cat([m.scales for m in layers])
        return out

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] this layer multiplies by (fp32)."""
        return self.qweight.float() * self.scales.float()[:, None]

    def integer_reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the integer kernels compute, in float64 before their fp32 sums and bf16 rounding: x [M, K] ->
        [M, N], scale[n] * sum_blocks dx[m, blk] * sum_{k in blk} q[n, k] x8[m, k]."""
        x8, dx = quantize_activations(x, ACT_BLOCK)
        m, k = x8.shape
        blocks = torch.einsum("mbc,nbc->mnb", x8.double().view(m, -1, ACT_BLOCK),
                              self.qweight.double().view(-1, k // ACT_BLOCK, ACT_BLOCK))  # [M, N, K/32]
        return (blocks * dx.double()[:, None, :]).sum(-1) * self.scales.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        ext = kernels.native()
        mm = ext.int8_mm if ext is not None else torch.ops.aten._weight_int8pack_mm
        y = mm(x2, self.qweight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
