// Int4 weight x bf16 activation products on the weight layout of torch's CPU int4 kernel, so Int4Linear's tensors
// are used as they are: a few-row kernel (decode, tree verification, the draft's passes) and, for many rows
// (prefill), blocks of the weight dequantized to bf16 for a bf16 GEMM.
//
// Why our own: torch's _weight_int4pack_mm_for_cpu turns each weight into fp32 and multiplies with fp32 FMAs, and
// unpacks the weights again for every block of 4 activation rows. Here each 4-bit weight is unpacked once per call
// for all rows and multiplied with vdpbf16ps (32 products per instruction). At a dozen rows the arithmetic, not
// the weights' memory traffic, is the bound. Many rows (prefill) take the bf16 GEMM path, at bf16-GEMM speed,
// where torch's int4 kernel is slower than bf16 weights. BENCHMARKS.md has the measurements.
//
// Layout (aten::_convert_weight_to_int4pack_for_cpu, inner k tiles 1): output rows in blocks of 64; for block b
// and input column k, 32 bytes at w[(b * K + k) * 32 ..]: byte d (d < 16) holds row 64b + d in its low nibble and
// row 64b + 32 + d in its high nibble, byte 16 + d rows 64b + 16 + d and 64b + 48 + d. Per group g of `group`
// columns, sz[g, n] = (scale, zero) bf16, and w[n, k] = (q - 8) * scale + zero, q in 0..15.
//
// Math: with sx[m, g] = sum_{k in g} x[m, k],
//   y[m, n] = sum_g scale * sum_{k in g} q x  +  (zero - 8 scale) * sx
// The inner sum runs on vdpbf16ps: the code q becomes the bf16 number 128 + q by OR-ing 0x4300 into its 16 bits
// (bf16 has step 1 in [128, 256)), and a lane multiplies the pair (k, k+1) of one output row with the pair of x,
// products exact, fp32 sums. So sum (128 + q) x = 128 sx + sum q x, and
//   y[m, n] = sum_g scale * D[m, n, g] + (zero - 136 scale) * sx[m, g],   D = the vdpbf16ps sum.
// Each output's arithmetic (even and odd column pairs summed in two accumulators, then the per-group FMAs) is the
// same whatever the number of rows in the call: a row's result never depends on the rows beside it, which keeps
// speculative decoding's verification equal to plain decode. The reference is quant/int4.py's formula
// (tests/quant/test_int4.py).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINICPM4_INT4_KERNEL 1
#endif

namespace int4 {

// The code path int4 products take in this build (minicpm4 info --system prints it).
inline const char* path() {
#ifdef MINICPM4_INT4_KERNEL
  return "avx512_bf16 (vdpbf16ps)";
#else
  return "torch (_weight_int4pack_mm_for_cpu)";
#endif
}

constexpr int64_t kBlockN = 64;
constexpr int64_t kMaxRows = 16;  // rows per call the few-row kernel takes; more go to prefill()
constexpr int64_t kChunk = 6;     // activation rows per pass over a block's weights (4 * 6 accumulators; 4 and 8
                                  // measured no faster)

#ifdef MINICPM4_INT4_KERNEL
// One pass over block b's columns for MB activation rows, covering NJ of its four 16-row quarters (rows
// 64b + 16q .. +15): bytes 16h .. 16h + 15 of a column hold quarter h in their low nibbles and quarter h + 2 in their
// high nibbles. NJ = 4 (all quarters, h = 0) keeps 8 accumulator chains busy for MB <= 2; NJ = 2 (quarters h and
// h + 2) fits the 4 * MB accumulators of larger MB in registers. Out: y[m, n] for those rows, bf16.
template <int MB, int NJ>
inline void block_rows(const uint16_t* x, const float* sx, const uint8_t* w, const uint16_t* sz, uint16_t* y,
                       int64_t b, int h, int64_t K, int64_t N, int64_t group) {
  const int64_t G = K / group;
  const __m512i low = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
  const __m512 c136 = _mm512_set1_ps(-136.f);
  __m512 out[MB][NJ];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NJ; ++j) out[m][j] = _mm512_setzero_ps();
  const uint8_t* wb = w + b * K * 32;
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MB][NJ][2];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < NJ; ++j) acc[m][j][0] = acc[m][j][1] = _mm512_setzero_ps();
    // column pairs alternate between the two accumulators (constant indices keep them in registers)
    auto step = [&](int64_t k, auto parity) {
      constexpr int p = decltype(parity)::value;
      __m512i wv[NJ];
      for (int half = 0; half < NJ / 2; ++half) {  // bytes 16 * (h + half) .. of columns k and k + 1
        const int64_t off = 16 * (h + half);
        const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + k * 32 + off));
        const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + (k + 1) * 32 + off));
        // [a0 c0 a1 c1 .. a15 c15] widened to 16 bits: lane 2d = column k, lane 2d + 1 = column k + 1
        const __m512i v = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(a, c), _mm_unpacklo_epi8(a, c)));
        wv[half] = _mm512_or_si512(_mm512_and_si512(v, low), bias);           // rows 16 (h + half) + d
        wv[half + NJ / 2] = _mm512_or_si512(_mm512_srli_epi16(v, 4), bias);  // rows 32 + 16 (h + half) + d
      }
      for (int m = 0; m < MB; ++m) {
        int32_t pair;  // x[m, k], x[m, k + 1] as one 32-bit lane, broadcast
        std::memcpy(&pair, x + m * K + k, 4);
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
        for (int j = 0; j < NJ; ++j) acc[m][j][p] = _mm512_dpbf16_ps(acc[m][j][p], (__m512bh)wv[j], xv);
      }
    };
    for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
      step(k, std::integral_constant<int, 0>{});
      step(k + 2, std::integral_constant<int, 1>{});
    }
    for (int j = 0; j < NJ; ++j) {
      // 16 (scale, zero) bf16 pairs = 16 32-bit lanes: scale in the low half, zero in the high half
      const int64_t n = b * kBlockN + 16 * (j < NJ / 2 ? h + j : 2 + h + j - NJ / 2);
      const __m512i pair = _mm512_loadu_si512(sz + (g * N + n) * 2);
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xFFFF0000))));
      const __m512 zz = _mm512_fmadd_ps(c136, s, z);
      for (int m = 0; m < MB; ++m) {
        const __m512 d = _mm512_add_ps(acc[m][j][0], acc[m][j][1]);
        out[m][j] = _mm512_fmadd_ps(s, d, out[m][j]);
        out[m][j] = _mm512_fmadd_ps(zz, _mm512_set1_ps(sx[m * G + g]), out[m][j]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NJ; ++j) {
      const int64_t n = b * kBlockN + 16 * (j < NJ / 2 ? h + j : 2 + h + j - NJ / 2);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + n), (__m256i)_mm512_cvtneps_pbh(out[m][j]));
    }
}

