"""gptfast.kernels: fused Triton kernels, one file per op (kernel + launcher + autograd Function),
and the "triton" backend that puts them into `GPTModel`.

Importing this package imports Triton and defines (but does not compile) the kernels; the
attention kernel module is loaded only when a TritonBackend is made, and a missing or broken
one leaves the backend on PyTorch's attention with one warning.

The op functions are exported here under their file's name, so `gptfast.kernels.layer_norm`
is the function; import a module's other names with `from gptfast.kernels.layer_norm import ...`.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from gptfast.backends import TorchBackend

from .cross_entropy import cross_entropy, linear_cross_entropy
from .gelu import bias_gelu, gelu
from .layer_norm import MAX_WIDTH, add_layer_norm, layer_norm

__all__ = ["TritonBackend", "add_layer_norm", "bias_gelu", "cross_entropy", "gelu", "layer_norm",
           "linear_cross_entropy"]


def _load_attention():
    """The attention kernel module, or None (with a warning) when it is missing or fails to import."""
    try:
        from . import attention
    except Exception as e:  # noqa: BLE001 - any import failure means "use torch's attention"
        warnings.warn(f"gptfast.kernels.attention is unavailable ({type(e).__name__}: {e}); the triton "
                      "backend uses PyTorch's attention", RuntimeWarning, stacklevel=3)
        return None
    return attention


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused(*tensors) -> bool:
    """Whether the kernels take these tensors' dtypes (fp32/fp16/bf16); others (fp64) go to torch."""
    return all(t.dtype in _FUSED_DTYPES for t in tensors)


class TritonBackend(TorchBackend):
    """gptfast's fused Triton kernels; shapes and dtypes a kernel does not cover go to the torch ops."""
    name = "triton"

    def __init__(self):
        self._attention = _load_attention()

    def layer_norm(self, x, scale, shift, eps=1e-5):
        if x.shape[-1] > MAX_WIDTH or not _fused(x):
            return super().layer_norm(x, scale, shift, eps)
        return layer_norm(x, scale, shift, eps)

    def add_layer_norm(self, x, residual, scale, shift, eps=1e-5):
        if x.shape[-1] > MAX_WIDTH or not _fused(x, residual):
            return super().add_layer_norm(x, residual, scale, shift, eps)
        return add_layer_norm(x, residual, scale, shift, eps)

    def linear_gelu(self, x, weight, bias):
        if not _fused(x, weight):
            return super().linear_gelu(x, weight, bias)
        h = F.linear(x, weight)  # the bias add is fused into the GELU kernel
        return gelu(h) if bias is None else bias_gelu(h, bias)

    def _attention_covers(self, q, *kv) -> bool:
        """Whether the attention kernels take q's head size, batch x heads and the dtypes."""
        mod = self._attention
        return (mod is not None and q.shape[-1] in mod.HEAD_DIMS and q.shape[0] * q.shape[1] <= mod.MAX_BATCH_HEADS
                and _fused(q, *kv))

    def decode_kernel(self, q):
        """The flash-decoding kernel when it covers q's head size, batch x heads and dtype, else None."""
        return self._attention.attention_decode if self._attention_covers(q) else None

    def attention(self, q, k, v, dropout_p=0.0, training=False):
        mod = self._attention
        if not self._attention_covers(q, k, v):
            return super().attention(q, k, v, dropout_p, training)
        p = dropout_p if training else 0.0
        T, S = q.shape[-2], k.shape[-2]
        if T == 1 and S > 1 and p == 0.0 and not (torch.is_grad_enabled() and q.requires_grad):
            return mod.attention_decode(q, k, v, S)  # one new token against the cache: split over S
        return mod.attention(q, k, v, causal=True, dropout_p=p)

    def cross_entropy(self, logits, targets, ignore_index=-100):
        if not _fused(logits):
            return super().cross_entropy(logits, targets, ignore_index)
        return cross_entropy(logits, targets, ignore_index)

    def linear_cross_entropy(self, hidden, weight, targets, ignore_index=-100):
        if not _fused(hidden, weight):
            return super().linear_cross_entropy(hidden, weight, targets, ignore_index)
        return linear_cross_entropy(hidden, weight, targets, ignore_index)
