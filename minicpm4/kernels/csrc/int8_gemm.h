// Int8 weight x bf16 activation product for a few rows (decode, tree verification), on Int8Linear's layout:
//   y[m, n] = bf16(scale[n] * sum_k q[n, k] x[m, k]),   q int8 [N, K] (row-major), scale bf16 [N]
//
// Why our own: torch's _weight_int8pack_mm runs the default model's 49152 x 576 int8 head at ~17 GB/s on one
// core, a quarter of an int4 decode step, and re-reads the weights for every block of 4 activation rows. Here 32
// weights of a row become 32 exact bf16 values (int8 -> fp32 -> bf16) and one vdpbf16ps multiplies them into
// each activation row's fp32 accumulator; each weight is converted once per call for up to kMaxRows rows.
// A row's arithmetic (32-column steps into one accumulator, one horizontal sum, one multiply by the scale) does
// not depend on the rows beside it, so verification rounds like a decode step. The reference is
// Int8Linear.dequantize (tests/quant/test_int8.py).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINICPM4_INT8_KERNEL 1
#endif

namespace int8 {

inline const char* path() {
#ifdef MINICPM4_INT8_KERNEL
  return "avx512_bf16 (vdpbf16ps)";
#else
  return "torch (_weight_int8pack_mm)";
#endif
}

constexpr int64_t kMaxRows = 16;  // activation rows per call the few-row kernel takes; more go to prefill()
constexpr int64_t kChunk = 8;     // activation rows per pass over the weights

#ifdef MINICPM4_INT8_KERNEL
// Weight rows [n0, n1) (a multiple of R apart) for MB activation rows; R rows interleaved so that R * MB
// accumulator chains overlap.
template <int MB, int R>
inline void rows(const uint16_t* x, const int8_t* w, const uint16_t* scale, uint16_t* y, int64_t n0, int64_t n1,
                 int64_t K, int64_t N) {
  for (int64_t n = n0; n < n1; n += R) {
    __m512 acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m512bh wv[R];
      for (int r = 0; r < R; ++r) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (n + r) * K + k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        wv[r] = _mm512_cvtne2ps_pbh(hi, lo);  // columns k .. k + 31 in order, exact
      }
      for (int m = 0; m < MB; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
      }
    }
    for (int r = 0; r < R; ++r) {
      const uint32_t sbits = static_cast<uint32_t>(scale[n + r]) << 16;
      float s;
      std::memcpy(&s, &sbits, 4);
      for (int m = 0; m < MB; ++m) {
        const at::BFloat16 v(_mm512_reduce_add_ps(acc[r][m]) * s);
        y[m * N + n + r] = v.x;
      }
    }
  }
}
#endif

// Whether mm() takes this call: the AVX512-BF16 kernel is compiled in, x bf16 with 1..kMaxRows rows, K a
// multiple of 32.
inline bool supported(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
#ifdef MINICPM4_INT8_KERNEL
  return x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows &&
         w.scalar_type() == at::kChar && w.dim() == 2 && w.is_contiguous() && x.size(1) == w.size(1) &&
         w.size(1) % 32 == 0 && scale.scalar_type() == at::kBFloat16 &&
         scale.is_contiguous() && scale.numel() == w.size(0);
#else
  (void)x; (void)w; (void)scale;
  return false;
#endif
}

// Many rows (prefill): chunks of weight rows as bf16(q * scale) for a bf16 GEMM; torch's int8 kernel is slower than
// bf16 weights there (benchmarks/bench_quant.py). The weight rounding to bf16 adds at most 2^-9 relative error per weight.
constexpr int64_t kPrefillRows = 1024;

inline at::Tensor prefill(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t N = w.size(0);
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += kPrefillRows) {
    const int64_t rows = std::min(kPrefillRows, N - n0);
    const at::Tensor wb = (w.narrow(0, n0, rows).to(at::kFloat) * scale.narrow(0, n0, rows).to(at::kFloat).unsqueeze(1))
                              .to(at::kBFloat16);
    y.narrow(1, n0, rows).copy_(at::mm(x, wb.t()));
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
#ifdef MINICPM4_INT8_KERNEL
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int8_t* wp = w.data_ptr<int8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, (N + 3) / 4, 16, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * 4, n1 = std::min(N, b1 * 4), tail = (n1 - n0) % 4;  // tail rows: one at a time
    for (int64_t m = 0; m < M; m += kChunk) {
      const uint16_t* xm = xp + m * K;
      uint16_t* ym = yp + m * N;
      const int64_t e = n1 - tail;
      switch (std::min(M - m, kChunk)) {  // 4 weight rows at a time for up to 4 activation rows, 2 beyond
        case 1: rows<1, 4>(xm, wp, sp, ym, n0, e, K, N); rows<1, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 2: rows<2, 4>(xm, wp, sp, ym, n0, e, K, N); rows<2, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 3: rows<3, 4>(xm, wp, sp, ym, n0, e, K, N); rows<3, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 4: rows<4, 4>(xm, wp, sp, ym, n0, e, K, N); rows<4, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 5: rows<5, 2>(xm, wp, sp, ym, n0, e, K, N); rows<5, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 6: rows<6, 2>(xm, wp, sp, ym, n0, e, K, N); rows<6, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        case 7: rows<7, 2>(xm, wp, sp, ym, n0, e, K, N); rows<7, 1>(xm, wp, sp, ym, e, n1, K, N); break;
        default: rows<8, 2>(xm, wp, sp, ym, n0, e, K, N); rows<8, 1>(xm, wp, sp, ym, e, n1, K, N); break;
      }
    }
  });
  return y;
#else
  return at::_weight_int8pack_mm(x_in, w, scale);  // not reached: supported() is false
#endif
}

}  // namespace int8
