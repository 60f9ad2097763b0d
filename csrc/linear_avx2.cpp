// AVX2 + FMA + F16C path of gptfast::linear (formats in linear_cpu.h). Every function here
// carries the target attribute, so this file builds with the default flags and runs only where
// linear_cpu.cpp's run-time check found the features.
//
// A tile is NB weight rows times MB rows of x: each step of 16 inputs converts 16 weights of
// each row to fp32 once (two 8-wide vectors) and multiplies them into all MB rows of x. Decode
// (M = 1) is bound by reading the weights, so the conversion only has to keep up with memory:
// with one x row, int4 skips the per-weight `s q + m` and sums q x per group, adding
// s * sum(q x) + m * sum(x) once per group. Rows are contiguous, so a tile prefetches the tile
// two ahead at the pace it reads its own (rows of a few hundred bytes are too short a stream for
// the hardware prefetcher: int8 ran 2.5x slower without it).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#include <algorithm>

#include "linear_cpu.h"

#define GPTFAST_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace gptfast {
namespace {

constexpr int64_t kPrefetchTiles = 2;

// Weights k..k+15 of row r as fp32 vectors; int4 as its q (0..15), without s and m.
template <WFormat F>
GPTFAST_AVX2 inline void load16(const uint8_t* r, int64_t k, __m256& lo, __m256& hi) {
  if constexpr (F == WFormat::F32) {
    const float* p = reinterpret_cast<const float*>(r) + k;
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  } else if constexpr (F == WFormat::BF16) {  // bf16 = the top half of an fp32
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k)));
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k + 16)));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  } else if constexpr (F == WFormat::F16) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k + 16)));
  } else if constexpr (F == WFormat::I8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r + k));
    lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
    hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
  } else {  // I4: 8 bytes hold inputs k..k+7 (low nibbles) and k+8..k+15 (high nibbles)
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + k / 2)));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xF)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
  }
}

// (s, m) of row n's group g, broadcast.
GPTFAST_AVX2 inline void group_scale(const Weight& w, int64_t n, int64_t g, __m256& s, __m256& m) {
  const int32_t bits = *reinterpret_cast<const int32_t*>(w.group_scale + 2 * (n * (w.K / w.group) + g));
  const __m128 sm = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));  // (s, m, 0, 0)
  s = _mm256_broadcastss_ps(sm);
  m = _mm256_broadcastss_ps(_mm_movehdup_ps(sm));
}

GPTFAST_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// The part of a tile's job every variant shares: rows, prefetch pointer, and the finish
// (horizontal sums, the K tail in scalar code, the store).
template <int NB>
struct TileRows {
  const uint8_t* rows[NB];
  const uint8_t* pf;
  int64_t pf_step;  // bytes of the prefetched tile per step of 16 inputs

  GPTFAST_AVX2 TileRows(const Weight& w, int64_t n0) {
    for (int i = 0; i < NB; ++i) rows[i] = row_ptr(w, n0 + i);
    pf = rows[0] + kPrefetchTiles * NB * w.row_bytes;
    pf_step = NB * w.row_bytes / std::max<int64_t>(1, w.K / 16);
  }
  GPTFAST_AVX2 void prefetch() {
    for (int64_t b = 0; b < pf_step; b += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + b), _MM_HINT_T0);
    pf += pf_step;
  }
};

GPTFAST_AVX2 inline void finish(const Weight& w, __m256 acc, const float* xm, float* out, int64_t n) {
  float s = hsum(acc);
  for (int64_t k = w.K / 16 * 16; k < w.K; ++k) s += weight_at(w, n, k) * xm[k];  // plain formats only
  *out = s;
}

