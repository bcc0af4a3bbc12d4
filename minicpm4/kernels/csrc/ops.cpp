// The one Python module of the native kernels, compiled once per instruction-set tier (kernels/isa.py picks the
// tier and passes its compiler flags; MINICPM4_ISA_NAME is the tier's name, unquoted). Every kernel lives in a header:
//
//   int4_gemm.h, int8_gemm.h   weight-only int4 / int8 products for few rows (decode) and many rows (prefill)
//   ternary_gemv.h             ternary (BitCPM) products on bit planes
//   sparse_attention.h         InfLLM v2: block selection and sparse attention, decode step
//   sparse_prefill.h           InfLLM v2 for a chunk of queries (prefill), a group of queries per task
//   dense_attention.h          dense attention of a few queries over the KV cache
//   decode_stack.h             a decode step's whole layer stack in one call
#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include "decode_stack.h"
#include "int4_gemm.h"
#include "int8_gemm.h"
#include "layer_kind.h"
#include "sparse_attention.h"
#include "sparse_prefill.h"
#include "ternary_gemv.h"

#ifndef MINICPM4_ISA_NAME
#define MINICPM4_ISA_NAME native
#endif
#define MINICPM4_STR2(x) #x
#define MINICPM4_STR(x) MINICPM4_STR2(x)

static bool has_int_kernels() {
#if defined(MINICPM4_INT4_KERNEL) && defined(MINICPM4_INT8_KERNEL)
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("ISA") = MINICPM4_STR(MINICPM4_ISA_NAME);
  pybind11::dict paths;  // op -> the code path this build runs it on
  paths["int4 GEMM"] = int4::path();
  paths["int8 GEMM"] = int8::path();
  paths["ternary GEMV"] = ternary::path();
  paths["InfLLM v2 / dense attention"] = infllm::path();
  m.attr("PATHS") = paths;

  m.def("int4_mm", &int4::mm, "x [M, K] bf16 @ int4 W^T -> [M, N] bf16");
  m.def("int4_supported", &int4::supported, "whether int4_mm runs the few-row kernel for these arguments");
  m.def("int8_mm", &int8::mm, "x [M, K] bf16 @ (int8 W * row scale)^T -> [M, N] bf16");
  m.def("int8_supported", &int8::supported, "whether int8_mm runs the few-row kernel for these arguments");
  m.def("has_kernels", &has_int_kernels, "whether this tier has our own int4/int8 few-row kernels");

  m.def("ternary_gemv", &ternary::gemv, "ternary gemv: x [M, K] bf16/fp32 -> [M, N]");
  m.def("ternary_unpack", &ternary::unpack, "dequantized bf16 rows [n0, n1)");

  m.def("sparse_decode", &infllm::decode_op, "InfLLM v2 decode step (selection + sparse attention) for one layer");
  m.def("sparse_decode_q8", &infllm::decode_q8_op, "sparse_decode over the int8 KV cache (int8 rows, fp32 row scales)");
  m.def("sparse_prefill", &infllm::prefill_op, "InfLLM v2 for a chunk of queries, each over its own selected blocks");

  pybind11::dict kinds;
  kinds["BF16"] = int64_t(kBF16);
  kinds["INT4"] = int64_t(kInt4);
  kinds["INT8"] = int64_t(kInt8);
  kinds["TERNARY"] = int64_t(kTernary);
  m.attr("LAYER_KINDS") = kinds;
  pybind11::class_<stack::DecodeStack>(m, "DecodeStack", pybind11::module_local())  // one per tier in a process
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &stack::DecodeStack::add_layer)
      .def("forward", &stack::DecodeStack::forward)
      .def("set_sparse", &stack::DecodeStack::set_sparse)
      .def("attach_sparse", &stack::DecodeStack::attach_sparse);
}
