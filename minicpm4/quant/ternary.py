"""Packed ternary linear layer (BitCPM / BitNet b1.58 weights) with a native CPU kernel.

Weights come from quant.quantize_ternary: codes c in {-1, 0, 1} and one absmean scale s per group of 32 input
columns. They are held in 2.25 bits per weight:

    planes   int32 [N, K/32, 2]   two bit planes per group: bit j of plane 0 marks c = +1, of plane 1 c = -1
                                  (2 bits per weight; 00 = 0, never 11)
    qscale   uint8 [N, K/32]      the group scale as an integer multiple of the row's step:
    dscale   fp32  [N]                s[n, g] ~= dscale[n] * qscale[n, g],  dscale[n] ~= max_g s[n, g] / 254

so w[n, k] = dscale[n] * qscale[n, k // 32] * c[n, k]. The 8-bit group scale is this layer's one loss against
`quant.dequantize` (relative error <= 1 / (2 * qscale), i.e. <= 0.2% for groups within 2.5x of the row's
largest scale); it brings the layer to 0.14x the bytes of bf16 instead of the 0.16x a bf16 scale would cost.

Decode (a few rows of x) runs csrc/ternary_gemv.h's gemv: per group it takes the signed sum of the activations
under the +1 / -1 codes (one bf16 dot product against codes expanded to {-1, 0, 1}, or masked fp32 adds and
subtracts) and scales it once, reading 1/7 of bf16's bytes (benchmarks/bench_quant.py measures it against bf16).
Prefill unpacks blocks of rows to bf16 (csrc unpack) and multiplies them with torch's bf16 GEMM. Without a
compiler both fall back to `forward_reference`: unpack in PyTorch, then x @ W^T.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpm4 import kernels
from minicpm4.quant.primitives import QTensor, quantize_ternary

GROUP = 32  # the kernel's group: one uint32 bit plane pair per group
GEMV_MAX_ROWS = 4  # up to this many activation rows the mask kernel runs (measured against unpack + GEMM)
UNPACK_BYTES = 1 << 20  # bf16 bytes of weight rows unpacked at once for prefill
_BITS = torch.arange(GROUP, dtype=torch.int64)


def pack_planes(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in {-1, 0, 1} -> int32 [N, K/32, 2] bit planes (+1 plane, -1 plane), bit j = column 32g+j."""
    n, k = codes.shape
    c = codes.reshape(n, k // GROUP, GROUP).to(torch.int64)
    planes = torch.stack([((c == 1).long() << _BITS).sum(-1), ((c == -1).long() << _BITS).sum(-1)], dim=-1)
    return torch.where(planes >= 2 ** 31, planes - 2 ** 32, planes).to(torch.int32)  # same 32 bits, signed


def unpack_planes(planes: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_planes: int32 [N, G, 2] -> int8 codes [N, G*32]."""
    p = planes.to(torch.int64) & 0xFFFFFFFF
    bits = (p[..., None] >> _BITS) & 1  # [N, G, 2, 32]
    return (bits[:, :, 0] - bits[:, :, 1]).reshape(planes.shape[0], -1).to(torch.int8)


def split_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales fp32 [N, G] -> (qscale uint8 [N, G], dscale fp32 [N]) with s ~= dscale * qscale.
    dscale is max_g s / 254 rounded to bf16 (so checkpoints store it exactly in bf16): the 0.4% of bf16 rounding
    cannot push the largest group past 255."""
    d = (scales.float().amax(dim=1) / 254).to(torch.bfloat16).float()
    d = torch.where(d > 0, d, 1.0)
    q = (scales.float() / d[:, None]).round().clamp(0, 255)  # 0: a group below 1/508 of the row's largest
    return q.to(torch.uint8), d


class TernaryLinear(nn.Module):
    """y = x @ W^T with W held as 2-bit ternary codes and 8-bit group scales (no bias)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        if in_features % GROUP:
            raise ValueError(f"TernaryLinear needs in_features divisible by {GROUP}, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        g = in_features // GROUP
        self.register_buffer("planes", torch.zeros(out_features, g, 2, dtype=torch.int32))
        self.register_buffer("qscale", torch.ones(out_features, g, dtype=torch.uint8))
        self.register_buffer("dscale", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def from_qtensor(cls, q: QTensor) -> "TernaryLinear":
        """The layer of a ternary QTensor (quant.quantize_ternary with group_size 32)."""
        n, k = q.shape
        if q.group_size != GROUP or q.zeros is not None or q.codes.abs().max() > 1:
            raise ValueError(f"TernaryLinear holds symmetric codes in {{-1, 0, 1}} with group size {GROUP}; got "
                             f"group size {q.group_size}, {'asymmetric' if q.zeros is not None else 'symmetric'}, "
                             f"codes up to {int(q.codes.abs().max())}")
        layer = cls(k, n)
        layer.planes = pack_planes(q.codes)
        layer.qscale, layer.dscale = split_scales(q.scales)
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "TernaryLinear":
        """Absmean ternary quantization of a float weight [N, K] (quant.quantize_ternary, group 32)."""
        return cls.from_qtensor(quantize_ternary(weight, GROUP))

    @classmethod
    def cat(cls, layers: list["TernaryLinear"]) -> "TernaryLinear":
        """One layer computing the outputs of `layers` (same input) side by side: rows are independent."""
        out = cls(layers[0].in_features, sum(m.out_features for m in layers))
        out.planes = torch.cat([m.planes for m in layers])
        out.qscale = torch.cat([m.qscale for m in layers])
        out.dscale = torch.cat([m.dscale for m in layers])
        return out

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def codes(self) -> torch.Tensor:
        """int8 codes [N, K] in {-1, 0, 1}."""
        return unpack_planes(self.planes)

    def scales(self) -> torch.Tensor:
        """fp32 group scales [N, K/32] as the layer holds them (dscale * qscale)."""
        return self.dscale[:, None] * self.qscale.float()

    def dequantize(self) -> torch.Tensor:
        """The float weight [N, K] this layer multiplies by (fp32)."""
        n, k = self.weight_shape
        return (self.codes().float().view(n, -1, GROUP) * self.scales()[..., None]).view(n, k)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch: unpack the whole weight, then a float matmul (fp32 for fp32 x, else bf16)."""
        dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        return (x.to(dtype) @ self.dequantize().to(dtype).T).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ext = kernels.native()
        if ext is None:
            return self.forward_reference(x)
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.bfloat16, torch.float32):
            x2 = x2.to(torch.bfloat16)
        if x2.shape[0] <= GEMV_MAX_ROWS:
            y = ext.ternary_gemv(x2, self.planes, self.qscale, self.dscale)
        else:  # prefill: bf16 GEMM on unpacked blocks of rows, never the whole float weight at once
            xb = x2.to(torch.bfloat16)
            rows = max(64, UNPACK_BYTES // (2 * self.in_features))
            y = torch.empty(x2.shape[0], self.out_features, dtype=torch.bfloat16)
            for n0 in range(0, self.out_features, rows):
                n1 = min(n0 + rows, self.out_features)
                y[:, n0:n1] = xb @ ext.ternary_unpack(self.planes, self.qscale, self.dscale, n0, n1).T
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP}"
