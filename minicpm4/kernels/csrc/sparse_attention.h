#pragma once

// InfLLM v2 in C++ (bf16): block selection and sparse attention for one query of one KV group per task, no
// gathers. decode_into runs a decode step of one layer in one call; sparse_prefill.h's prefill_into runs a chunk
// of queries with this selection (select_by) and its own attention over groups of queries.
//
// Why: the pure-PyTorch step (sparse/decode.py select_one + attend_one, the reference) is ~40 small torch ops
// plus a gather copy of the selected keys and values; at 32K keys its fixed cost is most of the step. Here
// each (row b, KV head g) is one task of at::parallel_for, and everything happens on registers and a few KB
// of thread-local scratch:
//
//   stage 1   s2[i, j] = bf16(qs_i . C2_j) / sqrt(D)             j < n2 (coarse kernels complete at t)
//             lse_i    = logsumexp_j s2[i, j]                      (+inf when n2 = 0: p = 0 below)
//             S[j]     = sum_i exp(bf16(qs_i . C1_j) / sqrt(D) - lse_i)     j < n1, i over the G heads of g
//   stage 1b  Bk[b]    = max S[j], j in [r b - 1, r b + r - 1] (r = block / stride; missing kernels are 0)
//             Bk[b]    = +inf for b < init_blocks and qb - local_blocks <= b <= qb   (qb = t / block)
//   stage 1c  top-K blocks by (score desc, index asc), ascending; slots past the row's blocks are -1
//   stage 2   o_i = sum_p bf16(softmax_p(q_i . K_p / sqrt(D))) V_p   over the tokens p <= t of those blocks,
//             read in place from the KV cache (any strides with a contiguous last dim)
//
// This header holds the kernel and its Python face (bound in ops.cpp), and decode_stack.h's layer
// stack calls it (with the compressed-key upkeep below) when a model runs InfLLM v2.
//
// Rounding follows the reference: stage-1 dot products are rounded to bf16 (the reference's bf16 matmul
// output), stage-2 scores and softmax are fp32, probabilities are rounded to bf16 before P V (SDPA-style), and
// the output is rounded to bf16 once. tests/sparse/test_sparse_native.py checks selection and output against it.
//
// Dot products: every tier widens bf16 to fp32 by a 16-bit shift (bf16 is the top half of an fp32) and multiplies
// in fp32 (FMA where the tier has it), on ATen's Vectorized<float> (W = 16 lanes on avx512, 8 on avx2, 4 on NEON) or
// SSE2 on the x86 scalar tier (4 lanes: ATen's fallback there is an array whose loops compile to shuffles). Dot
// products put W dimensions of one key in the lanes (G accumulators per key, the queries widened once) and sum W
// keys' accumulators across lanes in one transpose-add (hsum_tile), so no key is transposed; the avx512 tiers
// instead transpose 16 keys as dword pairs (a 16x16 dword transpose: lanes = 16 keys) and widen each pair by a
// shift and a mask (a third fewer instructions than lanes = dimensions at D = 64). P V puts W output dimensions in
// the lanes, keys in tiles of 64 that stay in L1 while the chunks of D pass over them.
// The int8 KV cache (quant/kv8.py) runs the same loops on int8 rows (T = int8_t): widened by sign extension, the
// dot products and P V in fp32 as above, the row scales applied to the scores and probabilities (scale_columns);
// on avx512 its keys are transposed as dwords of 4 dimensions and each byte sign-extended by a shift pair.
// The avx512_bf16 build runs these fp32 loops too: its vdpbf16ps loops (keys transposed as above, values
// interleaved in pairs, probabilities in bf16) measured 6-10% slower on a Sapphire Rapids core (BENCHMARKS.md,
// issue 16), since a step is bound by reading the scattered blocks and by the softmax, not by multiply-adds.
// exp is the same Cephes polynomial on every tier (exp512 / exp256 / exp_neon / exp_sse2 / exp_poly), and the bf16
// roundings are bit operations in loops the compiler vectorises.
//
// Memory: the selected blocks (64 contiguous keys each) are scattered over the cache, so the hardware prefetcher
// loses the stream at every block; every tier prefetches the key rows, and stage 2's value rows, kAhead rows early.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

