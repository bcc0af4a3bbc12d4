"""Int8 weight-only linear layer for CPU: per-output-row symmetric int8, on torch's int8pack kernel.

    w[n, k] = q[n, k] * scale[n],     q in -127..127,  scale[n] = max_k |w[n, k]| / 127

Up to 16 activation rows run csrc/int8_gemm.h (decode steps, draft-tree verification: each weight converted once
for all rows, fp32 accumulation); more rows (prefill) a bf16 GEMM on blocks of bf16(q * scale) rows; without a
compiler torch.ops.aten._weight_int8pack_mm. It halves the bytes a decode step reads from a bf16 weight, which is
what bounds the default model's 49152 x 576 head. The pure-PyTorch reference is `dequantize()`: x @ (q*scale)^T.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4 import kernels


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
