#pragma once

// InfLLM v2 prefill in C++ (bf16): the selection and sparse attention of a chunk of queries, kGroup consecutive
// queries of one (row, KV head) per task.
//
// Each query selects its own blocks (sparse_attention.h's select_by, stages 1-1c), scoring the compressed keys as
// the decode step does but from panels the group shares: C1 and C2 are transposed to fp32 columns once per group
// (load_keys_t), and a query's G heads x 64 kernels are one register-tiled product (qk_block).
// Stage 2 then walks the union of the group's selected blocks once, in block order. The group's queries share
// many blocks: the init block and the window (34 of a query's 96 under the default config) are the same for every
// query of a 64-token block, and top-k blocks overlap (with iid random data a top-k block is picked by ~18 of the
// 64 queries). Each block's keys and values are read and widened once per group (load_keys_t, load_values: the
// only places stage 2 reads the cache), and every (query, head) that picked the block is one row of two small
// GEMMs: scores = Q K^T (rows x 64 keys) and O += P V, with kR x kC vectors of register accumulators.
//
// Softmax is online (flash attention): each (query, head) keeps a running max m and sum l; a block's scores become
// exp(s - m) after m is raised to cover them, the output so far is scaled by exp(m_before - m), and the output is
// divided by l once at the end and rounded to bf16 once. So no scores are kept (64 queries x 8 heads x 6144 keys
// would be 12 MiB), and a group of 64 reads each block once; groups of 8 with the decode step's exact softmax
// (scores kept, probabilities rounded to bf16 before P V) read each block up to 8 times: 10.7 s against 9.0 s at
// 32K on the avx512 tier (BENCHMARKS.md, issue 16). The rounding differs from the reference's in that the probabilities are not
// rounded to bf16 (fp32 throughout, as exact math); tests/sparse/test_sparse_native.py holds the output to the
// reference within 2 bf16 ulps of its largest value, and the selections equal.

#include "sparse_attention.h"