template <int MB>
inline void block(const uint16_t* x, const float* sx, const uint8_t* w, const uint16_t* sz, uint16_t* y, int64_t b,
                  int64_t K, int64_t N, int64_t group) {
  if (MB <= 2) {
    block_rows<MB, 4>(x, sx, w, sz, y, b, 0, K, N, group);
  } else {
    block_rows<MB, 2>(x, sx, w, sz, y, b, 0, K, N, group);
    block_rows<MB, 2>(x, sx, w, sz, y, b, 1, K, N, group);
  }
}
#endif

// Whether our kernels take this weight: the AVX512-BF16 code is compiled in, at least one whole 64-row block,
// groups of a multiple of 4 columns, contiguous tensors.
inline bool weight_fits(const at::Tensor& w, int64_t group, const at::Tensor& sz) {
#ifdef MINICPM4_INT4_KERNEL
  const int64_t N = w.size(0), K = w.size(1) * 2;
  return w.scalar_type() == at::kByte && w.is_contiguous() && N >= kBlockN && group % 4 == 0 && K % group == 0 &&
         sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == K / group &&
         sz.size(1) == N;
#else
  (void)w; (void)group; (void)sz;
  return false;
#endif
}

// Whether mm() runs the few-row kernel (1..kMaxRows bf16 rows) for this call.
inline bool supported(const at::Tensor& x, const at::Tensor& w, int64_t group, const at::Tensor& sz) {
  return weight_fits(w, group, sz) && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) >= 1 &&
         x.size(0) <= kMaxRows && x.size(1) == w.size(1) * 2;
}

#ifdef MINICPM4_INT4_KERNEL
// Blocks [b0, b1) dequantized to bf16, transposed: wt[k, (b - b0) * 64 + r] = bf16((q - 8) * scale + zero) of row
// 64 b + r (one fp32 FMA, one rounding). Column k of a block is 32 bytes whose low nibbles are rows 0..31 and
// high nibbles rows 32..63, so each (block, k) writes 64 contiguous values.
inline void dequantize_t(const uint8_t* w, const uint16_t* sz, uint16_t* wt, int64_t b0, int64_t b1, int64_t K,
                         int64_t N, int64_t group) {
  const int64_t ld = (b1 - b0) * kBlockN;
  at::parallel_for(b0, b1, 1, [&](int64_t a, int64_t e) {
    for (int64_t b = a; b < e; ++b) {
      for (int64_t g = 0; g < K / group; ++g) {
        __m512 s[4], zz[4];
        for (int j = 0; j < 4; ++j) {  // rows 16 j .. 16 j + 15 of the block: (scale, zero) pairs
          const __m512i pair = _mm512_loadu_si512(sz + (g * N + b * kBlockN + 16 * j) * 2);
          s[j] = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
          const __m512 z = _mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(static_cast<int>(0xFFFF0000))));
          zz[j] = _mm512_fmadd_ps(_mm512_set1_ps(-8.f), s[j], z);  // w = q * scale + (zero - 8 scale)
        }
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (b * K + k) * 32)));
          const __m512i nib[2] = {_mm512_and_si512(v, _mm512_set1_epi16(0x000F)), _mm512_srli_epi16(v, 4)};
          uint16_t* out = wt + k * ld + (b - b0) * kBlockN;
          for (int h = 0; h < 2; ++h) {  // low nibbles: rows 0..31, high: rows 32..63
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(nib[h])));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(nib[h], 1)));
            const __m512bh r = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(hi, s[2 * h + 1], zz[2 * h + 1]),
                                                   _mm512_fmadd_ps(lo, s[2 * h], zz[2 * h]));
            _mm512_storeu_si512(out + 32 * h, (__m512i)r);
          }
        }
      }
    }
  });
}

