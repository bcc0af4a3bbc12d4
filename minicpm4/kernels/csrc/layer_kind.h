// Weight layout of a linear layer in the decode stack. minicpm4/kernels/__init__.py's LayerKind has the same
// values; ops.cpp exports these as LAYER_KINDS and tests/kernels/test_kernels.py checks that both agree.
#pragma once
#include <cstdint>

enum LayerKind : int64_t {
  kBF16 = 0,     // dense bf16 weight [N, K]
  kInt4 = 1,     // int4pack (torch CPU layout) + scales_and_zeros
  kInt8 = 2,     // int8 rows + per-row scales
  kTernary = 3,  // bit planes + 8-bit group scales + row scale
};
