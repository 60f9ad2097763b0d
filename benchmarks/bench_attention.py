"""attention benchmark: causal attention at GPT-2 124M shapes (12 heads x 64, bf16; 16 x 1024 and
4 x 4096 tokens): reference module vs SDPA's flash backend vs torch.compile of the reference vs
gptfast's Triton flash attention; forward, backward, forward+backward. The decode kernel is
bench_attention_decode.py.

    python benchmarks/bench_attention.py          (same as: pytest benchmarks/bench_attention.py --benchmark-only)
    python benchmarks/bench_attention.py --sweep [--T 1024 4096] [--head-dim 64]   (see --sweep --help)

--sweep times a grid of launch configs for each of the three kernels (forward, dK/dV, dQ) and
prints ranked tables plus a `_blocks` return line to paste into kernels/attention.py.

Correctness is checked first at each shape (batch 1: the fp32 truth holds H x T x T): the
fused output and gradients within 2x of SDPA-bf16's error against the fp32 reference.
FLOPs: a causal forward is 2 matmuls of B*H*T*T*D multiply-adds, halved by the mask
(2 * B*H*T^2*D flops); the backward is 2.5x that (5 matmuls), as FlashAttention counts.
"""
import argparse
import itertools
import math
import sys
import time

import pytest
import torch
from tqdm import tqdm

from gptfast.kernels.attention import HEAD_DIMS, _backward, _blocks, _forward, _interpreting, attention, attention_ref
from kernel_bench import PASSES, assert_within_2x, compiled, pass_fn, requires_cuda, run, time_ms

pytestmark = requires_cuda
SHAPES = {"T=1024": (16, 12, 1024, 64), "T=4096": (4, 12, 4096, 64)}  # (B, H, T, D)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {"reference": attention_ref, "native": sdpa_flash, "compile": attention_ref,
         "triton": attention}


def make_inputs(B, H, T, D, dtype=torch.bfloat16, seed=0, device="cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def flops(pass_, B, H, T, D):
    fwd = 2.0 * B * H * T * T * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


@pytest.fixture(scope="module")
def checked():
    """Fused bf16 output and grads vs the fp32 reference: error <= 2x SDPA-bf16's + 1e-3."""
    for B, H, T, D in SHAPES.values():
        (q, k, v), do = make_inputs(1, H, T, D, seed=1)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        outs = {}
        for name, fn, args, g in (("triton", attention, (q, k, v), do), ("sdpa", sdpa_flash, (q, k, v), do),
                                  ("truth", attention_ref, (q32, k32, v32), do.float())):
            out = fn(*args)
            outs[name] = [out.detach(), *torch.autograd.grad(out, args, g)]
        for what, ours, low, truth in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["sdpa"], outs["truth"]):
            assert_within_2x(ours, low, truth, f"attention T={T} {what}", atol=1e-3)
        del outs
    torch.cuda.empty_cache()
    return True


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention(benchmark, checked, shape, impl, pass_):
    fn = compiled(IMPLS[impl]) if impl == "compile" else IMPLS[impl]
    qkv, do = make_inputs(*SHAPES[shape])
    run(benchmark, op=f"attention {shape}", impl=impl, pass_=pass_, fn=pass_fn(fn, qkv, (do,), pass_),
        flops=flops(pass_, *SHAPES[shape]))
    del qkv, do
    torch.cuda.empty_cache()


# --------------------------------------------------------------- launch-config sweep (--sweep)

KERNELS = ("forward", "dK/dV", "dQ")  # the order of _blocks' configs


def kernel_runs(q, k, v, do, default):
    """kernel -> (config -> the tensors that kernel writes). The backward kernels run as the whole
    backward with the other kernel at its default config, so their times include that constant."""
    o, lse = _forward(q, k, v, True, 0.0, 0)
    return {"forward": lambda c: _forward(q, k, v, True, 0.0, 0, c)[:1],
            "dK/dV": lambda c: _backward(do, q, k, v, o, lse, True, 0.0, 0, (c, default[2]))[1:],
            "dQ": lambda c: _backward(do, q, k, v, o, lse, True, 0.0, 0, (default[1], c))[:1]}


def time_call(fn, device) -> float:
    """Median ms on CUDA; under the CPU interpreter one timed call (checks the path, times nothing)."""
    if device == "cuda":
        return time_ms(fn)
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sweep_shape(B, H, T, D, grid, device):
    """{kernel: {config: (ms or None, note)}}, the default config first. Each config is checked
    at batch 1 before timing: its error vs the fp32 reference within 2x the default config's."""
    default = _blocks(D, torch.bfloat16)
    (q, k, v), do = make_inputs(1, H, T, D, seed=1, device=device)
    q, k, v = (t.detach() for t in (q, k, v))
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    out = attention_ref(*leaves)
    dq, dk, dv = torch.autograd.grad(out, leaves, do.float())
    truths = {"forward": (out.detach(),), "dK/dV": (dk, dv), "dQ": (dq,)}
    checks = kernel_runs(q, k, v, do, default)
    (q, k, v), do = make_inputs(B, H, T, D, device=device)
    benches = kernel_runs(*(t.detach() for t in (q, k, v)), do, default)
    results = {}
    for kernel, dflt in zip(KERNELS, default):
        expected = checks[kernel](dflt)
        rows = results[kernel] = {}
        for cfg in tqdm([dflt] + [c for c in grid if c != dflt], desc=f"T={T} D={D} {kernel}", leave=False):
            try:
                for got, low, truth in zip(checks[kernel](cfg), expected, truths[kernel]):
                    assert_within_2x(got, low, truth, f"{kernel} {cfg}", atol=1e-3)
                rows[cfg] = time_call(lambda: benches[kernel](cfg), device), ""
            except AssertionError as e:  # runs, but wrong: never a candidate
                rows[cfg] = None, f"WRONG: {str(e).splitlines()[0]}"
            except Exception as e:  # e.g. out of shared memory or registers: cannot launch
                why = (str(e).strip().splitlines() or [""])[0][:120]
                rows[cfg] = None, f"skipped, cannot launch: {type(e).__name__}: {why}"
        if rows[dflt][0] is None:
            raise SystemExit(f"{kernel}: the default config {dflt} failed: {rows[dflt][1]}")
    if device == "cuda":
        torch.cuda.empty_cache()
    return results


