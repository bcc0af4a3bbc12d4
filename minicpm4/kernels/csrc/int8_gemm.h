// Int8 weight products for a few rows (decode, tree verification), on Int8Linear's layout:
//   w[n, k] = q[n, k] * scale[n],   q int8 [N, K] (row-major, -127..127), scale bf16 [N]
//
// Math (llama.cpp's Q8_0 x Q8_0): each block of kBlock = 32 columns of an activation row is quantized,
// dx = max|x| / 127, x8 = round_half_even(x / dx) (quantize_activations below; quant/int8.py
// quantize_activations is the same to the bit), then
//   y[m, n] = bf16(scale[n] * sum_blocks dx[m, blk] * sum_{k in blk} q[n, k] x8[m, k])
// with exact int32 block sums and fp32 across blocks. The activation rounding moves an output by at most
// sum_blk dx[m, blk] / 2 * sum_{k in blk} |w[n, k]| from x @ W^T (round to nearest: |x - dx x8| <= dx / 2);
// quant/int8.py's Int8Linear.integer_reference is this formula. The integer dot product by tier: avx512 (and
// avx512_bf16) vpdpbusd (u8 x s8: the activation as x8 + 128, unsigned, and the 128 * sum_k q[n, k] it adds taken
// off again with a vpdpbusd of ones), avx2 vpsignb + vpmaddubsw + vpmaddwd (llama.cpp's sign trick: |x8| unsigned
// times q with x8's sign), neon_dotprod sdot, neon smull + sadalp, scalar C++.
//
// Why our own: torch's _weight_int8pack_mm re-reads the weights for every block of 4 activation rows and its rows
// round differently depending on the batch; here each weight is read once per call for up to kMaxRows rows (on
// avx512_bf16 CPUs too: this replaced a vdpbf16ps kernel on bf16 activations, which it beats; BENCHMARKS.md). A
// row's arithmetic (fixed column steps into its own accumulator, one horizontal sum, one multiply by the scale)
// does not depend on the rows beside it, so verification rounds like a decode step and a request's tokens do not
// change with its batch neighbours. Many rows (prefill) take a GEMM on dequantized blocks of rows: bf16 on
// avx512_bf16, fp32 elsewhere (a bf16 GEMM without native bf16 dot products is several times slower than fp32).
// tests/quant/test_int8.py holds each tier to these formulas.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MINICPM4_INT8_BF16 1  // prefill: a bf16 GEMM (native bf16 dot products)
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINICPM4_INT8_VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define MINICPM4_INT8_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define MINICPM4_INT8_NEON 1
#endif
#define MINICPM4_INT8_KERNEL 1  // every tier has a few-row kernel

namespace int8 {

inline const char* path() {
#if defined(MINICPM4_INT8_VNNI) && defined(MINICPM4_INT8_BF16)
  return "avx512 (vpdpbusd, int8 activations); prefill: bf16 GEMM";
#elif defined(MINICPM4_INT8_VNNI)
  return "avx512 (vpdpbusd, int8 activations)";
#elif defined(MINICPM4_INT8_AVX2)
  return "avx2 (vpmaddubsw, int8 activations)";
#elif defined(MINICPM4_INT8_NEON) && defined(__ARM_FEATURE_DOTPROD)
  return "neon_dotprod (sdot, int8 activations)";
#elif defined(MINICPM4_INT8_NEON)
  return "neon (smull + sadalp, int8 activations)";
#else
  return "scalar (C++, int8 activations)";
#endif
}

constexpr int64_t kMaxRows = 16;  // activation rows per call the few-row kernel takes; more go to prefill()
constexpr int64_t kChunk = 8;     // activation rows per pass over the weights
constexpr int64_t kBlock = 32;    // columns per activation scale
// weight rows interleaved per pass for MB activation rows: R * MB accumulators fit the registers (16 ymm on avx2
// and x86-64, 32 zmm / NEON registers elsewhere); 1, 2 and 4 divide the 4-row units mm() splits N into
#if defined(MINICPM4_INT8_VNNI) || defined(MINICPM4_INT8_NEON)
constexpr int kR[9] = {0, 4, 4, 4, 4, 2, 2, 2, 2};
#else
constexpr int kR[9] = {0, 4, 4, 2, 2, 1, 1, 1, 1};
#endif

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Per block of `block` columns of each row of x [M, K] (bf16 bits): dx = max|x| / 127 (fp32), x8 =
// round_half_even(x * (1 / dx)) in -127..127 (0 where dx = 0), xsum = sum x8 (int32). Rows independent.
// quant/int8.py quantize_activations computes the same values: the same fp32 operations in the same order.
inline void quantize_activations(const uint16_t* x, int64_t M, int64_t K, int64_t block, int8_t* x8, float* dx,
                                 int32_t* xsum) {
  const int64_t B = K / block;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < B; ++j) {
      const uint16_t* xb = x + m * K + j * block;
      float amax = 0.f;
      for (int64_t k = 0; k < block; ++k) amax = std::max(amax, std::fabs(bf16_to_float(xb[k])));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int32_t s = 0;
      for (int64_t k = 0; k < block; ++k) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(bf16_to_float(xb[k]) * inv)));
        x8[m * K + j * block + k] = static_cast<int8_t>(v);
        s += static_cast<int32_t>(v);
      }
      dx[m * B + j] = d;
      if (xsum) xsum[m * B + j] = s;
    }
}

