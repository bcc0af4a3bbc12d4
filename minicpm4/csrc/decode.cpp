// The decoder stack for one decode step (one new token per row), bf16, in C++.
//
// Why: a batch-1 decode step of a small model is bound by per-op overhead, not arithmetic. The Python layer
// (model.py DecoderLayer) issues ~25 torch calls per layer, each paying Python binding and dispatch costs;
// here a layer is 4 matmuls, 1 SDPA call and 4 fused elementwise loops, with no Python between them.
//
// It computes what model.py computes, rounding where model.py rounds (bf16 storage, fp32 math):
//   n   = bf16(bf16(h * rsqrt(mean(h^2) + eps)) * w_in)                      RMSNorm, fp32 inside
//   qkv = n @ Wqkv^T                                                          [B, (H + 2 KVH) * D]
//   q,k = bf16(x * cos + roll(x, D/2) * signed_sin)  (fp32)                  rotate-half RoPE
//   cache[layer][b, :, pos_b] = k, v
//   a   = SDPA(q as [B, KVH, G, D], K/V cache[:, :, :kv_len], bias)          G = H / KVH
//   h   = bf16(h + bf16(a @ Wo^T * rs))                                       rs = scale_depth / sqrt(L)
//   h   = bf16(h + bf16(down(bf16(bf16(silu(gate)) * up)) * rs))             SiLU-gated MLP
// model.py's DecoderLayer is the reference; tests/test_native.py checks that both agree.

#include <torch/extension.h>

#include <cmath>

#include "ternary_gemv.h"
#include <vector>

using at::BFloat16;
using at::Tensor;

namespace {

// A linear layer in one of the four weight layouts the model uses (no bias).
struct Linear {
  int64_t kind;   // 0 dense bf16 weight [N, K]; 1 int4pack (torch CPU layout); 2 int8 rows; 3 ternary planes
  Tensor w;       // weight / qweight / ternary bit planes [N, K/32, 2]
  Tensor s;       // int4: scales_and_zeros [K/g, N, 2]; int8: row scales [N]; ternary: qscale [N, K/32]
  Tensor s2;      // ternary: dscale [N]; otherwise undefined
  int64_t group;  // int4 group size

  Tensor operator()(const Tensor& x) const {  // x [M, K] bf16 -> [M, N] bf16
    if (kind == 1) return at::_weight_int4pack_mm_for_cpu(x, w, group, s);
    if (kind == 2) return at::_weight_int8pack_mm(x, w, s);
    if (kind == 3) return ternary::gemv(x, w, s, s2);  // TernaryLinear's own kernel, bf16 out
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

// h = bf16(h + bf16(a * rs)) in place.
void add_scaled(BFloat16* h, const BFloat16* a, int64_t n, float rs) {
  if (rs == 1.f) {
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<float>(h[i]) + static_cast<float>(a[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) h[i] = static_cast<float>(h[i]) + bf(static_cast<float>(a[i]) * rs);
  }
}

}  // namespace

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
      if (kinds[i] == 3) ternary::check_weight(w[i], s[i], s2[i]);
    }
    layers_.push_back(Layer{in_norm.contiguous(), post_norm.contiguous(), l[0], l[1], l[2], l[3]});
  }

  // h [B, hidden] bf16 (updated in place and returned); cos, signed_sin [B, D] fp32; k/v cache
  // [L, B, KVH, S, D] bf16 (any strides with a contiguous last dim); pos [B] int64 (cache slot of the new token);
  // kv_len: keys visible (max pos + 1); bias: [B, 1, 1, kv_len] additive bf16, or undefined when every row's
  // pos is kv_len - 1.
  Tensor forward(Tensor h, Tensor cos, Tensor ssin, Tensor kc, Tensor vc, Tensor pos, int64_t kv_len,
                 c10::optional<Tensor> bias) {
    TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.is_contiguous() && h.dim() == 2, "h must be [B, hidden] bf16");
    TORCH_CHECK(kc.scalar_type() == at::kBFloat16 && kc.stride(4) == 1 && vc.stride(4) == 1, "bf16 KV cache");
    const int64_t B = h.size(0), hid = h.size(1), D = d_, half = D / 2, G = nh_ / nkv_;
    const int64_t nqk = nh_ + nkv_;
    cos = cos.contiguous(); ssin = ssin.contiguous(); pos = pos.contiguous();
    const float* cp = cos.data_ptr<float>();
    const float* sp = ssin.data_ptr<float>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    Tensor n = at::empty_like(h);
    Tensor q = at::empty({B, nkv_, G, D}, h.options());
    BFloat16* hp = h.data_ptr<BFloat16>();
    const float rs = static_cast<float>(rs_), eps = static_cast<float>(eps_);

