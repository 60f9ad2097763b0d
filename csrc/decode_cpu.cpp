// gptfast::decode_step: one step of GPT-2 on CPU in one call, for n tokens of any number of
// sequences. Each token brings its cache row and position: a decoding sequence one token at its
// length so far, a prompt being prefilled all its tokens from position 0 (or any run of
// consecutive positions). The step embeds the tokens, runs every block (LayerNorm, qkv, the new
// keys/values written into the cache, each token's attention over its row's slots up to its own
// position, out_proj, residual, LayerNorm, fc + GELU, proj, residual), then the final LayerNorm and
// the output head for the tokens asked for (a sequence's last), and returns their logits.
//
// Why: at batch 1 a token is ~50 matmuls that read the weights plus ~300 small ops; in eager
// PyTorch the small ops and the Python between them cost a third of the token (see
// benchmarks/profile_decode.py). Here they are plain loops over a few thousand floats. The
// matmuls are gptfast::linear's kernel (linear_cpu.cpp), so every weight format it reads runs
// here. Prompts prefilled in the same call as the decoding rows add their tokens to the rows of
// each matmul, where a separate prefill would read every weight once more. The reference is the
// model's own forward through the KV cache (gptfast.runner); tests/test_cpu_decode.py checks one
// against the other.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "linear_cpu.h"  // first: it defines GPTFAST_X86_GNU

#if defined(GPTFAST_X86_GNU)
#include <immintrin.h>
#endif

// The loops below are plain C++; on x86-64 each is also built for AVX2 + FMA (x86-64-v3) and the
// loader picks the clone this CPU runs (GCC/clang target_clones).
#if defined(GPTFAST_X86_GNU)
#define GPTFAST_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define GPTFAST_CLONES
#endif

