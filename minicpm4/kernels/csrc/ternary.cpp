// Ternary weight kernels for minicpm4.ternary_linear.TernaryLinear: the decode gemv (csrc/ternary_gemv.h, where
// the weight layout and the kernel are described) and unpack, the dequantized bf16 rows [n0, n1) for prefill (a
// bf16 GEMM on blocks of rows).
#include "ternary_gemv.h"

using ternary::check_weight;
using ternary::kGroup;

// The dequantized weight rows [n0, n1) as bf16 [n1 - n0, K].
at::Tensor unpack(const at::Tensor& planes, const at::Tensor& qscale, const at::Tensor& dscale, int64_t n0, int64_t n1) {
  check_weight(planes, qscale, dscale);
  const int64_t N = planes.size(0), G = planes.size(1), K = G * kGroup;
  TORCH_CHECK(0 <= n0 && n0 <= n1 && n1 <= N, "row range [", n0, ", ", n1, ") outside [0, ", N, ")");
  at::Tensor w = at::empty({n1 - n0, K}, at::TensorOptions().dtype(at::kBFloat16));
  const uint32_t* pl = reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>());
  const uint8_t* qs = qscale.data_ptr<uint8_t>();
  const float* ds = dscale.data_ptr<float>();
  at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::parallel_for(n0, n1, 8, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        const float s = ds[n] * static_cast<float>(qs[n * G + g]);
        const at::BFloat16 pos(s), neg(-s), zero(0.f);
        const uint32_t plus = pl[(n * G + g) * 2], minus = pl[(n * G + g) * 2 + 1];
        at::BFloat16* out = wp + (n - n0) * K + g * kGroup;
#ifdef __AVX512BW__
        // 32 bf16 lanes = one zmm: blend the +s and -s bit patterns in under the two 32-bit masks
        __m512i v = _mm512_maskz_mov_epi16(plus, _mm512_set1_epi16(static_cast<int16_t>(pos.x)));
        v = _mm512_mask_mov_epi16(v, minus, _mm512_set1_epi16(static_cast<int16_t>(neg.x)));
        _mm512_storeu_si512(out, v);
        (void)zero;
#else
        for (int j = 0; j < kGroup; ++j) out[j] = (plus >> j & 1u) ? pos : ((minus >> j & 1u) ? neg : zero);
#endif
      }
    }
  });
  return w;
}

bool has_avx512() {
#ifdef __AVX512F__
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &ternary::gemv, "ternary gemv: x [M, K] bf16/fp32 -> [M, N]");
  m.def("unpack", &unpack, "dequantized bf16 rows [n0, n1)");
  m.def("has_avx512", &has_avx512, "whether the AVX-512 path was compiled in");
}