    for (size_t li = 0; li < layers_.size(); ++li) {
      const Layer& L = layers_[li];
      rms_norm(hp, L.in_norm.data_ptr<BFloat16>(), n.data_ptr<BFloat16>(), B, hid, eps);
      Tensor qkv = L.qkv(n);  // [B, (H + 2 KVH) * D]
      const BFloat16* x = qkv.data_ptr<BFloat16>();
      Tensor kl = kc.select(0, li), vl = vc.select(0, li);  // [B, KVH, S, D]
      BFloat16* kp = kl.data_ptr<BFloat16>();
      BFloat16* vp = vl.data_ptr<BFloat16>();
      BFloat16* qp = q.data_ptr<BFloat16>();
      for (int64_t b = 0; b < B; ++b) {
        const float* c = cp + b * D;
        const float* sn = sp + b * D;
        const BFloat16* xb = x + b * (nqk + nkv_) * D;
        for (int64_t hd = 0; hd < nqk; ++hd) {  // q heads then k heads: rotate
          const BFloat16* xh = xb + hd * D;
          BFloat16* dst = hd < nh_ ? qp + (b * nh_ + hd) * D
                                   : kp + b * kl.stride(0) + (hd - nh_) * kl.stride(1) + pp[b] * kl.stride(2);
          for (int64_t i = 0; i < D; ++i) {
            float v = static_cast<float>(xh[i]) * c[i] + static_cast<float>(xh[(i + half) % D]) * sn[i];
            dst[i] = v;
          }
        }
        for (int64_t hd = 0; hd < nkv_; ++hd) {  // v heads: copy into the cache
          const BFloat16* xh = xb + (nqk + hd) * D;
          BFloat16* dst = vp + b * vl.stride(0) + hd * vl.stride(1) + pp[b] * vl.stride(2);
          std::copy(xh, xh + D, dst);
        }
      }
      Tensor a = at::scaled_dot_product_attention(q, kl.narrow(2, 0, kv_len), vl.narrow(2, 0, kv_len), bias);
      Tensor o = L.o(a.reshape({B, nh_ * D}));
      add_scaled(hp, o.data_ptr<BFloat16>(), B * hid, rs);

      rms_norm(hp, L.post_norm.data_ptr<BFloat16>(), n.data_ptr<BFloat16>(), B, hid, eps);
      Tensor gu = L.gate_up(n);  // [B, 2 I]
      const int64_t I = gu.size(1) / 2;
      Tensor act = at::empty({B, I}, h.options());
      const BFloat16* gp = gu.data_ptr<BFloat16>();
      BFloat16* ap = act.data_ptr<BFloat16>();
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t i = 0; i < I; ++i) {
          float g = gp[b * 2 * I + i];
          ap[b * I + i] = bf(bf(g / (1.f + std::exp(-g))) * static_cast<float>(gp[b * 2 * I + I + i]));
        }
      }
      Tensor m = L.down(act);
      add_scaled(hp, m.data_ptr<BFloat16>(), B * hid, rs);
    }
    return h;
  }

 private:
  int64_t nh_, nkv_, d_;
  double eps_, rs_;
  std::vector<Layer> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecodeStack>(m, "DecodeStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("forward", &DecodeStack::forward);
}
