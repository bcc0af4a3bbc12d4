// Ternary weight x float activation gemv, shared by TernaryLinear (through ops.cpp) and csrc/decode_stack.h (the
// C++ decode stack's ternary layers), so both run the very same kernel.
//
// Weight layout (per output row n, per group g of 32 input columns k = 32g .. 32g+31):
//   planes[n, g, 0]  uint32 bit j set <=> code c[n, 32g+j] = +1
//   planes[n, g, 1]  uint32 bit j set <=> code c[n, 32g+j] = -1      (never both bits)
//   w[n, k] = dscale[n] * qscale[n, g] * c[n, k]                       qscale uint8, dscale fp32
// so a weight costs 2 bits plus 8/32 bits of group scale.
//
// gemv: y[m, n] = dscale[n] * sum_g qscale[n, g] * (sum_{j: +1} x[m, 32g+j] - sum_{j: -1} x[m, 32g+j]).
// bf16 x (the engine's case) on AVX512_BF16: the group's codes become 32 bf16 values in {-1, 0, 1} and one
// vdpbf16ps takes the signed sum (gemv_rows_bf16). fp32 x, or no AVX512_BF16: each half-group of 16 activations is
// added under the +1 mask and subtracted under the -1 mask (masked vaddps/vsubps); on AVX2, NEON and the x86
// scalar tier the codes come from a table of bit patterns and one multiply-add per ATen Vectorized<float> of
// activations (8 / 4 / 8 lanes) takes the sum (measured on the scalar tier: ~35x the bit-by-bit loop, which only
// other architectures keep). Either way the sum is scaled
// once per group with one FMA, products are exact and accumulation is fp32; several weight rows are interleaved
// so their dependency chains overlap, and each row's codes serve up to 4 activation rows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#elif (defined(__AVX2__) && defined(__FMA__)) || defined(__ARM_NEON) || defined(__SSE2__)
#include <ATen/cpu/vec/vec.h>
#define TERNARY_CODE_TABLE 1
#endif

