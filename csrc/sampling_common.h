// Shared by the CPU (sampling.cpp) and CUDA (sampling_cuda.cu) top-k samplers: the
// per-row uniform, the float key they order on, and the op's documented semantics.
//
// Semantics of gptfast::sample_top_k (both backends):
//  1. kept set = the k largest logits of the row, ordered (value desc, index asc): ties at
//     the k-th value keep the lowest indices; k >= V keeps the whole row.
//  2. temperature == 0 or k == 1: the id is the argmax (lowest index among equal maxima).
//  3. weights w = exp((x - max) / T) over the kept set; with top_p < 1 the kept set is cut
//     to the shortest prefix (same order) whose mass reaches top_p * sum(w).
//  4. u = row_uniform(seed, offset, row); the id is the first kept token, in increasing
//     token-id order, whose running sum of w exceeds u * sum(kept w).
// CPU and CUDA sum in different orders (sequential vs block-parallel fp32), so their ids
// agree except when u * sum lands within fp32 rounding of a cumulative boundary: up to
// ~1e-5 relative over 50257 kept tokens, where ~10% of rows differ (by a neighbouring id);
// with k <= 1000 under 1% of rows. Exact when the sums are (e.g. logits in {0, -inf}).
// CUDA top-p sums bin masses with shared-memory float atomics, so near a nucleus boundary
// (within fp32 rounding) its cut, and then the id, can also vary from run to run.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GPTFAST_HD __host__ __device__ __forceinline__
#else
#define GPTFAST_HD inline
#endif

namespace gptfast {

// splitmix64 finalizer: a counter-based hash, so any (seed, offset, row) is one O(1) draw.
GPTFAST_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// u in [0, 1) with 24 random bits: exact in fp32 on both backends.
GPTFAST_HD float row_uniform(uint64_t seed, uint64_t offset, uint64_t row) {
  uint64_t h = mix64(mix64(mix64(seed) ^ offset) ^ row);
  return static_cast<float>(h >> 40) * (1.0f / 16777216.0f);
}

// Order-preserving float -> uint32 (larger float, larger key), -0 folded into +0 so equal
// floats are equal keys: both backends select the top-k and break ties on these keys.
GPTFAST_HD uint32_t key_of(float f) {
  f += 0.0f;
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

}  // namespace gptfast
