// Host code shared by the CPU and CUDA kernels of gptfast::sample_top_k: argument checks, outputs
// (torch headers only from c10/ATen core, so nvcc compiles it against any torch build).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <cmath>
#include <tuple>
#include <vector>

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

// The op's outputs, uninitialised: ids (B,) int64 and the top-k values (B, kk) (logits'
// dtype) and indices (B, kk) int64 when return_topk, else both (0,) (as the fake kernel).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_outputs(const at::Tensor& logits, int64_t kk,
                                                                    bool return_topk) {
  const int64_t B = logits.size(0);
  const std::vector<int64_t> topk_shape = return_topk ? std::vector<int64_t>{B, kk} : std::vector<int64_t>{0};
  return {at::empty({B}, logits.options().dtype(at::kLong)), at::empty(topk_shape, logits.options()),
          at::empty(topk_shape, logits.options().dtype(at::kLong))};
}

}  // namespace gptfast
