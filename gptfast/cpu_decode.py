"""The fused CPU decode step: one call of `torch.ops.gptfast.decode_step` (csrc/decode_cpu.cpp)
runs a GPT-2 decode step for rows at different lengths (embeddings, every block, the KV-cache
write, the head) where the eager step runs ~350 small ops and the Python between them.

`FusedDecode.for_model(model)` collects the model's operands once (they are the model's own
tensors, so weights updated in place are seen) or returns None where the model holds something
the C++ step does not run: a layer type other than nn.Linear or gptfast.quant's, non-fp32
embeddings or norms, a backend other than torch's (the reference backend runs the reference
modules, triton its kernels), or no _C. The reference is the model's own forward through the
KV cache (gptfast.runner); tests/test_cpu_decode.py checks one against the other.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import cpu_linear
from .quant import KernelLinear

try:
    from gptfast import _C  # noqa: F401  (registers the op)
    _HAS_OP = torch._C._dispatch_has_kernel_for_dispatch_key("gptfast::decode_step", "CPU")
except ImportError:
    _HAS_OP = False


def has_kernel() -> bool:
    """Whether gptfast._C was built with the fused CPU decode step."""
    return _HAS_OP


def _linear_operands(layer) -> tuple | None:
    """(weight, scale, bias, group) of a layer the C++ step multiplies by, or None."""
    if isinstance(layer, KernelLinear):
        return layer.weight, layer.scale, layer.bias, layer.group
    if type(layer) is nn.Linear and layer.weight.dtype == torch.float32:
        bias = None if layer.bias is None else layer.bias.detach()
        return layer.weight.detach().contiguous(), None, bias, 0
    return None


def _fp32(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


class FusedDecode:
    """The operands of one model for `torch.ops.gptfast.decode_step`."""

    def __init__(self, model, norms, linears, groups, eps):
        cfg = model.cfg
        self.tok_emb, self.pos_emb = model.tok_emb.weight.detach(), model.pos_emb.weight.detach()
        self.norms, self.linears, self.groups = norms, linears, groups
        self.n_heads, self.eps, self.vocab_size = cfg.n_heads, eps, cfg.vocab_size

    @classmethod
    def for_model(cls, model) -> FusedDecode | None:
        if not _HAS_OP or model.active_backend != "torch" or model.training:
            return None
        if not _fp32(model.tok_emb.weight, model.pos_emb.weight):
            return None
        norm_modules = [n for b in model.trf_blocks for n in (b.norm1, b.norm2)] + [model.final_norm]
        if any(getattr(type(n), "op", None) != "layer_norm" or not _fp32(n.scale, n.shift) for n in norm_modules):
            return None
        eps = {n.eps for n in norm_modules}
        if len(eps) != 1 or any(getattr(type(b.ff.layers[1]), "op", None) != "gelu" for b in model.trf_blocks):
            return None
        layers = [m for b in model.trf_blocks for m in (b.att.qkv, b.att.out_proj, b.ff.layers[0], b.ff.layers[2])]
        operands = [_linear_operands(m) for m in layers + [model.out_head]]
        if any(o is None for o in operands) or not cpu_linear.has_kernel():
            return None
        norms = [t.detach() for n in norm_modules for t in (n.scale, n.shift)]
        linears = [t for weight, scale, bias, _ in operands for t in (weight, scale, bias)]
        return cls(model, norms, linears, [o[3] for o in operands], eps.pop())

    def __call__(self, tokens: torch.Tensor, lengths: torch.Tensor, caches) -> torch.Tensor:
        """Logits (n, vocab_size) of one decode step: tokens (n,) at positions lengths (n,) of
        cache rows [0, n); each row's key/value goes to slot lengths[i] of its cache row."""
        return torch.ops.gptfast.decode_step(
            tokens, lengths, self.tok_emb, self.pos_emb, self.norms, self.linears, self.groups,
            [c.k for c in caches], [c.v for c in caches], self.n_heads, self.eps, self.vocab_size)
