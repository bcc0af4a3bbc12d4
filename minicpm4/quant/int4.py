"""Int4 weight-only linear layer for CPU, and GGUF Q4_1 weights loaded into it without dequantizing.

Values: for output row n and input column k in group g,

    w[n, k] = (q[n, k] - 8) * scale[g, n] + zero[g, n],     q in 0..15, groups of `group_size` columns

(those of torch.ops.aten._weight_int4pack_mm_for_cpu). The codes are packed by `pack` into the bytes torch's AVX-512
build of _convert_weight_to_int4pack_for_cpu writes, on every machine: torch's own packing follows its runtime CPU
capability (AVX2: 32-row blocks; default, as on aarch64: rows in pairs), and our kernels read one layout.

GGUF Q4_1 stores, per 32 weights, an fp16 scale d and minimum m with w = d * q + m, so it maps onto the layout
exactly with scale = d and zero = m + 8d; the one loss is holding scale and zero in bf16 (the kernel's dtype).
Decode reads 4.5 bits per weight instead of bf16's 16, which is what bounds decode speed on CPU.

The product runs csrc/int4_gemm.h (bound in csrc/ops.cpp), on every instruction-set tier (kernels/isa.py): for up
to 16 activation rows (decode steps, draft-tree verification, batched requests) a kernel that unpacks each weight
once for all rows and multiplies it by int8 activations with integer dot products (llama.cpp's Q4_1 x Q8_1: each
group of a row quantized by quant/int8.py's `quantize_activations`); for more rows (prefill) blocks of the weight
dequantized for a GEMM (bf16 on avx512_bf16, fp32 elsewhere); without a compiler torch's
_weight_int4pack_mm_for_cpu, on a copy torch packed where its layout is not ours (`torch_packed`). References: the
formula above on the unpacked values (tests/quant/test_int4.py builds it from the GGUF bytes with the gguf
package's own dequantizer), and `Int4Linear.integer_reference` for the few-row kernel's
integer math, whose activation rounding moves an output by at most sum_g dx[m, g] / 2 * sum_{k in g} |w[n, k]|.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from minicpm4 import kernels
from minicpm4.quant.int8 import quantize_activations

Q4_1_BLOCK = 32  # weights per Q4_1 block: fp16 d, fp16 m, 16 bytes of 4-bit values
Q4_1_BYTES = 20
PACK_ROWS = 64  # output rows are interleaved in blocks of 64


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] (0..15, N and K even) -> uint8 [N, K/2], the layout of csrc/int4_gemm.h. Rows in whole blocks
    of 64: block b, column k is 32 bytes, byte d holding row 64b + d (low nibble) and 64b + 32 + d (high). The last
    t = N % 64 rows follow, t/2 bytes per column k, byte j holding their rows 2j (low) and 2j + 1 (high)."""
    n, k = q.shape
    if n % 2 or k % 2:
        raise ValueError(f"int4 packing needs an even number of rows and columns, got {n} x {k}")
    q = q.to(torch.uint8)
    full = n // PACK_ROWS * PACK_ROWS
    blocks = q[:full].reshape(-1, PACK_ROWS, k).transpose(1, 2)  # [N/64, K, 64]
    part = q[full:].T  # [K, t]
    return torch.cat([(blocks[..., :32] | blocks[..., 32:] << 4).reshape(-1),
                      (part[:, 0::2] | part[:, 1::2] << 4).reshape(-1)]).view(n, k // 2)


def unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """pack's inverse: uint8 [N, K/2] -> codes int32 [N, K]."""
    n = packed.shape[0]
    full = n // PACK_ROWS * PACK_ROWS
    flat = packed.reshape(-1)
    blocks = flat[: full * k // 2].view(-1, k, 32)  # [N/64, K, 32]
    head = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).permute(0, 2, 1).reshape(full, k)  # rows 0..31, 32..63
    part = flat[full * k // 2:].view(k, -1)  # [K, t/2]
    tail = torch.stack([part & 0x0F, part >> 4], dim=-1).reshape(k, n - full).T
    return torch.cat([head, tail]).int()


@functools.cache
def torch_packs_like_us() -> bool:
    """Whether this torch's _convert_weight_to_int4pack_for_cpu (on this CPU) writes `pack`'s bytes, whole and part
    blocks: true on its AVX-512 capability only."""
    q = torch.randint(0, 16, (PACK_ROWS + 16, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    return torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1).view(torch.uint8), pack(q))


def unpack_q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """raw uint8 [N, K/32*20] -> q int32 [N, K] (0..15), d and m float32 [N, K/32].

    In each block, byte j holds weight j in its low nibble and weight j + 16 in its high nibble.
    """
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, Q4_1_BYTES)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)  # [N, K/32, 32]
    return q.reshape(n, -1), d, m


