"""feed_forward: the "triton" backend's feed-forward (Linear, GELU, Linear), and gemv, the
matrix-vector kernel it uses for the few rows of a decode step.

Many rows (training, prefill): cuBLAS for the matmuls, the first layer's bias add fused into
gelu.py's GELU kernel. At batch 1 a decode step's linears are matrix-vector products: on an
H200 cuBLAS took about 4.4 us for each of GPT-2's (1-5 MB of weights, about 1 us of reading),
plus a split-K reduction kernel for the down projection and the bias+GELU kernel after the up
projection (benchmarks/results/gpu-bench-nvidia-h200-20261130-1134-*/profile_decode.txt). The
gemv kernel has each program load its BLOCK_N weight rows whole, in one go (every load in flight
at once, no dependent loop), and reduce them against each of the M <= MAX_ROWS input rows, with
bias and GELU as its epilogue; the grid covers the SMs about twice.

Whether that beats cuBLAS on a given GPU and shape is measured, not assumed: `linear_rows`
times both at its first call for a shape outside a graph capture (in CUDA graphs, as decode
replays them, over copies of the weight that pass twice the L2, as a decode step streams its
weights from memory), keeps the faster, and until then, or inside a capture, takes cuBLAS.
The timing synchronizes the device: it belongs at a model's warm-up (the runner warms every
decode step up before capturing it), not beside another thread's graph capture.
`linear_rows_ref` is the reference the tests check both against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from gptfast.backends import FUSED_DTYPES, fused_dtypes, warn_once

from ._attention_common import _check_device, _sm_count
from .gelu import _tanh_gelu_parts, bias_gelu, bias_gelu_ref

MAX_ROWS = 4  # more rows: cuBLAS's GEMM
TILE = 8192  # weight elements a program holds (BLOCK_N x BLOCK_K): 32 fp32 registers a thread
NUM_WARPS = 8
_FASTER: dict[tuple, bool] = {}  # shape key -> gemv beat cuBLAS there


def linear_rows_ref(x, weight, bias=None, gelu: bool = False):
    """F.linear, or GPT-2's tanh GELU of the product plus the bias (added in fp32, as bias_gelu)."""
    return bias_gelu_ref(F.linear(x, weight), bias, upcast=True).to(x.dtype) if gelu else F.linear(x, weight, bias)


def cublas_linear(x, weight, bias, gelu):
    """The many-rows path: cuBLAS, then the bias+GELU kernel."""
    return bias_gelu(F.linear(x, weight), bias) if gelu else F.linear(x, weight, bias)


@triton.jit
def _gemv(X, W, BIAS, Y, N, K, ROWS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w = tl.load(W + cols[:, None].to(tl.int64) * K + ks[None, :], mask=(cols[:, None] < N) & (ks[None, :] < K),
                other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K): this program's weight rows, whole
    if HAS_BIAS:
        b = tl.load(BIAS + cols, mask=cols < N, other=0.0).to(tl.float32)
    for m in tl.static_range(ROWS):
        x = tl.load(X + m * K + ks, mask=ks < K, other=0.0).to(tl.float32)
        y = tl.sum(w * x[None, :], axis=1)  # (BLOCK_N,)
        if HAS_BIAS:
            y += b
        if GELU:
            s, _ = _tanh_gelu_parts(y)
            y = y * s
        tl.store(Y + m * N + cols, y.to(Y.dtype.element_ty), mask=cols < N)


def _fits(M: int, K: int, x, weight, bias) -> bool:
    """gemv's ground for M rows of K values like x (its dtype and device): 1 <= M <= MAX_ROWS,
    0 < K <= TILE, weight (N, K) and bias (N,) or None, contiguous, of x's dtype and device."""
    params = [weight] + ([] if bias is None else [bias])
    return (0 < M <= MAX_ROWS and 0 < K <= TILE and x.dtype in FUSED_DTYPES and weight.dim() == 2
            and weight.shape[1] == K and (bias is None or bias.shape == (weight.shape[0],))
            and all(p.is_contiguous() and p.dtype == x.dtype and p.device == x.device for p in params))


def _check(x, weight, bias):
    _check_device("gemv: x", x)
    if x.dim() != 2 or not x.is_contiguous() or not _fits(*x.shape, x, weight, bias):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, bias "
                         f"{None if bias is None else tuple(bias.shape)}: expected 1..{MAX_ROWS} contiguous rows "
                         f"of 0 < K <= {TILE} values, a contiguous (N, K) weight and an (N,) bias of x's dtype "
                         "and device")


def gemv(x, weight, bias=None, gelu: bool = False):
    """x (M, K) contiguous, M <= MAX_ROWS; weight (N, K) contiguous, K <= TILE; bias (N,) or None."""
    _check(x, weight, bias)
    return _launch_gemv(x, weight, bias, gelu)