def print_table(title, rows, dflt, fl):
    print(f"\n{title}  (vs default: default ms / ms, > 1 is faster)")
    print(f"{'rank':>4} {'BLOCK_M':>7} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'ms':>9} {'TFLOP/s':>8} "
          f"{'vs default':>10}")
    ranked = sorted((ms, cfg) for cfg, (ms, _) in rows.items() if ms is not None)
    for rank, (ms, cfg) in enumerate(ranked, 1):
        mark = "  <- current default" if cfg == dflt else ""
        print(f"{rank:>4} {cfg[0]:>7} {cfg[1]:>7} {cfg[2]:>5} {cfg[3]:>6} {ms:>9.4f} {fl / ms / 1e9:>8.1f} "
              f"{rows[dflt][0] / ms:>9.2f}x{mark}")
    for cfg, (ms, note) in rows.items():
        if ms is None:
            print(f"     {cfg}: {note}")


def sweep_main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="bench_attention.py",
        description="Time a grid of launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) for each attention "
                    "kernel (forward, dK/dV, dQ) in bf16 with causal masking, each checked against the default "
                    "config first; print ranked tables and a _blocks return line for the best ones. Needs CUDA "
                    "(TRITON_INTERPRET=1 on CPU runs the path at tiny sizes without meaningful times).")
    ap.add_argument("--sweep", action="store_true", required=True, help="run the sweep (else: the pytest suite)")
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 4096], help="sequence lengths (default 1024 4096)")
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64], choices=HEAD_DIMS, help="head dims (default 64)")
    ap.add_argument("--tokens", type=int, default=16 * 1024, help="batch = tokens // T (default 16384: 16 x 1024)")
    ap.add_argument("--heads", type=int, default=12, help="attention heads (default 12, GPT-2 124M)")
    ap.add_argument("--tiles", type=int, nargs="+", default=[32, 64, 128], help="BLOCK_M and BLOCK_N values")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="num_warps values")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4], help="num_stages values")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif _interpreting():
        device = "cpu"
        print("TRITON_INTERPRET=1 on CPU: checks every config's path; the times mean nothing")
    else:
        raise SystemExit("bench_attention.py --sweep: needs a CUDA GPU (or TRITON_INTERPRET=1 for a dry run)")
    grid = list(itertools.product(args.tiles, args.tiles, args.warps, args.stages))
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (interpreter)'}; {len(grid)} configs "
          f"per kernel; dK/dV and dQ times are the whole backward with the other kernel at its default")
    for D in args.head_dim:
        default = _blocks(D, torch.bfloat16)
        ratios = {kernel: {} for kernel in KERNELS}  # config -> [default ms / ms at each T]
        for T in args.T:
            B = max(1, args.tokens // T)
            fwd_flops = flops("fwd", B, args.heads, T, D)
            results = sweep_shape(B, args.heads, T, D, grid, device)
            for kernel, dflt in zip(KERNELS, default):
                rows = results[kernel]
                fl = fwd_flops if kernel == "forward" else flops("bwd", B, args.heads, T, D)
                print_table(f"{kernel}, T={T} D={D} (B={B}, H={args.heads}, bf16, causal)", rows, dflt, fl)
                for cfg, (ms, _) in rows.items():
                    ratios[kernel].setdefault(cfg, []).append(None if ms is None else rows[dflt][0] / ms)
        # the best config per kernel: highest geometric-mean speed-up over the default, run at every T
        best = {}
        for kernel in KERNELS:
            ok = {cfg: r for cfg, r in ratios[kernel].items() if len(r) == len(args.T) and None not in r}
            best[kernel] = max(ok.items(), key=lambda item: math.prod(item[1]))
        gains = ", ".join(f"{k} {math.prod(r) ** (1 / len(r)):.2f}x" for k, (_, r) in best.items())
        print(f"\n_blocks({D}, torch.bfloat16), best over T={', '.join(map(str, args.T))} (geomean speed-up vs "
              f"default: {gains}):\n    return {', '.join(str(cfg) for cfg, _ in best.values())}")
    return 0


if __name__ == "__main__":
    if "--sweep" in sys.argv[1:]:
        sys.exit(sweep_main(sys.argv[1:]))
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
