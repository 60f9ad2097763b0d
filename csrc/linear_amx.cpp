// AMX tiles of gptfast::linear's "amx" path: the avx512 path (linear_avx512.cpp) with int8 weights
// against kAmxMinRows or more x rows multiplied in the tile unit of Intel AMX (Sapphire Rapids on).
// Like linear_avx512.cpp, every function here carries its own target attribute and runs only
// where linear_cpu.cpp's run-time check found the features (and Linux granted the tile state).
//
// A tile dot product (tdpbssd / tdpbsud) multiplies a tile A of 16 rows of 64 int8 by a tile B of
// 16 rows of 16 groups of 4 int8 (B's row j, group c: column c's inputs 4j..4j+3) and adds into
// 16 x 16 int32, 16,384 products in one instruction. The weight is A, read where it lies (16
// output rows of 64 inputs, a row's bytes apart: no packed copy), and x is B, 16 x rows a tile,
// interleaved by fours once per call (prepare_amx). x's int16 enter as two bytes, xq = 256 hi + lo
// with lo unsigned: one tile of low bytes (tdpbsud, signed weight by unsigned x) and one of high
// bytes (tdpbssd), added as 256 * sum_hi + sum_lo in int64. The sums are the same exact integers
// as every other path's, so y is bitwise the portable path's.
//
// GCC 12's plain AVX-512 intrinsics start from an "undefined" vector that it then warns of (GCC
// bug 105593); before any header, so that the inlined intrinsics' own lines are covered
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "linear_cpu.h"

#if defined(GPTFAST_AMX)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#define GPTFAST_AMX_TARGET \
  __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vnni,bmi2,amx-tile,amx-int8")))

