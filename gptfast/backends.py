"""Backends are module classes: the torch-native op modules, and what every backend shares.

`GPTModel` has a few op modules whose computation differs between backends, each naming its
op in the class attribute `op`: "layer_norm" (with the block's residual add), "gelu",
"feed_forward", "attention" (the causal core, prefill and decode) and "loss" (the LM head's
cross-entropy). A backend is a choice of class for each op:

- "reference": the classic from-scratch math, in `gptfast.model` (the ground truth for tests);
- "torch": PyTorch's fused native ops, the classes below;
- "triton": gptfast's fused kernels, one class next to each kernel in `gptfast.kernels.<op>`
  (CUDA, or Triton's interpreter on CPU when TRITON_INTERPRET=1); each falls back to the
  torch class (its parent) for shapes and dtypes its kernel does not cover;
- "auto": "triton" on CUDA when Triton works, else "torch".

Every variant only overrides `forward` (and LayerNorm's `add_norm`), working on the reference
module's attributes and parameters, so `GPTModel.set_backend` switches by changing each op
module's class: the parameters, and so the state dict, stay the same.

This module imports nothing of gptfast (the kernels build on it); the choice itself is made
in one place, `GPTModel.set_backend`.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

BACKENDS = ("reference", "torch", "triton", "auto")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the fused kernels (Triton, C++) take


def triton_interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def fused_dtypes(*tensors) -> bool:
    """Whether the kernels take these tensors' dtypes (fp32/fp16/bf16); others (fp64) go to torch."""
    return all(t.dtype in FUSED_DTYPES for t in tensors)


_warned: set[str] = set()


def warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The device a command runs on: `name`, or CUDA when present, else the CPU; a device
    this machine does not have is a one-line error."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device name (try cpu, cuda or cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def causal_mask(T: int, S: int, device) -> torch.Tensor:
    """(T, S) bool, True where query t (at position S - T + t: the last T of S) may see key s."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


# ---- the torch-native op modules (the reference module's attributes, PyTorch's fused ops) ----

class TorchLayerNorm(nn.Module):
    op = "layer_norm"

    def forward(self, x):
        return F.layer_norm(x, self.scale.shape, self.scale, self.shift, self.eps)

    def add_norm(self, x, residual):
        """(x + residual, norm(x + residual)): the pre-norm block's residual step."""
        s = x + residual
        return s, self(s)


class TorchGELU(nn.Module):
    op = "gelu"

    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class TorchCausalAttention(nn.Module):
    """The causal core by F.scaled_dot_product_attention (flash / memory-efficient kernels)."""
    op = "attention"

    def forward(self, q, k, v, kv_cache=None):
        T, S = q.shape[-2], k.shape[-2]
        p = self.dropout_p if self.training else 0.0
        mask = None if kv_cache is None else kv_cache.mask(T)
        if mask is None and T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        if mask is None and T > 1:  # the T new queries see every cached key before them
            mask = causal_mask(T, S, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


TORCH_MODULES = {m.op: m for m in (TorchLayerNorm, TorchGELU, TorchCausalAttention)}
