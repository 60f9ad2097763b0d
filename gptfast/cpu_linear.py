"""Weight-only CPU matmuls for decoding: `torch.ops.gptfast.linear` (csrc/linear_cpu.cpp) and
the weight formats it reads, with their quantisers and a plain PyTorch reference.

Formats (weight tensor, scale tensor); for int8 and int4 the kernel rounds x to int16 per row
(x_scale = max |x_row| / 32767, an error of at most 2^-16 of the row's largest value) and sums
the integer products exactly:
- float32 / bfloat16 / float16: the weight (N, K) itself, no scale;
- int8: int8 q (N, K) and a float32 scale (N,) per output row, w = scale * q (symmetric,
  |w - w_q| <= scale / 2);
- int4: 4-bit q in groups of `group` inputs along K (rows zero-padded to whole groups), packed
  two per byte (N, K_padded / 2) uint8, and float16 (s, m) per (row, group) (N, groups, 2),
  w = s * q + m, q in 0..15 (asymmetric: |w - w_q| <= s / 2 with s = (max - min) / 15).

The op runs on CPU only (the path this CPU supports best, or the one GPTFAST_CPU_KERNEL
names); `reference_linear` computes the same in PyTorch (tests, and machines without _C).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def op_built(op: str) -> bool:
    """Whether gptfast._C is built and registered a CPU kernel for torch.ops.gptfast.<op>."""
    try:
        from gptfast import _C  # noqa: F401  (loading it registers the ops)
    except ImportError:  # not built: reference_linear is the fallback
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"gptfast::{op}", "CPU")


_HAS_OP = op_built("linear")

INT4_GROUPS = (32, 64, 128)
# Rows of x up to which gptfast's kernel beats dequantise + F.linear (torch's GEMM), by weight
# dtype (benchmarks/bench_cpu_linear.py --crossover, 2 threads; results/cpu_linear_crossover.md;
# int4 takes the limit of its groups of 32): the integer formats would dequantise every weight on
# each call, so their kernel wins up to long prompts.
MAX_KERNEL_ROWS = {torch.float32: 32, torch.bfloat16: 96, torch.float16: 96, torch.int8: 512, torch.uint8: 256}

if _HAS_OP:
    @torch.library.register_fake("gptfast::linear")
    def _linear_fake(x, weight, scale, bias, group_size, path="", packed=None):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))


def has_kernel() -> bool:
    """Whether gptfast._C was built with the CPU linear kernel."""
    return _HAS_OP


def kernel_paths() -> list[str]:
    """The kernel paths this CPU can run, best first (e.g. ['amx', 'avx512', 'avx2', 'portable']); [] without _C."""
    return list(torch.ops.gptfast.linear_paths()) if _HAS_OP else []


# the kernel paths that read int8 weights packed once (pack_int8) when the op is given the copy
PACKED_PATHS = ("amx", "avx512", "avx2")


def packs_int8() -> bool:
    """Whether the path this process runs (GPTFAST_CPU_KERNEL, else the best this CPU has) reads
    int8 weights packed once (pack_int8): avx2 and avx512 do, and amx below its tiles' rows (the
    avx512 path's); portable does not. (The variable is read at each call: set it before loading a
    model.)"""
    forced = os.environ.get("GPTFAST_CPU_KERNEL")  # (first: kernel_paths() asks Linux for AMX's tile state)
    return _HAS_OP and (forced or kernel_paths()[0]) in PACKED_PATHS


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 q (N, K) in the layout the avx2 and avx512 paths' packed tiles read (linear_cpu.h): passed to the
    op as `packed`, it spares them repacking every block of 16 rows at each call, and they then run
    from 3 x rows on (5 without it). A copy: q changed in place needs packing again. Only where
    "avx2" is among kernel_paths()."""
    return torch.ops.gptfast.pack_int8(q)


