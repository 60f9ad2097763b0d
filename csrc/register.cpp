// Declares the gptfast::sample_top_k operator (kernels: sampling.cpp for CPU,
// sampling_cuda.cu for CUDA; the fake/meta kernel is registered in gptfast/sampling.py)
// and the empty Python module gptfast._C whose import loads them.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(gptfast, m) {
  // seed: int64 tensor [2] = (seed, offset). A tensor, not two ints, so a CUDA graph or a
  // compiled graph can advance the offset in place without re-capturing.
  // values/indices: the sorted top-k (B, min(k, V)) when return_topk, else empty (0,).
  m.def("sample_top_k(Tensor logits, int k, float temperature, float top_p, Tensor seed, "
        "bool return_topk) -> (Tensor ids, Tensor values, Tensor indices)");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