namespace infllm {

// The code path of the attention loops (dot products, softmax) in this build; dense_attention.h shares them.
inline const char* path() {
#if defined(__AVX512F__)
  return "avx512 (fp32 FMA, 16 lanes)";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2 (fp32 FMA, 8 lanes)";
#elif defined(__ARM_NEON)
  return "neon (fp32 FMA, 4 lanes)";
#elif defined(__SSE2__)
  return "scalar (SSE2 fp32, 4 lanes)";
#else
  return "scalar (portable fp32)";
#endif
}

using at::BFloat16;
using at::Tensor;

constexpr float kInf = std::numeric_limits<float>::infinity();

inline float round_bf16(float x) { return static_cast<float>(static_cast<BFloat16>(x)); }

// Bit-pattern helpers for loops the compiler vectorises (no branches, no calls): bf16 <-> fp32 by shifts,
// round-to-nearest-even as c10::BFloat16 rounds (finite values; NaN stays NaN).
inline uint32_t bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float from_bits(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
inline float widen(BFloat16 h) { return from_bits(static_cast<uint32_t>(h.x) << 16); }
inline uint32_t rne_bits(float x) { const uint32_t u = bits(x); return u + 0x7FFFu + (u >> 16 & 1u); }
inline float rne_bf16(float x) { return from_bits(rne_bits(x) & 0xFFFF0000u); }
inline BFloat16 narrow(float x) { return BFloat16(static_cast<uint16_t>(rne_bits(x) >> 16), BFloat16::from_bits()); }

// exp(x) for one fp32 (Cephes polynomial, ~1 ulp, as exp512 below); below -87.3 (-inf included) it is 0, above
// 88.3 it is exp(88.3). Round-to-nearest of x log2(e) by adding and subtracting 1.5 * 2^23 (exact for
// |x log2(e)| < 2^22), whose bit pattern then holds n in its low bits: 2^n = bits((pattern - 0x4B400000 + 127) << 23).
inline float exp_poly(float x) {
  const bool live = x >= -87.3f;
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float t = x * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + (r + 1.f);
  const float y = p * from_bits((bits(t) + (127u - 0x4B400000u)) << 23);
  return live ? y : 0.f;
}

// The selected rows are blocks of 64 contiguous keys scattered over the cache, so the hardware prefetcher loses
// the stream at every block boundary; the row pointers are known ahead, so fetch kAhead rows early.
constexpr int64_t kAhead = 96;
template <typename T>  // BFloat16 or int8_t rows (the int8 KV cache, quant/kv8.py)
inline void prefetch_row(const T* r, int64_t D) {
  for (int64_t d = 0; d < D; d += 64 / static_cast<int64_t>(sizeof(T))) __builtin_prefetch(r + d, 0, 1);
}

#if defined(__SSE2__) && !defined(__AVX2__)
#define SPARSE_SSE2 1
// The scalar tier on x86-64: ATen's Vectorized<float> is a plain 8-float array there, whose loops GCC lowers to
// shuffles (measured: slower than the PyTorch reference); SSE2, which every x86-64 CPU has, gives 4 lanes directly.
struct Sse {
  __m128 v;
  Sse() = default;
  Sse(__m128 x) : v(x) {}
  explicit Sse(float x) : v(_mm_set1_ps(x)) {}
  operator __m128() const { return v; }
  static constexpr int size() { return 4; }
  static Sse loadu(const float* p) { return _mm_loadu_ps(p); }
  void store(float* p) const { _mm_storeu_ps(p, v); }
};
inline Sse operator+(Sse a, Sse b) { return _mm_add_ps(a, b); }
inline Sse operator-(Sse a, Sse b) { return _mm_sub_ps(a, b); }
inline Sse operator*(Sse a, Sse b) { return _mm_mul_ps(a, b); }
inline Sse operator/(Sse a, Sse b) { return _mm_div_ps(a, b); }
inline Sse vfma(Sse a, Sse b, Sse c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }  // no FMA: two roundings
inline Sse vmax(Sse a, Sse b) { return _mm_max_ps(a, b); }
using Vec = Sse;
#else
using Vec = at::vec::Vectorized<float>;
inline Vec vfma(const Vec& a, const Vec& b, const Vec& c) { return at::vec::fmadd(a, b, c); }
inline Vec vmax(const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }
#endif

constexpr int W = Vec::size();

// W bf16 -> W fp32 lanes.
inline Vec load_bf16(const BFloat16* p) {
#if defined(__AVX512F__)
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
#elif defined(__AVX2__)
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
#elif defined(__ARM_NEON) && !defined(CPU_CAPABILITY_SVE256)
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
#elif defined(SPARSE_SSE2)  // zeros interleaved below each bf16: the 16-bit shift
  return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), _mm_loadl_epi64((const __m128i*)p)));
#else
  alignas(64) float f[W];
  for (int k = 0; k < W; ++k) f[k] = widen(p[k]);
  return Vec::loadu(f);
#endif
}

// W int8 -> W fp32 lanes (sign-extended, converted exactly).
inline Vec load_i8(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
#elif defined(__ARM_NEON) && !defined(CPU_CAPABILITY_SVE256)
  int32_t four;
  std::memcpy(&four, p, 4);
  const int16x4_t h = vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four))));
  return vcvtq_f32_s32(vmovl_s16(h));
#elif defined(SPARSE_SSE2)  // each byte copied up into the top of its dword, then an arithmetic shift down
  int32_t four;
  std::memcpy(&four, p, 4);
  const __m128i x = _mm_cvtsi32_si128(four);
  return _mm_cvtepi32_ps(_mm_srai_epi32(_mm_unpacklo_epi16(_mm_unpacklo_epi8(x, x), _mm_unpacklo_epi8(x, x)), 24));
#else
  alignas(64) float f[W];
  for (int k = 0; k < W; ++k) f[k] = p[k];
  return Vec::loadu(f);
#endif
}

inline Vec load_row(const BFloat16* p) { return load_bf16(p); }
inline Vec load_row(const int8_t* p) { return load_i8(p); }

// a[0..W) -> the vector whose lane w is the sum of a[w]'s lanes (a transpose-add tree).
inline Vec hsum_tile(const Vec* a) {
#if defined(__AVX512F__)
  __m512 b[8], c[4];
  for (int k = 0; k < 8; ++k) {  // b[k] quarters: a[2k] (q0+q2, q1+q3), a[2k+1] (q0+q2, q1+q3)
    const __m512 x = a[2 * k], y = a[2 * k + 1];
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int k = 0; k < 4; ++k)  // c[k] quarter L = 4 partial sums of a[4k + L]
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], 0xDD));
  const __m512 e0 = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
  const __m512 e1 = _mm512_add_ps(_mm512_unpacklo_ps(c[2], c[3]), _mm512_unpackhi_ps(c[2], c[3]));
  // quarter L: sums of a[L], a[4 + L], a[8 + L], a[12 + L]
  const __m512 g = _mm512_add_ps(_mm512_shuffle_ps(e0, e1, 0x44), _mm512_shuffle_ps(e0, e1, 0xEE));
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(idx, g);
#elif defined(__AVX2__)
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);  // 128-bit halves: a[0..3], a[4..7]
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
#elif defined(__ARM_NEON) && !defined(CPU_CAPABILITY_SVE256)
  return vpaddq_f32(vpaddq_f32(a[0], a[1]), vpaddq_f32(a[2], a[3]));
#elif defined(SPARSE_SSE2)
  __m128 r0 = a[0], r1 = a[1], r2 = a[2], r3 = a[3];
  _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
  return _mm_add_ps(_mm_add_ps(r0, r1), _mm_add_ps(r2, r3));
