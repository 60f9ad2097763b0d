// AVX2 + FMA + F16C path of gptfast::linear (formats in linear_cpu.h). Every function here
// carries the target attribute, so this file builds with the default flags and runs only where
// linear_cpu.cpp's run-time check found the features.
//
// A tile is NB weight rows times MB rows of x: each step converts the weights of each row once
// and multiplies them into all MB rows of x. Decode (M = 1) is bound by reading the weights, so
// the conversion only has to keep up with memory:
// - float formats: 16 weights to two fp32 vectors, two FMAs per x row;
// - int8 and int4 against x rounded to int16 (linear_cpu.h's Input): vpmaddwd sums pairs of
//   products exactly into int32 lanes, about half the work of converting to fp32. int4 turns its
//   exact group sums into fp32 once per group: s * sum(q x) + m * sum(x).
// Every (weight row, x row) pair sees the same operations in the same order whatever NB and MB
// are, so a row of y is bitwise the same alone or in a batch (batched greedy decoding equals
// single-request decoding). Rows are contiguous, so a tile prefetches the tile two ahead at the
// pace it reads its own (rows of a few hundred bytes are too short a stream for the hardware
// prefetcher: int8 ran 2.5x slower without it).
#include "linear_cpu.h"

#if defined(GPTFAST_X86_GNU)
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#define GPTFAST_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace gptfast {
namespace {

constexpr int64_t kPrefetchTiles = 2;

GPTFAST_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

GPTFAST_AVX2 inline int64_t hsum_i64(__m256i v) {
  const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                     _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  return _mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
         _mm256_extract_epi64(s, 3);
}

// A tile's weight rows and its prefetch of the tile kPrefetchTiles ahead.
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

// Float weights k..k+15 of row r as two fp32 vectors.
template <WFormat F>
GPTFAST_AVX2 inline void load16(const uint8_t* r, int64_t k, __m256& lo, __m256& hi) {
  if constexpr (F == WFormat::F32) {
    const float* p = reinterpret_cast<const float*>(r) + k;
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  } else if constexpr (F == WFormat::BF16) {
    // bf16 = the top half of an fp32: each 32-bit lane holds inputs 2i (low) and 2i + 1 (high),
    // so one shift and one mask give the even and the odd inputs (x is permuted to match:
    // rows_bf16)
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + 2 * k));
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    static_assert(F == WFormat::F16, "float formats only");
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * k + 16)));
  }
}

// Float weights: two accumulators per (weight row, x row) (inputs 0..7 and 8..15 of each step).
template <WFormat F, int NB, int MB>
GPTFAST_AVX2 void tile_float(const Weight& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n0) {
  TileRows<NB> t(w, n0);
  const int64_t K = w.K, K16 = K / 16 * 16;
  __m256 acc[NB][MB][2];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K16; k += 16) {
    t.prefetch();
    for (int i = 0; i < NB; ++i) {
      __m256 lo, hi;
      load16<F>(t.rows[i], k, lo, hi);
      for (int j = 0; j < MB; ++j) {
        acc[i][j][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + j * ldx + k), acc[i][j][0]);
        acc[i][j][1] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + j * ldx + k + 8), acc[i][j][1]);
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      float s = hsum(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
      for (int64_t k = K16; k < K; ++k) s += weight_at(w, n0 + i, k) * x[j * ldx + k];
      y[j * ldy + n0 + i] = s;
    }
}

// A chunk's int32 lanes added into the int64 totals of an int8 row-dot tile.
template <int NB, int MB>
GPTFAST_AVX2 inline void add_chunk(int64_t (&total)[NB][MB], const __m256i (&acc)[NB][MB]) {
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) total[i][j] += hsum_i64(acc[i][j]);
}

// An int8 row-dot tile's inputs past the last whole 16 of K added in scalar, then its sums stored
// as floats.
template <int NB, int MB>
GPTFAST_AVX2 inline void store_i8(const TileRows<NB>& t, int64_t (&total)[NB][MB], const int16_t* xq, int64_t ldx,
                                  int64_t K, float* y, int64_t ldy, int64_t n0) {
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      const int8_t* q = reinterpret_cast<const int8_t*>(t.rows[i]);
      for (int64_t k = K / 16 * 16; k < K; ++k) total[i][j] += int64_t{q[k]} * xq[j * ldx + k];
      y[j * ldy + n0 + i] = static_cast<float>(total[i][j]);
    }
}

