// Int4 weight products on Int4Linear's weight layout (below): a few-row kernel (decode, tree verification, the
// draft's passes) and, for many rows (prefill), blocks of the weight dequantized for a GEMM.
//
// Why our own: torch's _weight_int4pack_mm_for_cpu turns each weight into fp32 and multiplies with fp32 FMAs,
// unpacks the weights again for every block of 4 activation rows, and rounds a row differently depending on the
// rows beside it. Here each 4-bit weight is unpacked once per call for all rows and multiplied by int8
// activations with integer dot products (on avx512_bf16 CPUs too: this replaced a vdpbf16ps kernel on the bf16
// activations, which it beats at 1 to 16 rows; BENCHMARKS.md has the measurements). Many rows (prefill) take a
// GEMM on dequantized blocks: bf16 on avx512_bf16, fp32 on every other tier (where a bf16 GEMM, without native
// bf16 dot products, is several times slower than fp32).
//
// Layout (quant/int4.py's pack(), the same bytes on every machine): output rows in blocks of 64; for block b and
// input column k, 32 bytes at w[(b * K + k) * 32 ..]: byte d (d < 32) holds row 64b + d in its low nibble and row
// 64b + 32 + d in its high nibble. The last t = N % 64 rows (a part block, t even) follow, t / 2 bytes per column:
// byte j of column k, at w[full * K / 2 + k * t / 2 + j] (full = N - t), holds part-block rows 2j (low) and 2j + 1
// (high). This is what torch's AVX-512 build of _convert_weight_to_int4pack_for_cpu writes; torch's layout
// follows its runtime CPU capability (AVX2: 32-row blocks; default, as on aarch64: 16 or 32 rows in pairs), so
// we pack ourselves and never read a tensor torch packed. Per group g of `group` columns, sz[g, n] =
// (scale, zero) bf16, and
//   w[n, k] = (q - 8) * scale + zero,   q in 0..15.
//
// Math (llama.cpp's Q4_1 x Q8_1): each row's group g of x is quantized to int8 (int8_gemm.h
// quantize_activations: dx = max|x| / 127, x8 = round_half_even(x / dx)), and
//   I[m, n, g] = sum_{k in g} q[n, k] x8[m, k],   S[m, g] = sum_{k in g} x8[m, k]     (exact int32)
//   y[m, n]    = bf16( sum_g dx[m, g] * (scale * I + (zero - 8 scale) * S) )          (fp32, groups in order)
// which is exactly x^ @ W^T for the dequantized activations x^ = dx * x8 (S is the group sum of x^, not of x, so
// that the zero term matches the product term). The extra rounding: |x - x^| <= dx / 2 per element, so an
// output moves by at most sum_g dx[m, g] / 2 * sum_{k in g} |w[n, k]| from x @ W^T; in greedy decoding of the
// default model this changes tokens after a few dozen (BENCHMARKS.md) and not how often the token is the fp32
// model's (tests/quant/test_int4.py). quant/int4.py's Int4Linear.integer_reference is this formula; the tests
// hold every tier to it and, at that bound, to the float weights.
//
// Each output's operations are the same whatever the number of rows in the call (integer sums are exact, the
// fp32 steps run per row in a fixed order), so a row's result never depends on the rows beside it: speculative
// verification equals plain decode, and a request's greedy tokens do not change with its batch neighbours.
//
// The integer products by tier: the code q (0..15) is the unsigned operand and x8 the signed one, 4 columns per
// 32-bit lane, so the layout's 4 columns k..k+3 of a block are transposed into lanes (byte unpacks: lane d = bytes
// d of the 4 columns) and their nibbles split: avx512 (and avx512_bf16) vpdpbusd, avx2 vpmaddubsw (16-bit pair
// sums, 8 column quads summed in 16 bits: 8 * 2 * 15 * 127 < 2^15) + vpmaddwd, neon_dotprod (and neon_bf16) sdot,
// neon smull + sadalp, scalar C++.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "int8_gemm.h"  // quantize_activations, bf16_to_float
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MINICPM4_INT4_BF16 1  // prefill dequantizes to bf16 for a bf16 GEMM (native bf16 dot products)
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MINICPM4_INT4_VNNI 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define MINICPM4_INT4_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define MINICPM4_INT4_NEON 1
#endif
#define MINICPM4_INT4_KERNEL 1  // every tier has a few-row kernel