#else
  alignas(64) float f[W], s[W];
  for (int w = 0; w < W; ++w) {
    a[w].store(f);
    float t = 0.f;
    for (int k = 0; k < W; ++k) t += f[k];
    s[w] = t;
  }
  return Vec::loadu(s);
#endif
}

#ifdef __AVX512F__
// 16 rows of 16 dwords in r[0..15] -> r[c] lane k = input row k, dword c.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  __m512i s[16];  // s[4k + p], 128-bit lane L = rows 4k..4k+3 at dword 4L + p
  for (int k = 0; k < 4; ++k) {
    s[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    s[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    s[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    s[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int p = 0; p < 4; ++p) {  // 4x4 transpose of 128-bit lanes across s[p], s[4 + p], s[8 + p], s[12 + p]
    __m512i u0 = _mm512_shuffle_i32x4(s[p], s[4 + p], 0x44), u1 = _mm512_shuffle_i32x4(s[p], s[4 + p], 0xEE);
    __m512i u2 = _mm512_shuffle_i32x4(s[8 + p], s[12 + p], 0x44), u3 = _mm512_shuffle_i32x4(s[8 + p], s[12 + p], 0xEE);
    r[p] = _mm512_shuffle_i32x4(u0, u2, 0x88);
    r[4 + p] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
    r[8 + p] = _mm512_shuffle_i32x4(u1, u3, 0x88);
    r[12 + p] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
  }
}

#endif

#ifdef __AVX512F__
// exp for fp32 lanes (Cephes polynomial, ~1 ulp); below -87.3 (-inf included) it is 0.
inline __m512 exp512(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  x = _mm512_min_ps(x, _mm512_set1_ps(88.7f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// exp512 on 8 lanes (AVX2 has no scalef: 2^n is built in the exponent bits, n <= 127 by the clamp at 88.3).
inline __m256 exp256(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

#if defined(__ARM_NEON) && !defined(CPU_CAPABILITY_SVE256)
// exp512 on 4 lanes.
inline float32x4_t exp_neon(float32x4_t x) {
  const uint32x4_t live = vcgeq_f32(x, vdupq_n_f32(-87.3f));
  x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.3f)), vdupq_n_f32(88.3f));
  const float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
  float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
  r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
  float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
  p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
  p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
  p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
  p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
  p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.f)), p, vmulq_f32(r, r));
  const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23);
  return vreinterpretq_f32_u32(vandq_u32(live, vreinterpretq_u32_f32(vmulq_f32(p, vreinterpretq_f32_s32(e)))));
}
#endif

#ifdef SPARSE_SSE2
// exp512 on 4 SSE2 lanes: no FMA, no roundps; n by the 1.5 * 2^23 trick of exp_poly, 2^n in the exponent bits.
inline __m128 exp_sse2(__m128 x) {
  const __m128 live = _mm_cmpge_ps(x, _mm_set1_ps(-87.3f));
  x = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(-87.3f)), _mm_set1_ps(88.3f));
  const __m128 magic = _mm_set1_ps(12582912.f);
  const __m128 n = _mm_sub_ps(_mm_add_ps(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)), magic), magic);
  __m128 r = _mm_sub_ps(x, _mm_mul_ps(n, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(n, _mm_set1_ps(-2.12194440e-4f)));
  __m128 p = _mm_set1_ps(1.9875691500e-4f);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, _mm_mul_ps(r, r)), _mm_add_ps(r, _mm_set1_ps(1.f)));
  const __m128i e = _mm_slli_epi32(_mm_add_epi32(_mm_cvtps_epi32(n), _mm_set1_epi32(127)), 23);
  return _mm_and_ps(live, _mm_mul_ps(p, _mm_castsi128_ps(e)));
}
#endif

// exp of W lanes: the intrinsics above, or exp_poly lane by lane (elsewhere: GCC keeps the clamps' float compares
// as branches under its default -ftrapping-math, so that loop stays scalar).
inline Vec exp_vec(Vec x) {
#if defined(__AVX512F__)
  return exp512(x);
#elif defined(__AVX2__) && defined(__FMA__)
  return exp256(x);
#elif defined(__ARM_NEON) && !defined(CPU_CAPABILITY_SVE256)
  return exp_neon(x);
#elif defined(SPARSE_SSE2)
  return exp_sse2(x);
#else
  alignas(64) float f[W];
  x.store(f);
  for (int k = 0; k < W; ++k) f[k] = exp_poly(f[k]);
  return Vec::loadu(f);
#endif
}

