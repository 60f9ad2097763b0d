// CUDA kernel of gptfast::sample_top_k (semantics in sampling_common.h).
//
// One 1024-thread block per row, no sort of the vocabulary:
//  1. one read of the row from global memory (8 loads in flight per thread), staging it in
//     shared memory when it fits (fp32 V=50257 on H100: 201 KB), with max / argmax / NaN check;
//     every later pass reads the staged copy;
//  2. top-k: 4-pass 8-bit radix select on order-preserving float keys finds the k-th key;
//     ties at it keep the lowest ids (an ordered count finds the cut id only if needed);
//  3. top-p: the same radix select weighted by exp((x - max) / T) finds the nucleus cut;
//  4. the draw: an index-ordered inverse CDF, each warp owning one contiguous segment.
// A kept token is one with (key, id) >= (cut_key, cut_id) in (key desc, id asc) order.
// Only c10/ATen core headers: this file compiles with nvcc against CPU builds of torch too.
#include <ATen/core/Tensor.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/sort.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>

#include "sampling_common.h"
#include "sampling_op.h"

namespace gptfast {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = 8;  // global loads in flight per thread while staging
constexpr unsigned kFull = 0xffffffffu;

// The inverse of key_of (sampling_common.h).
__device__ __forceinline__ float value_of(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

struct Cut {  // kept iff key > key_ || (key == key_ && id <= id_)
  uint32_t key_;
  int64_t id_;
  __device__ __forceinline__ bool keeps(uint32_t key, int64_t id) const {
    return key > key_ || (key == key_ && id <= id_);
  }
};

struct Shared {
  uint32_t count[256];
  float mass[256];
  float warp_f[kWarps];
  int64_t warp_i[kWarps];
  uint32_t prefix, bin_count, remaining;
  float mass_left, local_target;
  int owner;
  int64_t found;
  unsigned int gathered;
};

__device__ __forceinline__ float warp_inclusive_scan(float v) {
  const int lane = threadIdx.x & 31;
  for (int o = 1; o < 32; o <<= 1) {
    const float t = __shfl_up_sync(kFull, v, o);
    if (lane >= o) v += t;
  }
  return v;
}

// Sum over the block in a fixed order (same result on every thread and every run).
__device__ float block_sum(float v, Shared& sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(kFull, v, o);
  if ((threadIdx.x & 31) == 0) sh.warp_f[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += sh.warp_f[w];
  __syncthreads();
  return total;
}

// First id, in increasing id order, whose running sum of weight(id) exceeds the target
// (target = u * total when `fraction`, else u). Warp w owns ids [w*seg, (w+1)*seg); the
// owner warp replays exactly the per-step sums of the first pass, so they agree bit for bit.
template <typename Weight>
__device__ int64_t ordered_find(int64_t V, const Weight& weight, float u, bool fraction, Shared& sh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t seg = (V + kWarps - 1) / kWarps;
  const int64_t lo = warp * seg < V ? warp * seg : V, hi = lo + seg < V ? lo + seg : V;
  float run = 0.f;
  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t i = base + lane;
    run += __shfl_sync(kFull, warp_inclusive_scan(i < hi ? weight(i) : 0.f), 31);
  }
  if (lane == 0) sh.warp_f[warp] = run;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += sh.warp_f[w];
    const float target = fraction ? u * total : u;
    float before = 0.f;
    int owner = -1, last = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (sh.warp_f[w] > 0.f) {
        last = w;
        if (owner < 0 && before + sh.warp_f[w] > target) {
          owner = w;
          sh.local_target = target - before;
        }
      }
      if (owner < 0) before += sh.warp_f[w];
    }
    if (owner < 0) {  // rounding put the target past the end: take the last weighted id
      owner = last;
      sh.local_target = sh.warp_f[last];
    }
    sh.owner = owner;
  }
  __syncthreads();
  if (warp == sh.owner) {
    const float t = sh.local_target;
    float r = 0.f;
    int64_t found = -1, last_weighted = -1;
    for (int64_t base = lo; base < hi; base += 32) {
      const int64_t i = base + lane;
      const float v = i < hi ? weight(i) : 0.f;
      const float incl = warp_inclusive_scan(v);
      const unsigned hit = __ballot_sync(kFull, v > 0.f && r + incl > t);
      if (hit) {
        found = base + __ffs(hit) - 1;
        break;
      }
      const unsigned weighted = __ballot_sync(kFull, v > 0.f);
      if (weighted) last_weighted = base + 31 - __clz(weighted);
      r += __shfl_sync(kFull, incl, 31);
    }
    if (lane == 0) sh.found = found >= 0 ? found : last_weighted;
  }
  __syncthreads();
  return sh.found;
}