namespace int4 {

// The code path int4 products take in this build (minicpm4 info --system prints it).
inline const char* path() {
#if defined(MINICPM4_INT4_VNNI) && defined(MINICPM4_INT4_BF16)
  return "avx512 (vpdpbusd, int8 activations); prefill: bf16 GEMM";
#elif defined(MINICPM4_INT4_VNNI)
  return "avx512 (vpdpbusd, int8 activations)";
#elif defined(MINICPM4_INT4_AVX2)
  return "avx2 (vpmaddubsw, int8 activations)";
#elif defined(MINICPM4_INT4_NEON) && defined(__ARM_FEATURE_DOTPROD)
  return "neon_dotprod (sdot, int8 activations)";
#elif defined(MINICPM4_INT4_NEON)
  return "neon (smull + sadalp, int8 activations)";
#else
  return "scalar (C++, int8 activations)";
#endif
}

constexpr int64_t kBlockN = 64;
constexpr int64_t kMaxRows = 16;  // rows per call the few-row kernel takes; more go to prefill()

// block_int<MB> computes rows 64b .. 64b + 63 of y for MB activation rows (x8, dx, S and y
// offset to the first of them). Each tier sums I[m, n, g] for the block into 32-bit lanes in its own order of
// the block's rows, lane p holding row row_of(p), and keeps the fp32 outputs in that order until the end.

#if defined(MINICPM4_INT4_VNNI)
constexpr int64_t kIntChunk = 4;  // activation rows per pass: 4 accumulators (64 rows) each
// Lane p = 16 j + l of accumulator j: j = 2 hi + part, rows 32 hi + base[part][l / 4] + l % 4 (the unpacks below)
inline int row_of(int p) {
  static constexpr int base[2][4] = {{0, 16, 4, 20}, {8, 24, 12, 28}};
  const int j = p / 16, l = p % 16;
  return 32 * (j / 2) + base[j % 2][l / 4] + l % 4;
}

template <int MB>
inline void block_int(const int8_t* x8, const float* dx, const int32_t* xs, const uint8_t* w, const uint16_t* sz,
                      uint16_t* y, int64_t b, int64_t K, int64_t N, int64_t group) {
  const int64_t G = K / group;
  const uint8_t* wb = w + b * K * 32;
  const __m512i low = _mm512_set1_epi8(0x0F), zmask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000));
  const __m512i idx[2] = {_mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                          _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31)};
  __m512 o[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) o[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_si512();
    for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
      __m256i c[4];
      for (int i = 0; i < 4; ++i) c[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (k + i) * 32));
      // per 128-bit lane, bytes d of columns k, k+1 (then k+2, k+3) in 16-bit pairs, then 32-bit quads
      const __m256i a = _mm256_unpacklo_epi8(c[0], c[1]), bb = _mm256_unpackhi_epi8(c[0], c[1]);
      const __m256i cc = _mm256_unpacklo_epi8(c[2], c[3]), d = _mm256_unpackhi_epi8(c[2], c[3]);
      // quads of bytes d = 0-3 | 16-19 | 4-7 | 20-23, and 8-11 | 24-27 | 12-15 | 28-31
      const __m512i q01 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi16(a, cc)),
                                             _mm256_unpackhi_epi16(a, cc), 1);
      const __m512i q23 = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_unpacklo_epi16(bb, d)),
                                             _mm256_unpackhi_epi16(bb, d), 1);
      const __m512i v[4] = {_mm512_and_si512(q01, low), _mm512_and_si512(q23, low),
                            _mm512_and_si512(_mm512_srli_epi16(q01, 4), low),
                            _mm512_and_si512(_mm512_srli_epi16(q23, 4), low)};
      for (int m = 0; m < MB; ++m) {
        int32_t quad;  // x8[m, k .. k + 3]
        std::memcpy(&quad, x8 + m * K + k, 4);
        const __m512i xq = _mm512_set1_epi32(quad);
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], v[j], xq);
      }
    }
    for (int j = 0; j < 4; ++j) {
      // (scale, zero) pairs of rows 32 hi + 0..15 and 32 hi + 16..31, picked into accumulator j's row order
      const uint16_t* zp = sz + (g * N + b * kBlockN + 32 * (j / 2)) * 2;
      const __m512i pair = _mm512_permutex2var_epi32(_mm512_loadu_si512(zp), idx[j % 2], _mm512_loadu_si512(zp + 32));
      const __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(pair, 16));
      const __m512 zz = _mm512_fmadd_ps(_mm512_set1_ps(-8.f), s, _mm512_castsi512_ps(_mm512_and_si512(pair, zmask)));
      for (int m = 0; m < MB; ++m) {
        const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][j]), s,
                                         _mm512_mul_ps(_mm512_set1_ps(static_cast<float>(xs[m * G + g])), zz));
        o[m][j] = _mm512_fmadd_ps(_mm512_set1_ps(dx[m * G + g]), t, o[m][j]);
      }
    }
  }
  alignas(64) float out[MB][64];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) _mm512_store_ps(out[m] + 16 * j, o[m][j]);
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 64; ++p) y[m * N + b * kBlockN + row_of(p)] = at::BFloat16(out[m][p]).x;
}

