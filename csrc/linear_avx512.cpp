// AVX-512 VNNI tiles of gptfast::linear's "avx512" path: the AVX2 path (linear_avx2.cpp) with its
// many-row int8 tiles replaced by these. Like that file, every function here carries its own
// target attribute: the file builds with the default flags and runs only where linear_cpu.cpp's
// run-time check found the features.
//
// vpdpwssd multiplies 16 pairs of int16 and adds each pair's two products into an int32 lane in
// one instruction: a 512-bit register is the 16 columns of a packed block (linear_cpu.h's layout,
// a 32-byte line per pair of inputs, sign-extended to 32 int16), an x row's pair is broadcast
// from memory, and one instruction per x row per pair does what the AVX2 tiles do with two
// vpmaddwd and two vpaddd. With 32 vector registers a tile holds 16 x rows, so a
// 16-row decode step passes over each block once. The sums are the same exact integers as every
// other path's (no saturation: |q| <= 128, |xq| <= 32767, kPairChunk pairs per int32 lane).
#include "linear_cpu.h"

#if defined(GPTFAST_X86_GNU)
#include <c10/util/Exception.h>
#include <immintrin.h>

#include <cstring>

#define GPTFAST_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))

namespace gptfast {

bool has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

namespace {

// total[r][c] (+)= the 16 columns of packed pairs [p0, p1) times x row r, R rows, from xt (pairs,
// R): row r's pair p, (x[2p], x[2p + 1]), at xt[p * R + r]. Each step prefetches the line at
// pf + pf_step * (p - p0) (see rows_i8_packed).
template <int R>
GPTFAST_AVX512 void tile(const int8_t* pk, int64_t p0, int64_t p1, const int32_t* xt, int64_t (*total)[kPackRows],
                         uintptr_t pf, int64_t pf_step) {
  __m512i acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_si512();
  for (int64_t p = p0; p < p1; ++p, pf += pf_step) {
    _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pk + 32 * p)));
    const int32_t* pairs = xt + p * R;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] = _mm512_dpwssd_epi32(acc[r], w, _mm512_set1_epi32(pairs[r]));
  }
  const bool first = p0 == 0;  // a block's first chunk stores its totals, later ones add
  // (the zero-masked forms: GCC 12's plain ones start from an "undefined" vector it then warns of)
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const __m512i lo = _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xF, acc[r], 0));
    const __m512i hi = _mm512_maskz_cvtepi32_epi64(0xFF, _mm512_maskz_extracti64x4_epi64(0xF, acc[r], 1));
    int64_t* t = total[r];
    _mm512_storeu_si512(t, first ? lo : _mm512_add_epi64(_mm512_loadu_si512(t), lo));
    _mm512_storeu_si512(t + 8, first ? hi : _mm512_add_epi64(_mm512_loadu_si512(t + 8), hi));
  }
}

}  // namespace

int vnni_tile_height(int64_t M, int64_t m) {
  const int64_t left = M - m;
  return left >= 16 ? 16 : static_cast<int>((left + 3) / 4 * 4);
}

// The VNNI tiles' x: each tile's rows' pairs of inputs interleaved, (pairs, h) int32 at row m of
// the tile (one pointer a step for all its rows: 16 row pointers took more registers than x86-64
// has), zero past M. Made once per call: every chunk of rows the threads take reads it.
Input prepare_avx512(const Weight& w, const Input& in, Scratch& scratch) {
  if (!packed_tiles_take(w, in.M)) return prepare_avx2(w, in, scratch);
  const int64_t full = w.K / 2;
  scratch.pairs.assign((in.M + 3) * full, 0);  // the last tile's rows past M (at most 3) read zeros
  int32_t* out = scratch.pairs.data();
  for (int64_t m = 0, h; m < in.M; m += h) {
    h = vnni_tile_height(in.M, m);
    for (int64_t r = 0; r < h && m + r < in.M; ++r)
      for (int64_t p = 0; p < full; ++p)  // (x[2p], x[2p + 1]) as one int32
        std::memcpy(out + m * full + p * h + r, in.xq + (m + r) * in.ld + 2 * p, sizeof(int32_t));
  }
  Input paired = in;
  paired.xq_pairs = out;
  return paired;
}

void rows_avx512(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (in.xq_pairs != nullptr) return rows_i8_packed(w, in, y, ldy, n0, n1, true);
  rows_avx2(w, in, y, ldy, n0, n1);
}

GPTFAST_AVX512 void tile_i8_vnni(int rows, const int8_t* pk, int64_t p0, int64_t p1, const int32_t* xt,
                                 int64_t (*total)[kPackRows], uintptr_t pf, int64_t pf_step) {
  switch (rows) {
    case 4: return tile<4>(pk, p0, p1, xt, total, pf, pf_step);
    case 8: return tile<8>(pk, p0, p1, xt, total, pf, pf_step);
    case 12: return tile<12>(pk, p0, p1, xt, total, pf, pf_step);
    case 16: return tile<16>(pk, p0, p1, xt, total, pf, pf_step);
    default: TORCH_CHECK(false, "gptfast linear: no VNNI tile of ", rows, " rows");
  }
}

}  // namespace gptfast
#endif
