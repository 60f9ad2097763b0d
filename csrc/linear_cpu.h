// The weight formats of gptfast::linear (csrc/linear_cpu.cpp) and their plain C++ dequantisation,
// shared by the portable path and the tails of the vector paths.
//
// A weight is N output rows of K inputs, stored row after row:
//   F32 / BF16 / F16: the values themselves;
//   I8: int8 q, w = scale[n] * q (one fp32 scale per output row, applied after the dot product);
//   I4: unsigned 4-bit q in groups of `group` inputs along K (K padded to a multiple of the group,
//       the padding's x is zero), w = s * q + m with (s, m) fp16 per (row, group), stored
//       interleaved as (N, groups, 2). Nibble layout: each 16 inputs take 8 bytes, byte i holding
//       input i in its low and input i + 8 in its high nibble (one load, an AND and a shift give
//       two 8-wide vectors).
#pragma once
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace gptfast {

enum class WFormat { F32, BF16, F16, I8, I4 };

struct Weight {
  WFormat fmt;
  const void* data;
  int64_t N, K;                    // K: inputs per row (for I4 padded to a multiple of group)
  int64_t row_bytes;               // bytes from one row to the next
  const float* row_scale;          // I8: (N,)
  const c10::Half* group_scale;    // I4: (N, K / group, 2) = (s, m)
  int64_t group;                   // I4: inputs per group, a multiple of 16
};

inline const uint8_t* row_ptr(const Weight& w, int64_t n) {
  return static_cast<const uint8_t*>(w.data) + n * w.row_bytes;
}

// w[n, k] without the I8 row scale (applied to the finished dot product).
inline float weight_at(const Weight& w, int64_t n, int64_t k) {
  const uint8_t* r = row_ptr(w, n);
  switch (w.fmt) {
    case WFormat::F32: return reinterpret_cast<const float*>(r)[k];
    case WFormat::BF16: return static_cast<float>(reinterpret_cast<const c10::BFloat16*>(r)[k]);
    case WFormat::F16: return static_cast<float>(reinterpret_cast<const c10::Half*>(r)[k]);
    case WFormat::I8: return static_cast<float>(reinterpret_cast<const int8_t*>(r)[k]);
    case WFormat::I4: {
      const uint8_t byte = r[(k / 16) * 8 + (k % 8)];
      const int q = (k % 16) < 8 ? (byte & 0xF) : (byte >> 4);
      const c10::Half* sm = w.group_scale + 2 * (n * (w.K / w.group) + k / w.group);
      return static_cast<float>(sm[0]) * q + static_cast<float>(sm[1]);
    }
  }
  return 0.f;
}

// The kernel paths: rows [n0, n1) of y (M, N) = x (M, K) W^T, fp32 x and y with leading
// dimensions ldx and ldy, before the row scale and bias. Each writes every y[m, n] it owns.
void rows_portable(const Weight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
                   int64_t n0, int64_t n1);
#if defined(__x86_64__) || defined(_M_X64)
void rows_avx2(const Weight& w, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy,
               int64_t n0, int64_t n1);
#endif

}  // namespace gptfast