// int8 weights: per 16 inputs one sign extension, then per x row a vpmaddwd and an add into
// int32 lanes, added up in int64 every kI8Chunk inputs.
template <int NB, int MB>
GPTFAST_AVX2 void tile_i8(const Weight& w, const int16_t* xq, int64_t ldx, float* y, int64_t ldy, int64_t n0) {
  TileRows<NB> t(w, n0);
  const int64_t K = w.K, K16 = K / 16 * 16;
  int64_t total[NB][MB] = {};
  for (int64_t k0 = 0; k0 < K16; k0 += kI8Chunk) {
    __m256i acc[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < std::min(K16, k0 + kI8Chunk); k += 16) {
      t.prefetch();
      for (int i = 0; i < NB; ++i) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.rows[i] + k)));
        for (int j = 0; j < MB; ++j) {
          const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + j * ldx + k));
          acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(wv, xv));
        }
      }
    }
    add_chunk<NB, MB>(total, acc);
  }
  store_i8<NB, MB>(t, total, xq, ldx, K, y, ldy, n0);
}

// The row-dot int8 tile of 3 weight rows by 4 x rows in assembly, two steps of 16 inputs a loop
// iteration, each x vector a memory operand of its vpmaddwd: written with intrinsics (tile_i8<3,
// 4>), GCC kept 4 of the 12 accumulators in registers and round-tripped 8 through the stack at
// every step. 12 accumulators, 3 weight vectors and a product fill the 16 registers. OFF: the
// step (0 or 1) within the iteration; x at 2 bytes an input, the weights at 1. A GPT-2 step's
// matmuls at 4 x rows (two threads, each weight once, 7 alternating runs): median 12.1 ms against
// 14.8 with the intrinsics tile, faster in 6 of the 7. (Without packing, this tile at 16 rows ran
// 0.82x the packed tiles, at 5 rows 0.96-1.1x: packing stays from kPackedMinRows on.)
#define GPTFAST_ROWDOT(OFF, V, X, A) \
  "vpmaddwd " OFF "*32(%[" X "],%[k],2), %[" V "], %[t]\n\tvpaddd %[t], %[" A "], %[" A "]\n\t"
#define GPTFAST_ROWDOT_STEP(OFF)                                                                              \
  __asm__("vpmovsxbw " OFF "*16(%[w0],%[k]), %[v0]\n\tvpmovsxbw " OFF "*16(%[w1],%[k]), %[v1]\n\t"          \
          "vpmovsxbw " OFF "*16(%[w2],%[k]), %[v2]\n\t" GPTFAST_ROWDOT(OFF, "v0", "x0", "a00")                \
              GPTFAST_ROWDOT(OFF, "v0", "x1", "a01") GPTFAST_ROWDOT(OFF, "v0", "x2", "a02")                   \
                  GPTFAST_ROWDOT(OFF, "v0", "x3", "a03")                                                      \
          : [a00] "+x"(a00), [a01] "+x"(a01), [a02] "+x"(a02), [a03] "+x"(a03), [v0] "=&x"(v0),              \
            [v1] "=&x"(v1), [v2] "=&x"(v2), [t] "=&x"(t)                                                      \
          : [w0] "r"(w0), [w1] "r"(w1), [w2] "r"(w2), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), \
            [k] "r"(k)                                                                                        \
          : "memory");                                                                                        \
  __asm__(GPTFAST_ROWDOT(OFF, "v1", "x0", "a10") GPTFAST_ROWDOT(OFF, "v1", "x1", "a11")                       \
              GPTFAST_ROWDOT(OFF, "v1", "x2", "a12") GPTFAST_ROWDOT(OFF, "v1", "x3", "a13")                   \
                  GPTFAST_ROWDOT(OFF, "v2", "x0", "a20") GPTFAST_ROWDOT(OFF, "v2", "x1", "a21")               \
                      GPTFAST_ROWDOT(OFF, "v2", "x2", "a22") GPTFAST_ROWDOT(OFF, "v2", "x3", "a23")           \
          : [a10] "+x"(a10), [a11] "+x"(a11), [a12] "+x"(a12), [a13] "+x"(a13), [a20] "+x"(a20),             \
            [a21] "+x"(a21), [a22] "+x"(a22), [a23] "+x"(a23), [t] "=&x"(t)                                   \
          : [v1] "x"(v1), [v2] "x"(v2), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [k] "r"(k)    \
          : "memory");