namespace gptfast {

bool has_amx() {
  // CPUID itself (clang's __builtin_cpu_supports knows no AMX names): leaf 7 EDX bit 24 AMX-TILE,
  // 25 AMX-INT8; leaf 0x1D, the tile palettes (a VM may list AMX with none). Then Linux's grant of
  // AMX's 8 KB of tile state, asked once: it holds for every thread, and from then on the kernel
  // refuses a signal stack (sigaltstack) too small for that state; where a thread already has
  // one, it refuses the grant, and this path is not offered (docs: the kernel's x86 xstate.rst).
  static const bool granted = [] {
    __builtin_cpu_init();
    unsigned a, b, c, d;
    if (!__builtin_cpu_supports("bmi2") || !__builtin_cpu_supports("avx512dq") ||
        !__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1) ||
        !__get_cpuid_count(0x1D, 0, &a, &b, &c, &d) || a < 1)
      return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return granted;
}

namespace {

constexpr int64_t kStep = 64;       // inputs per tile step: a tile row's 64 bytes
constexpr int64_t kTile = 16;       // rows of a tile: weight rows in A, x rows in B
// x rows from which the tiles run; fewer take the avx512 path, whose packed tiles (over the copy
// cpu_decode keeps) a GPT-2 step's matmuls on two threads ran faster at 4-6 rows (amx 1.02-1.34x
// their time), even at 8 (1.01, 1.16x), slower at 10 (0.83-0.91x), 12 (0.75, 0.90x) and 16
// (0.76-0.79x), interleaved medians of 7-11 rounds
constexpr int64_t kAmxMinRows = 10;
// Inputs per int32 sum: |q lo| <= 128 * 255 per product, 32768 of them stay below 2^31.
constexpr int64_t kAmxChunk = 32768;
static_assert(kAmxChunk * 128 * 255 <= INT32_MAX && kAmxChunk % kStep == 0, "a chunk's int32 sums must not overflow");

// Bytes of one x tile's low (or high) bytes: K padded with zeros to whole steps, 16 x rows.
constexpr int64_t plane_bytes(int64_t K) { return (K + kStep - 1) / kStep * kStep * kTile; }

// Tiles 0-3: the sums (weight block 0 by x's low bytes, by its high bytes, then block 1's),
// 4-5: two blocks of 16 weight rows, 6-7: x's low and high bytes; all 16 rows of 64 bytes.
// ldtilecfg's 64 bytes (palette 1), in static storage: GCC's asm for it names only 8 of them.
struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr TileConfig kTileConfig{1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// sums[2b] / [2b + 1] (weight row i, x row r) = weight block b (16 rows from a[b], lda bytes
// apart) times the tile's x rows' low / high bytes (lo, hi: prepare_amx's layout, at the same
// input), over `steps` steps of kStep inputs. With `ahead`, step s also prefetches (into L2) the
// `share` bytes at ahead + s * share, in address order: a tile load's 16 rows are 16 streams that
// the hardware prefetcher does not follow (a single thread streamed 1.3x faster with these, in C).
template <int Blocks>
GPTFAST_AMX_TARGET void dot_tiles(const int8_t* const* a, int64_t lda, const int8_t* lo, const int8_t* hi,
                                  int64_t steps, int32_t (*sums)[kTile][kTile], const char* ahead, int64_t share) {
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (Blocks == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    if (ahead != nullptr)
      for (int64_t l = 0; l < share; l += 64) _mm_prefetch(ahead + s * share + l, _MM_HINT_T1);
    const int64_t k = s * kStep;
    _tile_loadd(6, lo + kTile * k, 64);  // 16 rows of (16 x rows by 4 inputs)
    _tile_loadd(7, hi + kTile * k, 64);
    _tile_loadd(4, a[0] + k, lda);
    _tile_dpbsud(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if constexpr (Blocks == 2) {
      _tile_loadd(5, a[1] + k, lda);
      _tile_dpbsud(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, sums[0], 64);
  _tile_stored(1, sums[1], 64);
  if constexpr (Blocks == 2) {
    _tile_stored(2, sums[2], 64);
    _tile_stored(3, sums[3], 64);
  }
}

// 16 x 16 floats transposed in registers: v[i] lane r -> v[r] lane i
GPTFAST_AMX_TARGET inline void transpose16(__m512 v[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // 32-bit pairs
    t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
  }
  for (int i = 0; i < 16; i += 4)  // 64-bit pairs
    for (int j = 0; j < 2; ++j) {
      const __m512d a = _mm512_castps_pd(t[i + j]), b = _mm512_castps_pd(t[i + j + 2]);
      v[i + 2 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      v[i + 2 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int i = 0; i < 16; i += 8)  // 128-bit lanes: even ones, then odd ones
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(v[i + j], v[i + j + 4], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    v[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// total[i] (+)= 256 * hi[i] + lo[i] in int64, 16 lanes (x rows) of weight row i; = on the first chunk
GPTFAST_AMX_TARGET inline void add_sums(const int32_t (*lo)[kTile], const int32_t (*hi)[kTile], int64_t (*total)[kTile],
                                        bool first) {
  for (int64_t i = 0; i < kTile; ++i)
    for (int h = 0; h < 2; ++h) {
      const __m512i l = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo[i] + 8 * h)));
      const __m512i u = _mm512_cvtepi32_epi64(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi[i] + 8 * h)));
      __m512i s = _mm512_add_epi64(_mm512_slli_epi64(u, 8), l);
      if (!first) s = _mm512_add_epi64(s, _mm512_loadu_si512(total[i] + 8 * h));
      _mm512_storeu_si512(total[i] + 8 * h, s);
    }
}

// rows [n0, n1) of y for every x row, 32 weight rows (two tiles) at a time
GPTFAST_AMX_TARGET void rows_i8_amx(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0,
                                    int64_t n1) {
  const int64_t K = w.K, K64 = K / kStep * kStep, plane = plane_bytes(K);
  // the next 32 rows' bytes each whole step prefetches, in whole lines
  const int64_t whole = std::max<int64_t>(1, K64 / kStep);
  const int64_t share = (2 * kTile * w.row_bytes / 64 + whole - 1) / whole * 64;
  thread_local std::vector<int8_t> edge;  // a weight block cut short by N, padded with rows of zeros
  alignas(64) int8_t tail[2 * kTile][kStep];  // the rows' inputs past K64, padded with zeros
  _tile_loadconfig(&kTileConfig);  // per thread: the tile registers are a thread's state
  for (int64_t n = n0; n < n1; n += 2 * kTile) {
    const int64_t cols = std::min(2 * kTile, n1 - n), blocks = cols > kTile ? 2 : 1;
    const int8_t* a[2];
    int64_t lda = w.row_bytes;
    if (n + blocks * kTile > w.N) {  // rows past N are not there to read: copy the last ones
      edge.assign(2 * kTile * K, 0);
      std::memcpy(edge.data(), row_ptr(w, n), (w.N - n) * K);
      a[0] = edge.data(), a[1] = edge.data() + kTile * K, lda = K;
    } else {
      a[0] = reinterpret_cast<const int8_t*>(row_ptr(w, n)), a[1] = a[0] + kTile * lda;
    }
    if (K64 < K)
      for (int64_t i = 0; i < blocks * kTile; ++i) {
        std::memset(tail[i], 0, kStep);
        std::memcpy(tail[i], a[i / kTile] + i % kTile * lda + K64, K - K64);
      }
    asm volatile("" ::: "memory");  // GCC's asm for tileloadd names no memory: the copies above stay before it
    // the next 32 rows (a contiguous 32 row_bytes), while the first x tile passes (the next ones
    // find these rows in cache); past n1 too, where this thread's next chunk of rows usually
    // starts (linear_cpu.cpp)
    const char* next = n + 4 * kTile <= w.N ? reinterpret_cast<const char*>(row_ptr(w, n + 2 * kTile)) : nullptr;
    for (int64_t m0 = 0; m0 < in.M; m0 += kTile) {
      const int8_t* lo = in.xq_bytes + m0 / kTile * 2 * plane;
      const int64_t rows = std::min(kTile, in.M - m0);
      alignas(64) int64_t total[2 * kTile][kTile];  // (weight row, x row)
      // total (+)= the weight rows at `at` (ld bytes apart) times this x tile over `steps` steps
      // from input k (a chunk of int32 sums)
      const auto add_steps = [&](const int8_t* const* at, int64_t ld, int64_t k, int64_t steps, const char* ahead) {
        alignas(64) int32_t sums[4][kTile][kTile];
        if (blocks == 2)
          dot_tiles<2>(at, ld, lo + kTile * k, lo + plane + kTile * k, steps, sums, ahead, share);
        else
          dot_tiles<1>(at, ld, lo + kTile * k, lo + plane + kTile * k, steps, sums, ahead, share);
        for (int64_t b = 0; b < blocks; ++b) add_sums(sums[2 * b], sums[2 * b + 1], total + kTile * b, k == 0);
      };
      for (int64_t k0 = 0; k0 < K64; k0 += kAmxChunk) {
        const int8_t* at[2] = {a[0] + k0, a[1] + k0};
        add_steps(at, lda, k0, (std::min(K64, k0 + kAmxChunk) - k0) / kStep,
                  m0 == 0 && next ? next + k0 / kStep * share : nullptr);
      }
      if (K64 < K) {  // one more step, from the padded copies (x's bytes are zeros past K too)
        const int8_t* at[2] = {tail[0], tail[kTile]};
        add_steps(at, kStep, K64, 1, nullptr);
      }
      for (int64_t b = 0; b < blocks; ++b) {  // as fp32 (one rounding, as every path's), transposed into y
        __m512 v[kTile];
        for (int64_t i = 0; i < kTile; ++i) {
          const int64_t* t = total[kTile * b + i];
          v[i] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(_mm512_loadu_si512(t))),
                                    _mm512_cvtepi64_ps(_mm512_loadu_si512(t + 8)), 1);
        }
        transpose16(v);
        const int64_t c = std::min(kTile, cols - kTile * b);
        const __mmask16 keep = static_cast<__mmask16>((1u << c) - 1);
        for (int64_t r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * ldy + n + kTile * b, keep, v[r]);
      }
    }
  }
  _tile_release();
}

}  // namespace

// x's int16 as the tiles read them, 16 x rows a tile, inputs padded with zeros to whole steps (and
// rows past M): for each tile its low bytes, then its high bytes, each (steps * 16, 16, 4): [j][r][e]
// = byte of xq[r][4j + e].
GPTFAST_AMX_TARGET Input prepare_amx(const Weight& w, const Input& in, Scratch& scratch) {
  if (w.fmt != WFormat::I8 || in.M < kAmxMinRows) return prepare_avx512(w, in, scratch);
  const int64_t K = w.K, plane = plane_bytes(K);
  scratch.bytes.assign((in.M + kTile - 1) / kTile * 2 * plane, 0);
  for (int64_t m = 0; m < in.M; ++m) {
    int8_t* lo = scratch.bytes.data() + m / kTile * 2 * plane + m % kTile * 4;
    const int16_t* xq = in.xq + m * in.ld;
    for (int64_t j = 0; j < K / 4; ++j) {  // 4 int16 -> 4 low bytes, 4 high bytes
      uint64_t four;
      std::memcpy(&four, xq + 4 * j, 8);
      const uint32_t low = _pext_u64(four, 0x00FF00FF00FF00FFull), high = _pext_u64(four, 0xFF00FF00FF00FF00ull);
      std::memcpy(lo + j * 4 * kTile, &low, 4);
      std::memcpy(lo + plane + j * 4 * kTile, &high, 4);
    }
    for (int64_t k = K / 4 * 4; k < K; ++k) {  // the last 1-3
      lo[k / 4 * 4 * kTile + k % 4] = static_cast<int8_t>(xq[k] & 0xFF);
      lo[plane + k / 4 * 4 * kTile + k % 4] = static_cast<int8_t>(xq[k] >> 8);
    }
  }
  Input split = in;
  split.xq_bytes = scratch.bytes.data();
  return split;
}

void rows_amx(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  if (in.xq_bytes != nullptr) return rows_i8_amx(w, in, y, ldy, n0, n1);
  rows_avx512(w, in, y, ldy, n0, n1);
}

}  // namespace gptfast
#endif