// out[i * ld + j] = q_i . rows[j] (fp32 sums) for i < G, j < n; q [G, D] contiguous; ld >= n rounded up to 16.
// also: rows read next (stage 2's values), prefetched alongside, or nullptr.
// T: the rows' type, BFloat16 or int8_t (the int8 KV cache: the dot products with its integer rows, scaled by the
// caller).
template <int G, typename T = BFloat16>
void dots(const BFloat16* q, int64_t D, const T* const* rows, int64_t n, float* out, int64_t ld,
          const T* const* also = nullptr) {
#if defined(__AVX512F__)
  if (std::is_same_v<T, int8_t> && D % 64 == 0) {  // int8 rows: lanes = 16 keys as for bf16 below, dword = 4 dims
    alignas(64) float qf[G * 256];
    for (int64_t x = 0; x < G * D; ++x) qf[x] = widen(q[x]);
    const int64_t P = D / 4;
    alignas(64) __m512i kt[64];
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t m = std::min<int64_t>(16, n - j0);
      for (int64_t k = j0 + kAhead; k < std::min(n, j0 + kAhead + 16); ++k) {
        prefetch_row(rows[k], D);
        if (also) prefetch_row(also[k], D);
      }
      for (int64_t c = 0; c < P; c += 16) {
        __m512i r[16];
        for (int k = 0; k < 16; ++k)
          r[k] = k < m ? _mm512_loadu_si512(reinterpret_cast<const int8_t*>(rows[j0 + k]) + 4 * c)
                       : _mm512_setzero_si512();
        transpose16(r);
        for (int k = 0; k < 16; ++k) kt[c + k] = r[k];
      }
      __m512 acc[G];
      for (int i = 0; i < G; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < P; ++c) {  // byte b of each dword, sign-extended by a shift pair
        const __m512i x = kt[c];
        const __m512 b0 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 24), 24));
        const __m512 b1 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 16), 24));
        const __m512 b2 = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(x, 8), 24));
        const __m512 b3 = _mm512_cvtepi32_ps(_mm512_srai_epi32(x, 24));
        for (int i = 0; i < G; ++i) {
          const float* qi = qf + i * D + 4 * c;
          acc[i] = _mm512_fmadd_ps(b0, _mm512_set1_ps(qi[0]), acc[i]);
          acc[i] = _mm512_fmadd_ps(b1, _mm512_set1_ps(qi[1]), acc[i]);
          acc[i] = _mm512_fmadd_ps(b2, _mm512_set1_ps(qi[2]), acc[i]);
          acc[i] = _mm512_fmadd_ps(b3, _mm512_set1_ps(qi[3]), acc[i]);
        }
      }
      for (int i = 0; i < G; ++i) _mm512_storeu_ps(out + i * ld + j0, acc[i]);
    }
    return;
  }
  if (std::is_same_v<T, BFloat16> && D % 32 == 0) {  // lanes = 16 keys, transposed as dword pairs as above, each pair widened by shift / mask
    alignas(64) float qf[G * 256];  // the queries in fp32, D <= 256
    for (int64_t x = 0; x < G * D; ++x) qf[x] = widen(q[x]);
    const int64_t P = D / 2;
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    alignas(64) __m512i kt[128];
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      const int64_t m = std::min<int64_t>(16, n - j0);
      for (int64_t k = j0 + kAhead; k < std::min(n, j0 + kAhead + 16); ++k) {
        prefetch_row(rows[k], D);
        if (also) prefetch_row(also[k], D);
      }
      for (int64_t c = 0; c < P; c += 16) {
        __m512i r[16];
        for (int k = 0; k < 16; ++k)
          r[k] = k < m ? _mm512_loadu_si512(reinterpret_cast<const BFloat16*>(rows[j0 + k]) + 2 * c)
                       : _mm512_setzero_si512();
        transpose16(r);
        for (int k = 0; k < 16; ++k) kt[c + k] = r[k];
      }
      __m512 acc[G];
      for (int i = 0; i < G; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t c = 0; c < P; ++c) {
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(kt[c], 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(kt[c], hi));
        for (int i = 0; i < G; ++i) {
          acc[i] = _mm512_fmadd_ps(even, _mm512_set1_ps(qf[i * D + 2 * c]), acc[i]);
          acc[i] = _mm512_fmadd_ps(odd, _mm512_set1_ps(qf[i * D + 2 * c + 1]), acc[i]);
        }
      }
      for (int i = 0; i < G; ++i) _mm512_storeu_ps(out + i * ld + j0, acc[i]);
    }
    return;
  }
#endif
  if (D % W == 0) {
    alignas(64) float qf[G * 256];  // the queries in fp32, D <= 256
    for (int64_t x = 0; x < G * D; ++x) qf[x] = widen(q[x]);
    Vec tile[G][W];  // tile[i][k]: head i's W partial sums of key j0 + k
    for (int64_t j0 = 0; j0 < n; j0 += W) {
      const int64_t m = std::min<int64_t>(W, n - j0);
      for (int64_t k = 0; k < m; ++k) {
        const T* kr = rows[j0 + k];
        if (j0 + k + kAhead < n) {
          prefetch_row(rows[j0 + k + kAhead], D);
          if (also) prefetch_row(also[j0 + k + kAhead], D);
        }
        Vec acc[G];
        for (int i = 0; i < G; ++i) acc[i] = Vec(0.f);
        for (int64_t c = 0; c < D; c += W) {
          const Vec kv = load_row(kr + c);
          for (int i = 0; i < G; ++i) acc[i] = vfma(Vec::loadu(qf + i * D + c), kv, acc[i]);
        }
        for (int i = 0; i < G; ++i) tile[i][k] = acc[i];
      }
      for (int i = 0; i < G; ++i) {
        for (int64_t k = m; k < W; ++k) tile[i][k] = Vec(0.f);
        hsum_tile(tile[i]).store(out + i * ld + j0);
      }
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int i = 0; i < G; ++i) {
      float s = 0.f;
      for (int64_t d = 0; d < D; ++d) s += static_cast<float>(q[i * D + d]) * static_cast<float>(rows[j][d]);
      out[i * ld + j] = s;
    }
}

// o[i, :] = sum_j p[i * ld + j] * rows[j] (fp32 sums) for i < G; p[i * ld + j] = 0 for n <= j < n rounded up to
// 2; o [G, D] fp32.
template <int G, typename T = BFloat16>
void weighted_sum(const float* p, int64_t ld, const T* const* rows, int64_t n, int64_t D, float* o) {
  if (D % W == 0) {
    std::fill(o, o + G * D, 0.f);
    constexpr int64_t kTile = 64;  // keys whose rows stay in L1 while the D / W chunks pass over them
    for (int64_t j0 = 0; j0 < n; j0 += kTile) {
      const int64_t j1 = std::min(n, j0 + kTile);
      for (int64_t c = 0; c < D; c += W) {
        Vec acc[G];
        for (int i = 0; i < G; ++i) acc[i] = Vec::loadu(o + i * D + c);
        for (int64_t j = j0; j < j1; ++j) {
          if (c == 0 && j + kAhead < n) prefetch_row(rows[j + kAhead], D);
          const Vec vv = load_row(rows[j] + c);
          for (int i = 0; i < G; ++i) acc[i] = vfma(Vec(p[i * ld + j]), vv, acc[i]);
        }
        for (int i = 0; i < G; ++i) acc[i].store(o + i * D + c);
      }
    }
    return;
  }
  std::fill(o, o + G * D, 0.f);
  for (int64_t j = 0; j < n; ++j)
    for (int i = 0; i < G; ++i) {
      const float w = static_cast<float>(p[i * ld + j]);
      for (int64_t d = 0; d < D; ++d) o[i * D + d] += w * static_cast<float>(rows[j][d]);
    }
}