namespace gptfast {
namespace {

constexpr int64_t kLinearsPerBlock = 4;  // qkv, out_proj, fc, proj (each: weight, scale, bias)
constexpr int64_t kNormsPerBlock = 4;    // norm1 scale, shift, norm2 scale, shift

// out = LayerNorm(x) of C values (two passes in fp32, as the reference module computes it).
GPTFAST_CLONES void layer_norm(const float* x, const float* scale, const float* shift, float eps, int64_t C,
                               float* out) {
  float mean = 0.f;
  for (int64_t c = 0; c < C; ++c) mean += x[c];
  mean /= static_cast<float>(C);
  float var = 0.f;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const float inv = 1.f / std::sqrt(var / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * inv * scale[c] + shift[c];
}

// tanh by a rational function (the one Eigen vectorises): a few float ulps over the whole
// range, in mul/add/div/min/max only, so the loop vectorises where std::tanh would not.
inline float tanh_rational(float x) {
  constexpr float kClamp = 7.90531110763549805f;  // tanh rounds to +-1 in float beyond
  x = x < -kClamp ? -kClamp : x;
  x = x > kClamp ? kClamp : x;
  const float x2 = x * x;
  float p = -2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  float q = 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

// GPT-2's GELU (tanh form), in place.
GPTFAST_CLONES void gelu(float* x, int64_t count) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  for (int64_t i = 0; i < count; ++i) {
    const float v = x[i];
    x[i] = 0.5f * v * (1.f + tanh_rational(kSqrt2OverPi * (v + 0.044715f * v * v * v)));
  }
}

// e^x for x <= 0 (softmax's shifted scores) within 1 float ulp: 2^n p(r) with n = round(x log2 e)
// and Cephes expf's polynomial on |r| <= ln 2 / 2, in arithmetic and bit operations that
// vectorise where std::exp is a library call per element.
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;  // e^-87 is still a normal float
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;         // x - n ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += static_cast<int32_t>(n) * (1 << 23);  // times 2^n
  std::memcpy(&p, &bits, sizeof bits);
  return p;
}

// The 8 partial sums of a dot product added up, in the one order every path uses.
inline float sum8(const float* part) {
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

// sum a[d] b[d] in 8 interleaved partial sums (a fixed order that vectorises, where one running
// sum would be a chain of dependent adds).
template <typename T>
inline float dot(const float* a, const T* b, int64_t D) {
  float part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += a[d + j] * static_cast<float>(b[d + j]);
  for (; d < D; ++d) part[0] += a[d] * static_cast<float>(b[d]);
  return sum8(part);
}

// scores[0..S) = softmax(scores / sqrt(D)) in place and out (D) zeroed, for out += p_s v_s; where a
// score is NaN or infinite (a NaN or inf in q or the keys) out is NaN, as the reference gives, and
// false tells the caller to stop there.
GPTFAST_CLONES bool softmax(float* scores, int64_t S, int64_t D, float* out) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  float big = -INFINITY, sum = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    scores[s] *= scale;
    big = std::max(big, scores[s]);
    sum += scores[s];
  }
  std::fill_n(out, D, std::isfinite(sum) ? 0.f : std::numeric_limits<float>::quiet_NaN());
  if (!std::isfinite(sum)) return false;
  float total = 0.f;
  for (int64_t s = 0; s < S; ++s) total += (scores[s] = exp_nonpositive(scores[s] - big));
  for (int64_t s = 0; s < S; ++s) scores[s] /= total;
  return true;
}

// The new key and value of one head of one token to slot L of its row's cache (float16: rounded
// to nearest even, as torch's copy rounds).
template <typename T>
void store_kv(const float* k_new, const float* v_new, T* k, T* v, int64_t L, int64_t D) {
  for (int64_t d = 0; d < D; ++d) {
    k[L * D + d] = static_cast<T>(k_new[d]);
    v[L * D + d] = static_cast<T>(v_new[d]);
  }
}

// One head of one token at position L: out (D) = softmax(q K[0..L]^T / sqrt(D)) V[0..L]. k, v: its
// row's (slots, D) cache of this head, float32 or (portable, a conversion call per value) float16.
template <typename T>
GPTFAST_CLONES void attend(const float* q, const T* k, const T* v, int64_t L, int64_t D, float* scores, float* out) {
  for (int64_t s = 0; s <= L; ++s) scores[s] = dot(q, k + s * D, D);
  if (!softmax(scores, L + 1, D, out)) return;
  for (int64_t s = 0; s <= L; ++s)
    for (int64_t d = 0; d < D; ++d) out[d] += scores[s] * static_cast<float>(v[s * D + d]);
}

#if defined(GPTFAST_X86_GNU)
#define GPTFAST_F16C __attribute__((target("avx2,fma,f16c")))
GPTFAST_F16C inline __m256 widen8(const uint16_t* p) {  // 8 float16 values as fp32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

GPTFAST_F16C void store_kv_f16(const float* k_new, const float* v_new, uint16_t* k, uint16_t* v, int64_t L,
                               int64_t D) {
  const int64_t D8 = D / 8 * 8;
  for (int64_t d = 0; d < D8; d += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(k + L * D + d), _mm256_cvtps_ph(_mm256_loadu_ps(k_new + d), 0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(v + L * D + d), _mm256_cvtps_ph(_mm256_loadu_ps(v_new + d), 0));
  }
  for (int64_t d = D8; d < D; ++d) {
    k[L * D + d] = _cvtss_sh(k_new[d], 0);
    v[L * D + d] = _cvtss_sh(v_new[d], 0);
  }
}

// sum8 of a vector's lanes, in sum8's order: (lanes + upper half) then ((0 + 1) + (2 + 3)).
GPTFAST_F16C inline float sum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_shuffle_ps(s, s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehl_ps(t, t)));
}

