"""Native CPU kernels: C++ in csrc/, compiled on first use for this CPU's instruction-set tier (isa.py, build.py;
cached; None where no compiler).

    native()   the module of csrc/ops.cpp for the selected tier (MINICPM4_ISA forces a lower one):
               int4_mm / int8_mm       weight-only int4 / int8 products (csrc/int4_gemm.h, int8_gemm.h)
               ternary_gemv / _unpack  ternary products on bit planes (csrc/ternary_gemv.h)
               sparse_decode / _prefill  InfLLM v2 decode step and prefill chunk (csrc/sparse_attention.h)
               DecodeStack             the decode step's whole layer stack in one call (csrc/decode_stack.h)

It returns the loaded module, or None: the caller then runs its pure-PyTorch reference, which lives next to the
caller (quant/, sparse/, model/native_stack.py) and which the tests hold each tier's kernels to.
"""

from __future__ import annotations

from enum import IntEnum

from minicpm4.kernels import isa
from minicpm4.kernels.build import native
from minicpm4.kernels.isa import cpu_flags

__all__ = ["LayerKind", "cpu_flags", "isa", "native"]


class LayerKind(IntEnum):
    """Weight layout of a linear layer in the C++ decode stack; the same values as csrc/layer_kind.h's enum
    (the module exports its own as LAYER_KINDS, and a test checks the two agree)."""
    BF16 = 0     # dense bf16 weight [N, K]
    INT4 = 1     # quant/int4.py pack()'s layout (torch's AVX-512 int4pack) + scales_and_zeros (Int4Linear)
    INT8 = 2     # int8 rows + per-row scales (Int8Linear)
    TERNARY = 3  # 2 bit planes + 8-bit group scales + a row scale (TernaryLinear)