namespace ternary {

inline const char* path() {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  return "avx512_bf16";
#elif defined(__AVX512F__)
  return "avx512f";
#elif defined(TERNARY_CODE_TABLE) && defined(__AVX2__)
  return "avx2 (fp32 FMA, code table)";
#elif defined(TERNARY_CODE_TABLE) && defined(__ARM_NEON)
  return "neon (fp32 FMA, code table)";
#elif defined(TERNARY_CODE_TABLE)
  return "scalar (fp32, code table)";
#else
  return "scalar";
#endif
}

constexpr int64_t kGroup = 32;

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// One group's signed sum for a row, scalar (the portable path and the reference for the AVX-512 one).
inline float group_sum_scalar(const float* x, uint32_t plus, uint32_t minus) {
  float s = 0.f;
  for (int j = 0; j < kGroup; ++j) {
    if (plus >> j & 1u) s += x[j];
    if (minus >> j & 1u) s -= x[j];
  }
  return s;
}

#ifdef TERNARY_CODE_TABLE
// AVX2 / NEON / SSE2 (no mask registers): a slice of W = 8 / 4 / 8 code bits becomes W fp32 codes by one load from a table
// of every W-bit pattern, plus[bits] - minus[bits] in {-1, 0, +1}, and one FMA per activation row takes the
// signed sum (exact products, fp32 accumulation). The table is 2^W x W floats: 8 KiB / 64 B, in L1.
using Vec = at::vec::Vectorized<float>;
constexpr int kLanes = Vec::size();
static_assert(kGroup % kLanes == 0, "a group is whole slices");

struct CodeTable {
  alignas(64) float v[1 << kLanes][kLanes];
  CodeTable() {
    for (int b = 0; b < (1 << kLanes); ++b)
      for (int j = 0; j < kLanes; ++j) v[b][j] = (b >> j & 1) ? 1.f : 0.f;
  }
};

inline const CodeTable& code_table() {
  static const CodeTable t;
  return t;
}

inline float hsum(const Vec& v) {
  alignas(64) float f[kLanes];
  v.store(f);
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += f[j];
  return s;
}
#endif

// y[m, n] for m < MB activation rows (x rows K apart, y rows N apart) and weight rows [n0, n1). Each weight
// row's masks are loaded once and applied to all MB activation rows.
template <int MB, typename Out>
inline void gemv_rows(const float* x, const uint32_t* planes, const uint8_t* qs, const float* ds, Out* y,
               int64_t n0, int64_t n1, int64_t G, int64_t K, int64_t N) {
  int64_t n = n0;
#ifdef __AVX512F__
  constexpr int R = MB == 1 ? 4 : 2;  // weight rows interleaved: R * MB accumulators stay in registers
  for (; n + R <= n1; n += R) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512 xlo[MB], xhi[MB];
      for (int m = 0; m < MB; ++m) {
        xlo[m] = _mm512_loadu_ps(x + m * K + g * kGroup);
        xhi[m] = _mm512_loadu_ps(x + m * K + g * kGroup + 16);
      }
      for (int r = 0; r < R; ++r) {
        const uint32_t* p = planes + ((n + r) * G + g) * 2;
        const __mmask16 pl = static_cast<__mmask16>(p[0]), ph = static_cast<__mmask16>(p[0] >> 16);
        const __mmask16 ml = static_cast<__mmask16>(p[1]), mh = static_cast<__mmask16>(p[1] >> 16);
        const __m512 s = _mm512_set1_ps(static_cast<float>(qs[(n + r) * G + g]));
        for (int m = 0; m < MB; ++m) {
          __m512 t = _mm512_maskz_mov_ps(pl, xlo[m]);
          t = _mm512_mask_sub_ps(t, ml, t, xlo[m]);
          t = _mm512_mask_add_ps(t, ph, t, xhi[m]);
          t = _mm512_mask_sub_ps(t, mh, t, xhi[m]);
          acc[r][m] = _mm512_fmadd_ps(s, t, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * N + n + r] = static_cast<Out>(ds[n + r] * _mm512_reduce_add_ps(acc[r][m]));
  }
#elif defined(TERNARY_CODE_TABLE)
  const auto& T = code_table().v;
  constexpr uint32_t kMask = (1u << kLanes) - 1;
  constexpr int R = MB == 1 ? 4 : 2;
  for (; n + R <= n1; n += R) {
    Vec acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = Vec(0.f);
    for (int64_t g = 0; g < G; ++g) {
      for (int r = 0; r < R; ++r) {
        const uint32_t* p = planes + ((n + r) * G + g) * 2;
        const uint32_t plus = p[0], minus = p[1];
        Vec t[MB];
        for (int m = 0; m < MB; ++m) t[m] = Vec(0.f);
        for (int c = 0; c < kGroup; c += kLanes) {
          const Vec code = Vec::loadu(T[plus >> c & kMask]) - Vec::loadu(T[minus >> c & kMask]);
          for (int m = 0; m < MB; ++m) t[m] = at::vec::fmadd(code, Vec::loadu(x + m * K + g * kGroup + c), t[m]);
        }
        const Vec s(static_cast<float>(qs[(n + r) * G + g]));
        for (int m = 0; m < MB; ++m) acc[r][m] = at::vec::fmadd(s, t[m], acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * N + n + r] = static_cast<Out>(ds[n + r] * hsum(acc[r][m]));
  }
#endif
  for (; n < n1; ++n) {
    for (int m = 0; m < MB; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t* p = planes + (n * G + g) * 2;
        acc += static_cast<float>(qs[n * G + g]) * group_sum_scalar(x + m * K + g * kGroup, p[0], p[1]);
      }
      y[m * N + n] = static_cast<Out>(ds[n] * acc);
    }
  }
}

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// bf16 activations: per group, the codes become 32 bf16 values in {-1, 0, +1} (two masked moves) and one
// vdpbf16ps multiplies them with the 32 activations into 16 fp32 pair sums; exact products, fp32 accumulation,
// about half the instructions of the fp32 masked add/sub path. One FMA per group applies the group scale.
template <int MB, typename Out>
inline void gemv_rows_bf16(const uint16_t* x, const uint32_t* planes, const uint8_t* qs, const float* ds, Out* y,
                           int64_t n0, int64_t n1, int64_t G, int64_t K, int64_t N) {
  const __m512i one = _mm512_set1_epi16(0x3F80), minus_one = _mm512_set1_epi16(static_cast<int16_t>(0xBF80));
  int64_t n = n0;
  constexpr int R = MB == 1 ? 4 : 2;
  for (; n + R <= n1; n += R) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
      __m512bh xv[MB];
      for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + g * kGroup);
      for (int r = 0; r < R; ++r) {
        const uint32_t* p = planes + ((n + r) * G + g) * 2;
        const __m512i c = _mm512_mask_mov_epi16(_mm512_maskz_mov_epi16(p[0], one), p[1], minus_one);
        const __m512 s = _mm512_set1_ps(static_cast<float>(qs[(n + r) * G + g]));
        for (int m = 0; m < MB; ++m)
          acc[r][m] = _mm512_fmadd_ps(s, _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)c, xv[m]), acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) y[m * N + n + r] = static_cast<Out>(ds[n + r] * _mm512_reduce_add_ps(acc[r][m]));
  }
  for (; n < n1; ++n) {  // tail rows: scalar, on the activations widened to fp32
    for (int m = 0; m < MB; ++m) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        const uint32_t* p = planes + (n * G + g) * 2;
        float xs[kGroup];
        for (int j = 0; j < kGroup; ++j) xs[j] = bf16_to_float(x[m * K + g * kGroup + j]);
        acc += static_cast<float>(qs[n * G + g]) * group_sum_scalar(xs, p[0], p[1]);
      }
      y[m * N + n] = static_cast<Out>(ds[n] * acc);
    }
  }
}
#define MINICPM4_BF16_KERNEL 1
#endif

