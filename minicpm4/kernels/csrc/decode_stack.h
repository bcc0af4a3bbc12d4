// The decoder stack for T new tokens per row (a decode step, T = 1, or a tree verification / draft pass, T > 1),
// bf16, in C++.
//
// Why: a batch-1 decode step of a small model is bound by per-op overhead, not arithmetic. The Python layer
// (model/decoder.py DecoderLayer) issues ~25 torch calls per layer, each paying Python binding and dispatch costs;
// here a layer is 4 matmuls, 1 attention call (dense_attention.h) and 4 fused elementwise loops, with no Python
// between them. With T > 1 the matmuls read each weight once for all T rows, so verifying a 12-node draft tree
// costs far less than 12 steps in bf16 (measured: ~1.6 steps); int4 weights are cheap to read, and their T rows
// cost T times the arithmetic (~3.3 steps at T = 12).
//
// It computes what model/decoder.py computes, rounding where model/decoder.py rounds (bf16 storage, fp32 math), per row r = (b, t):
//   n   = bf16(bf16(h * rsqrt(mean(h^2) + eps)) * w_in)                      RMSNorm, fp32 inside
//   qkv = n @ Wqkv^T                                                          [B*T, (H + 2 KVH) * D]
//   q,k = bf16(x * cos + roll(x, D/2) * signed_sin)  (fp32)                  rotate-half RoPE at the row's position
//   cache[layer][b, :, slot_(b,t)] = k, v                                     slot: any cache slot (tree nodes
//                                                                             share positions, not slots)
//   a   = softmax(q K^T / sqrt(D) + bias) V  over cache[:, :, :kv_len]        G = H / KVH query heads per KV
//                                                                             head (dense_attention.h; SDPA's math)
//   h   = bf16(h + bf16(a @ Wo^T * rs))                                       rs = scale_depth / sqrt(L)
//   h   = bf16(h + bf16(down(bf16(bf16(silu(gate)) * up)) * rs))             SiLU-gated MLP
// model/decoder.py's DecoderLayer is the reference; tests/model/test_native.py checks that both agree.
// The int8 KV cache (quant/kv8.py): the new k (after its bf16 rounding) and v rows are quantized as they are written,
// with the fp32 operations of kv8.quantize (same bits), and attention reads the int8 rows and scales in place.
// InfLLM v2 models: attention is sparse_attention.h's step instead of SDPA once kv_len >= dense_len, with the
// cache's compressed keys kept up to date as the Python backend keeps them (tests/sparse/test_sparse_native.py).

#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "dense_attention.h"
#include "int4_gemm.h"
#include "int8_gemm.h"
#include "layer_kind.h"
#include "sparse_attention.h"
#include "ternary_gemv.h"

namespace stack {

using at::BFloat16;
using at::Tensor;


// A linear layer in one of the four weight layouts the model uses (no bias).
struct Linear {
  int64_t kind;   // a LayerKind (csrc/layer_kind.h)
  Tensor w;       // weight / qweight / ternary bit planes [N, K/32, 2]
  Tensor s;       // int4: scales_and_zeros [K/g, N, 2]; int8: row scales [N]; ternary: qscale [N, K/32]
  Tensor s2;      // ternary: dscale [N]; otherwise undefined
  int64_t group;  // int4 group size

  Tensor operator()(const Tensor& x) const {  // x [M, K] bf16 -> [M, N] bf16
    if (kind == kInt4) return int4::mm(x, w, group, s);  // Int4Linear's own kernel (csrc/ops.cpp)
    if (kind == kInt8) return int8::mm(x, w, s);  // Int8Linear's own kernel
    if (kind == kTernary) return ternary::gemv(x, w, s, s2);  // TernaryLinear's own kernel, bf16 out
    return at::mm(x, w.t());
  }
};

struct Layer {
  Tensor in_norm, post_norm;  // [hidden] bf16
  Linear qkv, o, gate_up, down;
};

inline float bf(float x) { return static_cast<float>(static_cast<BFloat16>(x)); }

// out[r] = bf16(bf16(x[r] * rsqrt(mean(x[r]^2) + eps)) * w), rows of length n.
void rms_norm(const BFloat16* x, const BFloat16* w, BFloat16* out, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const BFloat16* xr = x + r * n;
    float ss = 0.f;
    for (int64_t i = 0; i < n; ++i) { float v = xr[i]; ss += v * v; }
    float rstd = 1.f / std::sqrt(ss / n + eps);
    for (int64_t i = 0; i < n; ++i) out[r * n + i] = bf(bf(xr[i] * rstd) * static_cast<float>(w[i]));
  }
}