#elif defined(MINICPM4_INT4_AVX2)
constexpr int64_t kIntChunk = 2;  // activation rows per pass (16 ymm registers)
// Lane p = 8 v + l of output vector v = 4 hi + i (quad vector i, nibble hi): l < 4 rows 4i + l, else 16 + 4i + l - 4
inline int row_of(int p) {
  const int v = p / 8, l = p % 8, hi = v / 4, i = v % 4;
  return 32 * hi + (l < 4 ? 4 * i + l : 16 + 4 * i + l - 4);
}

template <int MB>
inline void block_int(const int8_t* x8, const float* dx, const int32_t* xs, const uint8_t* w, const uint16_t* sz,
                      uint16_t* y, int64_t b, int64_t K, int64_t N, int64_t group) {
  const int64_t G = K / group;
  const uint8_t* wb = w + b * K * 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i zmask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000));
  __m256 o[MB][8];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 8; ++v) o[m][v] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    for (int h = 0; h < 2; ++h) {  // bytes d in 0-7 | 16-23 (unpacklo), then 8-15 | 24-31 (unpackhi)
      __m256i acc[MB][4];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_setzero_si256();
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
        __m256i a16[MB][4];  // 16-bit sums of up to 8 column quads
        for (int m = 0; m < MB; ++m)
          for (int j = 0; j < 4; ++j) a16[m][j] = _mm256_setzero_si256();
        for (int64_t k = k0; k < std::min(k0 + 32, (g + 1) * group); k += 4) {
          __m256i c[4];
          for (int i = 0; i < 4; ++i) c[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (k + i) * 32));
          const __m256i a = h ? _mm256_unpackhi_epi8(c[0], c[1]) : _mm256_unpacklo_epi8(c[0], c[1]);
          const __m256i cc = h ? _mm256_unpackhi_epi8(c[2], c[3]) : _mm256_unpacklo_epi8(c[2], c[3]);
          const __m256i q0 = _mm256_unpacklo_epi16(a, cc), q1 = _mm256_unpackhi_epi16(a, cc);
          const __m256i v[4] = {_mm256_and_si256(q0, low), _mm256_and_si256(q1, low),
                                _mm256_and_si256(_mm256_srli_epi16(q0, 4), low),
                                _mm256_and_si256(_mm256_srli_epi16(q1, 4), low)};
          for (int m = 0; m < MB; ++m) {
            int32_t quad;
            std::memcpy(&quad, x8 + m * K + k, 4);
            const __m256i xq = _mm256_set1_epi32(quad);
            for (int j = 0; j < 4; ++j) a16[m][j] = _mm256_add_epi16(a16[m][j], _mm256_maddubs_epi16(v[j], xq));
          }
        }
        for (int m = 0; m < MB; ++m)
          for (int j = 0; j < 4; ++j) acc[m][j] = _mm256_add_epi32(acc[m][j], _mm256_madd_epi16(a16[m][j], ones));
      }
      for (int j = 0; j < 4; ++j) {
        const int i = 2 * h + (j & 1), hi = j >> 1, v = 4 * hi + i;
        const uint16_t* zp = sz + (g * N + b * kBlockN + 32 * hi + 4 * i) * 2;  // rows 4i.. and 16 + 4i..
        const __m256i pair = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(zp + 32),
                                                 reinterpret_cast<const __m128i*>(zp));
        const __m256 s = _mm256_castsi256_ps(_mm256_slli_epi32(pair, 16));
        const __m256 zz = _mm256_fmadd_ps(_mm256_set1_ps(-8.f), s, _mm256_castsi256_ps(_mm256_and_si256(pair, zmask)));
        for (int m = 0; m < MB; ++m) {
          const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m][j]), s,
                                           _mm256_mul_ps(_mm256_set1_ps(static_cast<float>(xs[m * G + g])), zz));
          o[m][v] = _mm256_fmadd_ps(_mm256_set1_ps(dx[m * G + g]), t, o[m][v]);
        }
      }
    }
  }
  alignas(32) float out[MB][64];
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < 8; ++v) _mm256_store_ps(out[m] + 8 * v, o[m][v]);
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 64; ++p) y[m * N + b * kBlockN + row_of(p)] = at::BFloat16(out[m][p]).x;
}