GPTFAST_AVX2 void tile_i8_3x4(const Weight& w, const int16_t* xq, int64_t ldx, float* y, int64_t ldy, int64_t n0) {
  TileRows<3> rows(w, n0);
  const int64_t K = w.K, K16 = K / 16 * 16;
  const uint8_t *w0 = rows.rows[0], *w1 = rows.rows[1], *w2 = rows.rows[2];
  const int16_t *x0 = xq, *x1 = xq + ldx, *x2 = xq + 2 * ldx, *x3 = xq + 3 * ldx;
  int64_t total[3][4] = {};
  for (int64_t k0 = 0; k0 < K16; k0 += kI8Chunk) {
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00;
    __m256i a13 = a00, a20 = a00, a21 = a00, a22 = a00, a23 = a00, v0, v1, v2, t;
    const int64_t end = std::min(K16, k0 + kI8Chunk);
    int64_t k = k0;
    for (; k + 16 < end; k += 32) {
      rows.prefetch();
      rows.prefetch();
      GPTFAST_ROWDOT_STEP("0")
      GPTFAST_ROWDOT_STEP("1")
    }
    if (k < end) {  // an odd step of 16 left
      rows.prefetch();
      GPTFAST_ROWDOT_STEP("0")
    }
    const __m256i acc[3][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}};
    add_chunk<3, 4>(total, acc);
  }
  store_i8<3, 4>(rows, total, xq, ldx, K, y, ldy, n0);
}
#undef GPTFAST_ROWDOT_STEP
#undef GPTFAST_ROWDOT

// The (s, m) pairs of `rows` int4 rows from n0 as fp32, in a per-thread scratch buffer.
GPTFAST_AVX2 const float* group_scales(const Weight& w, int64_t n0, int rows) {
  thread_local std::vector<float> buf;
  const int64_t count = rows * 2 * (w.K / w.group);
  buf.resize(count);
  const c10::Half* src = w.group_scale + 2 * n0 * (w.K / w.group);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8)
    _mm256_storeu_ps(buf.data() + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < count; ++i) buf[i] = static_cast<float>(src[i]);
  return buf.data();
}

// int4 weights: per 32 inputs (16 bytes) one zero extension to 16-bit lanes, an AND and a shift
// for the two nibbles, then per x row two vpmaddwd and adds into int32 lanes (below 2^24 for a
// group of up to 256: exact in fp32). Per group: acc += s * lanes (fp32), mt += m * sum(x).
template <int NB, int MB>
GPTFAST_AVX2 void tile_i4(const Weight& w, const Input& in, int64_t m0, float* y, int64_t ldy, int64_t n0) {
  TileRows<NB> t(w, n0);
  const int64_t G = w.K / w.group;
  const float* sm = group_scales(w, n0, NB);  // row i, group g: sm[2 * (i * G + g)], then m
  const int16_t* xq = in.xq + m0 * in.ld;
  const float* xg = in.x_group_sum + m0 * G;
  const __m256i low4 = _mm256_set1_epi16(0xF);
  __m256 acc[NB][MB];
  float mt[NB][MB] = {};
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i part[NB][MB];
    for (int i = 0; i < NB; ++i)
      for (int j = 0; j < MB; ++j) part[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * w.group; k < (g + 1) * w.group; k += 32) {
      t.prefetch();
      t.prefetch();
      for (int i = 0; i < NB; ++i) {
        const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t.rows[i] + k / 2)));
        const __m256i lo = _mm256_and_si256(b, low4), hi = _mm256_srli_epi16(b, 4);
        for (int j = 0; j < MB; ++j) {
          const int16_t* xj = xq + j * in.ld + k;
          const __m256i p = _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj)));
          part[i][j] = _mm256_add_epi32(part[i][j], p);
          const __m256i r = _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xj + 16)));
          part[i][j] = _mm256_add_epi32(part[i][j], r);
        }
      }
    }
    for (int i = 0; i < NB; ++i) {
      const __m256 s = _mm256_broadcast_ss(sm + 2 * (i * G + g));
      const float m = sm[2 * (i * G + g) + 1];
      for (int j = 0; j < MB; ++j) {
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(part[i][j]), s, acc[i][j]);
        mt[i][j] += m * xg[j * G + g];
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) y[(m0 + j) * ldy + n0 + i] = hsum(acc[i][j]) + mt[i][j];
}

// Tile heights for MB x rows: the accumulators (float: NB * MB * 2; integer: NB * MB, int4 also
// NB * MB fp32) fit in the 16 vector registers.
template <WFormat F, int MB>
constexpr int tile_rows() {
  if constexpr (F == WFormat::I8) return MB == 4 ? 3 : 4;
  if constexpr (F == WFormat::I4) return MB == 1 ? 4 : MB == 4 ? 1 : 2;
  return MB == 1 ? 4 : MB == 2 ? 3 : MB == 3 ? 2 : 1;
}