namespace infllm {

constexpr int64_t kGroup = 64;  // queries per task: one block of positions

// The register tile: kR rows x kC vectors (16 / 8 / 4 lanes); kR x kC + kC + 1 registers at most the ISA's count.
#if defined(__AVX512F__)
constexpr int kR = 4, kC = 4;
#elif defined(__ARM_NEON)
constexpr int kR = 4, kC = 4;
#else
constexpr int kR = 4, kC = 2;
#endif

#if defined(__AVX2__) && !defined(__AVX512F__)
// 8 rows of 8 dwords in r[0..7] -> r[c] lane k = input row k, dword c.
inline void transpose8(__m256i r[8]) {
  __m256 a[8], t[8], u[8];
  for (int k = 0; k < 8; ++k) a[k] = _mm256_castsi256_ps(r[k]);
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(a[2 * k], a[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(a[2 * k], a[2 * k + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + c]: rows 4h..4h+3 at dwords c (low half) and c + 4 (high half)
    u[4 * h] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_castps_si256(_mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
    r[4 + c] = _mm256_castps_si256(_mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
  }
}
#endif

// A block's keys k_j = k + j * stride, j < n, as fp32 columns: kt[d * ld + j] = k_j[d] for j < n rounded up to 16
// (columns n.. zero). Stage 2's one read of keys: a reader of another key format replaces this function.
// avx512 / avx2: 16 / 8 keys at a time, transposed as dword pairs (two dimensions) and widened by a shift (even
// dimension) and a mask (odd), as dots() does.
inline void load_keys_t(const BFloat16* k, int64_t stride, int64_t n, int64_t D, int64_t ld, float* kt,
                        const BFloat16* next) {
#if defined(__AVX512F__)
  if (D % 32 == 0) {
    const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      if (next)
        for (int64_t x = j0; x < j0 + 16; ++x) prefetch_row(next + x * stride, D);
      for (int64_t c = 0; c < D / 2; c += 16) {
        __m512i r[16];
        for (int x = 0; x < 16; ++x)
          r[x] = j0 + x < n ? _mm512_loadu_si512(k + (j0 + x) * stride + 2 * c) : _mm512_setzero_si512();
        transpose16(r);
        for (int x = 0; x < 16; ++x) {
          _mm512_storeu_ps(kt + 2 * (c + x) * ld + j0, _mm512_castsi512_ps(_mm512_slli_epi32(r[x], 16)));
          _mm512_storeu_ps(kt + (2 * (c + x) + 1) * ld + j0, _mm512_castsi512_ps(_mm512_and_si512(r[x], hi)));
        }
      }
    }
    return;
  }
#elif defined(__AVX2__)
  if (D % 16 == 0) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (int64_t j0 = 0; j0 < n; j0 += 8) {
      if (next)
        for (int64_t x = j0; x < j0 + 8; ++x) prefetch_row(next + x * stride, D);
      for (int64_t c = 0; c < D / 2; c += 8) {
        __m256i r[8];
        for (int x = 0; x < 8; ++x)
          r[x] = j0 + x < n ? _mm256_loadu_si256((const __m256i*)(k + (j0 + x) * stride + 2 * c))
                            : _mm256_setzero_si256();
        transpose8(r);
        for (int x = 0; x < 8; ++x) {
          _mm256_storeu_ps(kt + 2 * (c + x) * ld + j0, _mm256_castsi256_ps(_mm256_slli_epi32(r[x], 16)));
          _mm256_storeu_ps(kt + (2 * (c + x) + 1) * ld + j0, _mm256_castsi256_ps(_mm256_and_si256(r[x], hi)));
        }
      }
    }
    return;
  }
#endif
  const int64_t n16 = pad16(n);
  if (next)
    for (int64_t j = 0; j < n16; ++j) prefetch_row(next + j * stride, D);
  for (int64_t j = 0; j < n16; ++j)
    for (int64_t d = 0; d < D; ++d) kt[d * ld + j] = j < n ? widen(k[j * stride + d]) : 0.f;
}

// A block's values v + j * stride, j < n, as fp32 rows vt[j * D + d]: stage 2's one read of values.
inline void load_values(const BFloat16* v, int64_t stride, int64_t n, int64_t D, float* vt, const BFloat16* next) {
  for (int64_t j = 0; j < n; ++j) {
    if (next) prefetch_row(next + j * stride, D);
    const BFloat16* row = v + j * stride;
    float* out = vt + j * D;
    int64_t d = 0;
    for (; d + W <= D; d += W) load_bf16(row + d).store(out + d);
    for (; d < D; ++d) out[d] = widen(row[d]);
  }
}

// s_r[0 .. C W) = scale * (q_r . kt[:, 0 .. C W)) for r < R; q_r fp32 [D], kt [D, ld].
template <int R, int C>
inline void qk_tile(const float* const* q, const float* kt, int64_t ld, int64_t D, float scale, float* const* s) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec(0.f);
  for (int64_t d = 0; d < D; ++d) {
    Vec kv[C];
    for (int c = 0; c < C; ++c) kv[c] = Vec::loadu(kt + d * ld + c * W);
    for (int r = 0; r < R; ++r) {
      const Vec qb(q[r][d]);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(qb, kv[c], acc[r][c]);
    }
  }
  const Vec sc(scale);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) (acc[r][c] * sc).store(s[r] + c * W);
}

// o_r[0 .. C W) += sum_{j < n} p_r[j] vt[j * D + 0 .. C W) for r < R.
template <int R, int C>
inline void pv_tile(const float* const* p, const float* vt, int64_t D, int64_t n, float* const* o) {
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec::loadu(o[r] + c * W);
  for (int64_t j = 0; j < n; ++j) {
    Vec vv[C];
    for (int c = 0; c < C; ++c) vv[c] = Vec::loadu(vt + j * D + c * W);
    for (int r = 0; r < R; ++r) {
      const Vec pb(p[r][j]);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(pb, vv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c].store(o[r] + c * W);
}

template <int C>
inline void qk_rows(int64_t m, const float* const* q, const float* kt, int64_t ld, int64_t D, float scale,
                    float* const* s) {
  switch (m) {
    case 1: return qk_tile<1, C>(q, kt, ld, D, scale, s);
    case 2: return qk_tile<2, C>(q, kt, ld, D, scale, s);
    case 3: return qk_tile<3, C>(q, kt, ld, D, scale, s);
    default: return qk_tile<kR, C>(q, kt, ld, D, scale, s);
  }
}

template <int C>
inline void pv_rows(int64_t m, const float* const* p, const float* vt, int64_t D, int64_t n, float* const* o) {
  switch (m) {
    case 1: return pv_tile<1, C>(p, vt, D, n, o);
    case 2: return pv_tile<2, C>(p, vt, D, n, o);
    case 3: return pv_tile<3, C>(p, vt, D, n, o);
    default: return pv_tile<kR, C>(p, vt, D, n, o);
  }
}

// Scores of M rows against one block: s[r][j] = scale * q[r] . key j for j < n rounded up to W (kt from
// load_keys_t; s[r] has room for them).
inline void qk_block(const float* const* q, float* const* s, int64_t M, const float* kt, int64_t ld, int64_t n,
                     int64_t D, float scale) {
  const int64_t nv = (n + W - 1) / W;
  float* so[kR];
  for (int64_t r0 = 0; r0 < M; r0 += kR) {
    const int64_t m = std::min<int64_t>(kR, M - r0);
    int64_t v = 0;
    for (; v + kC <= nv; v += kC) {
      for (int64_t x = 0; x < m; ++x) so[x] = s[r0 + x] + v * W;
      qk_rows<kC>(m, q + r0, kt + v * W, ld, D, scale, so);
    }
    for (; v < nv; ++v) {
      for (int64_t x = 0; x < m; ++x) so[x] = s[r0 + x] + v * W;
      qk_rows<1>(m, q + r0, kt + v * W, ld, D, scale, so);
    }
  }
}

// o[r][d] += sum_{j < n} p[r][j] vt[j * D + d] for M rows.
inline void pv_block(const float* const* p, float* const* o, int64_t M, const float* vt, int64_t n, int64_t D) {
  float* oo[kR];
  for (int64_t r0 = 0; r0 < M; r0 += kR) {
    const int64_t m = std::min<int64_t>(kR, M - r0);
    int64_t d = 0;
    for (; d + kC * W <= D; d += kC * W) {
      for (int64_t x = 0; x < m; ++x) oo[x] = o[r0 + x] + d;
      pv_rows<kC>(m, p + r0, vt + d, D, n, oo);
    }
    for (; d + W <= D; d += W) {
      for (int64_t x = 0; x < m; ++x) oo[x] = o[r0 + x] + d;
      pv_rows<1>(m, p + r0, vt + d, D, n, oo);
    }
    for (; d < D; ++d)
      for (int64_t x = 0; x < m; ++x) {
        float a = o[r0 + x][d];
        for (int64_t j = 0; j < n; ++j) a += p[r0 + x][j] * vt[j * D + d];
        o[r0 + x][d] = a;
      }
  }
}

// The largest lane and the sum of lanes.
inline float hmax(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(v);
#elif defined(__AVX2__)
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
#else
  alignas(64) float f[W];
  v.store(f);
  float m = f[0];
  for (int k = 1; k < W; ++k) m = std::max(m, f[k]);
  return m;
#endif
}

inline float hadd(Vec v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#elif defined(__AVX2__)
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
#else
  alignas(64) float f[W];
  v.store(f);
  float t = 0.f;
  for (int k = 0; k < W; ++k) t += f[k];
  return t;
#endif
}

// The online softmax step of one (query, head) over one block's scores x[0..n) (nt <= n rounded up to W, the
// block's keys for some query of the group; x[n..nt) are keys past this query and become 0): running max m and
// sum l are updated; x becomes exp(x - m); returns exp(m_before - m), the factor the output so far is scaled by.
inline float online_update(float* x, int64_t n, int64_t nt, float& m, float& l) {
  Vec vm(-kInf);
  int64_t j = 0;
  for (; j + W <= n; j += W) vm = vmax(vm, Vec::loadu(x + j));
  float mt = hmax(vm);
  for (; j < n; ++j) mt = std::max(mt, x[j]);
  const float mn = std::max(m, mt), corr = m == mn ? 1.f : exp_poly(m - mn);
  m = mn;
  const Vec shift(-mn);
  Vec acc(0.f);
  j = 0;
  for (; j + W <= n; j += W) {
    const Vec e = exp_vec(Vec::loadu(x + j) + shift);
    e.store(x + j);
    acc = acc + e;
  }
  float t = hadd(acc);
  for (; j < n; ++j) t += (x[j] = exp_poly(x[j] - mn));
  for (; j < nt; ++j) x[j] = 0.f;
  l = l * corr + t;
  return corr;
}

struct GroupScratch {
  Scratch w;                      // selection
  std::vector<float> qs, ct;      // one query's G stage-1 heads [G, D]; compressed-key panels [D, 64] each
  std::vector<float> qf, s, o;    // [n, G, D] queries fp32; [rows, ldk] one block's scores; [n, G, D] outputs
  std::vector<float> kt, vt;      // one block: keys [D, ld] (columns), values [block, D]
  std::vector<float> m, l;        // [n, G] running max and sum of exp
  std::vector<int64_t> sel, end, t, start;  // selected blocks, query x's at [end[x], end[x + 1]); positions; buckets
  struct Use { int64_t block, query; };
  std::vector<Use> uses;
  std::vector<const float*> in;   // rows of one block's GEMM
  std::vector<float*> out;
};

// One (row, KV head), queries i < nq: q / qs head i of query x at q + i * qh + x * qt (likewise qs), positions
// pos[x]; kbase, vbase, c1, c2 as for step(); outputs at out + i * oh + x * ot; selections at idx + x * k_sel
// (or idx nullptr).
template <int G>
void group(const BFloat16* q, int64_t qh, int64_t qt, const BFloat16* qs, int64_t qsh, int64_t qst,
           const BFloat16* kbase, const BFloat16* vbase, int64_t kstride, int64_t vstride, const BFloat16* c1,
           int64_t c1stride, const BFloat16* c2, int64_t c2stride, const int64_t* pos, int64_t nq, int64_t D,
           const Params& P, int64_t* idx, BFloat16* out, int64_t oh, int64_t ot, GroupScratch& g) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  const int64_t B = P.block, ldk = pad16(B);
  g.qf.resize(nq * G * D);
  g.s.resize(nq * G * ldk);
  g.o.assign(nq * G * D, 0.f);
  g.kt.resize(D * ldk);
  g.vt.resize(B * D);
  g.t.resize(nq);
  g.end.assign(nq + 1, 0);
  g.sel.clear();
  // stages 1-1c per query; the compressed keys they score, as panels of 64 columns (load_keys_t) shared by all
  const int64_t tmax = *std::max_element(pos, pos + nq);
  const int64_t n1 = n_kernels(tmax + 1, P.kernel_size, P.stride);
  const int64_t n2 = n_kernels(tmax + 1, 4 * P.kernel_size, 4 * P.stride);
  const int64_t p1 = (n1 + 63) / 64, p2 = (n2 + 63) / 64;
  g.ct.resize((p1 + p2) * D * 64);
  for (int64_t p = 0; p < p1 + p2; ++p) {
    const bool fine = p < p1;
    const int64_t j0 = (fine ? p : p - p1) * 64;
    load_keys_t((fine ? c1 + j0 * c1stride : c2 + j0 * c2stride), fine ? c1stride : c2stride,
                std::min<int64_t>(64, (fine ? n1 : n2) - j0), D, 64, g.ct.data() + p * D * 64, nullptr);
  }
  g.qs.resize(G * D);
  for (int64_t x = 0; x < nq; ++x) {
    const int64_t t = pos[x];
    const float* qsr[G];
    for (int64_t i = 0; i < G; ++i) {
      const BFloat16 *qi = q + i * qh + x * qt, *qsi = qs + i * qsh + x * qst;
      for (int64_t d = 0; d < D; ++d) g.qf[(x * G + i) * D + d] = widen(qi[d]);
      for (int64_t d = 0; d < D; ++d) g.qs[i * D + d] = widen(qsi[d]);
      qsr[i] = g.qs.data() + i * D;
    }
    const int64_t K = select_by<G>(
        [&](int level, int64_t n, float* s, int64_t ld) {
          const float* panels = g.ct.data() + (level == 1 ? 0 : p1) * D * 64;
          float* so[G];
          for (int64_t j0 = 0; j0 < n; j0 += 64) {
            for (int64_t i = 0; i < G; ++i) so[i] = s + i * ld + j0;
            qk_block(qsr, so, G, panels + j0 * D, 64, std::min<int64_t>(64, n - j0), D, 1.f);
          }
        },
        t, D, P, g.w);
    for (int64_t k = 0; k < K; ++k) g.sel.push_back(g.w.order[k]);
    if (idx)
      for (int64_t k = 0; k < P.k_sel; ++k) idx[x * P.k_sel + k] = k < K ? g.w.order[k] : -1;
    g.t[x] = t;
    g.end[x + 1] = static_cast<int64_t>(g.sel.size());
  }
  // the (block, query) pairs by block, then query (a counting sort: blocks are < tmax / B + 1)
  const int64_t nb = tmax / B + 1;
  g.start.assign(nb + 1, 0);
  for (const int64_t b : g.sel) ++g.start[b + 1];
  for (int64_t b = 0; b < nb; ++b) g.start[b + 1] += g.start[b];
  g.uses.resize(g.sel.size());
  for (int64_t x = 0; x < nq; ++x)
    for (int64_t u = g.end[x]; u < g.end[x + 1]; ++u) g.uses[g.start[g.sel[u]]++] = {g.sel[u], x};
  g.in.resize(nq * G);
  g.out.resize(nq * G);
  // runs of uses of one block: [u0, u1); the keys it needs: [lo, lo + n)
  auto run_end = [&](size_t u0, int64_t& n) {
    size_t u1 = u0;
    n = 0;
    for (; u1 < g.uses.size() && g.uses[u1].block == g.uses[u0].block; ++u1)
      n = std::max(n, std::min(B, g.t[g.uses[u1].query] + 1 - g.uses[u0].block * B));
    return u1;
  };
  // stage 2, block by block over the union: scores of every (query, head) that selected the block, the online
  // softmax update of each, then P V
  g.m.assign(nq * G, -kInf);
  g.l.assign(nq * G, 0.f);
  for (size_t u0 = 0, u1; u0 < g.uses.size(); u0 = u1) {
    int64_t n;
    u1 = run_end(u0, n);
    const int64_t lo = g.uses[u0].block * B;
    const bool more = u1 < g.uses.size();
    load_keys_t(kbase + lo * kstride, kstride, n, D, ldk, g.kt.data(),
                more ? kbase + g.uses[u1].block * B * kstride : nullptr);
    int64_t M = 0;
    for (size_t u = u0; u < u1; ++u)
      for (int64_t i = 0; i < G; ++i, ++M) {
        g.in[M] = g.qf.data() + (g.uses[u].query * G + i) * D;
        g.out[M] = g.s.data() + M * ldk;
      }
    qk_block(g.in.data(), g.out.data(), M, g.kt.data(), ldk, n, D, scale);
    M = 0;
    for (size_t u = u0; u < u1; ++u) {
      const int64_t x = g.uses[u].query, nx = std::min(B, g.t[x] + 1 - lo);
      for (int64_t i = 0; i < G; ++i, ++M) {
        const int64_t r = x * G + i;
        float* o = g.o.data() + r * D;
        const float corr = online_update(g.s.data() + M * ldk, nx, n, g.m[r], g.l[r]);
        if (corr != 1.f)
          for (int64_t d = 0; d < D; ++d) o[d] *= corr;
        g.in[M] = g.s.data() + M * ldk;
        g.out[M] = o;
      }
    }
    load_values(vbase + lo * vstride, vstride, n, D, g.vt.data(),
                more ? vbase + g.uses[u1].block * B * vstride : nullptr);
    pv_block(g.in.data(), g.out.data(), M, g.vt.data(), n, D);
  }
  for (int64_t x = 0; x < nq; ++x)
    for (int64_t i = 0; i < G; ++i) {
      const float* o = g.o.data() + (x * G + i) * D;
      const float c = 1.f / g.l[x * G + i];
      BFloat16* dst = out + i * oh + x * ot;
      for (int64_t d = 0; d < D; ++d) dst[d] = o[d] * c;
    }
}

using GroupFn = decltype(&group<1>);
template <int G>
struct GroupOf {
  static constexpr GroupFn fn = &group<G>;
};

// Prefill / chunked queries: q, qs [B, H, T, D] bf16 (contiguous last dim); pos [B, T] int64 contiguous (query
// positions, clamped to the rows' lengths); k, v, c1, c2 as for decode_into (c1, c2 pooled from the keys up to
// the longest row). out [B, H, T, D] contiguous; idx [B, KVH, T, k_sel] contiguous, or nullptr (not kept: at 32K
// queries it would be 48 MiB). Tasks are (row, KV head, group of kGroup queries).
inline void prefill_into(const Tensor& q, const Tensor& qs, const Tensor& k, const Tensor& v, const Tensor& c1,
                         const Tensor& c2, const int64_t* pos, const Params& P, BFloat16* op, int64_t* ip) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KVH = k.size(1), G = H / KVH;
  GroupFn fn = pick<GroupOf>(G, std::make_integer_sequence<int, 16>{});
  TORCH_CHECK(fn != nullptr && H % KVH == 0, "InfLLM v2 prefill: GQA group size must be 1..16");
  TORCH_CHECK(D <= 256 && P.block % P.stride == 0 && P.block % 16 == 0, "InfLLM v2 prefill: unsupported shape");
  const BFloat16 *qp = q.data_ptr<BFloat16>(), *qsp = qs.data_ptr<BFloat16>();
  const BFloat16 *kp = k.data_ptr<BFloat16>(), *vp = v.data_ptr<BFloat16>();
  const BFloat16 *c1p = c1.data_ptr<BFloat16>(), *c2p = c2.data_ptr<BFloat16>();
  const int64_t groups = (T + kGroup - 1) / kGroup;
  at::parallel_for(0, B * KVH * groups, 1, [&](int64_t begin, int64_t end) {
    thread_local GroupScratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KVH * groups), g = task / groups % KVH, t0 = task % groups * kGroup;
      const int64_t h = g * G;
      fn(qp + b * q.stride(0) + h * q.stride(1) + t0 * q.stride(2), q.stride(1), q.stride(2),
         qsp + b * qs.stride(0) + h * qs.stride(1) + t0 * qs.stride(2), qs.stride(1), qs.stride(2),
         kp + b * k.stride(0) + g * k.stride(1), vp + b * v.stride(0) + g * v.stride(1), k.stride(2), v.stride(2),
         c1p + b * c1.stride(0) + g * c1.stride(1), c1.stride(2), c2p + b * c2.stride(0) + g * c2.stride(1),
         c2.stride(2), pos + b * T + t0, std::min(kGroup, T - t0), D, P,
         ip ? ip + ((b * KVH + g) * T + t0) * P.k_sel : nullptr, op + ((b * H + h) * T + t0) * D, T * D, D,
         scratch);
    }
  });
}