// Warp 0 picks the bin, from the top, where the running count reaches `need` (exact
// integer arithmetic). Lane l owns bins 255-8l .. 248-8l.
__device__ void pick_count_bin(Shared& sh, int shift, uint32_t need) {
  const int lane = threadIdx.x & 31;
  const uint32_t* c = sh.count + 255 - 8 * lane;  // c[-j]: this lane's bins, top first
  uint32_t incl = 0;
  for (int j = 0; j < 8; ++j) incl += c[-j];
  const uint32_t own = incl;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += t;
  }
  uint32_t cum = incl - own;
  if (cum < need && need <= incl) {  // exactly one lane
    int j = 0;
    while (cum + c[-j] < need) cum += c[-j++];
    const int b = 255 - 8 * lane - j;
    sh.prefix |= static_cast<uint32_t>(b) << shift;
    sh.bin_count = c[-j];
    sh.remaining = need - cum;
  }
}

// Thread 0 picks the bin, from the top, where the running mass reaches `need`; serial, so
// a bin is always picked (the last weighted one if rounding leaves `need` unreached).
__device__ void pick_mass_bin(Shared& sh, int shift, float need) {
  float cum = 0.f, before = 0.f;
  int pick = -1;
  for (int b = 255; b >= 0; --b) {
    if (sh.mass[b] > 0.f) {
      pick = b;
      before = cum;
      cum += sh.mass[b];
      if (cum >= need) break;
    }
  }
  if (pick < 0) return;  // no mass at all: cannot happen, the max token weighs 1
  sh.prefix |= static_cast<uint32_t>(pick) << shift;
  sh.bin_count = sh.count[pick];
  sh.mass_left = need - before;
}

// Sum of x over each lane's peers (lanes with the same bit set in `peers`, from
// __match_any_sync), valid in the lowest peer: a tree over the peers in lane order, about
// log2(peers) shuffle rounds (Westphal, "Voting and Shuffling to Optimize Atomic Operations").
// All 32 lanes must call it.
__device__ __forceinline__ float reduce_peers(unsigned peers, float x) {
  const int lane = threadIdx.x & 31;
  unsigned rel = __popc(peers & ((1u << lane) - 1));  // my rank among my peers
  peers &= 0xfffffffeu << lane;                       // peers above me still to be added
  while (__any_sync(kFull, peers)) {
    const int next = __ffs(peers);  // the next peer above (1-based; 0: none)
    const float t = __shfl_sync(kFull, x, next - 1);
    if (next) x += t;
    peers &= ~__ballot_sync(kFull, rel & 1);  // odd ranks were just added below: drop them
    rel >>= 1;
  }
  return x;
}

// Adds the lanes with `ok` to their bins: count += 1 (and mass += w, kMass). In the first
// radix pass nearly every logit falls in the few bins of its top exponent bits, so per-lane
// shared atomics would serialise ~32-way on one address; instead each warp's lanes with the
// same bin are combined and their lowest lane adds once. Mass stays a float sum in no fixed
// order (a tree per warp, then float atomics across warps: see sampling_common.h).
// All 32 lanes must call it.
template <bool kMass>
__device__ __forceinline__ void add_to_bin(Shared& sh, bool ok, int b, float w) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700  // no __match_any_sync before Volta
  if (ok) {
    atomicAdd(&sh.count[b], 1u);
    if (kMass) atomicAdd(&sh.mass[b], w);
  }
#else
  const unsigned peers = __match_any_sync(kFull, ok ? b : 256);
  if (kMass) w = reduce_peers(peers, w);
  if (ok && (threadIdx.x & 31) == __ffs(peers) - 1) {
    atomicAdd(&sh.count[b], static_cast<uint32_t>(__popc(peers)));
    if (kMass) atomicAdd(&sh.mass[b], w);
  }
