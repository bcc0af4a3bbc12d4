// The products of Int4Linear (csrc/int4_gemm.h) and Int8Linear (csrc/int8_gemm.h), where their layouts and math
// are described: our few-row kernels for 1..16 activation rows; for more rows (prefill) blocks of the weights
// dequantized to bf16 for a bf16 GEMM; torch's kernels wherever ours are not compiled in. The C++ decode stack (decode.cpp) calls the same kernels.
#include "int4_gemm.h"
#include "int8_gemm.h"

bool has_kernels() {
#if defined(MINICPM4_INT4_KERNEL) && defined(MINICPM4_INT8_KERNEL)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_mm", &int4::mm, "x [M, K] bf16 @ int4 W^T -> [M, N] bf16");
  m.def("int4_supported", &int4::supported, "whether int4_mm runs the few-row kernel for these arguments");
  m.def("int8_mm", &int8::mm, "x [M, K] bf16 @ (int8 W * row scale)^T -> [M, N] bf16");
  m.def("int8_supported", &int8::supported, "whether int8_mm runs the few-row kernel for these arguments");
  m.def("has_kernels", &has_kernels, "whether the AVX512-BF16 kernels were compiled in");
}