class Int4Linear(nn.Module):
    """y = x @ W^T with W held as packed 4-bit values plus per-group bf16 scale and zero (no bias)."""

    def __init__(self, in_features: int, out_features: int, group_size: int = Q4_1_BLOCK):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=torch.bfloat16))

    @classmethod
    def from_q4_1(cls, raw: np.ndarray) -> "Int4Linear":
        q, d, m = unpack_q4_1(raw)
        layer = cls(q.shape[1], q.shape[0], Q4_1_BLOCK)
        layer.qweight = pack(torch.from_numpy(q))
        sz = np.stack([d, m + 8 * d], axis=-1).transpose(1, 0, 2)  # [K/32, N, 2]
        layer.scales_and_zeros = torch.from_numpy(np.ascontiguousarray(sz)).to(torch.bfloat16)
        return layer

    @classmethod
    def cat(cls, layers: list["Int4Linear"]) -> "Int4Linear":
        """One layer computing the outputs of `layers` (same input) side by side. `pack` interleaves output rows
        in blocks of PACK_ROWS, so packed tensors concatenate as they are when every part but the last fills whole
        blocks; otherwise ValueError."""
        if any(m.out_features % PACK_ROWS for m in layers[:-1]):
            raise ValueError(f"int4 layers of {[m.out_features for m in layers]} rows cannot be concatenated "
                             f"packed: all but the last need a multiple of {PACK_ROWS} rows")
        out = cls(layers[0].in_features, sum(m.out_features for m in layers), layers[0].group_size)
        out.qweight = torch.cat([m.qweight for m in layers])
        out.scales_and_zeros = torch.cat([m.scales_and_zeros for m in layers], dim=1)
        return out

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def unpack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The codes q int [N', K] (0..15), scale and zero fp32 [K/group, N'] of the rows in whole 64-row blocks
        (N' = N rounded down to 64: the rows the integer kernels take; a last part block goes to a GEMM)."""
        full = self.out_features // PACK_ROWS * PACK_ROWS
        q = unpack(self.qweight, self.in_features)[:full]
        sz = self.scales_and_zeros[:, :full].float()
        return q, sz[..., 0], sz[..., 1]

    def torch_packed(self) -> torch.Tensor:
        """qweight as torch's _weight_int4pack_mm_for_cpu reads it on this machine: qweight itself where torch
        packs like us, else a copy torch packed, made once (and again if qweight changes)."""
        if torch_packs_like_us():
            return self.qweight
        w = self.qweight
        cached = getattr(self, "_torch_packed", None)  # (qweight, its version, torch's packing of it)
        if cached is None or cached[0] is not w or cached[1] != w._version:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack(w, self.in_features), 1)
            cached = self._torch_packed = (w, w._version, packed)
        return cached[2]

    def integer_reference(self, x: torch.Tensor) -> torch.Tensor:
        """What the integer kernels compute for x [M, K] on the rows in whole blocks, in float64 before their
        fp32 sums and bf16 rounding: [M, N'] = sum_g dx[m, g] (scale I + (zero - 8 scale) S) with
        I = sum_{k in g} q x8 and S = sum_{k in g} x8 (x8, dx: quantize_activations per group)."""
        x8, dx = quantize_activations(x, self.group_size)
        q, scale, zero = self.unpack()
        m, g = dx.shape
        xg = x8.double().view(m, g, self.group_size)
        i = torch.einsum("mgc,ngc->mng", xg, q.double().view(-1, g, self.group_size))  # [M, N', G]
        s = xg.sum(-1)[:, None, :]  # [M, 1, G]
        scale, zero = scale.double().T[None], zero.double().T[None]  # [1, N', G]
        return ((scale * i + (zero - 8 * scale) * s) * dx.double()[:, None, :]).sum(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.bfloat16:
            x2 = x2.to(torch.bfloat16)
        ext = kernels.native()
        if ext is not None:
            y = ext.int4_mm(x2, self.qweight, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.torch_packed(), self.group_size,
                                                            self.scales_and_zeros)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"