#elif defined(MINICPM4_INT4_NEON)
#if defined(__ARM_FEATURE_DOTPROD)
constexpr int64_t kIntChunk = 2;  // 8 int32x4 accumulators per row
#else
constexpr int64_t kIntChunk = 1;  // 16 (pairs of products summed into two int32x4 per 4 rows)
#endif
inline int row_of(int p) { return p; }  // lanes in row order: p = 32 hi + 16 h + 4 i + l

template <int MB>
inline void block_int(const int8_t* x8, const float* dx, const int32_t* xs, const uint8_t* w, const uint16_t* sz,
                      uint16_t* y, int64_t b, int64_t K, int64_t N, int64_t group) {
  const int64_t G = K / group;
  const uint8_t* wb = w + b * K * 32;
  const uint8x16_t low = vdupq_n_u8(0x0F);
  float out[MB][64] = {};
  for (int64_t g = 0; g < G; ++g) {
    for (int h = 0; h < 2; ++h) {  // bytes 16h .. 16h + 15 of each column: rows 16h + d (low), 32 + 16h + d (high)
#if defined(__ARM_FEATURE_DOTPROD)
      int32x4_t acc[MB][8];
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 8; ++j) acc[m][j] = vdupq_n_s32(0);
#else
      int32x4_t acc[MB][8][2];  // lanes (row, columns k k+1 | k+2 k+3) of rows 0-1 and 2-3 of the quad vector
      for (int m = 0; m < MB; ++m)
        for (int j = 0; j < 8; ++j) acc[m][j][0] = acc[m][j][1] = vdupq_n_s32(0);
#endif
      for (int64_t k = g * group; k < (g + 1) * group; k += 4) {
        uint8x16_t c[4];
        for (int i = 0; i < 4; ++i) c[i] = vld1q_u8(wb + (k + i) * 32 + 16 * h);
        const uint8x16_t z01a = vzip1q_u8(c[0], c[1]), z01b = vzip2q_u8(c[0], c[1]);
        const uint8x16_t z23a = vzip1q_u8(c[2], c[3]), z23b = vzip2q_u8(c[2], c[3]);
        uint8x16_t q[4];  // quads of bytes d = 4i .. 4i + 3
        q[0] = vreinterpretq_u8_u16(vzip1q_u16(vreinterpretq_u16_u8(z01a), vreinterpretq_u16_u8(z23a)));
        q[1] = vreinterpretq_u8_u16(vzip2q_u16(vreinterpretq_u16_u8(z01a), vreinterpretq_u16_u8(z23a)));
        q[2] = vreinterpretq_u8_u16(vzip1q_u16(vreinterpretq_u16_u8(z01b), vreinterpretq_u16_u8(z23b)));
        q[3] = vreinterpretq_u8_u16(vzip2q_u16(vreinterpretq_u16_u8(z01b), vreinterpretq_u16_u8(z23b)));
        int8x16_t v[8];  // j = 4 hi + i
        for (int i = 0; i < 4; ++i) {
          v[i] = vreinterpretq_s8_u8(vandq_u8(q[i], low));
          v[4 + i] = vreinterpretq_s8_u8(vshrq_n_u8(q[i], 4));
        }
        for (int m = 0; m < MB; ++m) {
          int32_t quad;
          std::memcpy(&quad, x8 + m * K + k, 4);
          const int8x16_t xq = vreinterpretq_s8_s32(vdupq_n_s32(quad));
          for (int j = 0; j < 8; ++j) {
#if defined(__ARM_FEATURE_DOTPROD)
            acc[m][j] = vdotq_s32(acc[m][j], v[j], xq);
#else
            acc[m][j][0] = vpadalq_s16(acc[m][j][0], vmull_s8(vget_low_s8(v[j]), vget_low_s8(xq)));
            acc[m][j][1] = vpadalq_s16(acc[m][j][1], vmull_high_s8(v[j], xq));
#endif
          }
        }
      }
      for (int j = 0; j < 8; ++j) {
        const int r0 = 32 * (j / 4) + 16 * h + 4 * (j % 4);
        const uint32x4_t pair = vld1q_u32(reinterpret_cast<const uint32_t*>(sz + (g * N + b * kBlockN + r0) * 2));
        const float32x4_t s = vreinterpretq_f32_u32(vshlq_n_u32(pair, 16));
        const float32x4_t zz = vfmaq_n_f32(vreinterpretq_f32_u32(vandq_u32(pair, vdupq_n_u32(0xFFFF0000u))), s, -8.f);
        for (int m = 0; m < MB; ++m) {
#if defined(__ARM_FEATURE_DOTPROD)
          const int32x4_t i = acc[m][j];
#else
          const int32x4_t i = vpaddq_s32(acc[m][j][0], acc[m][j][1]);
#endif
          const float32x4_t t = vfmaq_f32(vmulq_n_f32(zz, static_cast<float>(xs[m * G + g])), vcvtq_f32_s32(i), s);
          vst1q_f32(out[m] + r0, vfmaq_n_f32(vld1q_f32(out[m] + r0), t, dx[m * G + g]));
        }
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 64; ++p) y[m * N + b * kBlockN + p] = at::BFloat16(out[m][p]).x;
}

#else
constexpr int64_t kIntChunk = 4;
inline int row_of(int p) { return p; }

template <int MB>
inline void block_int(const int8_t* x8, const float* dx, const int32_t* xs, const uint8_t* w, const uint16_t* sz,
                      uint16_t* y, int64_t b, int64_t K, int64_t N, int64_t group) {
  const int64_t G = K / group;
  const uint8_t* wb = w + b * K * 32;
  float out[MB][64] = {};
  for (int64_t g = 0; g < G; ++g) {
    int32_t acc[MB][64] = {};
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      const uint8_t* col = wb + k * 32;
      for (int m = 0; m < MB; ++m) {
        const int32_t xv = x8[m * K + k];
        for (int d = 0; d < 32; ++d) {
          acc[m][d] += (col[d] & 15) * xv;
          acc[m][32 + d] += (col[d] >> 4) * xv;
        }
      }
    }
    for (int r = 0; r < 64; ++r) {
      const uint16_t* pair = sz + (g * N + b * kBlockN + r) * 2;
      const float s = int8::bf16_to_float(pair[0]), zz = int8::bf16_to_float(pair[1]) - 8.f * s;
      for (int m = 0; m < MB; ++m)  // the SIMD tiers' step, t = fma(I, s, S zz); o = fma(dx, t, o), without FMAs
        out[m][r] += dx[m * G + g] * (static_cast<float>(acc[m][r]) * s + static_cast<float>(xs[m * G + g]) * zz);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < 64; ++p) y[m * N + b * kBlockN + p] = at::BFloat16(out[m][p]).x;
}
#endif

// block_int<mb> for 1 <= mb <= MB
template <int MB>
inline void block_int_rows(int64_t mb, const int8_t* x8, const float* dx, const int32_t* xs, const uint8_t* w,
                           const uint16_t* sz, uint16_t* y, int64_t b, int64_t K, int64_t N, int64_t group) {
  if (mb == MB) return block_int<MB>(x8, dx, xs, w, sz, y, b, K, N, group);
  if constexpr (MB > 1) block_int_rows<MB - 1>(mb, x8, dx, xs, w, sz, y, b, K, N, group);
}

// The weight's arguments as Int4Linear holds them (a TORCH_CHECK error naming the argument otherwise).
inline void check_weight(const at::Tensor& w, int64_t group, const at::Tensor& sz) {
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2, "int4 mm: the weight must be uint8 [N, K/2], got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1) * 2;
  TORCH_CHECK(N % 2 == 0, "int4 mm: the weight has ", N, " rows, not an even number");
  TORCH_CHECK(group > 0 && group % 4 == 0 && K % group == 0, "int4 mm: group size ", group,
              " must be a multiple of 4 dividing K = ", K);
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 3 && sz.size(0) == K / group && sz.size(1) == N &&
                  sz.size(2) == 2,
              "int4 mm: scales_and_zeros must be bf16 [", K / group, ", ", N, ", 2], got ", sz.scalar_type(), " ",
              sz.sizes());
}