// x[0..n) = exp(x + shift) in place.
inline void exp_shift(float* x, int64_t n, float shift) {
  int64_t j = 0;
  const Vec s(shift);
  for (; j + W <= n; j += W) exp_vec(Vec::loadu(x + j) + s).store(x + j);
  for (; j < n; ++j) x[j] = exp_poly(x[j] + shift);
}

// The softmax loops below, a vector at a time (scalar loops with a running max or sum do not vectorise
// without -ffast-math, and at 64K keys they were a fifth of the step). Rounding to bf16 is round-to-nearest-even
// either way (vcvtneps2bf16 also flushes denormals, which no score here reaches).

// x[j] = (round ? bf16(x[j]) : x[j]) * scale in place; returns max_j x[j] (-inf for n = 0).
inline float scale_max(float* x, int64_t n, float scale, bool round) {
  float m = -kInf;
  int64_t j = 0;
  if (round)
    for (int64_t i = 0; i < n; ++i) x[i] = rne_bf16(x[i]) * scale;
  else
    for (int64_t i = 0; i < n; ++i) x[i] *= scale;
  Vec vm(-kInf);
  for (; j + W <= n; j += W) vm = vmax(vm, Vec::loadu(x + j));
  alignas(64) float f[W];
  vm.store(f);
  for (int k = 0; k < W; ++k) m = std::max(m, f[k]);
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

inline float sum(const float* x, int64_t n) {
  float t = 0.f;
  int64_t j = 0;
  Vec acc(0.f);
  for (; j + W <= n; j += W) acc = acc + Vec::loadu(x + j);
  alignas(64) float f[W];
  acc.store(f);
  for (int k = 0; k < W; ++k) t += f[k];
  for (; j < n; ++j) t += x[j];
  return t;
}

// out[j] = bf16(x[j] * c), kept in fp32 (P V then needs no widening in its inner loop).
inline void to_prob(const float* x, int64_t n, float c, float* out) {
  int64_t j = 0;
  for (; j < n; ++j) out[j] = rne_bf16(x[j] * c);
}

struct Params {
  int64_t kernel_size, stride, block, init_blocks, local_blocks, k_sel;
  int64_t topk_local;  // topk + local_blocks: k_sel = min(topk_local, blocks of the longest row)
};

struct Scratch {  // per thread, grown as needed
  std::vector<const BFloat16*> rows, vrows;
  std::vector<const int8_t*> qrows, qvrows;  // the int8 KV cache's rows (step's T = int8_t)
  std::vector<float> kscale, vscale;        // and their scales
  std::vector<float> s, score, blocks;
  std::vector<float> p;
  std::vector<int64_t> order;
  std::vector<float> o;
};

inline int64_t n_kernels(int64_t len, int64_t size, int64_t stride) {
  return len >= size ? (len - size) / stride + 1 : 0;
}

inline int64_t pad16(int64_t n) { return (n + 15) / 16 * 16; }

// Stages 1-1c for one (row, KV head) at position t: the selected blocks, ascending, in w.order[0..K); returns K.
// qs [G, D] contiguous (the stage-1 queries). The decode step and the prefill kernel (sparse_prefill.h) share it.
// dot(level, n, out, ld) writes the G heads' fp32 dot products with the first n compressed keys of C1 (level 1)
// or C2 (level 2) to out[i * ld + j]: the decode step reads the rows in place (select below), the prefill
// kernel from key panels its queries share (sparse_prefill.h).
template <int G, class Dot>
int64_t select_by(Dot&& dot, int64_t t, int64_t D, const Params& P, Scratch& w) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t n1 = n_kernels(t + 1, P.kernel_size, P.stride);
  const int64_t n2 = n_kernels(t + 1, 4 * P.kernel_size, 4 * P.stride);
  const int64_t qb = t / P.block, nb = qb + 1, r = P.block / P.stride;
  const int64_t ld = pad16(std::max(n1, n2));
  w.rows.resize(std::max<int64_t>(w.rows.size(), ld));
  w.s.resize(std::max<int64_t>(w.s.size(), G * ld));

  // stage 1: log-normaliser per head from the coarse kernels
  float lse[G];
  dot(2, n2, w.s.data(), ld);
  for (int i = 0; i < G; ++i) {
    float* s = w.s.data() + i * ld;
    const float m = scale_max(s, n2, scale, true);
    if (n2 == 0) { lse[i] = kInf; continue; }
    exp_shift(s, n2, -m);
    lse[i] = m + std::log(sum(s, n2));
  }
  // fine kernels: S[j] = sum over heads of exp(s1 - lse)
  dot(1, n1, w.s.data(), ld);
  w.score.assign(n1, 0.f);
  for (int i = 0; i < G; ++i) {
    float* s = w.s.data() + i * ld;
    scale_max(s, n1, scale, true);
    exp_shift(s, n1, -lse[i]);
    for (int64_t j = 0; j < n1; ++j) w.score[j] += s[j];
  }
  // stage 1b: max-pool onto blocks, force init and local blocks
  w.blocks.assign(nb, 0.f);
  for (int64_t b = 0; b < nb; ++b) {
    float m = 0.f;
    for (int64_t j = std::max<int64_t>(r * b - 1, 0); j < std::min(r * b + r, n1); ++j) m = std::max(m, w.score[j]);
    w.blocks[b] = (b < P.init_blocks || b >= qb - P.local_blocks) ? kInf : m;
  }
  // stage 1c: top-K by (score desc, index asc), then ascending
  const int64_t K = std::min(P.k_sel, nb);
  w.order.resize(nb);
  std::iota(w.order.begin(), w.order.end(), 0);
  const float* bs = w.blocks.data();
  std::nth_element(w.order.begin(), w.order.begin() + (K - 1), w.order.end(),
                   [bs](int64_t a, int64_t b) { return bs[a] > bs[b] || (bs[a] == bs[b] && a < b); });
  std::sort(w.order.begin(), w.order.begin() + K);
  return K;
}

