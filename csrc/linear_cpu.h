// The weight formats of gptfast::linear (csrc/linear_cpu.cpp) and their plain C++ dequantisation,
// shared by the portable path and the tails of the vector paths.
//
// A weight is N output rows of K inputs, stored row after row:
//   F32 / BF16 / F16: the values themselves;
//   I8: int8 q, w = scale[n] * q (one fp32 scale per output row, applied after the dot product);
//   I4: unsigned 4-bit q in groups of `group` inputs along K (a multiple of 32, at most 256; K
//       padded to whole groups, the padding's x is zero), w = s * q + m with (s, m) fp16 per
//       (row, group), stored interleaved as (N, groups, 2). Nibble layout: each 32 inputs take 16
//       bytes, byte i holding input i in its low and input i + 16 in its high nibble (one load,
//       an AND and a shift give two vectors of 16).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

// x86-64 built by GCC or clang: the vector paths use their target attributes and CPU builtins.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GPTFAST_X86_GNU 1
// the "amx" path: Linux (which grants the tile state on request) and a compiler with AMX intrinsics
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define GPTFAST_AMX 1
#endif
#endif

namespace gptfast {

enum class WFormat { F32, BF16, F16, I8, I4 };

// Output rows per block: the unit the threads split (a multiple of every vector tile's height).
constexpr int64_t kRowBlock = 12;

struct Weight {
  WFormat fmt;
  const void* data;
  int64_t N, K;                    // K: inputs per row (for I4 padded to a multiple of group)
  int64_t row_bytes;               // bytes from one row to the next
  const float* row_scale;          // I8: (N,)
  const c10::Half* group_scale;    // I4: (N, K / group, 2) = (s, m)
  int64_t group;                   // I4: inputs per group
  const int8_t* packed;            // I8: pack_int8's copy of the weight, or nullptr (see below)
};

inline const uint8_t* row_ptr(const Weight& w, int64_t n) {
  return static_cast<const uint8_t*>(w.data) + n * w.row_bytes;
}

// w[n, k] of a float format.
inline float weight_at(const Weight& w, int64_t n, int64_t k) {
  const uint8_t* r = row_ptr(w, n);
  switch (w.fmt) {
    case WFormat::BF16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(r)[k]);
    case WFormat::F16: return static_cast<float>(reinterpret_cast<const c10::Half*>(r)[k]);
    default: return reinterpret_cast<const float*>(r)[k];
  }
}

// q[n, k] of an I4 weight (0..15).
inline uint8_t weight_q4(const Weight& w, int64_t n, int64_t k) {
  const uint8_t byte = row_ptr(w, n)[(k / 32) * 16 + (k % 16)];
  return (k % 32) < 16 ? (byte & 0xF) : (byte >> 4);
}

// x as the kernels read it: M rows of fp32 at x + m * ld; for int8 and int4 weights instead
// rounded to int16, xq = round(x / x_scale[m]) with x_scale = max |x_m| / 32767 (an error of at
// most 2^-16 of the row's largest value): integer products then sum exactly, about twice as
// fast as converting the weights to fp32. x_group_sum (M, groups): the int4 groups' sums of xq.
struct Input {
  const float* x;
  const int16_t* xq;
  const float* x_scale;
  const float* x_group_sum;
  int64_t M, ld;
  const int32_t* xq_pairs;  // "avx512", int8: xq's pairs of inputs as its tiles read them, or nullptr
  const int8_t* xq_bytes;   // "amx", int8: xq's low and high bytes as its tiles read them, or nullptr
};

// What a path's prepare makes once per call for its rows to read (see below).
struct Scratch {
  std::vector<float> x;
  std::vector<int32_t> pairs;
  std::vector<int8_t> bytes;
};