// x [D] fp32 -> q [D] int8, *s: s = max|x| / 127, q = round_half_even(x * (1 / s)) (0 where s = 0), as
// quant/kv8.quantize computes it (std::nearbyint rounds half to even in the default rounding mode).
void quantize_row(const float* x, int64_t D, int8_t* q, float* s) {
  float amax = 0.f;
  for (int64_t i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float sc = amax / 127.f, inv = sc > 0.f ? 1.f / sc : 0.f;
  for (int64_t i = 0; i < D; ++i)
    q[i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, std::nearbyint(x[i] * inv))));
  *s = sc;
}

// h = bf16(h + bf16(a * rs)) in place.
void add_scaled(BFloat16* h, const BFloat16* a, int64_t n, float rs) {
  if (rs == 1.f) {
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<float>(h[i]) + static_cast<float>(a[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<float>(h[i]) + bf(static_cast<float>(a[i]) * rs);
  }
}

// out[i] = bf16(bf16(silu(g[i])) * u[i]), silu(g) = g / (1 + exp(-g)) in fp32, with the sparse kernel's exp
// (~1 ulp of std::exp): silu a vector at a
// time into a 256-float buffer, then the bf16 roundings in a loop the compiler vectorises (exp_poly in the tail).
void silu_mul(const BFloat16* g, const BFloat16* u, BFloat16* out, int64_t n) {
  int64_t i = 0;
  using infllm::Vec;
  constexpr int64_t kChunk = 256;
  alignas(64) float s[kChunk];
  const Vec one(1.f), zero(0.f);
  while (n - i >= infllm::W) {
    const int64_t m = std::min(kChunk, (n - i) / infllm::W * infllm::W);
    for (int64_t j = 0; j < m; j += infllm::W) {
      const Vec gv = infllm::load_bf16(g + i + j);
      (gv / (one + infllm::exp_vec(zero - gv))).store(s + j);
    }
    for (int64_t j = 0; j < m; ++j) out[i + j] = infllm::narrow(infllm::rne_bf16(s[j]) * infllm::widen(u[i + j]));
    i += m;
  }
  for (; i < n; ++i) {
    const float gi = infllm::widen(g[i]);
    out[i] = bf(bf(gi / (1.f + infllm::exp_poly(-gi))) * infllm::widen(u[i]));
  }
}

class DecodeStack {
 public:
  DecodeStack(int64_t n_heads, int64_t n_kv, int64_t head_dim, double eps, double residual_scale)
      : nh_(n_heads), nkv_(n_kv), d_(head_dim), eps_(eps), rs_(residual_scale) {}

  void add_layer(Tensor in_norm, Tensor post_norm, std::vector<Tensor> w, std::vector<Tensor> s,
                 std::vector<Tensor> s2, std::vector<int64_t> kinds, std::vector<int64_t> groups) {
    TORCH_CHECK(w.size() == 4 && s.size() == 4 && s2.size() == 4 && kinds.size() == 4 && groups.size() == 4,
                "add_layer takes qkv, o, gate_up, down");
    Linear l[4];
    for (int i = 0; i < 4; ++i) {
      l[i] = Linear{kinds[i], w[i], s[i], s2[i], groups[i]};
      if (kinds[i] == kTernary) ternary::check_weight(w[i], s[i], s2[i]);
    }
    layers_.push_back(Layer{in_norm.contiguous(), post_norm.contiguous(), l[0], l[1], l[2], l[3]});
  }

  // h [B, T, hidden] bf16 (updated in place and returned); cos, signed_sin [B, T, D] fp32; k/v cache
  // [L, B, KVH, S, D] bf16 (any strides with a contiguous last dim); slots [B, T] int64 (cache slot of each new
  // token); kv_len: slots visible; bias: [B, 1, T, kv_len] additive bf16 (0 / -inf), or undefined: for T = 1 every
  // new token sees all kv_len slots, for T > 1 each token the slots up to its own (causal prefill).
  // ks, vs: the int8 KV cache's scales [L, B, KVH, S] fp32 (contiguous last dim; kc, vc int8), or None (bf16 cache).
  Tensor forward(Tensor h, Tensor cos, Tensor ssin, Tensor kc, Tensor vc, Tensor slots, int64_t kv_len,
                 c10::optional<Tensor> bias, c10::optional<Tensor> ks, c10::optional<Tensor> vs) {
    TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.is_contiguous() && h.dim() == 3,
                "h must be [B, T, hidden] bf16");
    const bool q8 = ks.has_value() && ks->defined();
    TORCH_CHECK(kc.stride(4) == 1 && vc.stride(4) == 1 &&
                    (q8 ? kc.scalar_type() == at::kChar && vc.scalar_type() == at::kChar && vs.has_value() &&
                              ks->scalar_type() == at::kFloat && vs->scalar_type() == at::kFloat &&
                              ks->stride(3) == 1 && vs->stride(3) == 1
                        : kc.scalar_type() == at::kBFloat16 && vc.scalar_type() == at::kBFloat16),
                "a bf16 KV cache, or an int8 one with fp32 scales [L, B, KVH, S]");
    TORCH_CHECK(!q8 || dense::supported(nh_, nkv_, d_), "the int8 KV cache needs GQA groups up to 16, D <= 256");
    const int64_t B = h.size(0), T = h.size(1), R = B * T, hid = h.size(2), D = d_, half = D / 2, G = nh_ / nkv_;
    const int64_t nqk = nh_ + nkv_;
    TORCH_CHECK(T == 1 || !sparse_, "the InfLLM v2 stack runs one token per row");
    cos = cos.contiguous(); ssin = ssin.contiguous(); slots = slots.contiguous();
    const float* cp = cos.data_ptr<float>();
    const float* sp = ssin.data_ptr<float>();
    const int64_t* pp = slots.data_ptr<int64_t>();
    // dense attention: our kernel (dense_attention.h); SDPA for shapes it does not take, with the bias per query
    // row of SDPA's [B, KVH, G*T, kv_len] layout (each token's row repeated for the G heads of a group)
    const bool own_attention = dense::supported(nh_, nkv_, D);
    c10::optional<Tensor> qbias = bias;
    if (T > 1 && !own_attention) {
      Tensor b4 = bias.has_value() && bias->defined()
                      ? *bias
                      : at::zeros({B, 1, T, kv_len}, h.options()).masked_fill_(  // causal by slot
                            at::arange(kv_len, slots.options()).view({1, 1, 1, kv_len}) > slots.view({B, 1, T, 1}),
                            -std::numeric_limits<float>::infinity());
      qbias = b4.expand({B, G, T, kv_len}).reshape({B, 1, G * T, kv_len});
    }
    Tensor n = at::empty({R, hid}, h.options());
    Tensor q = at::empty({B, nh_, T, D}, h.options());  // = [B, KVH, G*T, D]
    BFloat16* hp = h.data_ptr<BFloat16>();
    const float rs = static_cast<float>(rs_), eps = static_cast<float>(eps_);

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      rms_norm(hp, L.in_norm.data_ptr<BFloat16>(), n.data_ptr<BFloat16>(), R, hid, eps);
      Tensor qkv = L.qkv(n);  // [B*T, (H + 2 KVH) * D]
      const BFloat16* x = qkv.data_ptr<BFloat16>();
      Tensor kl = kc.select(0, li), vl = vc.select(0, li);  // [B, KVH, S, D]
      Tensor ksl = q8 ? ks->select(0, li) : Tensor(), vsl = q8 ? vs->select(0, li) : Tensor();  // [B, KVH, S]
      BFloat16* qp = q.data_ptr<BFloat16>();
      float row[256];  // one k or v row before int8 quantization (D <= 256, checked above for int8)
      for (int64_t r = 0; r < R; ++r) {
        const int64_t b = r / T, t = r % T;
        const float* c = cp + r * D;
        const float* sn = sp + r * D;
        const BFloat16* xr = x + r * (nqk + nkv_) * D;
        for (int64_t hd = 0; hd < nqk; ++hd) {  // q heads then k heads: rotate
          const BFloat16* xh = xr + hd * D;
          const int64_t ko = b * kl.stride(0) + (hd - nh_) * kl.stride(1) + pp[r] * kl.stride(2);
          if (hd >= nh_ && q8) {  // bf16 as the Python layers round k, then int8
            for (int64_t i = 0; i < D; ++i)
              row[i] = bf(static_cast<float>(xh[i]) * c[i] + static_cast<float>(xh[(i + half) % D]) * sn[i]);
            quantize_row(row, D, kl.data_ptr<int8_t>() + ko,
                         ksl.data_ptr<float>() + b * ksl.stride(0) + (hd - nh_) * ksl.stride(1) + pp[r]);
            continue;
          }
          BFloat16* dst = hd < nh_ ? qp + ((b * nh_ + hd) * T + t) * D : kl.data_ptr<BFloat16>() + ko;
          for (int64_t i = 0; i < D; ++i) {
            float v = static_cast<float>(xh[i]) * c[i] + static_cast<float>(xh[(i + half) % D]) * sn[i];
            dst[i] = v;
          }
        }
        for (int64_t hd = 0; hd < nkv_; ++hd) {  // v heads: copy into the cache
          const BFloat16* xh = xr + (nqk + hd) * D;
          const int64_t vo = b * vl.stride(0) + hd * vl.stride(1) + pp[r] * vl.stride(2);
          if (q8) {
            for (int64_t i = 0; i < D; ++i) row[i] = static_cast<float>(xh[i]);
            quantize_row(row, D, vl.data_ptr<int8_t>() + vo,
                         vsl.data_ptr<float>() + b * vsl.stride(0) + hd * vsl.stride(1) + pp[r]);
          } else {
            std::copy(xh, xh + D, vl.data_ptr<BFloat16>() + vo);
          }
        }
      }
      if (sparse_) sparse_->truncate(li, pp, B);  // keys at pp were just written (T = 1, checked above)
      Tensor a = sparse_ && sparse_->active(kv_len) ? sparse_->attend(li, q.view({B, nh_, D}), kl, vl, pp, kv_len, ksl, vsl)
                 : own_attention ? dense::attend(q, kl, vl, kv_len, bias, pp, ksl, vsl)
                                 : at::scaled_dot_product_attention(q.view({B, nkv_, G * T, D}),
                                                                    kl.narrow(2, 0, kv_len), vl.narrow(2, 0, kv_len), qbias);
      // [B, H, T, D] -> [B*T, H*D] (a view when T = 1)
      Tensor o = L.o(a.view({B, nh_, T, D}).transpose(1, 2).reshape({R, nh_ * D}));
      add_scaled(hp, o.data_ptr<BFloat16>(), R * hid, rs);

      rms_norm(hp, L.post_norm.data_ptr<BFloat16>(), n.data_ptr<BFloat16>(), R, hid, eps);
      Tensor gu = L.gate_up(n);  // [B*T, 2 I]
      const int64_t I = gu.size(1) / 2;
      Tensor act = at::empty({R, I}, h.options());
      const BFloat16* gp = gu.data_ptr<BFloat16>();
      BFloat16* ap = act.data_ptr<BFloat16>();
      for (int64_t r = 0; r < R; ++r) silu_mul(gp + r * 2 * I, gp + r * 2 * I + I, ap + r * I, I);
      Tensor m = L.down(act);
      add_scaled(hp, m.data_ptr<BFloat16>(), R * hid, rs);
    }
    return h;
  }

  // InfLLM v2 (sparse_config): set once; attach_sparse() hands over the compressed keys of the cache each
  // forward() runs on ([L, B, KVH, N, D] bf16 x2, covered [L, B] int64), as sparse_cache.CompressedKeys holds them.
  void set_sparse(int64_t kernel_size, int64_t stride, int64_t block, int64_t init_blocks, int64_t local_blocks,
                  int64_t topk, int64_t dense_len) {
    const int64_t topk_local = topk + local_blocks;
    sparse_ = infllm::CacheStep{{kernel_size, stride, block, init_blocks, local_blocks, topk_local, topk_local},
                                dense_len, Tensor(), Tensor(), Tensor()};
  }

  void attach_sparse(Tensor c1, Tensor c2, Tensor covered) {
    TORCH_CHECK(sparse_ && c1.scalar_type() == at::kBFloat16 && c2.scalar_type() == at::kBFloat16 &&
                    covered.scalar_type() == at::kLong && c1.stride(-1) == 1 && c2.stride(-1) == 1,
                "attach_sparse: bf16 compressed keys and int64 covered after set_sparse");
    sparse_->c1 = c1; sparse_->c2 = c2; sparse_->covered = covered;
  }

 private:
  std::optional<infllm::CacheStep> sparse_;
  int64_t nh_, nkv_, d_;
  double eps_, rs_;
  std::vector<Layer> layers_;
};

}  // namespace stack
