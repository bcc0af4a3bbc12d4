// Dense attention of a few new tokens per row over the KV cache (decode steps, tree verification, the draft's
// passes), for csrc/decode_stack.h's layer stack.
//
// Why not at::scaled_dot_product_attention: its CPU flash kernel is built for blocks of queries; for 1-12 queries
// it costs far more per call than the arithmetic (a large share of an int4 decode step; see BENCHMARKS.md).
// Here each (row b, KV head g, token t) is one task running the sparse kernel's stage-2 loops
// (sparse_attention.h: fp32-FMA dot products on keys read in place, vectorised softmax) over the
// keys it sees:
//   o_i = sum_p bf16(softmax_p(q_i . K_p / sqrt(D) + bias_p)) V_p,     i over the G heads of group g at token t
// Keys whose bias is -inf (the tree mask) are left out of the list rather than given zero weight, so a tree node
// sees exactly the key list plain decode shows the same token (the prompt, then its accepted ancestors in slot
// order): the sums run in the same order, and verification rounds like a decode step.
// The int8 KV cache (quant/kv8.py) runs the same loops on its int8 rows: scores are the dot products times the key
// rows' scales, and each probability is multiplied by its value row's scale before P V (sparse_attention.h's
// scale_columns), so no row is dequantized to memory.
// Rounding follows SDPA's: scores and softmax in fp32, probabilities rounded to bf16 before P V, the output
// rounded to bf16 once; model/decoder.py's SDPA path is the reference (tests/test_native*.py).
#pragma once
#include "sparse_attention.h"