def quantize_int8(weight: torch.Tensor):
    """(q int8 (N, K), scale float32 (N,)): symmetric, one scale per output row."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (N,)
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def quantize_int4(weight: torch.Tensor, group: int):
    """(packed uint8 (N, K_padded / 2), scale_min float16 (N, groups, 2)): asymmetric 4-bit,
    (s, m) per group of `group` inputs; s and m are rounded to fp16 before q is chosen, so the
    stored (s, m, q) reproduce w as closely as the grid allows."""
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size must be one of {INT4_GROUPS}, got {group!r}")
    w = weight.detach().float()
    N, K = w.shape
    pad = -K % group
    w = F.pad(w, (0, pad)).view(N, -1, group)  # (N, groups, group); padding quantised as zeros
    lo, hi = w.amin(dim=2), w.amax(dim=2)  # (N, groups)
    s = ((hi - lo) / 15).clamp(min=1e-8).half()
    m = lo.half()
    q = ((w - m.float()[..., None]) / s.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, -1)), torch.stack([s, m], dim=-1).contiguous()  # (N, groups, 2)


def quantize(weight: torch.Tensor, fmt: str):
    """(weight, scale, group): the op's operands for an fp32 weight (N, K) stored as `fmt`,
    one of "float32", "bfloat16", "float16", "int8", "int4-g32", "int4-g64", "int4-g128"."""
    if fmt == "int8":
        return (*quantize_int8(weight), 0)
    if fmt.startswith("int4-g"):
        group = int(fmt[len("int4-g"):])
        return (*quantize_int4(weight, group), group)
    if fmt not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown weight format {fmt!r}")
    return weight.detach().to(getattr(torch, fmt)).contiguous(), None, 0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15, K a multiple of 32 -> (N, K / 2) uint8: in each 32 inputs, byte i holds
    input i (low nibble) and input i + 16 (high nibble)."""
    N, K = q.shape
    q = q.to(torch.uint8).view(N, K // 32, 2, 16)  # (N, blocks, halves, 16)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (N, K / 2) uint8 -> q (N, K) uint8 in 0..15."""
    N, half = packed.shape
    b = packed.view(N, half // 16, 1, 16)  # (N, blocks, 1, 16)
    return torch.cat([b & 0xF, b >> 4], dim=2).reshape(N, 2 * half)


def dequantize(weight, scale=None, group=0, in_features=None) -> torch.Tensor:
    """The fp32 weight (N, K) a format stores (int4: `in_features` = K before padding)."""
    if weight.dtype == torch.int8:
        return weight.float() * scale.float()[:, None]
    if weight.dtype == torch.uint8:
        q = unpack_int4(weight).float()  # (N, K_padded)
        N = q.shape[0]
        sm = scale.float()  # (N, groups, 2)
        w = q.view(N, -1, group) * sm[..., :1] + sm[..., 1:]  # (N, groups, group)
        return w.view(N, -1)[:, :in_features]
    return weight.float()


def round_x(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) rounded as the integer kernels read it: to int16 steps of max |x_row| / 32767."""
    big = x.abs().amax(dim=-1, keepdim=True)  # (..., 1)
    steps = torch.round(x * torch.where(big > 0, 32767 / big, 0)).clamp(-32767, 32767)
    return steps * torch.where(big > 0, big / 32767, 1)


def reference_linear(x, weight, scale=None, bias=None, group=0):
    """What the op computes, in PyTorch: x (..., K) @ dequantize(weight)^T + bias in fp32 (int8 and
    int4: x rounded by round_x first), cast back to x's dtype."""
    xf = x.float()
    if weight.dtype in (torch.int8, torch.uint8):
        xf = round_x(xf)
    y = F.linear(xf, dequantize(weight, scale, group, x.shape[-1]), None if bias is None else bias.float())
    return y.to(x.dtype)


def linear(x, weight, scale=None, bias=None, group=0, path=""):
    """y (..., N) = x (..., K) W^T + bias (see the module docstring). On CPU, up to
    MAX_KERNEL_ROWS[weight.dtype] rows run gptfast's kernel; more rows (a long prefill) or no
    kernel: the dequantised weight through F.linear (torch's GEMM blocks for cache, where the
    kernel's matrix-vector tiles would re-read x). int8 on CUDA: torch's `_weight_int8pack_mm`."""
    rows = MAX_KERNEL_ROWS.get(weight.dtype)  # a 0-d x or a dtype that is no format: the op names the problem
    if _HAS_OP and x.device.type == "cpu" and (x.dim() == 0 or rows is None or x.numel() <= rows * x.shape[-1]):
        return torch.ops.gptfast.linear(x, weight, scale, bias, group, path)
    if x.is_cuda and weight.dtype == torch.int8:
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16), weight, scale.to(torch.bfloat16)).to(x.dtype)
        return y if bias is None else y + bias
    return reference_linear(x, weight, scale, bias, group)
