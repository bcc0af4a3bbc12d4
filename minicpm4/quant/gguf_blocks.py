"""GGUF quantized linear weights (Q4_0, Q4_1, Q8_0) put into our quantized layers without a float copy.

Block layouts (32 weights per block, in each row of a [N, K] weight; fp16 d and m):

    Q4_0  18 bytes: d, 16 bytes of nibbles       w = d * (q - 8),  q in 0..15
    Q4_1  20 bytes: d, m, 16 bytes of nibbles    w = d * q + m
    Q8_0  34 bytes: d, 32 int8                   w = d * q,        q in -128..127

(in a nibble block, byte j holds weight j in its low and weight j + 16 in its high nibble). Where they go:

    Q4_0 -> Int4Linear, exactly: codes q - 8 with scale d and zero 0 are Int4Linear's own symmetric layout
            (quant.to_int4_linear), lossless but for d in bf16.
    Q4_1 -> Int4Linear, exactly (int4_linear.Int4Linear.from_q4_1: scale d, zero m + 8d).
    Q8_0 -> Int8Linear, NOT exactly: Int8Linear has one scale per row (torch's int8pack kernel), Q8_0 one per
            32 weights, so each row is requantized once at load to s = max|w| / 127 (|change| <= s/2 per weight).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from minicpm4.quant.int4 import Int4Linear
from minicpm4.quant.int8 import Int8Linear
from minicpm4.quant.primitives import QTensor, dequantize, to_int4_linear

Q = gguf.GGMLQuantizationType
KEPT_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q8_0)  # what `gguf_linear` takes; other types are dequantized by the reader
BLOCK = 32


def _blocks(raw: np.ndarray, nbytes: int) -> np.ndarray:
    """raw uint8 [N, K/32*nbytes] -> [N, K/32, nbytes]."""
    return np.ascontiguousarray(raw).reshape(raw.shape[0], -1, nbytes)


def _d(blocks: np.ndarray) -> np.ndarray:
    """The fp16 scale at the start of each block, as float32 [N, K/32]."""
    return blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)


def unpack_q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw uint8 [N, K/32*18] -> q int32 [N, K] (0..15), d float32 [N, K/32]."""
    blocks = _blocks(raw, 18)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)
    return q.reshape(raw.shape[0], -1), _d(blocks)


def unpack_q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """raw uint8 [N, K/32*34] -> q int8 [N, K], d float32 [N, K/32]."""
    blocks = _blocks(raw, 34)
    return blocks[..., 2:].copy().view(np.int8).reshape(raw.shape[0], -1), _d(blocks)


def q4_0_qtensor(raw: np.ndarray) -> QTensor:
    q, d = unpack_q4_0(raw)
    return QTensor(torch.from_numpy(q - 8).to(torch.int16), torch.from_numpy(d), None, 4, BLOCK, True)


def q8_0_qtensor(raw: np.ndarray) -> QTensor:
    q, d = unpack_q8_0(raw)
    return QTensor(torch.from_numpy(q).to(torch.int16), torch.from_numpy(d), None, 8, BLOCK, True)


def gguf_linear(kind: int, raw: np.ndarray) -> Int4Linear | Int8Linear:
    """The quantized layer for one GGUF weight of type `kind` (one of KEPT_TYPES) with raw blocks [N, bytes]."""
    if kind == Q.Q4_1:
        return Int4Linear.from_q4_1(raw)
    if kind == Q.Q4_0:
        return to_int4_linear(q4_0_qtensor(raw))
    if kind == Q.Q8_0:
        return Int8Linear.from_float(dequantize(q8_0_qtensor(raw)))  # one load-time requantization per row
    raise ValueError(f"GGUF type {Q(kind).name} has no quantized layer here (kept types: "
                     f"{', '.join(t.name for t in KEPT_TYPES)})")