// The Python face of prefill_into (csrc/ops.cpp binds it as sparse_prefill). q, qs [B, H, T, D] bf16 (contiguous
// last dim); pos [B, T] positions, clamped to the rows' lengths; k, v, c1, c2 as for decode. Returns (out
// [B, H, T, D] bf16, idx [B, KVH, T, k_sel] int64 when with_idx, else empty).
inline std::tuple<Tensor, Tensor> prefill_op(Tensor q, Tensor qs, Tensor k, Tensor v, Tensor c1, Tensor c2, Tensor pos,
                                             int64_t kernel_size, int64_t stride, int64_t block, int64_t init_blocks,
                                             int64_t local_blocks, int64_t k_sel, bool with_idx) {
  for (const Tensor* x : {&q, &qs, &k, &v, &c1, &c2})
    TORCH_CHECK(x->scalar_type() == at::kBFloat16 && x->stride(-1) == 1,
                "sparse prefill: bf16 tensors with a contiguous last dim");
  TORCH_CHECK(q.dim() == 4 && qs.sizes() == q.sizes() && k.dim() == 4, "sparse prefill: q [B, H, T, D]");
  pos = pos.to(at::kLong).contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor idx = at::empty({with_idx ? q.size(0) : 0, k.size(1), q.size(2), k_sel}, q.options().dtype(at::kLong));
  const Params P{kernel_size, stride, block, init_blocks, local_blocks, k_sel, k_sel};
  prefill_into(q, qs, k, v, c1, c2, pos.data_ptr<int64_t>(), P, out.data_ptr<at::BFloat16>(),
               with_idx ? idx.data_ptr<int64_t>() : nullptr);
  return {out, idx};
}

}  // namespace infllm