def _launch_gemv(x, weight, bias, gelu):
    """gemv on operands already checked (_check)."""
    M, K = x.shape
    N = weight.shape[0]
    block_k = triton.next_power_of_2(K)
    sms = _sm_count(x.device)
    block_n = max(1, min(TILE // block_k, triton.next_power_of_2(max(1, N // (2 * sms)))))
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv[(triton.cdiv(N, block_n),)](x, weight, x if bias is None else bias, y, N, K, ROWS=M,
                                      HAS_BIAS=bias is not None, GELU=gelu, BLOCK_N=block_n, BLOCK_K=block_k,
                                      num_warps=NUM_WARPS)
    return y


def linear_rows(x, weight, bias=None, gelu: bool = False):
    """linear_rows_ref(x, weight, bias, gelu) for x (M, K) of at most MAX_ROWS contiguous rows on
    CUDA: gemv or cuBLAS, whichever replayed faster for this shape here."""
    _check(x, weight, bias)  # before any timing: a bad input is an error, not a recorded choice
    key = _key(x, weight, bias, gelu)
    if key not in _FASTER:
        if not x.is_cuda:  # (the interpreter's CPU tensors pass _check)
            raise ValueError(f"linear_rows: no choice recorded for this shape, and timing one needs CUDA; x is on "
                             f"{x.device.type}")
        if torch.cuda.is_current_stream_capturing():
            return cublas_linear(x, weight, bias, gelu)  # no timing inside a capture: decided at a warm-up
        _FASTER[key] = _faster(x, weight, bias, gelu)
    return _launch_gemv(x, weight, bias, gelu) if _FASTER[key] else cublas_linear(x, weight, bias, gelu)


def _key(x, weight, bias, gelu) -> tuple:
    """What linear_rows' choice depends on: device, shapes, dtype, bias or not, GELU or not."""
    return (x.device.index, *x.shape, weight.shape[0], x.dtype, bias is not None, gelu)


def replay_ms(fn, x, weight, bias=None, gelu: bool = False) -> float:
    """ms of fn(x, weight, bias, gelu) (gemv or the cuBLAS path) replayed in a CUDA graph, over
    copies of the weight that pass twice the L2: decode streams its weights from memory, where
    one weight timed again and again would sit in the L2."""
    with torch.cuda.device(x.device):
        l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 64 << 20)
        copies = triton.cdiv(2 * l2, weight.numel() * weight.element_size())
        weights = [weight.clone() for _ in range(copies)]
        fn(x, weight, bias, gelu)  # compiled before the capture that times it
        try:
            return triton.testing.do_bench_cudagraph(lambda: [fn(x, w, bias, gelu) for w in weights], rep=5) / copies
        finally:
            torch._C._cuda_clearCublasWorkspaces()  # each timing's new stream got a cuBLAS workspace


def _faster(x, weight, bias, gelu) -> bool:
    """Whether gemv replays faster than cuBLAS for these operands; a failure says why, once, and
    picks cuBLAS."""
    try:
        return replay_ms(_launch_gemv, x, weight, bias, gelu) < replay_ms(cublas_linear, x, weight, bias, gelu)
    except (RuntimeError, triton.CompilationError) as e:
        warn_once(f"gemv: timing it against cuBLAS failed ({type(e).__name__}: {e}); using cuBLAS")
        return False


class FusedFeedForward(nn.Module):
    """The feed-forward (Linear, GELU, Linear) with the first layer's bias add fused into the
    GELU kernel when that layer is a plain nn.Linear, and a decode step's few rows through
    linear_rows when both layers are; any other first layer (int8, LoRA) just runs the layers,
    each on its own class."""
    op = "feed_forward"

    def forward(self, x):
        up, _, down = self.layers
        if type(up) is not nn.Linear or not fused_dtypes(x, up.weight):
            return self.layers(x)
        if type(down) is nn.Linear and self._few_rows(x, up, down):
            rows = x.reshape(-1, x.shape[-1]).contiguous()  # (M, C)
            h = linear_rows(rows, up.weight, up.bias, gelu=True)  # (M, 4C)
            return linear_rows(h, down.weight, down.bias).view(*x.shape[:-1], -1)  # (..., C)
        return down(bias_gelu(F.linear(x, up.weight), up.bias))  # bias None: plain GELU

    @staticmethod
    def _few_rows(x, up, down) -> bool:
        """A CUDA inference call (no autocast) whose two products are on gemv's ground."""
        M = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return (x.is_cuda and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cuda")
                and _fits(M, x.shape[-1], x, up.weight, up.bias)
                and _fits(M, up.weight.shape[0], x, down.weight, down.bias))