template <WFormat F, int NB, int MB>
GPTFAST_AVX2 void tile_of(const Weight& w, const Input& in, int64_t m, float* y, int64_t ldy, int64_t n) {
  if constexpr (F == WFormat::I8 && NB == 3 && MB == 4)
    tile_i8_3x4(w, in.xq + m * in.ld, in.ld, y + m * ldy, ldy, n);
  else if constexpr (F == WFormat::I8)
    tile_i8<NB, MB>(w, in.xq + m * in.ld, in.ld, y + m * ldy, ldy, n);
  else if constexpr (F == WFormat::I4)
    tile_i4<NB, MB>(w, in, m, y, ldy, n);
  else
    tile_float<F, NB, MB>(w, in.x + m * in.ld, in.ld, y + m * ldy, ldy, n);
}

// Weight rows [n, n + rows) times x rows [m, m + MB), in tiles of tile_rows<F, MB>() rows.
template <WFormat F, int MB>
GPTFAST_AVX2 void tiles(const Weight& w, const Input& in, int64_t m, float* y, int64_t ldy, int64_t n, int64_t rows) {
  constexpr int NB = tile_rows<F, MB>();
  int64_t i = 0;
  for (; i + NB <= rows; i += NB) tile_of<F, NB, MB>(w, in, m, y, ldy, n + i);
  for (; i < rows; ++i) tile_of<F, 1, MB>(w, in, m, y, ldy, n + i);
}

template <WFormat F>
GPTFAST_AVX2 void rows_fmt(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  // blocks of kRowBlock weight rows (a multiple of every tile height); blocks of 4 x rows, then
  // the remainder, pass over each while it is in cache
  for (int64_t n = n0; n < n1; n += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n1 - n);
    int64_t m = 0;
    for (; m + 4 <= in.M; m += 4) tiles<F, 4>(w, in, m, y, ldy, n, rows);
    switch (in.M - m) {
      case 3: tiles<F, 3>(w, in, m, y, ldy, n, rows); break;
      case 2: tiles<F, 2>(w, in, m, y, ldy, n, rows); break;
      case 1: tiles<F, 1>(w, in, m, y, ldy, n, rows); break;
    }
  }
}

// int8 weights against many x rows (M >= kPackedMinRows; kPrepackedMinRows with w.packed):
// arithmetic, not reading the weights, bounds the step there, and the row-dot tiles above reload
// x for every weight row. So each block of 16 weight rows is first transposed into pairs of
// inputs, pk[p][c][e] = w[n + c][2p + e] (one 32-byte line per pair, zero past the block's rows
// and K: linear_cpu.h's packed layout, so a weight packed once by pack_int8 is read as it is),
// and then each step of the tile below sign-extends two lines, broadcasts each x row's pair
// (x[2p], x[2p + 1]) and adds one vpmaddwd per 8 columns: 8 column sums per register, no
// horizontal adds, and 56 bytes read per 12 vpmaddwd (6 x rows) where the row-dot tiles read 288
// per 8. Sums are exact integers, as there, so every path gives the same y.
// From 5 x rows on: a 16-row int8 decode step of GPT-2 124M took 45 ms against 54 with the row-dot
// tiles (benchmarks/results/decode_profile_cpu_rows16.md has the step before and after). Since the
// packed tiles prefetch step by step, a GPT-2 step's matmuls on two threads run 1.05x at 5 rows,
// 1.05-1.18x at 6 and 1.12x at 7 against the row-dot tiles, 0.97x at 4 and 0.75x at 2, where
// repacking is a large share of the work (interleaved rounds in one process, a temporary switch).
constexpr int64_t kPackedMinRows = 5;
// With the weight packed once (w.packed), from 3 x rows on: the 4-row tile, padded with zero rows,
// ran a GPT-2 step's matmuls in a median 8.9 ms against the row-dot tiles' 10.3 at 3 rows, 8.4
// against 9.1 at 4, the same at 2 and 9.6 against 9.0 at 1 (10-20 interleaved rounds, 2 threads).
constexpr int64_t kPrepackedMinRows = 3;
constexpr int64_t kPairChunk = 256;  // pairs of int8 x int16 products per int32 lane before int64
// |q| <= 128 and |xq| <= 32767 (quantize_x clamps to +-32767: -32768 would overflow here)
static_assert(kPairChunk * 2 * 128 * 32767 <= INT32_MAX, "an int32 lane must hold a chunk's sums");

