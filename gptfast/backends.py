"""The backend switch: the few ops where the backends differ, behind one interface.

Every backend computes the same function on the same parameters; they differ only in
how. `GPTModel` asks `get_backend(name, device)` for one and hands it to its blocks.

- "reference": the classic from-scratch math, op by op (the ground truth for tests).
- "torch": PyTorch's fused native ops (scaled_dot_product_attention, layer_norm, gelu).
- "triton": gptfast's own fused kernels from `gptfast.kernels` (CUDA, or the Triton
  interpreter on CPU when TRITON_INTERPRET=1).
- "auto": "triton" on CUDA when Triton works, else "torch".
"""
from __future__ import annotations

import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F

BACKENDS = ("reference", "torch", "triton", "auto")


def reference_layer_norm(x, scale, shift, eps=1e-5):
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


def reference_gelu(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def reference_attention(q, k, v, dropout_p=0.0, training=False):
    """Causal attention on (B, H, T, D) tensors with an explicit [T x T] mask."""
    T, S = q.shape[-2], k.shape[-2]
    # queries are the last T of S positions (S > T while decoding with a KV cache)
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, H, T, S)
    scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, dropout_p, training)
    return weights @ v  # (B, H, T, D)


class ReferenceBackend:
    """The classic math, op by op."""
    name = "reference"

    def layer_norm(self, x, scale, shift, eps=1e-5):
        return reference_layer_norm(x, scale, shift, eps)

    def add_layer_norm(self, x, residual, scale, shift, eps=1e-5):
        """(x + residual, layer_norm(x + residual)): the pre-norm block's residual step."""
        s = x + residual
        return s, self.layer_norm(s, scale, shift, eps)

    def linear_gelu(self, x, weight, bias):
        return reference_gelu(F.linear(x, weight, bias))

    def attention(self, q, k, v, dropout_p=0.0, training=False):
        return reference_attention(q, k, v, dropout_p, training)

    def cross_entropy(self, logits, targets, ignore_index=-100):
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)

    def linear_cross_entropy(self, hidden, weight, targets, ignore_index=-100):
        """Loss of the output head hidden @ weight.T; fused backends never build the logits."""
        return self.cross_entropy(F.linear(hidden, weight), targets, ignore_index)


class TorchBackend(ReferenceBackend):
    """PyTorch-native fused ops."""
    name = "torch"

    def layer_norm(self, x, scale, shift, eps=1e-5):
        return F.layer_norm(x, scale.shape, scale, shift, eps)

    def linear_gelu(self, x, weight, bias):
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    def attention(self, q, k, v, dropout_p=0.0, training=False):
        T, S = q.shape[-2], k.shape[-2]
        p = dropout_p if training else 0.0
        if T == S:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        # decoding with a cache: the T new queries see every cached key before them
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


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


_INSTANCES = {"reference": ReferenceBackend(), "torch": TorchBackend()}
_warned: set[str] = set()


def _warn_once(msg: str):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _triton_backend():
    """The Triton backend, or None with the reason it cannot run."""
    if "triton" not in _INSTANCES:
        if "tensorflow" in sys.modules and "triton" not in sys.modules:  # importing it now aborts
            return None, ("tensorflow was imported before triton, and importing triton now would abort the "
                          "process (LLVM option clash); import triton (or gptfast.kernels) before tensorflow")
        try:
            from gptfast.kernels import TritonBackend
        except Exception as e:  # Triton missing or broken: fall back, never crash
            return None, f"Triton is unavailable ({type(e).__name__}: {e})"
        _INSTANCES["triton"] = TritonBackend()
    return _INSTANCES["triton"], None


def get_backend(name: str, device: torch.device | str = "cpu"):
    """The backend object for `name` on `device`, falling back with one warning."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name in ("reference", "torch"):
        return _INSTANCES[name]
    usable = device.type == "cuda" or triton_interpreting()
    if name == "auto":
        if device.type != "cuda":
            return _INSTANCES["torch"]
        backend, _ = _triton_backend()
        return backend or _INSTANCES["torch"]
    if not usable:
        _warn_once("backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1); using 'torch' on "
                   f"{device.type}")
        return _INSTANCES["torch"]
    backend, why = _triton_backend()
    if backend is None:
        _warn_once(f"backend 'triton': {why}; using 'torch'")
        return _INSTANCES["torch"]
    return backend