// scores[s + j] = q . key s + j for J keys at once: J independent chains of FMAs where one key
// alone is a chain of D / 8 dependent ones (each key's sums in the same order either way).
template <int J>
GPTFAST_F16C inline void key_scores(const float* q, const uint16_t* k, const uint16_t* v, int64_t s, int64_t D,
                                    float* scores) {
  constexpr int64_t kAhead = 8;
  const int64_t D8 = D / 8 * 8;
  __m256 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = _mm256_setzero_ps();
  // the keys kAhead on and these keys' values into cache: one head's keys and values are a few
  // KB each, too short a stream for the hardware prefetcher to catch (the address as an integer:
  // the keys ahead can lie past the row, where a prefetch is harmless but pointer arithmetic is
  // not defined)
  const uintptr_t keys_ahead = reinterpret_cast<uintptr_t>(k) + (s + kAhead) * D * 2;
  for (int64_t b = 0; b < J * D * 2; b += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(keys_ahead + b), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(v + s * D) + b, _MM_HINT_T0);
  }
  for (int64_t d = 0; d < D8; d += 8) {
    const __m256 qd = _mm256_loadu_ps(q + d);
    for (int j = 0; j < J; ++j) acc[j] = _mm256_fmadd_ps(qd, widen8(k + (s + j) * D + d), acc[j]);
  }
  for (int j = 0; j < J; ++j) {
    if (D8 < D) {  // the tail into lane 0, as dot's part[0]
      alignas(32) float part[8];
      _mm256_store_ps(part, acc[j]);
      for (int64_t d = D8; d < D; ++d) part[0] += q[d] * _cvtsh_ss(k[(s + j) * D + d]);
      acc[j] = _mm256_load_ps(part);
    }
    scores[s + j] = sum8(acc[j]);
  }
}

// out[d0, d0 + 8 NB) += sum_s p_s v_s over the S values, in NB registers across the keys (through
// memory, each key's FMAs waited on the store of the key before).
template <int NB>
GPTFAST_F16C inline void add_values(const float* p, const uint16_t* v, int64_t S, int64_t D, int64_t d0, float* out) {
  __m256 o[NB];
  for (int j = 0; j < NB; ++j) o[j] = _mm256_loadu_ps(out + d0 + 8 * j);
  for (int64_t s = 0; s < S; ++s) {
    const __m256 ps = _mm256_set1_ps(p[s]);
    for (int j = 0; j < NB; ++j) o[j] = _mm256_fmadd_ps(ps, widen8(v + s * D + d0 + 8 * j), o[j]);
  }
  for (int j = 0; j < NB; ++j) _mm256_storeu_ps(out + d0 + 8 * j, o[j]);
}

// attend over a float16 cache with F16C: 8 values per conversion instruction, where the compiler
// leaves float16 loops scalar. A float16 cache halves the bytes the step reads per cached token
// (the fp32 cache is read at the memory floor). The same sums in the same order as attend's.
GPTFAST_F16C void attend_f16(const float* q, const uint16_t* k, const uint16_t* v, int64_t L, int64_t D,
                             float* scores, float* out) {
  constexpr int kKeys = 4, kBlock = 8;  // keys per chain group; value registers per block of D
  const int64_t S = L + 1, D8 = D / 8 * 8;
  int64_t s = 0;
  for (; s + kKeys <= S; s += kKeys) key_scores<kKeys>(q, k, v, s, D, scores);
  for (; s < S; ++s) key_scores<1>(q, k, v, s, D, scores);
  if (!softmax(scores, S, D, out)) return;
  int64_t d0 = 0;
  for (; d0 + 8 * kBlock <= D8; d0 += 8 * kBlock) add_values<kBlock>(scores, v, S, D, d0, out);
  for (; d0 < D8; d0 += 8) add_values<1>(scores, v, S, D, d0, out);
  for (s = 0; s < S; ++s)
    for (int64_t d = D8; d < D; ++d) out[d] += scores[s] * _cvtsh_ss(v[s * D + d]);
}
#endif