// The quantized activations as the integer kernels read them, per row m: q = x8 [K] (avx512: x8 + 128, unsigned;
// avx2: |x8| in q and x8 in sgn, for the sign trick), d = a float per column lane: the dx of its block for each
// of the lane's columns (avx512: per 4 columns, 16 lanes per 64 columns; elsewhere per block).
struct XRow {
  const uint8_t* q;
  const int8_t* sgn;
  const float* d;
};

template <int MB, int R>
inline void rows(const XRow* x, const int8_t* w, const uint16_t* scale, uint16_t* y, int64_t n0, int64_t n1,
                 int64_t K, int64_t N) {
  for (int64_t n = n0; n < n1; n += R) {
    float sum[R][MB];
#if defined(MINICPM4_INT8_VNNI)
    // 64 columns per step: lane l holds columns 4l .. 4l + 3 of one block; sum_k (x8 + 128) q - 128 sum_k q
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    const __m512i ones = _mm512_set1_epi8(1);
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;  // a last 32 columns
      __m512i wv[R], corr[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = _mm512_maskz_loadu_epi8(mask, w + (n + r) * K + k);
        corr[r] = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv[r]), 7);
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi8(mask, x[m].q + k);
        const __m512 d = _mm512_loadu_ps(x[m].d + k / 4);
        for (int r = 0; r < R; ++r) {
          const __m512i i = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[r]), corr[r]);
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), d, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) sum[r][m] = _mm512_reduce_add_ps(acc[r][m]);
#elif defined(MINICPM4_INT8_AVX2)
    // one block (32 columns) per step: |x8| * sign(q, x8) in 16-bit pairs, then 32-bit lanes of 4 columns
    __m256 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t k = 0; k < K; k += 32) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r) wv[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * K + k));
      for (int m = 0; m < MB; ++m) {
        const __m256i ax = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].q + k));
        const __m256i sx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[m].sgn + k));
        const __m256 d = _mm256_broadcast_ss(x[m].d + k / 32);
        for (int r = 0; r < R; ++r) {
          const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[r], sx)), ones);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r][m]), _mm256_extractf128_ps(acc[r][m], 1));
        const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
        sum[r][m] = _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
      }
#elif defined(MINICPM4_INT8_NEON)
    // one block (32 columns) per step: two 16-byte halves into one int32x4, then its dx
    float32x4_t acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = vdupq_n_f32(0.f);
    for (int64_t k = 0; k < K; k += 32) {
      int8x16_t w0[R], w1[R];
      for (int r = 0; r < R; ++r) {
        w0[r] = vld1q_s8(w + (n + r) * K + k);
        w1[r] = vld1q_s8(w + (n + r) * K + k + 16);
      }
      for (int m = 0; m < MB; ++m) {
        const int8x16_t x0 = vld1q_s8(reinterpret_cast<const int8_t*>(x[m].q) + k);
        const int8x16_t x1 = vld1q_s8(reinterpret_cast<const int8_t*>(x[m].q) + k + 16);
        const float d = x[m].d[k / 32];
        for (int r = 0; r < R; ++r) {
#if defined(__ARM_FEATURE_DOTPROD)
          const int32x4_t i = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0[r], x0), w1[r], x1);
#else
          int32x4_t i = vpaddlq_s16(vmull_s8(vget_low_s8(w0[r]), vget_low_s8(x0)));
          i = vpadalq_s16(i, vmull_high_s8(w0[r], x0));
          i = vpadalq_s16(i, vmull_s8(vget_low_s8(w1[r]), vget_low_s8(x1)));
          i = vpadalq_s16(i, vmull_high_s8(w1[r], x1));
#endif
          acc[r][m] = vfmaq_n_f32(acc[r][m], vcvtq_f32_s32(i), d);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) sum[r][m] = vaddvq_f32(acc[r][m]);
#else
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) {
        const int8_t* wr = w + (n + r) * K;
        const int8_t* xr = reinterpret_cast<const int8_t*>(x[m].q);
        float s = 0.f;
        for (int64_t k = 0; k < K; k += 32) {
          int32_t i = 0;
          for (int64_t c = k; c < k + 32; ++c) i += static_cast<int32_t>(wr[c]) * xr[c];
          s += x[m].d[k / 32] * static_cast<float>(i);
        }
        sum[r][m] = s;
      }
#endif
    for (int r = 0; r < R; ++r) {
      const float s = bf16_to_float(scale[n + r]);
      for (int m = 0; m < MB; ++m) y[m * N + n + r] = at::BFloat16(sum[r][m] * s).x;
    }
  }
}

