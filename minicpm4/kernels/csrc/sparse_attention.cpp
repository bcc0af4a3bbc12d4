// Python bindings of the InfLLM v2 kernels (sparse_attention.h): sparse_decode.native_step / native_chunk call them.

#include "sparse_attention.h"

#include <torch/extension.h>

using at::Tensor;

// q, qs [B, H, D] bf16 contiguous (stage-2 and stage-1 queries); k, v [B, KVH, S, D] bf16 (contiguous last dim);
// c1, c2 [B, KVH, N, D] bf16 compressed keys holding at least the kernels complete at t; t [B] int64 positions
// (row b attends keys [0, t_b]). Returns (out [B, H, D] bf16, idx [B, KVH, k_sel] int64, -1 = empty slot).
std::tuple<Tensor, Tensor> decode(Tensor q, Tensor qs, Tensor k, Tensor v, Tensor c1, Tensor c2, Tensor t,
                                  int64_t kernel_size, int64_t stride, int64_t block, int64_t init_blocks,
                                  int64_t local_blocks, int64_t k_sel) {
  for (const Tensor* x : {&q, &qs, &k, &v, &c1, &c2})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->stride(-1) == 1,
                "sparse decode: bf16 tensors with a contiguous last dim");
  TORCH_CHECK(q.is_contiguous() && qs.is_contiguous() && q.dim() == 3 && k.dim() == 4, "sparse decode: q [B, H, D]");
  t = t.to(at::kLong).contiguous();
  Tensor out = at::empty_like(q);
  Tensor idx = at::empty({q.size(0), k.size(1), k_sel}, q.options().dtype(at::kLong));
  const infllm::Params P{kernel_size, stride, block, init_blocks, local_blocks, k_sel, k_sel};
  infllm::decode_into(q, qs, k, v, c1, c2, t.data_ptr<int64_t>(), P, out.data_ptr<at::BFloat16>(),
                      idx.data_ptr<int64_t>());
  return {out, idx};
}

// q, qs [B, H, T, D] bf16 (contiguous last dim); pos [B, T] positions, clamped to the rows' lengths; k, v, c1,
// c2 as for decode. Returns (out [B, H, T, D] bf16, idx [B, KVH, T, k_sel] int64 when with_idx, else empty).
std::tuple<Tensor, Tensor> prefill(Tensor q, Tensor qs, Tensor k, Tensor v, Tensor c1, Tensor c2, Tensor pos,
                                   int64_t kernel_size, int64_t stride, int64_t block, int64_t init_blocks,
                                   int64_t local_blocks, int64_t k_sel, bool with_idx) {
  for (const Tensor* x : {&q, &qs, &k, &v, &c1, &c2})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->stride(-1) == 1,
                "sparse prefill: bf16 tensors with a contiguous last dim");
  TORCH_CHECK(q.dim() == 4 && qs.sizes() == q.sizes() && k.dim() == 4, "sparse prefill: q [B, H, T, D]");
  pos = pos.to(at::kLong).contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor idx = at::empty({with_idx ? q.size(0) : 0, k.size(1), q.size(2), k_sel}, q.options().dtype(at::kLong));
  const infllm::Params P{kernel_size, stride, block, init_blocks, local_blocks, k_sel, k_sel};
  infllm::prefill_into(q, qs, k, v, c1, c2, pos.data_ptr<int64_t>(), P, out.data_ptr<at::BFloat16>(),
                       with_idx ? idx.data_ptr<int64_t>() : nullptr);
  return {out, idx};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "InfLLM v2 decode step (selection + sparse attention) for one layer, bf16");
  m.def("prefill", &prefill, "InfLLM v2 for a chunk of queries, each over its own selected blocks, bf16");
}