template <int G>
int64_t select(const BFloat16* qs, const BFloat16* c1, int64_t c1stride, const BFloat16* c2, int64_t c2stride,
               int64_t t, int64_t D, const Params& P, Scratch& w) {
  return select_by<G>(
      [&](int level, int64_t n, float* out, int64_t ld) {
        const BFloat16* c = level == 1 ? c1 : c2;
        const int64_t stride = level == 1 ? c1stride : c2stride;
        for (int64_t j = 0; j < n; ++j) w.rows[j] = c + j * stride;
        dots<G>(qs, D, w.rows.data(), n, out, ld);
      },
      t, D, P, w);
}

// The row-pointer buffers of Scratch for key/value rows of type T.
template <typename T>
std::pair<std::vector<const T*>&, std::vector<const T*>&> row_lists(Scratch& w) {
  if constexpr (std::is_same_v<T, int8_t>) return {w.qrows, w.qvrows};
  else return {w.rows, w.vrows};
}

// The int8 KV cache (quant/kv8.py): scores s[i, j] (dot products with the integer rows) times their key rows'
// scales, and probabilities p[i, j] times their value rows' scales, so P V over the integer rows is P V over
// q * s. G rows of n, leading dimension ld.
template <int G>
void scale_columns(float* x, int64_t ld, const float* scales, int64_t n) {
  for (int i = 0; i < G; ++i)
    for (int64_t j = 0; j < n; ++j) x[i * ld + j] *= scales[j];
}

// One (row, KV head): selection into idx[0..k_sel), attention into out [G, D]. T: the cache's rows, BFloat16, or
// int8_t with one fp32 scale per row at kscale[p], vscale[p] (the int8 KV cache; unused for BFloat16).
template <int G, typename T>
void step_kv(const BFloat16* q, const BFloat16* qs, const T* kbase, const T* vbase, int64_t kstride,
             int64_t vstride, const float* kscale, const float* vscale, const BFloat16* c1, int64_t c1stride,
             const BFloat16* c2, int64_t c2stride, int64_t t, int64_t D, const Params& P, int64_t* idx,
             BFloat16* out, Scratch& w) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t K = select<G>(qs, c1, c1stride, c2, c2stride, t, D, P, w);
  for (int64_t k = 0; k < P.k_sel; ++k) idx[k] = k < K ? w.order[k] : -1;
  w.rows.resize(std::max<int64_t>(w.rows.size(), pad16(P.k_sel * P.block)));
  w.s.resize(std::max<int64_t>(w.s.size(), G * pad16(P.k_sel * P.block)));

  // stage 2: the selected tokens p <= t, in block order: their keys, and the value rows P V reads next
  constexpr bool q8 = std::is_same_v<T, int8_t>;
  auto [krows, vrows] = row_lists<T>(w);
  int64_t n = 0;
  krows.resize(w.rows.size());
  vrows.resize(w.rows.size());
  if (q8) { w.kscale.resize(w.rows.size()); w.vscale.resize(w.rows.size()); }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t lo = w.order[k] * P.block, hi = std::min(lo + P.block, t + 1);
    for (int64_t p = lo; p < hi; ++p, ++n) {
      krows[n] = kbase + p * kstride;
      vrows[n] = vbase + p * vstride;
      if (q8) { w.kscale[n] = kscale[p]; w.vscale[n] = vscale[p]; }
    }
  }
  const int64_t ld2 = pad16(n);
  dots<G, T>(q, D, krows.data(), n, w.s.data(), ld2, vrows.data());
  if (q8) scale_columns<G>(w.s.data(), ld2, w.kscale.data(), n);
  w.p.resize(G * ld2);
  for (int i = 0; i < G; ++i) {
    float* s = w.s.data() + i * ld2;
    exp_shift(s, n, -scale_max(s, n, scale, false));
    float* pi = w.p.data() + i * ld2;
    to_prob(s, n, 1.f / sum(s, n), pi);
    std::fill(pi + n, pi + ld2, 0.f);
  }
  if (q8) scale_columns<G>(w.p.data(), ld2, w.vscale.data(), n);
  w.o.resize(G * D);
  weighted_sum<G, T>(w.p.data(), ld2, vrows.data(), n, D, w.o.data());
  for (int64_t i = 0; i < G * D; ++i) out[i] = w.o[i];
}

// The bf16 cache's step.
template <int G>
void step(const BFloat16* q, const BFloat16* qs, const BFloat16* kbase, const BFloat16* vbase, int64_t kstride,
          int64_t vstride, const BFloat16* c1, int64_t c1stride, const BFloat16* c2, int64_t c2stride, int64_t t,
          int64_t D, const Params& P, int64_t* idx, BFloat16* out, Scratch& w) {
  step_kv<G, BFloat16>(q, qs, kbase, vbase, kstride, vstride, nullptr, nullptr, c1, c1stride, c2, c2stride, t, D, P,
                       idx, out, w);
}

// A kernel's instantiation for GQA group size g (1 .. sizeof Gs), or nullptr: Of<G>::fn is the kernel for G.
template <template <int> class Of, int... Gs>
auto pick(int64_t g, std::integer_sequence<int, Gs...>) -> std::remove_const_t<decltype(Of<1>::fn)> {
  const std::remove_const_t<decltype(Of<1>::fn)> fns[] = {Of<Gs + 1>::fn...};
  return g >= 1 && g <= static_cast<int64_t>(sizeof...(Gs)) ? fns[g - 1] : nullptr;
}

using StepFn = decltype(&step<1>);
template <int G>
struct StepOf {
  static constexpr StepFn fn = &step<G>;
};
using Step8Fn = decltype(&step_kv<1, int8_t>);
template <int G>
struct Step8Of {
  static constexpr Step8Fn fn = &step_kv<G, int8_t>;
};


