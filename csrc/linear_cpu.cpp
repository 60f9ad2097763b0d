// CPU kernel of gptfast::linear: y = x W^T (* row scale) (+ bias) for the few rows of x that
// decoding multiplies (M = 1..16), with W in one of the formats of linear_cpu.h. At M = 1 the
// time is reading W once, so the low-precision formats are faster in proportion to their bytes.
//
// Paths, chosen at run time from the CPU's features (best first): "amx" (the avx512 path with int8
// weights against 4 or more x rows in AMX tiles, linear_amx.cpp), "avx512" (the avx2 path with its
// many-row int8 tiles in AVX-512 F/BW + VNNI, linear_avx512.cpp), "avx2" (AVX2 + FMA + F16C,
// linear_avx2.cpp) and "portable" (plain C++). GPTFAST_CPU_KERNEL=<name> or the op's `path`
// argument forces one (tests and benchmarks run each path this CPU has). Output rows are split
// over torch's intra-op threads.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/Exception.h>
#include <c10/util/bit_cast.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "linear_cpu.h"

namespace gptfast {

// Row n of a float-format W as fp32.
static void dequant_row(const Weight& w, int64_t n, float* out) {
  const uint8_t* r = row_ptr(w, n);
  switch (w.fmt) {
    case WFormat::F32: std::copy_n(reinterpret_cast<const float*>(r), w.K, out); return;
    case WFormat::BF16: std::copy_n(reinterpret_cast<const c10::BFloat16*>(r), w.K, out); return;
    case WFormat::F16: std::copy_n(reinterpret_cast<const c10::Half*>(r), w.K, out); return;
    case WFormat::I8:
    case WFormat::I4: break;  // integer paths
  }
}

void rows_portable(const Weight& w, const Input& in, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  std::vector<float> row(w.K);
  for (int64_t n = n0; n < n1; ++n) {
    if (w.fmt == WFormat::I8) {  // exact integer sums, as every path computes them
      const int8_t* q = reinterpret_cast<const int8_t*>(row_ptr(w, n));
      for (int64_t m = 0; m < in.M; ++m) {
        int64_t s = 0;
        for (int64_t k = 0; k < w.K; ++k) s += int64_t{q[k]} * in.xq[m * in.ld + k];
        y[m * ldy + n] = static_cast<float>(s);
      }
      continue;
    }
    if (w.fmt == WFormat::I4) {  // exact integer sums per group, then s * sum + m * sum(x)
      const int64_t G = w.K / w.group;
      const c10::Half* sm = w.group_scale + 2 * n * G;
      for (int64_t m = 0; m < in.M; ++m) {
        float s = 0.f, mt = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          int32_t part = 0;
          for (int64_t k = g * w.group; k < (g + 1) * w.group; ++k)
            part += static_cast<int32_t>(weight_q4(w, n, k)) * in.xq[m * in.ld + k];
          s += static_cast<float>(part) * static_cast<float>(sm[2 * g]);
          mt += static_cast<float>(sm[2 * g + 1]) * in.x_group_sum[m * G + g];
        }
        y[m * ldy + n] = s + mt;
      }
      continue;
    }
    dequant_row(w, n, row.data());
    for (int64_t m = 0; m < in.M; ++m) {
      const float* xm = in.x + m * in.ld;
      float s = 0.f;
      for (int64_t k = 0; k < w.K; ++k) s += row[k] * xm[k];
      y[m * ldy + n] = s;
    }
  }
}

