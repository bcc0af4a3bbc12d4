"""Native CPU kernels: C++ sources in csrc/, compiled on first use by build.py (cached; None where no compiler).

One function per extension, so no caller spells an extension's name:

    qgemm()             int4 / int8 weight-only GEMM for few rows (csrc/int4_gemm.h, int8_gemm.h)
    ternary()           ternary GEMV on bit planes (csrc/ternary_gemv.h)
    sparse_attention()  InfLLM v2 decode step and prefill chunk (csrc/sparse_attention.h)
    decode()            the decode step's whole layer stack in one call (csrc/decode.cpp)

Each returns the loaded module, or None: the caller then runs its pure-PyTorch reference, which lives next to the
caller (quant/, sparse/, model/native_stack.py) and which the tests hold each kernel to.
"""

from __future__ import annotations

from enum import IntEnum
from types import ModuleType

from minicpm4.kernels.build import cpu_flags, extension

__all__ = ["LayerKind", "cpu_flags", "extension", "qgemm", "ternary", "sparse_attention", "decode", "EXTENSIONS"]


class LayerKind(IntEnum):
    """Weight layout of a linear layer in the C++ decode stack; the same values as csrc/layer_kind.h's enum
    (the `decode` extension exports its own as LAYER_KINDS, and a test checks the two agree)."""
    BF16 = 0     # dense bf16 weight [N, K]
    INT4 = 1     # torch's int4pack CPU layout + scales_and_zeros (Int4Linear)
    INT8 = 2     # int8 rows + per-row scales (Int8Linear)
    TERNARY = 3  # 2 bit planes + 8-bit group scales + a row scale (TernaryLinear)


def qgemm() -> ModuleType | None:
    return extension("qgemm")


def ternary() -> ModuleType | None:
    return extension("ternary")


def sparse_attention() -> ModuleType | None:
    return extension("sparse_attention")


def decode() -> ModuleType | None:
    return extension("decode")


EXTENSIONS = {"decode": decode, "qgemm": qgemm, "ternary": ternary, "sparse_attention": sparse_attention}