void check_float(const at::Tensor& t, const char* what, int64_t numel) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == numel,
              "gptfast decode_step: ", what, " must be a contiguous float32 tensor of ", numel, " values");
}

void check_float(const at::Tensor& t, const char* what) { check_float(t, what, t.numel()); }

// The step's tokens against the cache (rows of `slots` slots) and the context S: ids in the
// vocabulary, rows and positions in range, each row's tokens one run of consecutive positions
// (its keys are written before any token attends, so a run attends causally within itself),
// and the outputs indices of tokens.
void check_tokens(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& rows,
                  const at::Tensor& outputs, int64_t vocab_size, int64_t cache_rows, int64_t positions_held) {
  const int64_t n = tokens.numel();
  for (const at::Tensor* t : {&tokens, &positions, &rows, &outputs})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1,
                "gptfast decode_step: tokens, positions, rows and outputs must be contiguous 1-D int64 tensors");
  TORCH_CHECK(positions.numel() == n && rows.numel() == n,
              "gptfast decode_step: tokens, positions and rows must have one size");
  const int64_t *tok = tokens.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();
  std::vector<bool> seen(cache_rows, false);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(0 <= tok[i] && tok[i] < vocab_size, "gptfast decode_step: token id ", tok[i], " of token ", i,
                " is outside the vocabulary [0, ", vocab_size, ")");
    TORCH_CHECK(0 <= row[i] && row[i] < cache_rows, "gptfast decode_step: token ", i, " is for cache row ", row[i],
                "; the cache has ", cache_rows, " rows");
    TORCH_CHECK(0 <= pos[i] && pos[i] < positions_held, "gptfast decode_step: token ", i, " has position ", pos[i],
                "; the cache and the context hold ", positions_held, " positions");
    const bool continues = i > 0 && row[i] == row[i - 1];
    TORCH_CHECK(continues ? pos[i] == pos[i - 1] + 1 : !seen[row[i]], "gptfast decode_step: the tokens of cache row ",
                row[i], " must be one run of consecutive positions");
    seen[row[i]] = true;
  }
  const int64_t* out = outputs.data_ptr<int64_t>();
  for (int64_t j = 0; j < outputs.numel(); ++j)
    TORCH_CHECK(0 <= out[j] && out[j] < n, "gptfast decode_step: output ", j, " names token ", out[j], " of ", n);
}

}  // namespace