namespace {

using RowsFn = void (*)(const Weight&, const Input&, float*, int64_t, int64_t, int64_t);
using PrepareFn = Input (*)(const Weight&, const Input&, Scratch&);

struct Path {
  const char* name;
  RowsFn rows;
  bool (*supported)();
  PrepareFn prepare;
};

Input as_is(const Weight&, const Input& in, Scratch&) { return in; }

#if defined(GPTFAST_X86_GNU)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

const Path kPaths[] = {  // best first
#if defined(GPTFAST_AMX)
    {"amx", rows_amx, [] { return has_avx2() && has_avx512_vnni() && has_amx(); }, prepare_amx},  // avx512's, and more
#endif
#if defined(GPTFAST_X86_GNU)
    {"avx512", rows_avx512, [] { return has_avx2() && has_avx512_vnni(); }, prepare_avx512},  // avx2's, and more
    {"avx2", rows_avx2, has_avx2, prepare_avx2},
#endif
    {"portable", rows_portable, [] { return true; }, as_is},
};

const Path& find_path(const std::string& name) {
  for (const Path& p : kPaths) {
    if (name == p.name) {
      TORCH_CHECK(p.supported(), "gptfast: CPU kernel path '", name, "' needs CPU features this CPU lacks");
      return p;
    }
  }
  std::string known;
  for (const Path& p : kPaths) known += std::string(known.empty() ? "" : ", ") + p.name;
  // (decode_step and argmax_rows read the choice too: the message names no one op)
  TORCH_CHECK(false, "gptfast: unknown CPU kernel path '", name,
              "' (GPTFAST_CPU_KERNEL, or the linear op's path=); choose from ", known);
}

// The path for `requested` ("" = GPTFAST_CPU_KERNEL if set, else the best this CPU supports).
const Path& choose_path(const std::string& requested) {
  if (!requested.empty()) return find_path(requested);
  const char* env = std::getenv("GPTFAST_CPU_KERNEL");
  if (env != nullptr && *env) return find_path(env);
  for (const Path& p : kPaths)
    if (p.supported()) return p;
  return kPaths[std::size(kPaths) - 1];
}

}  // namespace

bool avx2_chosen() {
  return std::string(choose_path("").name) != "portable";  // each vector path is avx2's and more
}

namespace {

// The weight's format and view, checked against x (M, K) and the scale.
Weight weight_view(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                   int64_t group, const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "gptfast linear: weight must be a contiguous 2-D tensor");
  const int64_t N = weight.size(0), K = x.size(-1);
  Weight w{WFormat::F32, weight.data_ptr(), N, K, weight.size(1) * weight.element_size(), nullptr, nullptr, 0, nullptr};
  switch (weight.scalar_type()) {
    case at::kFloat: w.fmt = WFormat::F32; break;
    case at::kBFloat16: w.fmt = WFormat::BF16; break;
    case at::kHalf: w.fmt = WFormat::F16; break;
    case at::kChar: w.fmt = WFormat::I8; break;
    case at::kByte: w.fmt = WFormat::I4; break;
    default: TORCH_CHECK(false, "gptfast linear: unsupported weight dtype ", weight.scalar_type());
  }
  TORCH_CHECK(!packed.has_value() || w.fmt == WFormat::I8, "gptfast linear: packed is for int8 weights, not ",
              weight.scalar_type());
  if (w.fmt == WFormat::I4) {
    TORCH_CHECK(group > 0 && group % 32 == 0 && group <= 256,
                "gptfast linear: int4 group size must be a multiple of 32 up to 256, got ", group);
    w.group = group;
    w.K = (K + group - 1) / group * group;  // rows padded to whole groups
    TORCH_CHECK(weight.size(1) * 2 == w.K, "gptfast linear: packed int4 weight has ", weight.size(1),
                " bytes per row; x's ", K, " inputs in groups of ", group, " need ", w.K / 2);
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kHalf && scale->is_contiguous() &&
                    scale->sizes() == at::IntArrayRef({N, w.K / group, 2}),
                "gptfast linear: int4 needs a contiguous float16 scale of shape (", N, ", ", w.K / group, ", 2)");
    w.group_scale = reinterpret_cast<const c10::Half*>(scale->data_ptr());
    return w;
  }
  TORCH_CHECK(weight.size(1) == K, "gptfast linear: x has ", K, " inputs but weight has ", weight.size(1));
  if (w.fmt == WFormat::I8) {
    TORCH_CHECK(scale.has_value() && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->dim() == 1 && scale->size(0) == N,
                "gptfast linear: int8 needs a contiguous float32 scale of shape (", N, ")");
    w.row_scale = scale->data_ptr<float>();
    if (packed.has_value()) {
      const std::vector<int64_t> shape{packed_blocks(N), packed_block_bytes(K)};
      TORCH_CHECK(packed->scalar_type() == at::kChar && packed->is_contiguous() && packed->sizes() == shape,
                  "gptfast linear: packed must be pack_int8(weight), contiguous int8 of shape ", at::IntArrayRef(shape),
                  ", got ", packed->scalar_type(), " ", packed->sizes());
      w.packed = packed->data_ptr<int8_t>();
    }
  } else {
    TORCH_CHECK(!scale.has_value(), "gptfast linear: a ", weight.scalar_type(), " weight takes no scale");
  }
  return w;
}