// Whether the few-row kernel and the prefill GEMM take rows of this weight: at least one whole 64-row block.
inline bool weight_fits(const at::Tensor& w) { return w.size(0) >= kBlockN; }

// Whether mm() runs the few-row kernel (1..kMaxRows bf16 rows) for this call.
inline bool supported(const at::Tensor& x, const at::Tensor& w, int64_t group, const at::Tensor& sz) {
  check_weight(w, group, sz);
  return weight_fits(w) && x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.size(0) >= 1 &&
         x.size(0) <= kMaxRows && x.size(1) == w.size(1) * 2;
}

#ifdef MINICPM4_INT4_BF16
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
#else
// Blocks [b0, b1) dequantized to fp32, transposed: wt[k, (b - b0) * 64 + r] = q * scale + (zero - 8 scale) of
// row 64 b + r. Column k of a block is 32 bytes whose low nibbles are rows 0..31 and high nibbles rows 32..63, so
// each (block, k) writes 64 contiguous values (the compiler vectorizes the loops with the tier's flags).
inline void dequantize_t(const uint8_t* w, const uint16_t* sz, float* wt, int64_t b0, int64_t b1, int64_t K,
                         int64_t N, int64_t group) {
  const int64_t ld = (b1 - b0) * kBlockN;
  at::parallel_for(b0, b1, 1, [&](int64_t a, int64_t e) {
    for (int64_t b = a; b < e; ++b) {
      for (int64_t g = 0; g < K / group; ++g) {
        float s[64], zz[64];
        for (int r = 0; r < 64; ++r) {
          const uint16_t* pair = sz + (g * N + b * kBlockN + r) * 2;
          s[r] = int8::bf16_to_float(pair[0]);
          zz[r] = int8::bf16_to_float(pair[1]) - 8.f * s[r];
        }
        for (int64_t k = g * group; k < (g + 1) * group; ++k) {
          const uint8_t* col = w + (b * K + k) * 32;
          float* out = wt + k * ld + (b - b0) * kBlockN;
          for (int d = 0; d < 32; ++d) {
            out[d] = static_cast<float>(col[d] & 15) * s[d] + zz[d];
            out[32 + d] = static_cast<float>(col[d] >> 4) * s[32 + d] + zz[32 + d];
          }
        }
      }
    }
  });
}