at::Tensor decode_step_cpu(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& rows,
                           const at::Tensor& outputs, const at::Tensor& tok_emb, const at::Tensor& pos_emb,
                           at::TensorList norms, const c10::List<c10::optional<at::Tensor>>& linears,
                           at::IntArrayRef groups, const c10::List<c10::optional<at::Tensor>>& packed,
                           at::TensorList k_cache, at::TensorList v_cache, int64_t n_heads,
                           double eps, int64_t vocab_size) {
  const int64_t L = static_cast<int64_t>(k_cache.size()), n = tokens.numel(), C = tok_emb.size(1);
  const int64_t D = C / n_heads, S = pos_emb.size(0);
  TORCH_CHECK(n_heads > 0 && C % n_heads == 0, "gptfast decode_step: ", C, " channels do not split into ",
              n_heads, " heads");
  const int64_t n_linears = kLinearsPerBlock * L + 1;
  TORCH_CHECK(static_cast<int64_t>(v_cache.size()) == L &&
                  static_cast<int64_t>(norms.size()) == kNormsPerBlock * L + 2 &&
                  static_cast<int64_t>(linears.size()) == 3 * n_linears &&
                  static_cast<int64_t>(groups.size()) == n_linears &&
                  static_cast<int64_t>(packed.size()) == n_linears,
              "gptfast decode_step: operands for ", L, " layers need ", kNormsPerBlock * L + 2, " norm tensors, ",
              3 * n_linears, " linear operands, ", n_linears, " group sizes and ", n_linears,
              " packed weights (or None)");
  for (int64_t i = 0; i < n_linears; ++i)
    TORCH_CHECK(linears.get(3 * i).has_value(), "gptfast decode_step: linear ", i, " has no weight");
  TORCH_CHECK(tok_emb.dim() == 2 && tok_emb.size(0) >= vocab_size && pos_emb.dim() == 2,
              "gptfast decode_step: tok_emb must be (>= vocab_size rows, C) and pos_emb (context, C)");
  check_float(tok_emb, "tok_emb");
  check_float(pos_emb, "pos_emb", S * C);
  for (const at::Tensor& t : norms) check_float(t, "a LayerNorm parameter", C);
  const bool half_cache = L > 0 && k_cache[0].scalar_type() == at::kHalf;
  for (int64_t l = 0; l < L; ++l)
    for (const at::Tensor& t : {k_cache[l], v_cache[l]})
      TORCH_CHECK((t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf) &&
                      t.scalar_type() == k_cache[0].scalar_type() && t.is_contiguous() && t.dim() == 4 &&
                      t.size(1) == n_heads && t.size(3) == D && t.sizes() == k_cache[0].sizes(),
                  "gptfast decode_step: every cache must be contiguous, float32 or float16, of one dtype and "
                  "shape (rows, ", n_heads, ", slots, ", D, ")");
  const int64_t cache_rows = L ? k_cache[0].size(0) : n, slots = L ? k_cache[0].size(2) : S;
  check_tokens(tokens, positions, rows, outputs, vocab_size, cache_rows, std::min(S, slots));
#if defined(GPTFAST_F16C)
  const bool f16c = half_cache && avx2_chosen();
#endif
  const int64_t *tok = tokens.data_ptr<int64_t>(), *pos = positions.data_ptr<int64_t>();
  const int64_t* row = rows.data_ptr<int64_t>();

  // linear i of the list: x (rows, K) -> (rows, N); N = 0: any width (fc: proj checks its K)
  auto linear = [&](const at::Tensor& x, int64_t i, int64_t N) {
    at::Tensor y = linear_cpu(x, *linears.get(3 * i), linears.get(3 * i + 1), linears.get(3 * i + 2), groups[i], "",
                              packed.get(i));
    TORCH_CHECK(N == 0 || y.size(1) == N, "gptfast decode_step: linear ", i, " has ", y.size(1), " outputs, not ", N);
    return y;
  };
  const auto opts = tok_emb.options();
  at::Tensor x = at::empty({n, C}, opts), h = at::empty({n, C}, opts), att = at::empty({n, C}, opts);
  float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < n; ++m) {  // token + position embeddings
    const float* te = tok_emb.data_ptr<float>() + tok[m] * C;
    const float* pe = pos_emb.data_ptr<float>() + pos[m] * C;
    for (int64_t c = 0; c < C; ++c) xp[m * C + c] = te[c] + pe[c];
  }
  // the rows of `in` through norm i into `out`, split over the threads beyond 8 rows (a step of a
  // few rows stays on this thread: a fork costs more than it saves there)
  const auto norm_rows = [&](int64_t i, const at::Tensor& in, at::Tensor& out) {
    const float *ip = in.data_ptr<float>(), *scale = norms[i].data_ptr<float>();
    const float* shift = norms[i + 1].data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, in.size(0), 8, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) layer_norm(ip + m * C, scale, shift, static_cast<float>(eps), C, op + m * C);
    });
  };
  const auto add_into_x = [&](const at::Tensor& y) {  // the residual stream: x += y
    const float* yp = y.data_ptr<float>();
    for (int64_t i = 0; i < n * C; ++i) xp[i] += yp[i];
  };
  for (int64_t l = 0; l < L; ++l) {
    norm_rows(kNormsPerBlock * l, x, h);
    const at::Tensor qkv = linear(h, kLinearsPerBlock * l, 3 * C);  // (n, 3C): q, k, v, each (H, D)
    const float* qp = qkv.data_ptr<float>();
    float* ap = att.data_ptr<float>();
    // the layer's cache, typed once (data_ptr<T>() checks the dtype at each call), and where
    // token m's head hd starts in it, laid out (rows, H, slots, D)
    float *kf = nullptr, *vf = nullptr;
    c10::Half *kh = nullptr, *vh = nullptr;
    if (half_cache)
      kh = k_cache[l].data_ptr<c10::Half>(), vh = v_cache[l].data_ptr<c10::Half>();
    else
      kf = k_cache[l].data_ptr<float>(), vf = v_cache[l].data_ptr<float>();
    const auto base = [&](int64_t m, int64_t hd) { return (row[m] * n_heads + hd) * slots * D; };
    const auto bits = [](c10::Half* p) { return reinterpret_cast<uint16_t*>(p); };
    // every token's key and value first: a prompt's tokens attend to each other's
    for (int64_t i = 0; i < n * n_heads; ++i) {
      const int64_t m = i / n_heads, hd = i % n_heads, b = base(m, hd);
      const float* kv = qp + m * 3 * C + C + hd * D;
      if (!half_cache)
        store_kv(kv, kv + C, kf + b, vf + b, pos[m], D);
#if defined(GPTFAST_F16C)
      else if (f16c)
        store_kv_f16(kv, kv + C, bits(kh + b), bits(vh + b), pos[m], D);
#endif
      else
        store_kv(kv, kv + C, kh + b, vh + b, pos[m], D);
    }
    // (token, head) pairs handed out one at a time: tokens at different positions make fixed
    // halves of the pairs uneven, and the thread that finishes first would wait at the join
    std::atomic<int64_t> next{0};
    at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n * n_heads), 1, [&](int64_t, int64_t) {
      std::vector<float> scores(slots);
      for (int64_t i = next++; i < n * n_heads; i = next++) {
        const int64_t m = i / n_heads, hd = i % n_heads, b = base(m, hd);
        const float* q = qp + m * 3 * C + hd * D;
        float* out = ap + m * C + hd * D;
        if (!half_cache)
          attend(q, kf + b, vf + b, pos[m], D, scores.data(), out);
#if defined(GPTFAST_F16C)
        else if (f16c)
          attend_f16(q, bits(kh + b), bits(vh + b), pos[m], D, scores.data(), out);
#endif
        else
          attend(q, kh + b, vh + b, pos[m], D, scores.data(), out);
      }
    });
    add_into_x(linear(att, kLinearsPerBlock * l + 1, C));
    norm_rows(kNormsPerBlock * l + 2, x, h);
    at::Tensor f = linear(h, kLinearsPerBlock * l + 2, 0);  // (n, 4C)
    float* fp = f.data_ptr<float>();
    const int64_t F = f.size(1);  // whole rows per thread: each value sees the same vector lanes as alone
    at::parallel_for(0, n, 8, [&](int64_t m0, int64_t m1) { gelu(fp + m0 * F, (m1 - m0) * F); });
    add_into_x(linear(f, kLinearsPerBlock * l + 3, C));
  }
  // the final norm and the head for the tokens asked for only, through the head's first vocab_size
  // rows: a padded vocabulary's other rows would be computed and then copied away
  const at::Tensor last = x.index_select(0, outputs);  // (r, C)
  at::Tensor last_h = at::empty_like(last);
  norm_rows(kNormsPerBlock * L, last, last_h);
  const int64_t head = kLinearsPerBlock * L;
  const at::Tensor head_weight = *linears.get(3 * head);  // (get returns a copy: a reference would dangle)
  TORCH_CHECK(head_weight.dim() == 2, "gptfast decode_step: the head's weight must be 2-D, got ", head_weight.sizes());
  TORCH_CHECK(head_weight.size(0) >= vocab_size, "gptfast decode_step: the head has ", head_weight.size(0),
              " outputs for ", vocab_size, " tokens");
  using Operand = c10::optional<at::Tensor>;
  const auto first = [](const Operand& t, int64_t rows, const char* what) -> Operand {
    if (!t.has_value()) return c10::nullopt;
    TORCH_CHECK(t->dim() >= 1 && t->size(0) >= rows, "gptfast decode_step: the head's ", what, " has ",
                t->dim() ? t->size(0) : 0, " rows; its ", rows, " are needed");
    return t->narrow(0, 0, rows);
  };
  const Operand scale = first(linears.get(3 * head + 1), vocab_size, "scale");
  const Operand bias = first(linears.get(3 * head + 2), vocab_size, "bias");
  const Operand packed_rows = first(packed.get(head), packed_blocks(vocab_size), "packed copy");
  return linear_cpu(last_h, head_weight.narrow(0, 0, vocab_size), scale, bias, groups[head], "",
                    packed_rows);  // (r, vocab_size)
}