// One row of x rounded to int16 (see Input): returns its scale, NaN for a row holding inf or NaN
// (its outputs are then NaN, as fp32 arithmetic would make them). On x86-64 also built for AVX2,
// chosen at load time: 8 lanes where the baseline has 4, and no FMA (which would round the
// scaled value once instead of twice, so a quantised row would depend on the CPU).
#if defined(GPTFAST_X86_GNU)
__attribute__((target_clones("avx2", "default")))
#endif
float quantize_row(const float* x, int64_t K, int16_t* q) {
  // max |x| over the bit patterns without the sign: for floats that are not NaN their order is
  // the integers' order, and any inf or NaN lies at or above inf's, so one integer maximum
  // (which vectorises, where a float one does not without -ffast-math) gives both the largest
  // magnitude and whether the row is finite
  uint32_t top = 0;
  for (int64_t k = 0; k < K; ++k) top = std::max(top, c10::bit_cast<uint32_t>(x[k]) & 0x7FFFFFFFu);
  if (top >= 0x7F800000u) {
    std::fill_n(q, K, int16_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float big = c10::bit_cast<float>(top);
  // a largest magnitude below 32767 / FLT_MAX would make inv infinite, and 0 * inf a NaN (whose
  // conversion to int16 is undefined); such a row's scale is subnormal anyway
  const float inv = big > 0.f ? std::min(32767.f / big, std::numeric_limits<float>::max()) : 0.f;
  // round to nearest even by the 1.5 * 2^23 trick (|x * inv| <= 32767.x): plain adds that
  // vectorise, where std::nearbyint is a library call per element
  constexpr float kMagic = 12582912.f;
  for (int64_t k = 0; k < K; ++k) {
    const float r = (x[k] * inv + kMagic) - kMagic;
    q[k] = static_cast<int16_t>(std::clamp(r, -32767.f, 32767.f));
  }
  return big > 0.f ? big / 32767.f : 1.f;
}

// x (M, K) rounded to int16 per row (quantize_row). group > 0: also the groups' sums.
void quantize_x(const at::Tensor& xf, int64_t group, at::Tensor& xq, at::Tensor& x_scale, at::Tensor& group_sum) {
  const int64_t M = xf.size(0), K = xf.size(1);
  xq = at::empty({M, K}, xf.options().dtype(at::kShort));
  x_scale = at::empty({M}, xf.options());
  // rows split over the threads beyond 8 rows (a batched step, a prefill); fewer stay here
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      x_scale.data_ptr<float>()[m] = quantize_row(xf.data_ptr<float>() + m * K, K, xq.data_ptr<int16_t>() + m * K);
  });
  if (group == 0) return;
  group_sum = at::empty({M, K / group}, xf.options());
  float* gs = group_sum.data_ptr<float>();
  const int16_t* q = xq.data_ptr<int16_t>();
  for (int64_t i = 0; i < M * (K / group); ++i)  // exact: |sum| < 2^24 for groups of <= 256
    gs[i] = static_cast<float>(std::accumulate(q + i * group, q + (i + 1) * group, int32_t{0}));
}

}  // namespace

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& scale,
                      const c10::optional<at::Tensor>& bias, int64_t group_size, c10::string_view path,
                      const c10::optional<at::Tensor>& packed) {
  TORCH_CHECK(x.dim() >= 1, "gptfast linear: x must have at least 1 dimension (..., K)");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kBFloat16 || xt == at::kHalf,
              "gptfast linear: x must be float32, bfloat16 or float16, got ", xt);
  const Weight w = weight_view(x, weight, scale, group_size, packed);
  const Path& p = choose_path(std::string(path));
  const int64_t K = x.size(-1), M = K > 0 ? x.numel() / K : 0, N = w.N;
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  // nothing to compute (no rows to split over the threads either: the split below divides by them)
  if (M == 0 || N == 0) return at::empty(out_shape, x.options());
  // fp32 x (M, K); int4 rows padded with zeros to whole groups (the padding's weights add nothing)
  at::Tensor xf = x.to(at::kFloat).reshape({M, K}).contiguous();
  if (w.K != K) {
    at::Tensor padded = at::zeros({M, w.K}, xf.options());
    padded.narrow(1, 0, K).copy_(xf);
    xf = padded;
  }
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "gptfast linear: bias must have shape (", N, ")");
    b = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, xf.options()), xq, x_scale, group_sum;
  if (w.fmt == WFormat::I8 || w.fmt == WFormat::I4) quantize_x(xf, w.group, xq, x_scale, group_sum);
  Scratch scratch;
  const Input in = p.prepare(w,
                             {xf.data_ptr<float>(), xq.defined() ? xq.data_ptr<int16_t>() : nullptr,
                              x_scale.defined() ? x_scale.data_ptr<float>() : nullptr,
                              group_sum.defined() ? group_sum.data_ptr<float>() : nullptr, M, w.K, nullptr, nullptr},
                             scratch);
  float* yp = y.data_ptr<float>();
  const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
  // chunks of whole row blocks (at least ~64 KB of weights, a multiple of 48 rows: whole 16-row
  // blocks of the packed int8 tiles) handed out one at a time, so that a thread the OS preempts
  // (a server's event loop shares these cores) leaves its chunks to the others instead of holding
  // them all at the join: under 16 streaming clients the server gave 1.01-1.14x the tokens/s of
  // fixed halves (6 interleaved rounds), at one client the same within noise. Each thread first
  // takes the chunks of its own share of the rows, in order, so that one chunk's prefetch of the
  // rows past it serves the thread's next chunk, then helps with the others' shares: a GPT-2
  // step's matmuls on two threads ran 4-6% faster at 16 and 32 rows and 7% at 1 row than with
  // one shared order (20 interleaved rounds each)
  static_assert(4 * kRowBlock % kPackRows == 0, "a chunk holds whole 16-row blocks of the packed int8 tiles");
  const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
  const int64_t chunk = (std::max<int64_t>(1, 65536 / (kRowBlock * w.row_bytes)) + 3) / 4 * 4;
  const auto run = [&](int64_t b0, int64_t b1) {
    const int64_t n0 = kRowBlock * b0, n1 = std::min(N, kRowBlock * b1);
    p.rows(w, in, yp, N, n0, n1);
    // the scales, then the bias: branch-free loops over a row (they vectorise)
    for (int64_t m = 0; m < M; ++m) {
      float* ym = yp + m * N;
      if (in.x_scale && w.row_scale) {
        const float xs = in.x_scale[m];
        for (int64_t n = n0; n < n1; ++n) ym[n] *= w.row_scale[n] * xs;
      } else if (in.x_scale) {
        const float xs = in.x_scale[m];
        for (int64_t n = n0; n < n1; ++n) ym[n] *= xs;
      }
      if (bp)
        for (int64_t n = n0; n < n1; ++n) ym[n] += bp[n];
    }
  };
  const int64_t chunks = (blocks + chunk - 1) / chunk;
  const int64_t shares = std::min<int64_t>(at::get_num_threads(), chunks), per = (chunks + shares - 1) / shares;
  std::vector<std::atomic<int64_t>> next(shares);  // the next chunk of each share
  for (int64_t s = 0; s < shares; ++s) next[s] = s * per;
  at::parallel_for(0, shares, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t r = 0; r < shares; ++r) {
        const int64_t s = (t + r) % shares, end = std::min(chunks, (s + 1) * per);
        for (int64_t c = next[s]++; c < end; c = next[s]++) run(c * chunk, std::min(blocks, (c + 1) * chunk));
      }
  });
  y = y.view(out_shape);  // (..., N)
  return xt == at::kFloat ? y : y.to(xt);
}

std::vector<std::string> linear_paths() {
  std::vector<std::string> names;
  for (const Path& p : kPaths)
    if (p.supported()) names.emplace_back(p.name);
  return names;
}

at::Tensor pack_int8(const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kChar && weight.dim() == 2 && weight.is_contiguous(),
              "gptfast pack_int8: weight must be a contiguous 2-D int8 tensor, got ", weight.scalar_type(), " ",
              weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor out = at::empty({packed_blocks(N), packed_block_bytes(K)}, weight.options());
#if defined(GPTFAST_X86_GNU)
  if (has_avx2()) {
    pack_int8_avx2({WFormat::I8, weight.data_ptr(), N, K, K, nullptr, nullptr, 0, nullptr}, out.data_ptr<int8_t>());
    return out;
  }
#endif
  TORCH_CHECK(false, "gptfast pack_int8: only the avx2 path reads packed weights, and this CPU or build has none");
}

TORCH_LIBRARY_IMPL(gptfast, CPU, m) {
  m.impl("linear", linear_cpu);
  m.impl("pack_int8", pack_int8);
}

TORCH_LIBRARY_FRAGMENT(gptfast, m) { m.def("linear_paths() -> str[]", linear_paths); }

}  // namespace gptfast
