// CPU kernel of gptfast::sample_top_k (semantics in sampling_common.h).
// One pass per row finds max/argmax and, for small k, keeps a size-k heap, skipping
// 64-element chunks whose max cannot enter it; larger k select by a histogram of the top 11
// key bits and a partial sort of the few candidates. Temperature, exp and the draw touch
// only the k survivors. Rows run in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <limits>
#include <vector>

#include "sampling_common.h"
#include "sampling_op.h"

namespace gptfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 64;
constexpr int64_t kHeapMaxK = 64;  // above it the histogram select is faster
constexpr int kBinShift = 21;      // 2^11 bins over the order-preserving float key

struct Cand {
  float v;
  int64_t i;
};
// a comes before b in the kept order: larger value first, then lower token id.
inline bool before(const Cand& a, const Cand& b) { return a.v > b.v || (a.v == b.v && a.i < b.i); }
inline bool by_id(const Cand& a, const Cand& b) { return a.i < b.i; }

struct RowStats {
  float max = -kInf;
  int64_t argmax = 0;
  bool bad = false;  // NaN or +inf seen
};

// One pass over the row: max/argmax, the NaN/+inf check, the row as floats into `as_float`
// (when given), and (when heap_k > 0) a heap of the heap_k best candidates whose front is
// the worst of them.
template <typename T>
RowStats scan_row(const T* x, int64_t V, int64_t heap_k, std::vector<Cand>& heap, float* as_float) {
  RowStats s;
  heap.clear();
  float buf[kChunk];
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    float cmax = -kInf;
    bool cbad = false;
    for (int64_t j = 0; j < n; ++j) {
      const float f = static_cast<float>(x[c0 + j]);
      buf[j] = f;
      cmax = f > cmax ? f : cmax;
      cbad |= !(f < kInf);  // NaN or +inf
    }
    if (as_float) std::copy(buf, buf + n, as_float + c0);
    if (cbad) {
      s.bad = true;
      return s;
    }
    if (cmax > s.max) {  // strict: the lowest index wins among equal maxima
      s.max = cmax;
      s.argmax = c0 + (std::find(buf, buf + n, cmax) - buf);
    }
    if (heap_k == 0) continue;
    if (static_cast<int64_t>(heap.size()) == heap_k && cmax <= heap.front().v) continue;
    for (int64_t j = 0; j < n; ++j) {
      if (static_cast<int64_t>(heap.size()) < heap_k) {
        heap.push_back({buf[j], c0 + j});
        std::push_heap(heap.begin(), heap.end(), before);
      } else if (buf[j] > heap.front().v) {  // equal value, later id: stays out
        std::pop_heap(heap.begin(), heap.end(), before);
        heap.back() = {buf[j], c0 + j};
        std::push_heap(heap.begin(), heap.end(), before);
      }
    }
  }
  return s;
}

// The k best of the row in kept order: the histogram bin holding the k-th key bounds the
// candidates, which a partial sort orders.
void select_top(const float* x, int64_t V, int64_t k, std::vector<Cand>& out) {
  std::vector<uint32_t> hist(1u << (32 - kBinShift), 0);
  for (int64_t i = 0; i < V; ++i) ++hist[key_of(x[i]) >> kBinShift];
  int64_t bin = static_cast<int64_t>(hist.size()) - 1, above = 0;
  while (above + hist[bin] < static_cast<uint32_t>(k)) above += hist[bin--];
  const uint32_t lowest = static_cast<uint32_t>(bin) << kBinShift;
  out.clear();
  for (int64_t i = 0; i < V; ++i)
    if (key_of(x[i]) >= lowest) out.push_back({x[i], i});
  std::partial_sort(out.begin(), out.begin() + k, out.end(), before);
  out.resize(k);
}

// Inverse-CDF draw over `kept` (sorted by token id): first id whose running weight > u*sum.
int64_t draw(const std::vector<Cand>& kept, float vmax, float inv_t, float u, int64_t fallback) {
  float total = 0.f;
  for (const Cand& c : kept) total += std::exp((c.v - vmax) * inv_t);
  const float target = u * total;
  float cum = 0.f;
  for (const Cand& c : kept) {
    cum += std::exp((c.v - vmax) * inv_t);
    if (cum > target) return c.i;
  }
  return fallback;  // only if rounding left target >= cum; the argmax is always kept
}