namespace {

// The index of the first largest value of x[0..V), or of its first NaN: torch.argmax's answer
// (sampling.cpp's row scan rejects NaN instead, as the sampler must: the two stay apart).
int64_t argmax_row(const float* x, int64_t V) {
  int64_t best = 0;
  for (int64_t k = 0; k < V; ++k) {
    if (std::isnan(x[k])) return k;
    if (x[k] > x[best]) best = k;
  }
  return best;
}

#if defined(GPTFAST_F16C)
// The same in two vector passes: the largest value (8 lanes; a NaN anywhere sends the row to
// argmax_row), then the first index holding it. The row (a vocabulary of logits) stays in cache.
GPTFAST_F16C int64_t argmax_row_avx2(const float* x, int64_t V) {
  const int64_t V8 = V / 8 * 8;
  __m256 top = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), nan = _mm256_setzero_ps();
  for (int64_t k = 0; k < V8; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    top = _mm256_max_ps(top, v);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, top);
  if (_mm256_movemask_ps(nan)) return argmax_row(x, V);
  float best = *std::max_element(lanes, lanes + 8);
  for (int64_t k = V8; k < V; ++k) {
    if (std::isnan(x[k])) return k;  // the first NaN: none came before the tail
    best = std::max(best, x[k]);
  }
  const __m256 want = _mm256_set1_ps(best);
  for (int64_t k = 0; k < V8; k += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + k), want, _CMP_EQ_OQ));
    if (hit) return k + __builtin_ctz(hit);
  }
  return argmax_row(x + V8, V - V8) + V8;
}
#endif

}  // namespace