// pk (pairs, 16, 2) from rows [n, n + rows) of w; pairs = ceil(K / 2).
GPTFAST_AVX2 void pack_pairs(const Weight& w, int64_t n, int64_t rows, int8_t* pk) {
  const int64_t K = w.K, pairs = (K + 1) / 2;
  int64_t p = 0;
  if (rows == kPackRows) {
    const uint8_t* r[kPackRows];
    for (int c = 0; c < kPackRows; ++c) r[c] = row_ptr(w, n + c);
    // 8 pairs of 16 rows at a time: rows c (low lane) and c + 8 (high lane) in one register,
    // then an 8 x 8 transpose of 16-bit pairs within each lane
    for (; 2 * p + 16 <= K; p += 8) {
      __m256i a[8], t[8], u[8];
      for (int c = 0; c < 8; ++c)
        a[c] = _mm256_inserti128_si256(
            _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[c] + 2 * p))),
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[c + 8] + 2 * p)), 1);
      for (int c = 0; c < 4; ++c) {
        t[2 * c] = _mm256_unpacklo_epi16(a[2 * c], a[2 * c + 1]);
        t[2 * c + 1] = _mm256_unpackhi_epi16(a[2 * c], a[2 * c + 1]);
      }
      for (int h = 0; h < 2; ++h)
        for (int c = 0; c < 2; ++c) {
          u[4 * h + 2 * c] = _mm256_unpacklo_epi32(t[4 * h + c], t[4 * h + c + 2]);
          u[4 * h + 2 * c + 1] = _mm256_unpackhi_epi32(t[4 * h + c], t[4 * h + c + 2]);
        }
      // u[0..3]: rows 0-3, pairs (0,1) (2,3) (4,5) (6,7); u[4..7]: rows 4-7, the same pairs
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pk + (p + 2 * j) * 32), _mm256_unpacklo_epi64(u[j], u[j + 4]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pk + (p + 2 * j + 1) * 32),
                            _mm256_unpackhi_epi64(u[j], u[j + 4]));
      }
    }
  }
  for (; p < pairs; ++p)
    for (int c = 0; c < kPackRows; ++c)
      for (int e = 0; e < 2; ++e) {
        const int64_t k = 2 * p + e;
        pk[p * 32 + 2 * c + e] = c < rows && k < K ? reinterpret_cast<const int8_t*>(row_ptr(w, n + c))[k] : 0;
      }
}

// total[0..8) += acc's lanes, or = them for a block's first chunk of pairs (no zeroing pass first:
// it had been 1% of the step, a few KB per block of 16 weight rows)
GPTFAST_AVX2 inline void add_wide(int64_t* total, __m256i acc, bool first) {
  __m256i* t = reinterpret_cast<__m256i*>(total);
  const __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc));
  const __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc, 1));
  _mm256_storeu_si256(t, first ? lo : _mm256_add_epi64(_mm256_loadu_si256(t), lo));
  _mm256_storeu_si256(t + 1, first ? hi : _mm256_add_epi64(_mm256_loadu_si256(t + 1), hi));
}

// y[0..8) = t[0..8) rounded to float as static_cast<float> rounds them, in one vector store: a
// block's 256 scalar stores, into lines of y not yet in cache, filled the store queue (8% of this
// path's samples under load). AVX2 has no int64 -> float conversion. Any |t| < 2^51 (so any K
// below 2^29: K * 128 * 32767) is exact in a double by the 1.5 * 2^52 trick (t added to that
// double's bits), which then rounds to float once.
GPTFAST_AVX2 inline void store_f32(const int64_t* t, float* y) {
  const __m256d magic = _mm256_set1_pd(6755399441055744.0);  // 1.5 * 2^52
  __m128 half[2];
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t + 4 * h));
    const __m256d d = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_add_epi64(v, _mm256_castpd_si256(magic))), magic);
    half[h] = _mm256_cvtpd_ps(d);
  }
  _mm256_storeu_ps(y, _mm256_set_m128(half[1], half[0]));
}

// One x row's part of a packed step: broadcast its pair (x[2p], x[2p + 1]), then per 8 columns
// one vpmaddwd into t and an add into the row's accumulator. Addresses are base + i (i = 4p, the
// bytes of p pairs of x; the packed weights at 8i), so a step costs no address arithmetic, and
// OFF is the step within the loop's two.
#define GPTFAST_PAIR_ROW(X, OFF, A0, A1)                                \
  "vpbroadcastd " OFF "*4(%[" X "],%[i]), %[b]\n\t"                     \
  "vpmaddwd %[b], %[w0], %[t]\n\tvpaddd %[t], %[" A0 "], %[" A0 "]\n\t" \
  "vpmaddwd %[b], %[w1], %[t]\n\tvpaddd %[t], %[" A1 "], %[" A1 "]\n\t"