// Selection and attention for every (row, KV head): q, qs [B, H, D] bf16 contiguous (stage-2 / stage-1 queries);
// k, v [B, KVH, S, D] bf16 with a contiguous last dim; c1, c2 [B, KVH, N, D] likewise, holding at least the
// kernels complete at t; t [B] positions (row b attends keys [0, t_b]); out [B, H, D]; idx [B, KVH, k_sel].
// ks, vs: the int8 KV cache's scales [B, KVH, S] fp32 (contiguous last dim; k, v then int8), or nullptr (bf16).
inline void decode_into(const Tensor& q, const Tensor& qs, const Tensor& k, const Tensor& v, const Tensor& c1,
                        const Tensor& c2, const int64_t* tp, const Params& P, BFloat16* op, int64_t* ip,
                        const Tensor* ks = nullptr, const Tensor* vs = nullptr) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k.size(1), G = H / KVH;
  StepFn fn = pick<StepOf>(G, std::make_integer_sequence<int, 16>{});
  Step8Fn fn8 = pick<Step8Of>(G, std::make_integer_sequence<int, 16>{});
  TORCH_CHECK(fn != nullptr && H % KVH == 0, "InfLLM v2 decode: GQA group size must be 1..16");
  TORCH_CHECK(D <= 256 && P.block % P.stride == 0, "InfLLM v2 decode: unsupported shape");
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *qsp = qs.data_ptr<BFloat16>();
  const BFloat16 *c1p = c1.data_ptr<BFloat16>(), *c2p = c2.data_ptr<BFloat16>();
  at::parallel_for(0, B * KVH, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch w;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KVH, g = task % KVH;
      const int64_t ko = b * k.stride(0) + g * k.stride(1), vo = b * v.stride(0) + g * v.stride(1);
      const BFloat16 *c1b = c1p + b * c1.stride(0) + g * c1.stride(1), *c2b = c2p + b * c2.stride(0) + g * c2.stride(1);
      if (ks != nullptr)
        fn8(qp + (b * H + g * G) * D, qsp + (b * H + g * G) * D, k.data_ptr<int8_t>() + ko, v.data_ptr<int8_t>() + vo,
            k.stride(2), v.stride(2), ks->data_ptr<float>() + b * ks->stride(0) + g * ks->stride(1),
            vs->data_ptr<float>() + b * vs->stride(0) + g * vs->stride(1), c1b, c1.stride(2), c2b, c2.stride(2), tp[b],
            D, P, ip + task * P.k_sel, op + (b * H + g * G) * D, w);
      else
        fn(qp + (b * H + g * G) * D, qsp + (b * H + g * G) * D, k.data_ptr<BFloat16>() + ko,
           v.data_ptr<BFloat16>() + vo, k.stride(2), v.stride(2), c1b, c1.stride(2), c2b, c2.stride(2), tp[b], D, P,
           ip + task * P.k_sel, op + (b * H + g * G) * D, w);
    }
  });
}

// Kernels [lo, hi) of size/stride of one row's keys k [KVH, S, D] into c [KVH, N, D]: the mean of each kernel's
// keys, summed as stride-long segments in fp32 as sparse_select.compress_keys does, rounded to bf16 once.
// ks: the int8 KV cache's key scales [KVH, S] (k int8), or nullptr (k bf16): keys are then bf16(q * s), the
// dequantized rows KVCache.update gives the Python layers, so the kernels pooled here equal theirs.
inline void pool(const Tensor& k, const Tensor& c, int64_t lo, int64_t hi, int64_t size, int64_t stride,
                 const Tensor* ks = nullptr) {
  const int64_t KVH = k.size(0), D = k.size(2), r = size / stride;
  const BFloat16* kb = ks ? nullptr : k.data_ptr<BFloat16>();
  const int8_t* k8 = ks ? k.data_ptr<int8_t>() : nullptr;
  std::vector<float> seg(r * D), acc(D);
  for (int64_t g = 0; g < KVH; ++g) {
    const int64_t kg = g * k.stride(0);
    const float* sg = ks ? ks->data_ptr<float>() + g * ks->stride(0) : nullptr;
    BFloat16* cp = c.data_ptr<BFloat16>() + g * c.stride(0);
    for (int64_t j = lo; j < hi; ++j) {
      for (int64_t i = 0; i < r; ++i) {  // segment j + i: keys [(j + i) stride, (j + i + 1) stride)
        float* s = seg.data() + i * D;
        std::fill(s, s + D, 0.f);
        for (int64_t p = (j + i) * stride; p < (j + i + 1) * stride; ++p) {
          const int64_t o = kg + p * k.stride(1);
          if (k8)
            for (int64_t d = 0; d < D; ++d) s[d] += round_bf16(static_cast<float>(k8[o + d]) * sg[p]);
          else
            for (int64_t d = 0; d < D; ++d) s[d] += static_cast<float>(kb[o + d]);
        }
      }
      std::copy(seg.begin(), seg.begin() + D, acc.begin());
      for (int64_t i = 1; i < r; ++i)
        for (int64_t d = 0; d < D; ++d) acc[d] += seg[i * D + d];
      for (int64_t d = 0; d < D; ++d) cp[j * c.stride(1) + d] = acc[d] / static_cast<float>(size);
    }
  }
}

// A KV cache's compressed keys (sparse_cache.CompressedKeys): c1, c2 [L, B, KVH, N, D] bf16 and covered [L, B]
// int64, the key prefix each row's kernels were pooled from. A decode step writes key pos_b of every row:
// truncate() forgets kernels reaching it, attend() pools the kernels each row lacks (at most one of each size)
// and runs the step, exactly as the Python backend (sparse.make_backend) does through the same cache.
struct CacheStep {
  Params P;
  int64_t dense_len;  // sparse once kv_len >= dense_len (-1: always)
  Tensor c1, c2, covered;

  bool active(int64_t kv_len) const { return dense_len < 0 || kv_len >= dense_len; }

