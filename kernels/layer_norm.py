"""layer_norm: LayerNorm over the last dimension, forward and backward in Triton.

Statistics (mean, 1/std) and all arithmetic are fp32 whatever the row dtype (fp32, fp16,
bf16). One program normalises one row held whole in registers, so rows are at most
MAX_WIDTH wide. `add_layer_norm` fuses the pre-norm block's residual add: it returns
(x + residual, layer_norm(x + residual)) from one read of each input.

Backward: each program walks a contiguous run of rows, writing dx and keeping its own
fp32 partial sums of dscale/dshift; torch adds the few partial rows at the end (no atomics,
so the result is deterministic).

`TritonLayerNorm` is the "triton" backend's LayerNorm module (see gptfast.backends);
`layer_norm_ref` is the reference the tests and benchmarks check these kernels against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gptfast.backends import FUSED_DTYPES, TorchLayerNorm, fused_dtypes

MAX_WIDTH = 8192


def layer_norm_ref(x, scale, shift, eps: float = 1e-5, upcast: bool = False):
    """The classic formula, in x's dtype (or in fp32 with `upcast`: the truth low-precision
    results are measured against)."""
    if upcast:
        x, scale, shift = x.float(), scale.float(), shift.float()
    mean = x.mean(dim=-1, keepdim=True)
    var = x.var(dim=-1, keepdim=True, unbiased=False)
    return scale * (x - mean) / torch.sqrt(var + eps) + shift


@triton.jit
def _layer_norm_fwd(X, RES, SUM, Y, W, B, MEAN, RSTD, N, eps,
                    HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    offs = row * N + cols
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
        # round the sum to its storage dtype first: backward re-reads the stored sum
        s = (x + r).to(SUM.dtype.element_ty)
        tl.store(SUM + offs, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd(DY, DSUM, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, M, N, rows_per_prog,
                    HAS_DSUM: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog  # int64: M * N may pass 2**31
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for row in range(row_start, row_end):
        offs = row * N + cols
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        wdy = w * dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dx = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DSUM:  # gradient reaching the residual sum directly
            dx += tl.load(DSUM + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    tl.store(DB_PART + pid * N + cols, db, mask=mask)


def _launch_config(N: int):
    block = triton.next_power_of_2(N)
    return block, min(max(block // 256, 1), 16)


BWD_PROGRAMS_PER_SM = 8  # enough to hide latency, few partial rows (benchmarks/tune_gpu.py times others)


def _bwd_programs(M: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(M, BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(M, 8)


def _check(name: str, x, scale, shift):
    if x.dtype not in FUSED_DTYPES:
        raise ValueError(f"layer_norm: {name} has dtype {x.dtype}; expected one of fp32, fp16, bf16")
    N = x.shape[-1]
    if not 0 < N <= MAX_WIDTH:
        raise ValueError(f"layer_norm: {name} rows are {N} wide; supported widths are 1..{MAX_WIDTH}")
    for pname, p in (("scale", scale), ("shift", shift)):
        if p.shape != (N,):
            raise ValueError(f"layer_norm: {pname} has shape {tuple(p.shape)}; expected ({N},) "
                             f"to match the last dimension of {name}")
        if p.device != x.device:
            raise ValueError(f"layer_norm: {pname} is on {p.device} but {name} is on {x.device}")


class LayerNormFunction(torch.autograd.Function):
    """y = layer_norm(x); with a residual, returns (s, layer_norm(s)) where s = x + residual."""

    @staticmethod
    def forward(ctx, x, residual, scale, shift, eps):
        shape, N = x.shape, x.shape[-1]
        x2 = x.reshape(-1, N).contiguous()  # (M, N)
        M = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        has_res = residual is not None
        if has_res:
            r2 = residual.reshape(-1, N).contiguous()  # (M, N)
            s = torch.empty_like(x2)
        else:
            r2 = s = x2  # unused by the kernel
        block, warps = _launch_config(N)
        if M > 0:
            _layer_norm_fwd[(M,)](x2, r2, s, y, scale, shift, mean, rstd, N, eps,
                                  HAS_RES=has_res, BLOCK_N=block, num_warps=warps)
        ctx.save_for_backward(s, scale, mean, rstd)
        ctx.has_res, ctx.shape, ctx.shift_dtype = has_res, shape, shift.dtype
        if has_res:
            return s.view(shape), y.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, *grads):
        s, scale, mean, rstd = ctx.saved_tensors
        dsum, dy = grads if ctx.has_res else (None, grads[0])
        M, N = s.shape
        if dy is None:  # only the residual sum was used
            dsum = dsum.reshape(M, N)
            dx = dsum
            dw, db = torch.zeros_like(scale), torch.zeros(N, dtype=ctx.shift_dtype, device=s.device)
        else:
            dy = dy.reshape(M, N).contiguous()  # (M, N)
            if dsum is not None:
                dsum = dsum.reshape(M, N).contiguous()  # (M, N)
            dx = torch.empty_like(s)
            progs = _bwd_programs(M, s.device)
            dw_part = torch.zeros(max(progs, 1), N, dtype=torch.float32, device=s.device)
            db_part = torch.zeros_like(dw_part)
            block, warps = _launch_config(N)
            if M > 0:
                _layer_norm_bwd[(progs,)](dy, dsum if dsum is not None else dy, s, scale, mean, rstd,
                                          dx, dw_part, db_part, M, N, triton.cdiv(M, progs),
                                          HAS_DSUM=dsum is not None, BLOCK_N=block, num_warps=warps)
            dw, db = dw_part.sum(0).to(scale.dtype), db_part.sum(0).to(ctx.shift_dtype)
        dx = dx.view(ctx.shape)
        if ctx.has_res:
            return dx, dx, dw, db, None
        return dx, None, dw, db, None


def layer_norm(x, scale, shift, eps: float = 1e-5):
    """LayerNorm over the last dimension of x (any leading shape): scale * (x - mean) / std + shift."""
    _check("x", x, scale, shift)
    return LayerNormFunction.apply(x, None, scale, shift, eps)


def add_layer_norm(x, residual, scale, shift, eps: float = 1e-5):
    """(x + residual, layer_norm(x + residual)) in one pass; the sum takes the promoted dtype."""
    if x.shape != residual.shape:
        raise ValueError(f"add_layer_norm: x has shape {tuple(x.shape)} but residual has "
                         f"{tuple(residual.shape)}; they must match")
    dtype = torch.promote_types(x.dtype, residual.dtype)
    x, residual = x.to(dtype), residual.to(dtype)
    _check("x", x, scale, shift)
    return LayerNormFunction.apply(x, residual, scale, shift, eps)


class TritonLayerNorm(TorchLayerNorm):
    """The LayerNorm module on these kernels; rows wider than MAX_WIDTH and other dtypes
    (fp64) go to the torch module."""

    def _covers(self, *xs) -> bool:
        return xs[0].shape[-1] <= MAX_WIDTH and fused_dtypes(*xs)

    def forward(self, x):
        if not self._covers(x):
            return super().forward(x)
        return layer_norm(x, self.scale, self.shift, self.eps)

    def add_norm(self, x, residual):
        if not self._covers(x, residual):
            return super().add_norm(x, residual)
        return add_layer_norm(x, residual, self.scale, self.shift, self.eps)