// the step's two lines of packed weights, sign-extended, and its prefetch (pf, then pf + ps)
#define GPTFAST_LOAD_PAIRS(OFF, PF) \
  "prefetcht1 " PF "\n\tvpmovsxbw " OFF "*32(%[w],%[i],8), %[w0]\n\tvpmovsxbw " OFF "*32+16(%[w],%[i],8), %[w1]\n\t"

// R x rows' steps OFF of a loop iteration (4 rows: one asm statement; 6: two, as one takes at
// most 30 operands, the second reusing w0 and w1).
#define GPTFAST_PACKED_STEP(OFF, PF)                                                                            \
  if constexpr (R == 4) {                                                                                      \
    __asm__(GPTFAST_LOAD_PAIRS(OFF, PF) GPTFAST_PAIR_ROW("x0", OFF, "a00", "a01")                              \
                GPTFAST_PAIR_ROW("x1", OFF, "a10", "a11") GPTFAST_PAIR_ROW("x2", OFF, "a20", "a21")            \
                    GPTFAST_PAIR_ROW("x3", OFF, "a30", "a31")                                                  \
            : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11), [a20] "+x"(a20),             \
              [a21] "+x"(a21), [a30] "+x"(a30), [a31] "+x"(a31), [w0] "=&x"(w0), [w1] "=&x"(w1), [b] "=&x"(b), \
              [t] "=&x"(t)                                                                                     \
            : [w] "r"(pk), [i] "r"(i), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3), [pf] "r"(pf),   \
              [ps] "r"(pf_step)                                                                                \
            : "memory");                                                                                       \
  } else {                                                                                                     \
    __asm__(GPTFAST_LOAD_PAIRS(OFF, PF) GPTFAST_PAIR_ROW("x0", OFF, "a00", "a01")                              \
                GPTFAST_PAIR_ROW("x1", OFF, "a10", "a11") GPTFAST_PAIR_ROW("x2", OFF, "a20", "a21")            \
            : [a00] "+x"(a00), [a01] "+x"(a01), [a10] "+x"(a10), [a11] "+x"(a11), [a20] "+x"(a20),             \
              [a21] "+x"(a21), [w0] "=&x"(w0), [w1] "=&x"(w1), [b] "=&x"(b), [t] "=&x"(t)                      \
            : [w] "r"(pk), [i] "r"(i), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [pf] "r"(pf), [ps] "r"(pf_step) \
            : "memory");                                                                                       \
    __asm__(GPTFAST_PAIR_ROW("x3", OFF, "a30", "a31") GPTFAST_PAIR_ROW("x4", OFF, "a40", "a41")                \
                GPTFAST_PAIR_ROW("x5", OFF, "a50", "a51")                                                      \
            : [a30] "+x"(a30), [a31] "+x"(a31), [a40] "+x"(a40), [a41] "+x"(a41), [a50] "+x"(a50),             \
              [a51] "+x"(a51), [b] "=&x"(b), [t] "=&x"(t)                                                      \
            : [w0] "x"(w0), [w1] "x"(w1), [i] "r"(i), [x3] "r"(x3), [x4] "r"(x4), [x5] "r"(x5)                 \
            : "memory");                                                                                       \
  }