// Many rows (prefill): the weight dequantized to fp32 a chunk of blocks at a time, x converted to fp32 (exact),
// an fp32 GEMM, the output rounded to bf16. Without native bf16 dot products this is several times faster than a
// bf16 GEMM; the whole layer is never held in fp32 (chunks of kPrefillBlocks blocks).
constexpr int64_t kPrefillBlocks = 16;

inline void prefill(const at::Tensor& x, const uint8_t* w, const uint16_t* sz, at::Tensor& y, int64_t full,
                    int64_t K, int64_t N, int64_t group) {
  const at::Tensor xf = x.to(at::kFloat);
  for (int64_t b0 = 0; b0 < full / kBlockN; b0 += kPrefillBlocks) {
    const int64_t b1 = std::min(full / kBlockN, b0 + kPrefillBlocks), cols = (b1 - b0) * kBlockN;
    at::Tensor wt = at::empty({K, cols}, xf.options());
    dequantize_t(w, sz, wt.data_ptr<float>(), b0, b1, K, N, group);
    y.narrow(1, b0 * kBlockN, cols).copy_(at::mm(xf, wt));
  }
}
#endif

// The part block (rows full .. N - 1, t = N - full < 64, packed in pairs: see Layout): y[:, full:] = x @ W^T with
// those rows dequantized to fp32 (one FMA each, as dequantize_t) and an fp32 GEMM on x converted to fp32 (exact).
// At most 62 rows of a layer, so plain loops (as the prefill GEMM's, its rounding may depend on the row count).
inline void part_block(const at::Tensor& x, const uint8_t* w, const uint16_t* sz, at::Tensor& y, int64_t full,
                       int64_t K, int64_t N, int64_t group) {
  const int64_t t = N - full;
  at::Tensor wd = at::empty({t, K}, x.options().dtype(at::kFloat));
  float* out = wd.data_ptr<float>();
  const uint8_t* wt = w + full * K / 2;
  for (int64_t r = 0; r < t; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const uint16_t* pair = sz + ((k / group) * N + full + r) * 2;
      const float s = int8::bf16_to_float(pair[0]), zz = int8::bf16_to_float(pair[1]) - 8.f * s;
      const uint8_t byte = wt[k * t / 2 + r / 2];
      out[r * K + k] = static_cast<float>(r % 2 ? byte >> 4 : byte & 15) * s + zz;
    }
  }
  y.narrow(1, full, t).copy_(at::mm(x.to(at::kFloat), wd.t()));
}