// Greedy decoding's ids: logits (B, V) -> (B,) int64, as logits.argmax(-1), which took 469 us
// for 16 rows of GPT-2's vocabulary on this project's CPU (this: 68 us), serial time in each step.
// Other dtypes and layouts: torch's argmax.
at::Tensor argmax_rows_cpu(const at::Tensor& logits) {
  if (logits.scalar_type() != at::kFloat || logits.dim() != 2 || !logits.is_contiguous() || logits.size(1) == 0)
    return logits.argmax(-1);
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor ids = at::empty({B}, logits.options().dtype(at::kLong));
  const float* x = logits.data_ptr<float>();
  int64_t* out = ids.data_ptr<int64_t>();
#if defined(GPTFAST_F16C)
  const bool avx2 = avx2_chosen();
#endif
  at::parallel_for(0, B, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
#if defined(GPTFAST_F16C)
      if (avx2) {
        out[b] = argmax_row_avx2(x + b * V, V);
        continue;
      }
#endif
      out[b] = argmax_row(x + b * V, V);
    }
  });
  return ids;
}

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("decode_step", decode_step_cpu);
  m.impl("argmax_rows", argmax_rows_cpu);
}

TORCH_LIBRARY_IMPL(gptfast, CompositeExplicitAutograd, m) {
  m.impl("argmax_rows", [](const at::Tensor& logits) { return logits.argmax(-1); });
}

}  // namespace gptfast