// int8 weights as the AVX2 path's many-row tiles read them: blocks of kPackRows output rows, each
// (ceil(K / 2), kPackRows, 2) with block b's [p][c][e] = q[kPackRows b + c][2 p + e], zero past N
// and K (a copy narrowed to fewer rows, as decode_step's head, may hold further rows in its last
// block: only N are stored). Those tiles pack every block as they go; a copy made once
// (gptfast::pack_int8, which gptfast/cpu_decode.py keeps beside an int8 model's weights) spares
// them that work.
constexpr int64_t kPackRows = 16;
inline int64_t packed_block_bytes(int64_t K) { return (K + 1) / 2 * 2 * kPackRows; }
inline int64_t packed_blocks(int64_t N) { return (N + kPackRows - 1) / kPackRows; }
// The block holding row n (a multiple of kPackRows) of a packed copy of K inputs a row.
inline const int8_t* packed_block(const int8_t* packed, int64_t n, int64_t K) {
  return packed + n / kPackRows * packed_block_bytes(K);
}

// Inputs per integer chunk: 128 steps of 16 int8 x int16 products (each int32 lane gains at most
// 2 * 128 * 32767 per step) cannot overflow int32 before they are added up in int64.
constexpr int64_t kI8Chunk = 2048;

// The kernel paths: rows [n0, n1) of y (M, N) = x (M, K) W^T, y with leading dimension ldy,
// before the row and x scales and the bias (int8/int4: in units of x_scale). Each writes every
// y[m, n] it owns. A path's prepare runs once per call before the threads split the rows and
// returns the Input its rows read (its own copies of x, if it needs them, in `scratch`).
void rows_portable(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1);
#if defined(GPTFAST_X86_GNU)
void rows_avx2(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1);
Input prepare_avx2(const Weight& w, const Input& in, Scratch& scratch);
void pack_int8_avx2(const Weight& w, int8_t* out);  // the packed copy above, (ceil(N / 16), block) bytes
// Whether M x rows of an int8 w run the many-row packed tiles (linear_avx2.cpp), and those rows
// through them: linear_avx2.cpp's AVX2 tiles, or with `vnni` linear_avx512.cpp's
bool packed_tiles_take(const Weight& w, int64_t M);
void rows_i8_packed(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1, bool vnni);
// "avx512": rows_avx2 with the many-row int8 tiles in AVX-512 F/BW + VNNI (linear_avx512.cpp's tile of
// `rows` = 4, 8, 12 or 16 x rows, vnni_tile_height's for the tile at row m of M, reading their
// pairs of inputs interleaved by prepare_avx512; the other arguments as linear_avx2.cpp's
// tile_i8_packed takes them)
bool has_avx512_vnni();  // the AVX-512 features alone (the path also needs has_avx2's)
int vnni_tile_height(int64_t M, int64_t m);
void rows_avx512(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1);
Input prepare_avx512(const Weight& w, const Input& in, Scratch& scratch);
void tile_i8_vnni(int rows, const int8_t* pk, int64_t p0, int64_t p1, const int32_t* xt,
                  int64_t (*total)[kPackRows], uintptr_t pf, int64_t pf_step);
#endif
#if defined(GPTFAST_AMX)
// "amx": the avx512 path with int8 weights against 4 or more x rows in AMX tiles (linear_amx.cpp)
bool has_amx();  // AMX-TILE + AMX-INT8 (+ BMI2, AVX512DQ), and Linux's grant of the tile state
void rows_amx(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1);
Input prepare_amx(const Weight& w, const Input& in, Scratch& scratch);
#endif

// Whether the linear op's default path (GPTFAST_CPU_KERNEL, else the best this CPU runs) reads
// AVX2 + FMA + F16C (every path but "portable"); decode_cpu.cpp's float16 KV cache follows the same choice.
bool avx2_chosen();

// The op itself (registered as gptfast::linear; decode_cpu.cpp calls it directly). packed: int8
// only, pack_int8(weight), read by the AVX2 path's many-row tiles instead of packing as they go.
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& bias, int64_t group_size, c10::string_view path,
                      const c10::optional<at::Tensor>& packed);

}  // namespace gptfast
