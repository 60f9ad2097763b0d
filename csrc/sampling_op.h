// Argument checks of gptfast::sample_top_k shared by the CPU and CUDA kernels
// (torch headers only from c10/ATen core, so nvcc compiles it against any torch build).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cmath>

namespace gptfast {

inline void check_sample_args(const at::Tensor& logits, int64_t k, double temperature,
                              double top_p, const at::Tensor& seed) {
  TORCH_CHECK(logits.dim() == 2, "sample_top_k: logits must be 2-D (B, V), got ", logits.dim(), "-D");
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "sample_top_k: logits must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(logits.size(1) >= 1, "sample_top_k: logits must have V >= 1 columns");
  TORCH_CHECK(k >= 1, "sample_top_k: k must be >= 1, got ", k);
  TORCH_CHECK(std::isfinite(temperature) && temperature >= 0,
              "sample_top_k: temperature must be finite and >= 0, got ", temperature);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sample_top_k: top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 2,
              "sample_top_k: seed must be an int64 tensor of 2 elements (seed, offset)");
}

// Greedy (argmax) draws: temperature 0, k = 1, or a temperature so small 1/T overflows fp32.
inline bool is_greedy(int64_t k, double temperature) {
  return temperature == 0 || k == 1 || std::isinf(static_cast<float>(1.0 / temperature));
}

}  // namespace gptfast