// One x row, NB weight rows, two accumulators per row. int4: per group, sum(q x) and sum(x).
template <WFormat F, int NB>
GPTFAST_AVX2 void tile_m1(const Weight& w, const float* xm, float* ym, int64_t n0) {
  TileRows<NB> t(w, n0);
  const int64_t K16 = w.K / 16 * 16;
  const int64_t G = F == WFormat::I4 ? w.group : std::max<int64_t>(K16, 16);
  __m256 acc[NB], part[NB][2];
  for (int i = 0; i < NB; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K16; k0 += G) {
    __m256 xsum = _mm256_setzero_ps();
    for (int i = 0; i < NB; ++i) part[i][0] = part[i][1] = _mm256_setzero_ps();
    for (int64_t k = k0; k < std::min(K16, k0 + G); k += 16) {
      t.prefetch();
      const __m256 x0 = _mm256_loadu_ps(xm + k), x1 = _mm256_loadu_ps(xm + k + 8);
      if constexpr (F == WFormat::I4) xsum = _mm256_add_ps(xsum, _mm256_add_ps(x0, x1));
      for (int i = 0; i < NB; ++i) {
        __m256 lo, hi;
        load16<F>(t.rows[i], k, lo, hi);
        part[i][0] = _mm256_fmadd_ps(lo, x0, part[i][0]);
        part[i][1] = _mm256_fmadd_ps(hi, x1, part[i][1]);
      }
    }
    for (int i = 0; i < NB; ++i) {
      const __m256 dot = _mm256_add_ps(part[i][0], part[i][1]);
      if constexpr (F == WFormat::I4) {
        __m256 s, m;
        group_scale(w, n0 + i, k0 / G, s, m);
        acc[i] = _mm256_fmadd_ps(dot, s, _mm256_fmadd_ps(xsum, m, acc[i]));
      } else {
        acc[i] = _mm256_add_ps(acc[i], dot);
      }
    }
  }
  for (int i = 0; i < NB; ++i) finish(w, acc[i], xm, ym + n0 + i, n0 + i);
}

// MB x rows (2..4), NB weight rows, one accumulator each: the weights, converted once
// (int4: to s q + m, per group), serve every x row.
template <WFormat F, int NB, int MB>
GPTFAST_AVX2 void tile_mb(const Weight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0) {
  TileRows<NB> t(w, n0);
  const int64_t K16 = w.K / 16 * 16;
  const int64_t G = F == WFormat::I4 ? w.group : std::max<int64_t>(K16, 16);
  __m256 acc[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K16; k0 += G) {
    __m256 s[NB], m[NB];
    if constexpr (F == WFormat::I4)
      for (int i = 0; i < NB; ++i) group_scale(w, n0 + i, k0 / G, s[i], m[i]);
    for (int64_t k = k0; k < std::min(K16, k0 + G); k += 16) {
      t.prefetch();
      for (int i = 0; i < NB; ++i) {
        __m256 lo, hi;
        load16<F>(t.rows[i], k, lo, hi);
        if constexpr (F == WFormat::I4) {
          lo = _mm256_fmadd_ps(lo, s[i], m[i]);
          hi = _mm256_fmadd_ps(hi, s[i], m[i]);
        }
        for (int j = 0; j < MB; ++j) {
          acc[i][j] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + j * ldx + k), acc[i][j]);
          acc[i][j] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + j * ldx + k + 8), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) finish(w, acc[i][j], x + j * ldx, y + j * ldy + n0 + i, n0 + i);
}

// Weight rows [n, n + NB) for every x row: blocks of 4 x rows, then the remainder; the tile's
// weights stay in L1 while each x block passes over them.
template <WFormat F, int NB>
GPTFAST_AVX2 void all_rows_of_x(const Weight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
                                int64_t n) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) tile_mb<F, NB, 4>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
  switch (M - m) {
    case 3: return tile_mb<F, NB, 3>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
    case 2: return tile_mb<F, NB, 2>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
    case 1: return tile_m1<F, NB>(w, x + m * ldx, y + m * ldy, n);
  }
}

template <WFormat F>
GPTFAST_AVX2 void rows_fmt(const Weight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
                           int64_t n0, int64_t n1) {
  if (M == 1) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) tile_m1<F, 4>(w, x, y, n);
    for (; n < n1; ++n) tile_m1<F, 1>(w, x, y, n);
    return;
  }
  // NB * 4 accumulators (+ NB (s, m) pairs for int4) in the 16 vector registers
  constexpr int NB = F == WFormat::I4 ? 2 : 3;
  int64_t n = n0;
  for (; n + NB <= n1; n += NB) all_rows_of_x<F, NB>(w, x, M, ldx, y, ldy, n);
  for (; n < n1; ++n) all_rows_of_x<F, 1>(w, x, M, ldx, y, ldy, n);
}

}  // namespace

void rows_avx2(const Weight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
               int64_t n0, int64_t n1) {
  switch (w.fmt) {
    case WFormat::F32: return rows_fmt<WFormat::F32>(w, x, M, ldx, y, ldy, n0, n1);
    case WFormat::BF16: return rows_fmt<WFormat::BF16>(w, x, M, ldx, y, ldy, n0, n1);
    case WFormat::F16: return rows_fmt<WFormat::F16>(w, x, M, ldx, y, ldy, n0, n1);
    case WFormat::I8: return rows_fmt<WFormat::I8>(w, x, M, ldx, y, ldy, n0, n1);
    case WFormat::I4: return rows_fmt<WFormat::I4>(w, x, M, ldx, y, ldy, n0, n1);
  }
}

}  // namespace gptfast
#endif