  void truncate(int64_t layer, const int64_t* pos, int64_t B) {
    int64_t* cov = covered.select(0, layer).data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) cov[b * covered.stride(1)] = std::min(cov[b * covered.stride(1)], pos[b]);
  }

  // q [B, H, D]; kl, vl [B, KVH, S, D] (the layer's cache); pos [B]; ksl, vsl: the int8 cache's scales [B, KVH, S]
  // (kl, vl int8) or undefined (bf16). Returns [B, H, D].
  Tensor attend(int64_t layer, const Tensor& q, const Tensor& kl, const Tensor& vl, const int64_t* pos, int64_t kv_len,
                const Tensor& ksl = Tensor(), const Tensor& vsl = Tensor()) {
    const bool q8 = ksl.defined();
    const int64_t B = q.size(0);
    Tensor l1 = c1.select(0, layer), l2 = c2.select(0, layer);
    int64_t* cov = covered.select(0, layer).data_ptr<int64_t>();
    const int64_t sizes[2][2] = {{P.kernel_size, P.stride}, {4 * P.kernel_size, 4 * P.stride}};
    for (int64_t b = 0; b < B; ++b) {
      int64_t& have = cov[b * covered.stride(1)];
      const int64_t want = pos[b] + 1;
      for (int i = 0; i < 2; ++i) {
        const int64_t size = sizes[i][0], stride = sizes[i][1];
        const Tensor sb = q8 ? ksl.select(0, b) : Tensor();
        pool(kl.select(0, b), (i ? l2 : l1).select(0, b), n_kernels(std::min(have, want), size, stride),
             n_kernels(want, size, stride), size, stride, q8 ? &sb : nullptr);
      }
      have = want;
    }
    Params p = P;
    p.k_sel = std::min(P.topk_local, (kv_len + P.block - 1) / P.block);
    Tensor out = at::empty_like(q);
    Tensor idx = at::empty({B, kl.size(1), p.k_sel}, q.options().dtype(at::kLong));
    decode_into(q, q, kl, vl, l1, l2, pos, p, out.data_ptr<BFloat16>(), idx.data_ptr<int64_t>(), q8 ? &ksl : nullptr,
                q8 ? &vsl : nullptr);
    return out;
  }
};

// The Python face of decode_into (csrc/ops.cpp binds it as sparse_decode; sparse_prefill.h has the prefill's).
// q, qs [B, H, D] bf16 contiguous (stage-2 and stage-1 queries); k, v [B, KVH, S, D] bf16 (contiguous last dim);
// c1, c2 [B, KVH, N, D] bf16 compressed keys holding at least the kernels complete at t; t [B] int64 positions
// (row b attends keys [0, t_b]). Returns (out [B, H, D] bf16, idx [B, KVH, k_sel] int64, -1 = empty slot).
inline std::tuple<Tensor, Tensor> decode_op(Tensor q, Tensor qs, Tensor k, Tensor v, Tensor c1, Tensor c2, Tensor t,
                                  int64_t kernel_size, int64_t stride, int64_t block, int64_t init_blocks,
                                  int64_t local_blocks, int64_t k_sel) {
  for (const Tensor* x : {&q, &qs, &k, &v, &c1, &c2})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->stride(-1) == 1,
                "sparse decode: bf16 tensors with a contiguous last dim");
  TORCH_CHECK(q.is_contiguous() && qs.is_contiguous() && q.dim() == 3 && k.dim() == 4, "sparse decode: q [B, H, D]");
  t = t.to(at::kLong).contiguous();
  Tensor out = at::empty_like(q);
  Tensor idx = at::empty({q.size(0), k.size(1), k_sel}, q.options().dtype(at::kLong));
  const Params P{kernel_size, stride, block, init_blocks, local_blocks, k_sel, k_sel};
  decode_into(q, qs, k, v, c1, c2, t.data_ptr<int64_t>(), P, out.data_ptr<at::BFloat16>(),
                      idx.data_ptr<int64_t>());
  return {out, idx};
}

// decode_op over the int8 KV cache (quant/kv8.py): k, v [B, KVH, S, D] int8 and ks, vs [B, KVH, S] fp32 (contiguous
// last dims); the rest as for decode_op.
inline std::tuple<Tensor, Tensor> decode_q8_op(Tensor q, Tensor qs, Tensor k, Tensor v, Tensor ks, Tensor vs, Tensor c1,
                                               Tensor c2, Tensor t, int64_t kernel_size, int64_t stride, int64_t block,
                                               int64_t init_blocks, int64_t local_blocks, int64_t k_sel) {
  for (const Tensor* x : {&q, &qs, &c1, &c2})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->stride(-1) == 1,
                "sparse decode: bf16 queries and compressed keys with a contiguous last dim");
  TORCH_CHECK(k.scalar_type() == at::kChar && v.scalar_type() == at::kChar && k.stride(-1) == 1 && v.stride(-1) == 1 &&
                  ks.scalar_type() == at::kFloat && vs.scalar_type() == at::kFloat && ks.stride(-1) == 1 &&
                  vs.stride(-1) == 1 && ks.dim() == 3 && vs.dim() == 3,
              "sparse decode: int8 k, v [B, KVH, S, D] and fp32 scales [B, KVH, S] with contiguous last dims");
  TORCH_CHECK(q.is_contiguous() && qs.is_contiguous() && q.dim() == 3 && k.dim() == 4, "sparse decode: q [B, H, D]");
  t = t.to(at::kLong).contiguous();
  Tensor out = at::empty_like(q);
  Tensor idx = at::empty({q.size(0), k.size(1), k_sel}, q.options().dtype(at::kLong));
  const Params P{kernel_size, stride, block, init_blocks, local_blocks, k_sel, k_sel};
  decode_into(q, qs, k, v, c1, c2, t.data_ptr<int64_t>(), P, out.data_ptr<at::BFloat16>(), idx.data_ptr<int64_t>(), &ks,
              &vs);
  return {out, idx};
}

}  // namespace infllm