// Whether mm() takes this call with the few-row kernel: x bf16 with 1..kMaxRows rows, K a multiple of 32.
inline bool supported(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  return x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows &&
         w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1) &&
         w.size(1) % 32 == 0 && scale.scalar_type() == at::kBFloat16 && scale.is_contiguous() &&
         scale.numel() == w.size(0);
}

// Many rows (prefill): chunks of weight rows dequantized, q * scale, for a GEMM; torch's int8 kernel is slower
// than that (benchmarks/bench_quant.py). avx512_bf16: bf16 weights and activations (the weight rounding to bf16
// adds at most 2^-9 relative error per weight); other tiers: fp32 weights (exact) and activations, bf16 output.
constexpr int64_t kPrefillRows = 1024;

inline at::Tensor prefill(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t N = w.size(0);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
#if defined(MINICPM4_INT8_BF16)
  const at::Tensor& xg = x;
  const auto wtype = at::kBFloat16;
#else
  const at::Tensor xg = x.to(at::kFloat);
  const auto wtype = at::kFloat;
#endif
  for (int64_t n0 = 0; n0 < N; n0 += kPrefillRows) {
    const int64_t rows = std::min(kPrefillRows, N - n0);
    const at::Tensor wb = (w.narrow(0, n0, rows).to(at::kFloat) * scale.narrow(0, n0, rows).to(at::kFloat).unsqueeze(1))
                              .to(wtype);
    y.narrow(1, n0, rows).copy_(at::mm(xg, wb.t()));
  }
  return y;
}

// x [M, K] bf16 @ (w [N, K] int8 * scale [N] bf16)^T -> [M, N] bf16: the few-row kernel where supported(),
// prefill() for more bf16 rows, torch's kernel otherwise.
inline at::Tensor mm(const at::Tensor& x_in, const at::Tensor& w, const at::Tensor& scale) {
  if (x_in.scalar_type() == at::kBFloat16 && x_in.dim() == 2 && x_in.size(0) > kMaxRows && w.dim() == 2 &&
      w.scalar_type() == at::kChar && x_in.size(1) == w.size(1) && scale.numel() == w.size(0))
    return prefill(x_in.contiguous(), w, scale);
  if (!supported(x_in, w, scale)) return at::_weight_int8pack_mm(x_in, w, scale);
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  // int8 activations, laid out as rows() reads them (see XRow)
  const int64_t B = K / kBlock, lanes = (K + 63) / 64 * 16;
  std::vector<int8_t> x8(M * K);
  std::vector<uint8_t> q(M * K);
  std::vector<float> dx(M * B), d(M * std::max(lanes, B), 0.f);
  quantize_activations(xp, M, K, kBlock, x8.data(), dx.data(), nullptr);
  std::vector<XRow> xrows(M);
  const int64_t dstride = std::max(lanes, B);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K; ++k) {
#if defined(MINICPM4_INT8_VNNI)
      q[m * K + k] = static_cast<uint8_t>(x8[m * K + k] + 128);
#elif defined(MINICPM4_INT8_AVX2)
      q[m * K + k] = static_cast<uint8_t>(std::abs(x8[m * K + k]));
#else
      q[m * K + k] = static_cast<uint8_t>(x8[m * K + k]);
#endif
    }
#if defined(MINICPM4_INT8_VNNI)
    for (int64_t l = 0; l < K / 4; ++l) d[m * dstride + l] = dx[m * B + l * 4 / kBlock];
#else
    for (int64_t j = 0; j < B; ++j) d[m * dstride + j] = dx[m * B + j];
#endif
    xrows[m] = XRow{q.data() + m * K, x8.data() + m * K, d.data() + m * dstride};
  }
  const XRow* xr = xrows.data();
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4), tail = (n1 - n0) % 4;  // tail rows: one at a time
    for (int64_t m = 0; m < M; m += kChunk) {
      const XRow* xm = xr + m;
      uint16_t* ym = yp + m * N;
      const int64_t e = n1 - tail;
      switch (std::min(M - m, kChunk)) {  // kR[MB] weight rows at a time, then the tail rows one at a time
        case 1: rows<1, kR[1]>(xm, wp, sp, ym, n0, e, K, N); rows<1, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 2: rows<2, kR[2]>(xm, wp, sp, ym, n0, e, K, N); rows<2, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 3: rows<3, kR[3]>(xm, wp, sp, ym, n0, e, K, N); rows<3, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 4: rows<4, kR[4]>(xm, wp, sp, ym, n0, e, K, N); rows<4, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 5: rows<5, kR[5]>(xm, wp, sp, ym, n0, e, K, N); rows<5, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 6: rows<6, kR[6]>(xm, wp, sp, ym, n0, e, K, N); rows<6, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 7: rows<7, kR[7]>(xm, wp, sp, ym, n0, e, K, N); rows<7, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        default: rows<8, kR[8]>(xm, wp, sp, ym, n0, e, K, N); rows<8, 1>(xm, wp, sp, ym, e, n1, K, N); break;
      }
    }
  });
  return y;
}

}  // namespace int8