#endif
}

// Radix select over kept tokens (Cut `within`): the largest key whose cumulative count
// (or mass, kMass) from the top reaches `need`. Leaves prefix/bin_count/remaining|mass_left.
template <bool kMass, typename T>
__device__ void radix_select(const T* x, int64_t V, Cut within, float vmax, float inv_t, float need, Shared& sh) {
  const int lane = threadIdx.x & 31;
  uint32_t mask = 0;
  if (threadIdx.x == 0) sh.prefix = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += kThreads) {
      sh.count[b] = 0;
      sh.mass[b] = 0.f;
    }
    __syncthreads();
    const uint32_t prefix = sh.prefix;
    // warp-aligned bases: all 32 lanes run every iteration, as add_to_bin needs
    for (int64_t i0 = threadIdx.x - lane; i0 < V; i0 += kThreads) {
      const int64_t i = i0 + lane;
      const float f = i < V ? static_cast<float>(x[i]) : 0.f;
      const uint32_t key = key_of(f);
      const bool ok = i < V && (key & mask) == prefix && within.keeps(key, i);
      add_to_bin<kMass>(sh, ok, (key >> shift) & 255, ok && kMass ? expf((f - vmax) * inv_t) : 0.f);
    }
    __syncthreads();
    if (kMass && threadIdx.x == 0) pick_mass_bin(sh, shift, need);
    if (!kMass && threadIdx.x < 32) pick_count_bin(sh, shift, static_cast<uint32_t>(need));
    __syncthreads();
    need = kMass ? sh.mass_left : static_cast<float>(sh.remaining);
    mask |= 0xffu << shift;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_top_k_kernel(
    const T* __restrict__ logits, int64_t V, bool staged, int64_t k, float inv_t, bool greedy, float top_p,
    const int64_t* __restrict__ seed_dev, uint64_t seed_host, uint64_t offset_host,
    int64_t* __restrict__ ids, T* __restrict__ values, int64_t* __restrict__ indices) {
  __shared__ Shared sh;
  extern __shared__ __align__(16) unsigned char staged_row[];
  const int64_t row = blockIdx.x;
  const T* xg = logits + row * V;
  T* xs = reinterpret_cast<T*>(staged_row);
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;

  // 1. stage the row; max / argmax (lowest id among equal maxima) / NaN or +inf check.
  // Each thread visits its ids in increasing order, so a strict > keeps the lowest.
  float m = -INFINITY;
  int64_t arg = V;
  bool bad = false;
  for (int64_t base = threadIdx.x; base < V; base += kUnroll * kThreads) {
    T r[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < V) r[j] = xg[i];
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + j * kThreads;
      if (i < V) {
        if (staged) xs[i] = r[j];
        const float f = static_cast<float>(r[j]);
        bad |= !(f < INFINITY);
        if (f > m) {
          m = f;
          arg = i;
        }
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_down_sync(kFull, m, o);
    const int64_t a2 = __shfl_down_sync(kFull, arg, o);
    if (m2 > m || (m2 == m && a2 < arg)) {
      m = m2;
      arg = a2;
    }
  }
  if (lane == 0) {
    sh.warp_f[warp] = m;
    sh.warp_i[warp] = arg;
  }
  bad = __syncthreads_or(bad);  // also publishes the staged row
  const T* x = staged ? xs : xg;
  float vmax = -INFINITY;
  int64_t argmax = V;
  for (int w = 0; w < kWarps; ++w) {
    if (sh.warp_f[w] > vmax || (sh.warp_f[w] == vmax && sh.warp_i[w] < argmax)) {
      vmax = sh.warp_f[w];
      argmax = sh.warp_i[w];
    }
  }
  if (bad || argmax >= V) {  // NaN / +inf, or an all -inf row: id -1 (Python checks eagerly)
    if (threadIdx.x == 0) ids[row] = -1;
    return;
  }
  if (greedy && values == nullptr) {
    if (threadIdx.x == 0) ids[row] = argmax;
    return;
  }
  __syncthreads();

  // 2. top-k cut
  Cut cut{0u, V};  // keeps everything (every float key is > 0)
  if (k < V) {
    radix_select<false>(x, V, cut, vmax, inv_t, static_cast<float>(k), sh);
    const uint32_t kth = sh.prefix;
    const uint32_t ties_needed = sh.remaining, ties = sh.bin_count;
    int64_t cut_id = V;
    if (ties_needed < ties) {
      cut_id = ordered_find(
          V, [&](int64_t i) { return key_of(static_cast<float>(x[i])) == kth ? 1.f : 0.f; },
          static_cast<float>(ties_needed) - 0.5f, false, sh);
    }
    cut = Cut{kth, cut_id};
  }

  if (values != nullptr) {  // top-k outputs, unsorted here (the host sorts them)
    if (threadIdx.x == 0) sh.gathered = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      const T v = x[i];
      if (cut.keeps(key_of(static_cast<float>(v)), i)) {
        const unsigned pos = atomicAdd(&sh.gathered, 1u);
        values[row * k + pos] = v;
        indices[row * k + pos] = i;
      }
    }
  }
  if (greedy) {
    if (threadIdx.x == 0) ids[row] = argmax;
    return;
  }

  auto weight = [&](int64_t i) {
    const float f = static_cast<float>(x[i]);
    return cut.keeps(key_of(f), i) ? expf((f - vmax) * inv_t) : 0.f;
  };

  // 3. top-p cut: the shortest (key desc, id asc) prefix with mass >= top_p * kept mass
  if (top_p < 1.f) {
    float part = 0.f;
    for (int64_t i = threadIdx.x; i < V; i += kThreads) part += weight(i);
    const float need = top_p * block_sum(part, sh);
    radix_select<true>(x, V, cut, vmax, inv_t, need, sh);
    const uint32_t pkey = sh.prefix;
    const uint32_t ties = sh.bin_count;
    const float tie_w = expf((value_of(pkey) - vmax) * inv_t);
    const float want = ceilf(sh.mass_left / tie_w);
    const uint32_t ties_needed = static_cast<uint32_t>(fminf(fmaxf(want, 1.f), static_cast<float>(ties)));
    int64_t cut_id = pkey == cut.key_ ? cut.id_ : V;
    if (ties_needed < ties) {
      cut_id = ordered_find(
          V, [&](int64_t i) { return key_of(static_cast<float>(x[i])) == pkey ? 1.f : 0.f; },
          static_cast<float>(ties_needed) - 0.5f, false, sh);
    }
    cut = Cut{pkey, cut_id};
  }

  // 4. the draw
  const uint64_t seed = seed_dev ? static_cast<uint64_t>(seed_dev[0]) : seed_host;
  const uint64_t offset = seed_dev ? static_cast<uint64_t>(seed_dev[1]) : offset_host;
  const float u = row_uniform(seed, offset, static_cast<uint64_t>(row));
  const int64_t id = ordered_find(V, weight, u, true, sh);
  if (threadIdx.x == 0) ids[row] = id >= 0 ? id : argmax;
}

