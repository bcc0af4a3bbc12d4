"""Weight quantization primitives shared by post-training quantization (RTN, GPTQ), QAT and export.

A weight W [N, K] (N output rows, K input columns) is split along K into groups of `group_size` columns; each
row of each group g gets its own scale s (and, asymmetric, an integer zero point z):

    symmetric,  b bits:   qmax = 2^(b-1) - 1,  s = max|W_g| / qmax,  c = clamp(round(W/s), -qmax, qmax),  W_q = c*s
    asymmetric, b bits:   qmax = 2^b - 1,      s = (max' - min') / qmax,  z = round(-min'/s),
                          c = clamp(round(W/s) + z, 0, qmax),  W_q = (c - z)*s
                          with min' = min(min W_g, 0), max' = max(max W_g, 0): the range holds 0, so z lies in
                          [0, qmax] (it fits the format) and exact zeros stay exact (GPTQ's convention)
    ternary (BitNet b1.58 absmean):  s = max(mean|W_g|, eps),  c = clamp(round(W/s), -1, 1),  W_q = c*s

Rounding never moves a weight by more than s/2 (symmetric and asymmetric; ternary clamps, so large weights can
move further). int8 per output channel is bits=8 with group_size=K. Ternary codes are the symmetric 2-bit code
range (qmax = 1) with a different scale, so a ternary QTensor has bits=2, symmetric=True and dequantizes like any
symmetric one. A group that is all zero gets s = 1 (codes 0), never a NaN.

`to_int4_linear` / `to_int8_linear` put a QTensor onto the existing CPU kernels, whose per-group scale and zero
are bf16: that rounding is their only loss against `dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minicpm4.quant.int4 import Int4Linear, pack
from minicpm4.quant.int8 import Int8Linear

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
INT4_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu needs N divisible by 16


@dataclass
class QTensor:
    """A quantized weight [N, K]: W_q = (codes - zeros) * scales, per group of `group_size` columns."""
    codes: torch.Tensor  # int16 [N, K]
    scales: torch.Tensor  # fp32 [N, K // group_size]
    zeros: torch.Tensor | None  # int16 [N, K // group_size] when asymmetric, else None (zero point 0)
    bits: int
    group_size: int
    symmetric: bool

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> fp32 [N, K/group_size, group_size]."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"input dimension {k} is not divisible by group size {group_size}")
    return w.detach().float().reshape(n, k // group_size, group_size)


def group_params(wg: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and integer zero point) of each group: wg [..., g] -> scale [...], zero [...] or None."""
    if symmetric:
        scale = wg.abs().amax(-1) / (2 ** (bits - 1) - 1)
        return torch.where(scale == 0, 1.0, scale), None
    qmax = 2 ** bits - 1
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, 1.0, scale)
    return scale, (-lo / scale).round()


def quantize_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of wg [..., g] under a given per-group scale [...] and zero [...] (None: symmetric)."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return (wg / scale[..., None]).round().clamp(-qmax, qmax)
    return ((wg / scale[..., None]).round() + zero[..., None]).clamp(0, 2 ** bits - 1)


def quantize_int(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True) -> QTensor:
    """Round-to-nearest (RTN) quantization of w [N, K] to `bits`-bit codes per group of `group_size` columns."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    wg = _grouped(w, group_size)
    scale, zero = group_params(wg, bits, symmetric)
    codes = quantize_codes(wg, scale, zero, bits)
    return QTensor(codes.reshape(w.shape).to(torch.int16), scale,
                   None if zero is None else zero.to(torch.int16), bits, group_size, symmetric)


def quantize_ternary(w: torch.Tensor, group_size: int = 32, eps: float = 1e-5) -> QTensor:
    """Ternary codes {-1, 0, 1} with the absmean scale s = max(mean|W_g|, eps) per group."""
    wg = _grouped(w, group_size)
    scale = wg.abs().mean(-1).clamp_min(eps)
    codes = (wg / scale[..., None]).round().clamp(-1, 1)
    return QTensor(codes.reshape(w.shape).to(torch.int16), scale, None, 2, group_size, True)


def dequantize(q: QTensor) -> torch.Tensor:
    """The fp32 weight [N, K] a QTensor stands for."""
    n, k = q.shape
    c = q.codes.float().reshape(n, k // q.group_size, q.group_size)
    if q.zeros is not None:
        c = c - q.zeros.float()[..., None]
    return (c * q.scales[..., None]).reshape(n, k)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = True,
                  ternary: bool = False) -> torch.Tensor:
    """dequantize(quantize(w)) in w's dtype, for quantization-aware training (ternary ignores bits, symmetric)."""
    q = quantize_ternary(w, group_size) if ternary else quantize_int(w, bits, group_size, symmetric)
    return dequantize(q).to(w.dtype)


def ste(w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of wq, the gradient of w (round() has zero gradient a.e.)."""
    return w + (wq - w).detach()


def to_int4_linear(q: QTensor) -> Int4Linear:
    """An Int4Linear computing x @ dequantize(q)^T. Its layout is w = (u - 8)*scale + zero with u in 0..15:
    symmetric codes c (|c| <= 7) map to u = c + 8, zero = 0; asymmetric codes (0..15, zero point z) to u = c,
    zero = (8 - z)*scale. Both are exact up to the bf16 rounding of scale and zero."""
    n, k = q.shape
    if q.bits > 4:
        raise ValueError(f"Int4Linear holds at most 4-bit codes, got {q.bits}-bit")
    if q.group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"Int4Linear group size must be one of {INT4_GROUP_SIZES}, got {q.group_size}")
    if n % INT4_ROW_MULTIPLE:
        raise ValueError(f"Int4Linear needs the output dimension divisible by {INT4_ROW_MULTIPLE}, got {n}")
    if q.symmetric:
        u, zero = q.codes.int() + 8, torch.zeros_like(q.scales)
    else:
        u, zero = q.codes.int(), (8 - q.zeros.float()) * q.scales
    layer = Int4Linear(k, n, q.group_size)
    layer.qweight = pack(u)
    sz = torch.stack([q.scales, zero], dim=-1).transpose(0, 1)  # [N, G, 2] -> [G, N, 2], the kernel's layout
    layer.scales_and_zeros = sz.contiguous().to(torch.bfloat16)
    return layer


def to_int8_linear(q: QTensor) -> Int8Linear:
    """An Int8Linear computing x @ dequantize(q)^T: symmetric, one scale per output row (group_size = K) only."""
    n, k = q.shape
    if not q.symmetric or q.group_size != k or q.bits > 8:
        raise ValueError(f"Int8Linear holds symmetric per-output-channel codes (group_size = K = {k}); got "
                         f"{'symmetric' if q.symmetric else 'asymmetric'} {q.bits}-bit, group size {q.group_size}")
    layer = Int8Linear(k, n)
    layer.qweight = q.codes.to(torch.int8)
    layer.scales = q.scales[:, 0].to(torch.bfloat16)
    return layer