// total[j][c] += (p0 = 0: =) the 16 packed columns times x rows x[0..R) over pairs [p0, p1) (at most
// kPairChunk), R = 4 or 6; each step also prefetches the line at address pf + pf_step * (p - p0)
// (an integer: it runs past the weights at the last blocks, where a prefetch is harmless). The
// step is written in assembly: GCC computed all the products of a step before adding any of
// them, which needs more than the 16 vector registers, and spilled an accumulator (a
// store-to-load round trip per step; the tile ran at a third of vpmaddwd's throughput). 6 rows
// fill the registers (12 accumulators, 2 weight vectors, the broadcast and a product): the
// weights' sign extensions and the loop's overhead spread over 12 vpmaddwd instead of 8. On Zen 3
// the tile alone ran 5-20% faster; a GPT-2 step's matmuls (one thread, order-balanced interleaved
// rounds) 16% faster at 96 x rows (a prefill), 10% at 32, even at 16.
// Two steps a loop iteration, every address base + index: an address per x row per step and the
// loop's counter had taken a fifth of the instructions. The tile alone in L1 went from 1.0-1.1
// vpmaddwd a cycle to 1.25-1.35; benchmarks/engine_load.py at 16 clients, 6 alternating 20 s runs
// against the tile before: 5% more tokens/s in all (faster in 5 of the 6 pairs).
template <int R>
GPTFAST_AVX2 void tile_i8_packed(const int8_t* pk, int64_t p0, int64_t p1, const int16_t* const x[R],
                                 int64_t (*total)[kPackRows], uintptr_t pf, int64_t pf_step) {
  static_assert(R == 4 || R == 6, "tiles of 4 or 6 x rows");
  __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
  __m256i a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const int16_t *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];  // in registers despite the memory clobber
  const int16_t *x4 = R == 6 ? x[4] : nullptr, *x5 = R == 6 ? x[5] : nullptr;
  __m256i w0, w1, b, t;
  int64_t i = 4 * p0;  // bytes of x rows before pair p (int16 pairs); the pair's weights at pk + 8 i
  for (; i + 4 < 4 * p1; i += 8, pf += 2 * pf_step) {
    GPTFAST_PACKED_STEP("0", "(%[pf])")
    GPTFAST_PACKED_STEP("1", "(%[pf],%[ps])")
  }
  if (i < 4 * p1) {  // an odd pair left
    GPTFAST_PACKED_STEP("0", "(%[pf])")
  }
  const bool first = p0 == 0;
  add_wide(total[0], a00, first), add_wide(total[0] + 8, a01, first);
  add_wide(total[1], a10, first), add_wide(total[1] + 8, a11, first);
  add_wide(total[2], a20, first), add_wide(total[2] + 8, a21, first);
  add_wide(total[3], a30, first), add_wide(total[3] + 8, a31, first);
  if constexpr (R == 6) {
    add_wide(total[4], a40, first), add_wide(total[4] + 8, a41, first);
    add_wide(total[5], a50, first), add_wide(total[5] + 8, a51, first);
  }
}
#undef GPTFAST_PACKED_STEP
#undef GPTFAST_PAIR_ROW
#undef GPTFAST_LOAD_PAIRS

// The x rows of the tile at row m of M (rows past M read zeros). AVX2: 6 while 9 or more are left,
// then as few padding rows as 4s and 6s allow (5: 6; 7: 4 + 4; 16 = 6 + 6 + 4).
inline int tile_height(int64_t M, int64_t m, bool vnni) {
  const int64_t left = M - m;
  if (vnni) return vnni_tile_height(M, m);
  return left >= 9 || left == 5 || left == 6 ? 6 : 4;
}

}  // namespace