inline void check_weight(const at::Tensor& planes, const at::Tensor& qscale, const at::Tensor& dscale) {
  TORCH_CHECK(planes.dim() == 3 && planes.size(2) == 2 && planes.scalar_type() == at::kInt && planes.is_contiguous(),
              "planes must be contiguous int32 [N, K/32, 2]");
  TORCH_CHECK(qscale.scalar_type() == at::kByte && qscale.is_contiguous() &&
              qscale.sizes() == at::IntArrayRef({planes.size(0), planes.size(1)}), "qscale must be uint8 [N, K/32]");
  TORCH_CHECK(dscale.scalar_type() == at::kFloat && dscale.is_contiguous() && dscale.dim() == 1 &&
              dscale.size(0) == planes.size(0), "dscale must be float32 [N]");
}


struct Weight {
  const uint32_t* planes;
  const uint8_t* qs;
  const float* ds;
  int64_t G, K, N;
};

// Rows of y in blocks of 4 over torch's threads; activation rows go through in chunks of up to 4.
// Kernel: a functor template over MB (Rows below) called with (x rows, y rows, n0, n1).
template <template <int> class Kernel, typename X, typename Out>
void run_blocks(const X* x, Out* y, int64_t M, const Weight& w) {
  const int64_t N = w.N, K = w.K;
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4);
    for (int64_t m = 0; m < M; m += 4) {
      const X* xm = x + m * K;
      Out* ym = y + m * N;
      switch (std::min<int64_t>(M - m, 4)) {
        case 1: Kernel<1>{w}(xm, ym, n0, n1); break;
        case 2: Kernel<2>{w}(xm, ym, n0, n1); break;
        case 3: Kernel<3>{w}(xm, ym, n0, n1); break;
        default: Kernel<4>{w}(xm, ym, n0, n1); break;
      }
    }
  });
}


// The kernel for MB activation rows, picked by the activations' type: fp32 -> gemv_rows, bf16 -> gemv_rows_bf16.
template <int MB>
struct Rows {
  Weight w;
  template <typename Out>
  void operator()(const float* x, Out* y, int64_t n0, int64_t n1) const {
    gemv_rows<MB>(x, w.planes, w.qs, w.ds, y, n0, n1, w.G, w.K, w.N);
  }
#ifdef MINICPM4_BF16_KERNEL
  template <typename Out>
  void operator()(const uint16_t* x, Out* y, int64_t n0, int64_t n1) const {
    gemv_rows_bf16<MB>(x, w.planes, w.qs, w.ds, y, n0, n1, w.G, w.K, w.N);
  }
#endif
};

// x [M, K] bf16 or fp32 -> y [M, N] in x's dtype, written by the kernel itself: a bf16 result is rounded once
// from the fp32 accumulator (what y.to(bf16) would give) with no fp32 temporary and no conversion op.
inline at::Tensor gemv(const at::Tensor& x_in, const at::Tensor& planes, const at::Tensor& qscale,
                       const at::Tensor& dscale) {
  check_weight(planes, qscale, dscale);
  const int64_t N = planes.size(0), G = planes.size(1), K = G * kGroup;
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == K, "x must be [M, ", K, "]");
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat, "x must be bf16 or fp32");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const Weight w{reinterpret_cast<const uint32_t*>(planes.data_ptr<int32_t>()), qscale.data_ptr<uint8_t>(),
                 dscale.data_ptr<float>(), G, K, N};
  if (x.scalar_type() == at::kFloat) {
    run_blocks<Rows>(x.data_ptr<float>(), y.data_ptr<float>(), M, w);
    return y;
  }
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  at::BFloat16* yb = y.data_ptr<at::BFloat16>();
#ifdef MINICPM4_BF16_KERNEL
  run_blocks<Rows>(xb, yb, M, w);
#else
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(xb[i]);
  run_blocks<Rows>(static_cast<const float*>(xf.data()), yb, M, w);
#endif
  return y;
}

// The dequantized weight rows [n0, n1) as bf16 [n1 - n0, K].
inline at::Tensor unpack(const at::Tensor& planes, const at::Tensor& qscale, const at::Tensor& dscale, int64_t n0, int64_t n1) {
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

}  // namespace ternary