// Many rows (prefill): the weight dequantized to bf16 a chunk of blocks at a time, then a bf16 GEMM. Rounding
// the weight to bf16 adds at most 2^-9 relative error per weight, which the bf16 activations already carry;
// the whole layer is never held in bf16 (chunks of kPrefillBlocks blocks).
constexpr int64_t kPrefillBlocks = 16;

inline void prefill(const at::Tensor& x, const uint8_t* w, const uint16_t* sz, at::Tensor& y, int64_t full,
                    int64_t K, int64_t N, int64_t group) {
  for (int64_t b0 = 0; b0 < full / kBlockN; b0 += kPrefillBlocks) {
    const int64_t b1 = std::min(full / kBlockN, b0 + kPrefillBlocks), cols = (b1 - b0) * kBlockN;
    at::Tensor wt = at::empty({K, cols}, x.options());
    dequantize_t(w, sz, reinterpret_cast<uint16_t*>(wt.data_ptr<at::BFloat16>()), b0, b1, K, N, group);
    y.narrow(1, b0 * kBlockN, cols).copy_(at::mm(x, wt));
  }
}
#endif

// x [M, K] bf16 @ W^T -> [M, N] bf16, W = (w [N, K/2] uint8, group, sz [K/group, N, 2] bf16) in torch's layout.
// Our few-row kernel for up to kMaxRows rows, dequantized blocks + bf16 GEMM beyond, torch's kernel for weights
// ours do not take. The last N % 64 rows (a part block, packed in another layout)
// always go to torch's kernel, so a layer's rows get the same kernel whether or not it is concatenated with others.
inline at::Tensor mm(const at::Tensor& x_in, const at::Tensor& w, int64_t group, const at::Tensor& sz) {
  if (!weight_fits(w, group, sz) || x_in.scalar_type() != at::kBFloat16 || x_in.dim() != 2 || x_in.size(0) < 1)
    return at::_weight_int4pack_mm_for_cpu(x_in, w, group, sz);
#ifdef MINICPM4_INT4_KERNEL
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  TORCH_CHECK(K == w.size(1) * 2, "int4 mm: x has ", K, " columns, the weight ", w.size(1) * 2);
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  const int64_t full = N / kBlockN * kBlockN;
  at::Tensor y = at::empty({M, N}, x.options());
  if (full < N)
    y.narrow(1, full, N - full)
        .copy_(at::_weight_int4pack_mm_for_cpu(x, w.narrow(0, full, N - full), group, sz.narrow(1, full, N - full).contiguous()));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  if (M > kMaxRows) {
    prefill(x, wp, szp, y, full, K, N, group);
    return y;
  }
  std::vector<float> sx(M * G);  // group sums of x, fp32 in column order
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += static_cast<float>(xb[m * K + k]);
      sx[m * G + g] = s;
    }
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, full / kBlockN, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t m = 0; m < M;) {  // chunks of kChunk rows, the last one 1..kChunk
        const int64_t mb = std::min<int64_t>(M - m, kChunk);
        const uint16_t* xm = xp + m * K;
        const float* sm = sx.data() + m * G;
        uint16_t* ym = yp + m * N;
        switch (mb) {
          case 1: block<1>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 2: block<2>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 3: block<3>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 4: block<4>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 5: block<5>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 6: block<6>(xm, sm, wp, szp, ym, b, K, N, group); break;
          case 7: block<7>(xm, sm, wp, szp, ym, b, K, N, group); break;
          default: block<8>(xm, sm, wp, szp, ym, b, K, N, group); break;
        }
        m += mb;
      }
    }
  });
  return y;
#else
  return at::_weight_int4pack_mm_for_cpu(x_in, w, group, sz);  // not reached: weight_fits() is false
#endif
}

}  // namespace int4