// x [M, K] @ W^T -> [M, N] in x's dtype (computed from x in bf16), W = (w [N, K/2] uint8, group, sz [K/group, N, 2]
// bf16) in Int4Linear's layout. Our few-row kernel for up to kMaxRows rows, dequantized blocks + GEMM beyond; the
// last N % 64 rows (a part block) always take part_block(), so a layer's rows get the same kernel whether or not
// it is concatenated with others.
inline at::Tensor mm(const at::Tensor& x_in, const at::Tensor& w_in, int64_t group, const at::Tensor& sz_in) {
  check_weight(w_in, group, sz_in);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == w_in.size(1) * 2, "int4 mm: x must be [M, ", w_in.size(1) * 2,
              "], got ", x_in.sizes());
  if (x_in.scalar_type() != at::kBFloat16)
    return mm(x_in.to(at::kBFloat16), w_in, group, sz_in).to(x_in.scalar_type());
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), sz = sz_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), G = K / group;
  const at::BFloat16* xb = x.data_ptr<at::BFloat16>();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xb);
  const int64_t full = N / kBlockN * kBlockN;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(sz.data_ptr<at::BFloat16>());
  if (full < N) part_block(x, wp, szp, y, full, K, N, group);
  if (full == 0) return y;
  if (M > kMaxRows) {
    prefill(x, wp, szp, y, full, K, N, group);
    return y;
  }
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  std::vector<int8_t> x8(M * K);  // int8 activations per group (int8_gemm.h)
  std::vector<float> dx(M * G);
  std::vector<int32_t> xs(M * G);
  int8::quantize_activations(xp, M, K, group, x8.data(), dx.data(), xs.data());
  at::parallel_for(0, full / kBlockN, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = 0; m < M; m += kIntChunk)
        block_int_rows<kIntChunk>(std::min<int64_t>(M - m, kIntChunk), x8.data() + m * K, dx.data() + m * G,
                                  xs.data() + m * G, wp, szp, yp + m * N, b, K, N, group);
  });
  return y;
}

}  // namespace int4