template <typename T>
void sample_rows(const at::Tensor& logits, int64_t k, double temperature, double top_p,
                 uint64_t seed, uint64_t offset, bool return_topk, at::Tensor& ids,
                 at::Tensor& values, at::Tensor& indices) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const int64_t kk = std::min(k, V);
  const bool greedy = is_greedy(kk, temperature);
  const bool full = kk == V;
  const bool nucleus = !greedy && top_p < 1;
  // The top-k set is needed for the top-k outputs or a filtered draw; k >= V keeps the row.
  const bool select = !full && (return_topk || !greedy);
  const bool by_heap = select && kk <= kHeapMaxK;
  constexpr bool is_float = std::is_same_v<T, float>;
  const float inv_t = greedy ? 0.f : static_cast<float>(1.0 / temperature);
  const T* x = logits.data_ptr<T>();
  int64_t* ids_p = ids.data_ptr<int64_t>();
  T* val_p = return_topk ? values.data_ptr<T>() : nullptr;
  int64_t* idx_p = return_topk ? indices.data_ptr<int64_t>() : nullptr;

  at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Cand> kept;
    std::vector<float> row_f((select && !by_heap && !is_float) ? V : 0);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * V;
      const RowStats s = scan_row(row, V, by_heap ? kk : 0, kept, row_f.empty() ? nullptr : row_f.data());
      TORCH_CHECK(!s.bad, "sample_top_k: logits row ", r, " contains NaN or +inf");
      TORCH_CHECK(s.max > -kInf, "sample_top_k: logits row ", r, " is all -inf (nothing to sample)");
      const bool sorted_needed = return_topk || nucleus;
      if (select && !by_heap) {
        select_top(row_f.empty() ? reinterpret_cast<const float*>(row) : row_f.data(), V, kk, kept);
      } else {
        if (full && (sorted_needed || !greedy)) {  // whole row kept
          kept.resize(V);
          for (int64_t i = 0; i < V; ++i) kept[i] = {static_cast<float>(row[i]), i};
        }
        if (sorted_needed) std::sort(kept.begin(), kept.end(), before);
      }
      if (return_topk) {
        for (int64_t j = 0; j < kk; ++j) {
          val_p[r * kk + j] = static_cast<T>(kept[j].v);
          idx_p[r * kk + j] = kept[j].i;
        }
      }
      if (greedy) {
        ids_p[r] = s.argmax;
        continue;
      }
      if (nucleus) {  // shortest prefix (kept order) whose mass reaches top_p * total
        float total = 0.f;
        for (const Cand& c : kept) total += std::exp((c.v - s.max) * inv_t);
        const float mass = static_cast<float>(top_p) * total;
        float cum = 0.f;
        size_t n = 0;
        while (n < kept.size() && cum < mass) cum += std::exp((kept[n++].v - s.max) * inv_t);
        kept.resize(n);
      }
      const bool id_ordered = full && !sorted_needed;  // the whole row, as read
      if (!id_ordered) std::sort(kept.begin(), kept.end(), by_id);
      ids_p[r] = draw(kept, s.max, inv_t, row_uniform(seed, offset, r), s.argmax);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_top_k_cpu(
    const at::Tensor& logits_in, int64_t k, double temperature, double top_p,
    const at::Tensor& seed, bool return_topk) {
  check_sample_args(logits_in, k, temperature, top_p, seed);
  TORCH_CHECK(seed.device().is_cpu(), "sample_top_k: seed must be a CPU tensor for CPU logits");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor seed_c = seed.contiguous();
  auto [ids, values, indices] = empty_outputs(logits, std::min(k, logits.size(1)), return_topk);
  const uint64_t s = static_cast<uint64_t>(seed_c.data_ptr<int64_t>()[0]);
  const uint64_t off = static_cast<uint64_t>(seed_c.data_ptr<int64_t>()[1]);
  switch (logits.scalar_type()) {
    case at::kFloat:
      sample_rows<float>(logits, k, temperature, top_p, s, off, return_topk, ids, values, indices);
      break;
    case at::kHalf:
      sample_rows<c10::Half>(logits, k, temperature, top_p, s, off, return_topk, ids, values, indices);
      break;
    default:
      sample_rows<c10::BFloat16>(logits, k, temperature, top_p, s, off, return_topk, ids, values, indices);
  }
  return {ids, values, indices};
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CPU, m) { m.impl("sample_top_k", &gptfast::sample_top_k_cpu); }