namespace dense {

using at::BFloat16;
using at::Tensor;

// Attention of query heads q [G, D] (contiguous) over keys/values kbase + j * kstride, j < n, each with the
// additive bias bias[j] (nullptr: none); keys with bias -inf skipped. out [G, D]. T: BFloat16, or int8_t with the
// rows' scales at kscale[j], vscale[j] (the int8 KV cache; unused for BFloat16).
template <int G, typename T>
void step(const BFloat16* q, const T* kbase, const T* vbase, int64_t kstride, int64_t vstride, const float* kscale,
          const float* vscale, int64_t n, const BFloat16* bias, int64_t D, BFloat16* out, infllm::Scratch& w) {
  constexpr bool q8 = std::is_same_v<T, int8_t>;
  auto [rows, vrows] = infllm::row_lists<T>(w);
  rows.resize(infllm::pad16(n));
  w.order.resize(n);
  int64_t m = 0;  // visible keys
  for (int64_t j = 0; j < n; ++j)
    if (bias == nullptr || static_cast<float>(bias[j]) != -infllm::kInf) w.order[m++] = j;
  for (int64_t j = 0; j < m; ++j) rows[j] = kbase + w.order[j] * kstride;
  const int64_t ld = infllm::pad16(m);
  w.s.resize(G * ld);
  w.p.resize(G * ld);
  infllm::dots<G, T>(q, D, rows.data(), m, w.s.data(), ld);
  if (q8) {
    w.kscale.resize(m);
    for (int64_t j = 0; j < m; ++j) w.kscale[j] = kscale[w.order[j]];
    infllm::scale_columns<G>(w.s.data(), ld, w.kscale.data(), m);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  for (int i = 0; i < G; ++i) {
    float* s = w.s.data() + i * ld;
    float mx = infllm::scale_max(s, m, scale, false);
    if (bias != nullptr) {
      mx = -infllm::kInf;
      for (int64_t j = 0; j < m; ++j) mx = std::max(mx, s[j] += static_cast<float>(bias[w.order[j]]));
    }
    infllm::exp_shift(s, m, -mx);
    float* pi = w.p.data() + i * ld;
    infllm::to_prob(s, m, 1.f / infllm::sum(s, m), pi);
    std::fill(pi + m, pi + ld, 0.f);
  }
  for (int64_t j = 0; j < m; ++j) rows[j] = vbase + w.order[j] * vstride;
  if (q8) {
    w.vscale.resize(m);
    for (int64_t j = 0; j < m; ++j) w.vscale[j] = vscale[w.order[j]];
    infllm::scale_columns<G>(w.p.data(), ld, w.vscale.data(), m);
  }
  w.o.resize(G * D);
  infllm::weighted_sum<G, T>(w.p.data(), ld, rows.data(), m, D, w.o.data());
  for (int64_t i = 0; i < G * D; ++i) out[i] = w.o[i];
}

using StepFn = decltype(&step<1, BFloat16>);
template <int G>
struct StepOf {
  static constexpr StepFn fn = &step<G, BFloat16>;
};
using Step8Fn = decltype(&step<1, int8_t>);
template <int G>
struct Step8Of {
  static constexpr Step8Fn fn = &step<G, int8_t>;
};

// Whether attend() takes these shapes (GQA groups up to 16, head_dim up to 256); SDPA runs the others.
inline bool supported(int64_t heads, int64_t kv_heads, int64_t head_dim) {
  return heads % kv_heads == 0 && heads / kv_heads <= 16 && head_dim <= 256;
}

// q [B, H, T, D] bf16 contiguous; k, v [B, KVH, S, D] with a contiguous last dim; keys [0, kv_len) of each row;
// bias [B, 1, T, kv_len] bf16 contiguous (additive, -inf = masked), or undefined: with T = 1 every token sees every
// key, with T > 1 token t of row b sees slots [0, slots[b, t]] (causal prefill: no mask tensor to build or scan).
// ks, vs: the int8 KV cache's scales [B, KVH, S] fp32 with a contiguous last dim (k, v then int8), or undefined.
// Returns [B, H, T, D] bf16.
inline Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, int64_t kv_len, const c10::optional<Tensor>& bias,
                     const int64_t* slots, const Tensor& ks = Tensor(), const Tensor& vs = Tensor()) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KVH = k.size(1), G = H / KVH;
  StepFn fn = infllm::pick<StepOf>(G, std::make_integer_sequence<int, 16>{});
  Step8Fn fn8 = infllm::pick<Step8Of>(G, std::make_integer_sequence<int, 16>{});
  const bool q8 = ks.defined();
  TORCH_CHECK(fn != nullptr && supported(H, KVH, D), "dense attention: GQA group size must be 1..16, D <= 256");
  Tensor bc;
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.scalar_type() == at::kBFloat16 && bc.numel() == B * T * kv_len, "bias must be [B, 1, T, kv_len] bf16");
  }
  Tensor out = at::empty({B, H, T, D}, q.options());
  const BFloat16* qp = q.data_ptr<BFloat16>();
  const BFloat16* bp = has_bias ? bc.data_ptr<BFloat16>() : nullptr;
  BFloat16* op = out.data_ptr<BFloat16>();
  at::parallel_for(0, B * KVH * T, 1, [&](int64_t begin, int64_t end) {
    thread_local infllm::Scratch w;
    thread_local std::vector<BFloat16> qg, og;  // the G heads of one token, contiguous [G, D]
    qg.resize(G * D); og.resize(G * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KVH * T), g = task / T % KVH, t = task % T;
      for (int64_t i = 0; i < G; ++i) std::copy_n(qp + ((b * H + g * G + i) * T + t) * D, D, qg.data() + i * D);
      const int64_t n = bp || T == 1 ? kv_len : std::min(kv_len, slots[b * T + t] + 1);
      const int64_t ko = b * k.stride(0) + g * k.stride(1), vo = b * v.stride(0) + g * v.stride(1);
      const BFloat16* bt = bp ? bp + (b * T + t) * kv_len : nullptr;
      if (q8)
        fn8(qg.data(), k.data_ptr<int8_t>() + ko, v.data_ptr<int8_t>() + vo, k.stride(2), v.stride(2),
            ks.data_ptr<float>() + b * ks.stride(0) + g * ks.stride(1),
            vs.data_ptr<float>() + b * vs.stride(0) + g * vs.stride(1), n, bt, D, og.data(), w);
      else
        fn(qg.data(), k.data_ptr<BFloat16>() + ko, v.data_ptr<BFloat16>() + vo, k.stride(2), v.stride(2), nullptr,
           nullptr, n, bt, D, og.data(), w);
      for (int64_t i = 0; i < G; ++i) std::copy_n(og.data() + i * D, D, op + ((b * H + g * G + i) * T + t) * D);
    }
  });
  return out;
}

}  // namespace dense
