"""gptfast.kernels: fused Triton kernels, one file per op: kernel, launcher, autograd Function,
the "triton" backend's module for that op, and the op's reference (what tests and benchmarks
check the kernel against).

| file | functions | module (the op it implements) | reference |
| --- | --- | --- | --- |
| layer_norm.py | layer_norm, add_layer_norm | TritonLayerNorm (layer_norm) | layer_norm_ref |
| gelu.py | gelu, bias_gelu | TritonGELU (gelu) | bias_gelu_ref |
| feed_forward.py | gemv, linear_rows (decode's few rows, where faster than cuBLAS) | FusedFeedForward (feed_forward) | linear_rows_ref |
| cross_entropy.py | cross_entropy, linear_cross_entropy | LinearCrossEntropyLoss (loss) | cross_entropy_ref, linear_cross_entropy_ref |
| attention.py | attention | TritonCausalAttention (attention: prefill and decode) | attention_ref |
| attention_decode.py | attention_decode (flash-decoding) | called by TritonCausalAttention | attention_ref |

_attention_common.py holds what the two attention files share (input checks, precision, head sizes).

Importing this package imports Triton and defines (but does not compile) the kernels; the
attention kernel modules are loaded only by `op_modules()`, and a missing or broken one leaves
the triton backend on PyTorch's attention with one warning.

The op functions are exported here under their file's name, so `gptfast.kernels.layer_norm`
is the function; import a module's other names with `from gptfast.kernels.layer_norm import ...`.
"""
from __future__ import annotations

import warnings

from gptfast.backends import TorchCausalAttention

from .cross_entropy import LinearCrossEntropyLoss, cross_entropy, linear_cross_entropy
from .feed_forward import FusedFeedForward
from .gelu import TritonGELU, bias_gelu, gelu
from .layer_norm import TritonLayerNorm, add_layer_norm, layer_norm

__all__ = ["add_layer_norm", "bias_gelu", "cross_entropy", "gelu", "layer_norm", "linear_cross_entropy",
           "op_modules"]


def _attention_module() -> type:
    """The attention core on the kernels, or torch's (with a warning) when that file fails to import."""
    try:
        from .attention import TritonCausalAttention
    except Exception as e:  # noqa: BLE001 - any import failure means "use torch's attention"
        warnings.warn(f"gptfast.kernels.attention is unavailable ({type(e).__name__}: {e}); the triton "
                      "backend uses PyTorch's attention", RuntimeWarning, stacklevel=3)
        return TorchCausalAttention
    return TritonCausalAttention


def op_modules() -> dict[str, type]:
    """The "triton" backend: its class for each op (see gptfast.backends)."""
    return {m.op: m for m in (TritonLayerNorm, TritonGELU, FusedFeedForward, _attention_module(),
                              LinearCrossEntropyLoss)}
