// Declares the gptfast::sample_top_k operator (kernels: sampling.cpp for CPU,
// sampling_cuda.cu for CUDA; the fake/meta kernel is registered in gptfast/sampling.py),
// gptfast::linear and gptfast::pack_int8 (CPU kernels: linear_cpu.cpp; linear's fake kernel in
// gptfast/cpu_linear.py),
// gptfast::decode_step and gptfast::argmax_rows (CPU: decode_cpu.cpp)
// and the empty Python module gptfast._C whose import loads them.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gptfast, m) {
  // seed: int64 tensor [2] = (seed, offset). A tensor, not two ints, so a CUDA graph or a
  // compiled graph can advance the offset in place without re-capturing.
  // values/indices: the sorted top-k (B, min(k, V)) when return_topk, else empty (0,).
  m.def("sample_top_k(Tensor logits, int k, float temperature, float top_p, Tensor seed, "
        "bool return_topk) -> (Tensor ids, Tensor values, Tensor indices)");
  // y (..., N) = x (..., K) W^T (* row scale) (+ bias) for decode's few rows; W float32/bfloat16/float16, int8
  // with a float32 scale (N,), or packed int4 (uint8) with float16 (scale, min) (N, groups, 2).
  // path: "" = the best for this CPU (or GPTFAST_CPU_KERNEL), else one of linear_paths().
  // packed: int8 only, pack_int8(weight) (linear_cpu.h's layout), read instead of packing as it goes.
  m.def("linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias, int group_size, str path=\"\", "
        "Tensor? packed=None) -> Tensor");
  // int8 weight (N, K) -> (ceil(N / 16), 32 ceil(K / 2)) int8 in the avx2 path's packed layout
  m.def("pack_int8(Tensor weight) -> Tensor");
  // One GPT-2 step on CPU (decode_cpu.cpp; operands built by gptfast/cpu_decode.py) for n tokens:
  // token i at positions[i] of cache row rows[i], its key/value written to that slot; a row's
  // tokens are one run of consecutive positions (a decoding row: one token; a prompt: all of it).
  // norms: per block norm1 (scale, shift), norm2 (scale, shift), then the final norm's; linears:
  // (weight, scale, bias) for qkv, out_proj, fc, proj of each block, then the head; groups and
  // packed (pack_int8 of an int8 weight, or None): one per linear. Returns the logits of the
  // tokens named by outputs (r, vocab_size).
  m.def("decode_step(Tensor tokens, Tensor positions, Tensor rows, Tensor outputs, Tensor tok_emb, Tensor pos_emb, "
        "Tensor[] norms, Tensor?[] linears, int[] groups, Tensor?[] packed, Tensor(a!)[] k_cache, "
        "Tensor(b!)[] v_cache, int n_heads, float eps, int vocab_size) -> Tensor");
  // logits (B, V) -> (B,) int64, as logits.argmax(-1) (greedy decoding's ids; a fast CPU kernel in
  // decode_cpu.cpp, torch's argmax elsewhere)
  m.def("argmax_rows(Tensor logits) -> Tensor");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