template <typename T>
void launch(const at::Tensor& logits, int64_t k, double temperature, double top_p, const int64_t* seed_dev,
            uint64_t seed_host, uint64_t offset_host, at::Tensor& ids, at::Tensor& values,
            at::Tensor& indices, bool return_topk, cudaStream_t stream) {
  const int64_t B = logits.size(0), V = logits.size(1);
  const bool greedy = is_greedy(k, temperature);
  // Stage the row in shared memory when it fits this device's opt-in limit next to the
  // kernel's static shared memory as the compiler laid it out (more than sizeof(Shared):
  // the dynamic array's alignment pads it); otherwise every pass reads global memory (L2).
  // Per device and kernel instantiation, the opt-in is raised to the largest row seen.
  constexpr int kMaxDevices = 64;
  static int optin[kMaxDevices] = {}, static_smem[kMaxDevices] = {}, raised[kMaxDevices] = {};
  const int dev = logits.get_device();
  TORCH_CHECK(dev >= 0 && dev < kMaxDevices, "sample_top_k: CUDA device index ", dev, " out of range");
  if (optin[dev] == 0) {
    int limit = 0;
    cudaFuncAttributes attr{};
    cudaError_t e = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (e == cudaSuccess) e = cudaFuncGetAttributes(&attr, sample_top_k_kernel<T>);
    TORCH_CHECK(e == cudaSuccess, "sample_top_k: reading shared-memory limits failed: ", cudaGetErrorString(e));
    static_smem[dev] = static_cast<int>(attr.sharedSizeBytes);
    optin[dev] = limit;
  }
  const size_t row_bytes = static_cast<size_t>(V) * sizeof(T);
  // a greedy draw without top-k outputs reads the row once: nothing to stage
  const bool staged = !(greedy && !return_topk) && row_bytes + static_smem[dev] <= static_cast<size_t>(optin[dev]);
  const int smem = staged ? static_cast<int>(row_bytes) : 0;
  if (smem > raised[dev]) {
    cudaError_t e = cudaFuncSetAttribute(sample_top_k_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    TORCH_CHECK(e == cudaSuccess, "sample_top_k: cudaFuncSetAttribute(", smem,
                " B dynamic shared memory) failed: ", cudaGetErrorString(e));
    raised[dev] = smem;
  }
  sample_top_k_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      logits.data_ptr<T>(), V, staged, k, greedy ? 0.f : static_cast<float>(1.0 / temperature), greedy,
      static_cast<float>(top_p), seed_dev, seed_host, offset_host, ids.data_ptr<int64_t>(),
      return_topk ? values.data_ptr<T>() : nullptr, return_topk ? indices.data_ptr<int64_t>() : nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_top_k_cuda(
    const at::Tensor& logits_in, int64_t k, double temperature, double top_p,
    const at::Tensor& seed, bool return_topk) {
  check_sample_args(logits_in, k, temperature, top_p, seed);
  c10::DeviceGuard guard(logits_in.device());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), V = logits.size(1), kk = std::min(k, V);
  auto [ids, values, indices] = empty_outputs(logits, kk, return_topk);
  if (B == 0) return {ids, values, indices};

  // A CUDA seed is read by the kernel (graph-safe); a CPU one is passed by value.
  const at::Tensor seed_c = seed.contiguous();
  const int64_t* seed_dev = nullptr;
  uint64_t seed_host = 0, offset_host = 0;
  if (seed_c.is_cuda()) {
    TORCH_CHECK(seed_c.device() == logits.device(), "sample_top_k: seed must be on the logits' device or the CPU");
    seed_dev = seed_c.data_ptr<int64_t>();
  } else {
    seed_host = static_cast<uint64_t>(seed_c.data_ptr<int64_t>()[0]);
    offset_host = static_cast<uint64_t>(seed_c.data_ptr<int64_t>()[1]);
  }
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(logits.device());
  const auto cuda_stream = static_cast<cudaStream_t>(stream.native_handle());
  switch (logits.scalar_type()) {
    case at::kFloat:
      launch<float>(logits, kk, temperature, top_p, seed_dev, seed_host, offset_host, ids, values, indices,
                    return_topk, cuda_stream);
      break;
    case at::kHalf:
      launch<c10::Half>(logits, kk, temperature, top_p, seed_dev, seed_host, offset_host, ids, values, indices,
                        return_topk, cuda_stream);
      break;
    default:
      launch<c10::BFloat16>(logits, kk, temperature, top_p, seed_dev, seed_host, offset_host, ids, values,
                            indices, return_topk, cuda_stream);
  }
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "sample_top_k: CUDA launch failed: ", cudaGetErrorString(err));
  if (return_topk) {  // gathered unsorted: order by id, then stable by value desc (torch.topk order);
    // the value keys fold -0 into +0 (equal, as in the kernel and the CPU op) whatever sort does
    auto [by_id, perm] = at::sort(indices, 1);
    const at::Tensor by_id_values = values.gather(1, perm);
    const at::Tensor order = std::get<1>(at::sort(by_id_values.add(0), /*stable=*/true, 1, /*descending=*/true));
    values = by_id_values.gather(1, order);
    indices = by_id.gather(1, order);
  }
  return {ids, values, indices};
}

}  // namespace
}  // namespace gptfast

TORCH_LIBRARY_IMPL(gptfast, CUDA, m) { m.impl("sample_top_k", &gptfast::sample_top_k_cuda); }
