"""gelu: GPT-2's tanh-approximation GELU with the preceding bias add fused, in Triton.

bias_gelu(x, bias) = gelu(x + bias), the feed-forward up-projection's epilogue: one read of
x and one write of y instead of an add pass and a GELU pass. Backward recomputes x + bias
(cheaper than storing it) and writes dx; dbias is dx summed over rows.

Numerics: fp32 inside. gelu(z) = z (1 + tanh(u)) / 2 = z sigmoid(2u), and sigmoid(2u) is
1 / (1 + e) or e / (1 + e) with e = exp(-2|u|) <= 1: it never overflows and, unlike 1 + tanh,
keeps full relative precision in the negative tail. The cubic uses z clamped to +-20, past
which the sigmoid is exactly 0 or 1 in fp32, so no NaN or inf for any finite input.
(tl.math.tanh is not in every Triton version, so the kernel does not use it.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK = 1024


@triton.jit
def _tanh_gelu_parts(z):
    """For fp32 z: (s, ds/dz) with s = (1 + tanh(u)) / 2 = sigmoid(2u), u = sqrt(2/pi)(z + 0.044715 z**3)."""
    zc = tl.minimum(tl.maximum(z, -20.0), 20.0)  # |u| > 300 there: s is exactly 0 or 1 in fp32
    u = 0.7978845608028654 * (zc + 0.044715 * zc * zc * zc)
    e = tl.exp(-2.0 * tl.abs(u))  # in (0, 1]: no overflow
    inv = 1.0 / (1.0 + e)
    s = tl.where(u < 0, e * inv, inv)  # no 1 + tanh cancellation in the negative tail
    du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * zc * zc)
    return s, 2.0 * e * inv * inv * du  # ds/dz = 2 s (1 - s) du


@triton.jit
def _bias_gelu_fwd(X, BIAS, Y, numel, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    s, _ = _tanh_gelu_parts(z)
    tl.store(Y + offs, (z * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DY, X, BIAS, DX, numel, N, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + offs % N, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s, ds = _tanh_gelu_parts(z)
    # ds is exactly 0 wherever z is clamped, so z * ds stays finite
    dz = dy * (s + z * ds)
    tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)


def _grid(numel: int):
    return (triton.cdiv(numel, BLOCK),)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        y = torch.empty_like(x)
        N = x.shape[-1]
        if x.numel():
            _bias_gelu_fwd[_grid(x.numel())](x, bias if bias is not None else x, y, x.numel(), N,
                                             HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        N = x.shape[-1]
        if x.numel():
            _bias_gelu_bwd[_grid(x.numel())](dy, x, bias if bias is not None else x, dx, x.numel(), N,
                                             HAS_BIAS=bias is not None, BLOCK=BLOCK, num_warps=4)
        dbias = None
        if bias is not None and ctx.needs_input_grad[1]:
            dbias = dx.reshape(-1, N).sum(0, dtype=torch.float32).to(bias.dtype)  # over rows
        return dx, dbias


def _check(x, bias):
    if x.dtype not in DTYPES:
        raise ValueError(f"gelu: x has dtype {x.dtype}; expected one of fp32, fp16, bf16")
    if bias is not None:
        if bias.shape != (x.shape[-1],):
            raise ValueError(f"bias_gelu: bias has shape {tuple(bias.shape)}; expected "
                             f"({x.shape[-1]},) to match the last dimension of x")
        if bias.device != x.device:
            raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")


def bias_gelu(x, bias):
    """gelu(x + bias) with bias broadcast over the last dimension; output has x's dtype."""
    _check(x, bias)
    return BiasGeluFunction.apply(x, bias)


def gelu(x):
    """GPT-2's tanh-approximation GELU, elementwise."""
    _check(x, None)
    return BiasGeluFunction.apply(x, None)
