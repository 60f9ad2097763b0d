"""gelu: GPT-2's tanh-approximation GELU with the preceding bias add fused, in Triton.

bias_gelu(x, bias) = gelu(x + bias), the feed-forward up-projection's epilogue: one read of
x and one write of y instead of an add pass and a GELU pass. Backward recomputes x + bias
(cheaper than storing it) and writes dx; each program walks one column block down a group of
rows, keeping dx's column sums in registers, so dbias costs a few fp32 partial rows instead of
another pass over dx.

Numerics: fp32 inside. gelu(z) = z (1 + tanh(u)) / 2 = z sigmoid(2u), and sigmoid(2u) is
1 / (1 + e) or e / (1 + e) with e = exp(-2|u|) <= 1: it never overflows and, unlike 1 + tanh,
keeps full relative precision in the negative tail. The cubic uses z clamped to +-20, past
which the sigmoid is exactly 0 or 1 in fp32, so no NaN or inf for any finite input.
(tl.math.tanh is not in every Triton version, so the kernel does not use it.)

`TritonGELU` is the "triton" backend's GELU module (its feed-forward, which fuses the first
layer's bias into this kernel, is feed_forward.py's); `bias_gelu_ref` is the reference the
tests and benchmarks check these kernels against.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptfast.backends import FUSED_DTYPES, TorchGELU, fused_dtypes

NUM_WARPS = 8  # 16 elements of a 4096-element tile per thread: few registers, many programs per SM
# backward: enough loads in flight, few dbias partial rows; 1.76x the one-tile-a-program backward
# on an H200 (benchmarks/results/gpu-bench-nvidia-h200-20261130-1134-*; tune_gpu.py times others)
BWD_PROGRAMS_PER_SM, BWD_NUM_WARPS = 4, 8


def bias_gelu_ref(x, bias=None, upcast: bool = False):
    """gelu(x + bias) by GPT-2's tanh formula, in x's dtype (or in fp32 with `upcast`)."""
    if upcast:
        x, bias = x.float(), None if bias is None else bias.float()
    z = x if bias is None else x + bias
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * torch.pow(z, 3))))


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
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets, mask, columns and row-block index of this program's (BLOCK_M, BLOCK_N) tile of
    an (M, N) array. The grid is 1-D (grid y and z stop at 65535: a long 1-D x would pass that)."""
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_col_blocks
    pid_n = tl.program_id(0) % n_col_blocks
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    return rows[:, None] * N + cols[None, :], mask, cols, pid_m


@triton.jit
def _bias_gelu_fwd(X, BIAS, Y, M, N, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs, mask, cols, _ = _tile(M, N, BLOCK_M, BLOCK_N)
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    s, _ = _tanh_gelu_parts(z)
    tl.store(Y + offs, (z * s).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd(DY, X, BIAS, DX, DBIAS_PART, M, N, rows_per_prog, HAS_BIAS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One column block of `rows_per_prog` rows (a multiple of BLOCK_M), BLOCK_M rows a step;
    dbias's column sums stay an fp32 tile in registers and are reduced once, at the end."""
    n_col_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_col_blocks
    cols = (tl.program_id(0) % n_col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row0 = pid_m.to(tl.int64) * rows_per_prog  # int64: M * N may pass 2**31
    for start in range(0, rows_per_prog, BLOCK_M):
        rows = row0 + start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += bias[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        s, ds = _tanh_gelu_parts(z)
        # ds is exactly 0 wherever z is clamped, so z * ds stays finite
        dz = tl.where(mask, dy * (s + z * ds), 0.0)
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
        acc += dz
    if HAS_BIAS:  # one fp32 row of dbias partials per row group
        tl.store(DBIAS_PART + pid_m * N + cols, tl.sum(acc, axis=0), mask=col_mask)


def _tiles(M: int, N: int):
    """(row blocks, grid, BLOCK_M, BLOCK_N): tiles of 4096 elements, rows 256 wide at most."""
    block_n = min(triton.next_power_of_2(max(N, 1)), 256)
    block_m = min(4096 // block_n, 64)
    row_blocks = triton.cdiv(M, block_m)
    return row_blocks, (row_blocks * triton.cdiv(N, block_n),), block_m, block_n


def _bwd_tiles(M: int, N: int, device: torch.device):
    """(row groups, grid, rows per program, BLOCK_M, BLOCK_N) of the backward: each program walks
    one column block down a group of rows, BWD_PROGRAMS_PER_SM programs per SM in all (on CPU,
    two row groups: the interpreter's tests still take several steps per program)."""
    _, _, block_m, block_n = _tiles(M, N)
    col_blocks = triton.cdiv(N, block_n)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        groups = triton.cdiv(BWD_PROGRAMS_PER_SM * sms, col_blocks)
    else:
        groups = 2
    rows_per_prog = triton.cdiv(triton.cdiv(M, groups), block_m) * block_m
    groups = triton.cdiv(M, rows_per_prog)
    return groups, (groups * col_blocks,), rows_per_prog, block_m, block_n


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        y = torch.empty_like(x)
        N = x.shape[-1]
        M = x.numel() // max(N, 1)  # x as (M, N)
        if x.numel():
            _, grid, bm, bn = _tiles(M, N)
            _bias_gelu_fwd[grid](x, bias if bias is not None else x, y, M, N, HAS_BIAS=bias is not None,
                                 BLOCK_M=bm, BLOCK_N=bn, num_warps=NUM_WARPS)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        N = x.shape[-1]
        M = x.numel() // max(N, 1)  # x as (M, N)
        has_bias, wants_dbias = bias is not None, bias is not None and ctx.needs_input_grad[1]
        if not x.numel():
            return dx, torch.zeros_like(bias) if wants_dbias else None
        groups, grid, rows_per_prog, bm, bn = _bwd_tiles(M, N, x.device)
        part = torch.empty(groups, N, dtype=torch.float32, device=x.device) if has_bias else x  # x: unused
        _bias_gelu_bwd[grid](dy, x, bias if has_bias else x, dx, part, M, N, rows_per_prog, HAS_BIAS=has_bias,
                             BLOCK_M=bm, BLOCK_N=bn, num_warps=BWD_NUM_WARPS)
        dbias = part.sum(0).to(bias.dtype) if wants_dbias else None
        return dx, dbias


def _check(x, bias):
    if x.dtype not in FUSED_DTYPES:
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


class TritonGELU(TorchGELU):
    def forward(self, x):
        return gelu(x) if fused_dtypes(x) else super().forward(x)
