"""What flash attention (attention.py) and flash-decoding (attention_decode.py) share: the head
sizes and batch x heads the kernels cover, the input checks, the fp32/tf32 precision choice and
the bf16 rounding `_cast` that Triton's CPU interpreter needs. Both import it from here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptfast.backends import FUSED_DTYPES
from gptfast.backends import triton_interpreting as _interpreting

HEAD_DIMS = (16, 32, 64, 128)
MAX_BATCH_HEADS = 65535  # B * H is the grid's y dimension, which CUDA caps there
LOG2E = 1.4426950408889634  # the kernels' exponentials are base 2: logits are scaled by c * log2(e)


@triton.jit
def _cast(x, dtype: tl.constexpr, PREC: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does. Triton's CPU interpreter truncates
    fp32 -> bf16 casts, so under it ("upcast") round the fp32 bits to 8 mantissa bits first."""
    if PREC == "upcast":
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)  # now exactly representable in bf16
    return x.to(dtype)


def _precision(dtype: torch.dtype) -> str:
    """The kernels' PREC: fp32 dots must not silently drop to tf32 (10-bit mantissa)."""
    if dtype == torch.bfloat16 and _interpreting():
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _sm_count(device) -> int:
    """The multiprocessors a grid is sized for (4 under the interpreter, which has none)."""
    return 4 if _interpreting() else torch.cuda.get_device_properties(device).multi_processor_count


def _check_device(name: str, t: torch.Tensor):
    if t.device.type != "cuda" and not _interpreting():
        raise ValueError(f"{name} is on {t.device.type}; Triton kernels need a CUDA tensor "
                         "(or TRITON_INTERPRET=1)")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D (B, H, T, D) tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in FUSED_DTYPES:
            raise ValueError(f"attention: {name} has dtype {t.dtype}; use float16, bfloat16 or float32")
        _check_device(f"attention: {name}", t)
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                         "must be (B, H, T, D), (B, H, S, D), (B, H, S, D)")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError("attention: q, k and v must share one dtype and device")
    if q.shape[3] not in HEAD_DIMS:
        raise ValueError(f"attention: head_dim {q.shape[3]} is not supported; use one of {HEAD_DIMS}")
    if not 1 <= q.shape[2] <= k.shape[2]:
        raise ValueError(f"attention: need 1 <= T <= S, got T={q.shape[2]}, S={k.shape[2]}")
    if q.shape[0] * q.shape[1] > MAX_BATCH_HEADS:
        raise ValueError(f"attention: batch x heads = {q.shape[0] * q.shape[1]} is over the kernels' "
                         f"limit of {MAX_BATCH_HEADS}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """The kernels index rows by stride and the head dim densely; views from a fused qkv pass as is."""
    return t if t.stride(-1) == 1 else t.contiguous()
