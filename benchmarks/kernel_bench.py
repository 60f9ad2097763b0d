"""Shared machinery of the kernel benchmarks (bench_layer_norm / bench_gelu / bench_cross_entropy).

Each benchmark times one op's forward, backward and forward+backward for every implementation
(the reference module, the PyTorch-native op, torch.compile of the reference, and ours) at
GPT-2 124M training shapes in bf16. Times are medians from triton.testing.do_bench (CUDA
events, L2 flushed between runs); pytest-benchmark also times each call (with a sync) and
keeps the numbers below in `extra_info`, which benchmarks/report.py turns into a table. Memory-bound
rows also give "BW %": their GB/s as a share of a plain device-to-device copy timed in the
same run (the issue's 70%-of-bandwidth target for LayerNorm and GELU reads off it).

CPU-only machines skip every benchmark with the reason: Triton kernels there run only in
the interpreter, whose timings say nothing about the GPU.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from kernel_checks import assert_within_2x  # noqa: E402,F401  (the tests' low-precision rule)
from common import PeakMemory  # noqa: E402  (benchmarks/ is on sys.path)

TOKENS, WIDTH, VOCAB, DTYPE = 16 * 1024, 768, 50257, torch.bfloat16  # GPT-2 124M, batch 16 x 1024
PASSES = ("fwd", "bwd", "fwd+bwd")
BASELINE = "native"  # ratios are speed-ups over the PyTorch-native op
RESULTS: list[dict] = []  # every measurement of this session, printed by conftest.py

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: on CPU Triton runs only in the interpreter, so timings would mean nothing")


def time_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


@functools.cache
def copy_bandwidth() -> float:
    """GB/s (bytes read + written) of a plain 1 GiB device-to-device copy, measured once per
    run: the practical peak that the memory-bound kernels' "BW %" column is a share of
    (an H100 SXM copies at about 3,000 of its nominal 3,350 GB/s)."""
    src = torch.empty(2**29, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def pass_fn(forward, inputs, grad_outputs, pass_):
    """A no-argument callable running `pass_` of forward(*inputs); backward w.r.t. every input
    that requires grad, against grad_outputs (one per forward output)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if pass_ == "fwd":
        return lambda: forward(*inputs)
    if pass_ == "fwd+bwd":
        return lambda: torch.autograd.grad(_as_tuple(forward(*inputs)), leaves, grad_outputs)
    out = _as_tuple(forward(*inputs))  # bwd alone: one forward, then backward again and again
    return lambda: torch.autograd.grad(out, leaves, grad_outputs, retain_graph=True)


def compiled(fn):
    """torch.compile(fn), or a skip that says why it cannot be had here."""
    try:
        return torch.compile(fn)
    except Exception as e:  # noqa: BLE001 - any failure: state it, do not hide it
        pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {e}")


def run(benchmark, *, op, impl, pass_, fn, nbytes=None, flops=None, memory=False, ms=None, note=None):
    """Time fn (or take `ms`, for a pass derived by difference, told in `note`), record it and
    let pytest-benchmark time fn too."""
    try:
        fn()  # first call compiles (Triton, torch.compile)
    except Exception as e:  # noqa: BLE001
        if impl == "compile":
            pytest.skip(f"torch.compile failed here: {type(e).__name__}: {str(e).splitlines()[0]}")
        raise
    ms = time_ms(fn) if ms is None else ms
    info = {"op": op, "pass": pass_, "impl": impl, "ms": round(ms, 4)}
    if nbytes and ms > 0:  # a pass derived by difference can come out ~0
        info["GB/s"] = round(nbytes / ms / 1e6, 1)
        info["BW %"] = round(100 * info["GB/s"] / copy_bandwidth(), 1)
    if flops and ms > 0:
        info["TFLOP/s"] = round(flops / ms / 1e9, 1)
    if memory:
        fn()  # warm-up: compilation and caching allocators settle first
        with PeakMemory("cuda") as mem:
            fn()
        info["peak_MiB"] = round(mem.mib, 1)
    if note:
        info["note"] = note
    RESULTS.append(info)
    benchmark.group = f"{op} {pass_}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
    return ms


def table(rows: list[dict]) -> str:
    """Markdown table of measurements with speed-up (and memory ratio) over the native op."""
    cols = ["op", "pass", "impl", "ms", "GB/s", "BW %", "TFLOP/s", "peak_MiB", "note"]
    cols = [c for c in cols if any(c in r for r in rows)]
    base = {(r["op"], r["pass"]): r for r in rows if r["impl"] == BASELINE}
    lines = ["| " + " | ".join(cols + [f"speed-up vs {BASELINE}"]) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        b = base.get((r["op"], r["pass"]))
        ratio = f"{b['ms'] / r['ms']:.2f}x" if b and r["ms"] > 0 else ""
        if b and "peak_MiB" in r and b.get("peak_MiB"):
            ratio += f" (memory {r['peak_MiB'] / b['peak_MiB']:.2f}x)"
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + f" | {ratio} |")
    return "\n".join(lines)