// Blocks of 16 weight rows: pack (or take the block of w.packed), then chunks of kPairChunk pairs
// (8 KB of the packed block, 1 KB of each x row) that every tile of x rows passes over while they
// are in cache: the AVX2 tiles above, or with `vnni` linear_avx512.cpp's (reading in.xq_pairs,
// from prepare_avx512). Rows [n0, n1) start at a block of w.packed (linear_cpu.cpp splits whole
// blocks).
GPTFAST_AVX2 void rows_i8_packed(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1,
                                 bool vnni) {
  const int64_t K = w.K, full = K / 2, block_bytes = packed_block_bytes(K);
  thread_local std::vector<int8_t> pk;
  thread_local std::vector<int16_t> zeros;  // the x row of the rows past M in the last tile
  thread_local std::vector<int64_t> total;  // (M + 5, 16): room for the last tile's rows past M
  if (!w.packed) pk.resize(block_bytes);
  zeros.assign(K + 1, 0);
  total.resize((in.M + 5) * kPackRows);
  int64_t groups = 0;
  for (int64_t m = 0; m < in.M; m += tile_height(in.M, m, vnni)) ++groups;
  // The weights two blocks on are prefetched while this block's tiles run, one line per tile
  // step at the pace that covers a block per block: rows of a few hundred bytes are too short a
  // stream for the hardware prefetcher, and the block's share fetched in one burst before each
  // tile stalled on the full miss queue (the step after a burst took 8% of this function's
  // samples). Spread over the steps: a GPT-2 step's matmuls on two threads 1.25x at 8 x rows,
  // 1.13x at 16, 1.03x at 32 and 96 (interleaved rounds in one process). Past n1 too, where this
  // thread's next chunk of rows usually starts (linear_cpu.cpp); a prefetch never faults. With
  // w.packed the stream is the packed blocks themselves.
  const int64_t steps = std::max<int64_t>(1, full * groups);
  const int64_t pf_step = (block_bytes + steps - 1) / steps;
  const int16_t* x[6];
  for (int64_t n = n0; n < n1; n += kPackRows) {
    const int64_t cols = std::min(kPackRows, n1 - n);
    const int8_t* block = w.packed ? packed_block(w.packed, n, K) : pk.data();
    if (!w.packed) pack_pairs(w, n, cols, pk.data());
    if (full == 0) std::fill(total.begin(), total.end(), 0);  // (K = 1: no chunk of pairs sets total)
    auto* tot = reinterpret_cast<int64_t(*)[kPackRows]>(total.data());
    const int64_t ahead = std::min(w.N, n + 2 * kPackRows);
    uintptr_t pf = w.packed ? reinterpret_cast<uintptr_t>(packed_block(w.packed, ahead, K))
                            : reinterpret_cast<uintptr_t>(row_ptr(w, ahead));
    for (int64_t p0 = 0; p0 < full; p0 += kPairChunk)
      for (int64_t m = 0, h; m < in.M; m += h) {
        h = tile_height(in.M, m, vnni);
        const int64_t p1 = std::min(full, p0 + kPairChunk);
        if (vnni) {
          tile_i8_vnni(h, block, p0, p1, in.xq_pairs + m * full, tot + m, pf, pf_step);
        } else {
          for (int j = 0; j < h; ++j) x[j] = m + j < in.M ? in.xq + (m + j) * in.ld : zeros.data();
          if (h == 6)
            tile_i8_packed<6>(block, p0, p1, x, tot + m, pf, pf_step);
          else
            tile_i8_packed<4>(block, p0, p1, x, tot + m, pf, pf_step);
        }
        pf += pf_step * (p1 - p0);
      }
    for (int64_t m = 0; m < in.M; ++m) {
      if (K % 2)  // the last input
        for (int64_t c = 0; c < cols; ++c) tot[m][c] += int64_t{block[full * 32 + 2 * c]} * in.xq[m * in.ld + K - 1];
      float* ym = y + m * ldy + n;
      if (cols == kPackRows) {
        store_f32(tot[m], ym), store_f32(tot[m] + 8, ym + 8);
      } else {
        for (int64_t c = 0; c < cols; ++c) ym[c] = static_cast<float>(tot[m][c]);
      }
    }
  }
}

bool packed_tiles_take(const Weight& w, int64_t M) {
  return w.fmt == WFormat::I8 && M >= (w.packed ? kPrepackedMinRows : kPackedMinRows);
}

// bf16 weights read inputs k..k+15 as (k, k+2, ..., k+14) then (k+1, k+3, ..., k+15) (load16): x
// is permuted the same way, in whole blocks of 16 (the tail stays in order), once per call before
// the threads take their rows.
GPTFAST_AVX2 Input prepare_avx2(const Weight& w, const Input& in, Scratch& scratch) {
  if (w.fmt != WFormat::BF16) return in;
  const int64_t K = w.K, K16 = K / 16 * 16;
  std::vector<float>& xp = scratch.x;
  xp.resize(in.M * K);
  for (int64_t m = 0; m < in.M; ++m) {
    const float* src = in.x + m * in.ld;
    float* dst = xp.data() + m * K;
    for (int64_t k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        dst[k + i] = src[k + 2 * i];
        dst[k + 8 + i] = src[k + 2 * i + 1];
      }
    std::copy(src + K16, src + K, dst + K16);
  }
  Input permuted = in;
  permuted.x = xp.data();
  permuted.ld = K;
  return permuted;
}

GPTFAST_AVX2 void pack_int8_avx2(const Weight& w, int8_t* out) {
  const int64_t block_bytes = packed_block_bytes(w.K);
  for (int64_t n = 0; n < w.N; n += kPackRows)
    pack_pairs(w, n, std::min(kPackRows, w.N - n), out + n / kPackRows * block_bytes);
}

void rows_avx2(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  switch (w.fmt) {
    case WFormat::F32: return rows_fmt<WFormat::F32>(w, in, y, ldy, n0, n1);
    case WFormat::BF16: return rows_fmt<WFormat::BF16>(w, in, y, ldy, n0, n1);  // x from prepare_avx2
    case WFormat::F16: return rows_fmt<WFormat::F16>(w, in, y, ldy, n0, n1);
    case WFormat::I8:
      return packed_tiles_take(w, in.M) ? rows_i8_packed(w, in, y, ldy, n0, n1, false)
                                        : rows_fmt<WFormat::I8>(w, in, y, ldy, n0, n1);
    case WFormat::I4: return rows_fmt<WFormat::I4>(w, in, y, ldy, n0, n1);
  }
}

}  // namespace gptfast
#endif
