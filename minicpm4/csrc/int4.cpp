// Int4Linear's product (csrc/int4_gemm.h, where the layout and the math are described): our kernel for 1..16
// activation rows, torch's _weight_int4pack_mm_for_cpu for more rows (prefill) or where ours is not compiled in.
#include "int4_gemm.h"

bool has_kernel() {
#ifdef MINICPM4_INT4_KERNEL
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mm", &int4::mm, "x [M, K] bf16 @ int4 W^T -> [M, N] bf16");
  m.def("supported", &int4::supported, "whether mm runs our kernel (not torch's) for these arguments");
  m.def("has_kernel", &has_kernel, "whether the AVX512-BF16 kernel was compiled in");
}
