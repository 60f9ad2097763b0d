"""Causal attention speed: gptfast's Triton flash attention vs the reference, SDPA (flash) and
torch.compile of the reference, at GPT-2 124M shapes in bf16; plus the decode kernel.

    python benchmarks/bench_attention.py                 # table + results file (CUDA only)
    pytest benchmarks/bench_attention.py --benchmark-only

Correctness is checked first (fused output and gradients against an fp32 reference, by the
2x rule); then forward, backward and forward+backward are timed side by side.
FLOPs: a causal forward is 2 matmuls of B*H*T*T*D multiply-adds, halved by the mask
(2 * B*H*T^2*D flops); the backward is 2.5x that (5 matmuls), as FlashAttention counts.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

import torch
import triton  # noqa: F401  (before anything that may pull in tensorflow)

from gptfast.backends import reference_attention
from gptfast.kernels.attention import attention, attention_decode

from common import commit_id  # noqa: E402  (benchmarks/ is on sys.path)

SHAPES = [(16, 12, 1024, 64), (4, 12, 4096, 64)]  # (B, H, T, D): GPT-2 124M heads, 16x1024 tokens
DECODE = [(1, 12, 1024, 64), (16, 12, 1024, 64)]  # (B, H, cache length, D)
PROVIDERS = ("reference", "compiled-reference", "sdpa-flash", "triton")
MODES = ("fwd", "bwd", "fwd+bwd")
NO_GPU = "needs a CUDA GPU (this machine has none); CPU correctness is covered by tests/test_attention.py"


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


_compiled = {}


def provider_fn(name):
    if name == "compiled-reference":
        if name not in _compiled:
            _compiled[name] = torch.compile(reference_attention)
        return _compiled[name]
    return {"reference": reference_attention, "sdpa-flash": sdpa_flash, "triton": attention}[name]


def make_inputs(B, H, T, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def make_case(provider, mode, shape):
    """A no-argument callable running `mode` of `provider` on fresh inputs of `shape`."""
    (q, k, v), do = make_inputs(*shape)
    fn = provider_fn(provider)
    if mode == "fwd":
        return lambda: fn(q, k, v)
    if mode == "bwd":
        out = fn(q, k, v)
        return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def flops(mode, B, H, T, D):
    fwd = 2.0 * B * H * T * T * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def check_correctness(shape):
    """Fused bf16 output and grads vs an fp32 reference: error <= 2x SDPA-bf16's error + 1e-3."""
    B, H, T, D = shape
    (q, k, v), do = make_inputs(1, H, T, D, seed=1)  # batch 1: the fp32 reference holds (H, T, T)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = [reference_attention(q32, k32, v32)]
    exact += torch.autograd.grad(exact[0], (q32, k32, v32), do.float())
    worst = []
    for name, fn in (("sdpa-flash", sdpa_flash), ("triton", attention)):
        out = fn(q, k, v)
        got = [out] + list(torch.autograd.grad(out, (q, k, v), do))
        worst.append([(a.float() - b).abs().max().item() for a, b in zip(got, exact)])
    for what, ours, ref in zip(("out", "dq", "dk", "dv"), worst[1], worst[0]):
        if ours > 2 * ref + 1e-3:
            sys.exit(f"correctness check failed at {shape}: {what} error {ours:.3g} > 2 x sdpa's {ref:.3g} + 1e-3")

    lens = torch.tensor([1024, 17], device="cuda").clamp(max=T)
    qd, kc, vc = (t.detach() for t in make_inputs(2, H, T, D, seed=2)[0])
    got = attention_decode(qd[:, :, :1], kc, vc, lens)
    for b, n in enumerate(lens.tolist()):
        want = reference_attention(*(t[b:b + 1].float() for t in (qd[:, :, :1], kc[:, :, :n], vc[:, :, :n])))
        if (got[b:b + 1].float() - want).abs().max().item() > 2e-2:
            sys.exit(f"decode correctness check failed (row {b}, cache_len {n})")


def decode_fns(B, H, L, D):
    (q, k, v), _ = make_inputs(B, H, L, D, seed=3)
    q, k, v = q.detach()[:, :, :1], k.detach(), v.detach()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"reference": lambda: reference_attention(q, k, v), "sdpa": lambda: sdpa(q, k, v),
            "triton-decode": lambda: attention_decode(q, k, v, L),
            "triton (flash fwd, T=1)": lambda: attention(q, k, v)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of %(default)s")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/attention_<date>.md)")
    parser.add_argument("--rep", type=int, default=100, help="timing repetitions in ms for do_bench (default 100)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench_attention: skipped: {NO_GPU}")
        return 0
    from tqdm import tqdm
    from triton.testing import do_bench

    providers = args.providers.split(",")
    lines = ["# attention benchmark\n", f"device: {torch.cuda.get_device_name()}  ",
             f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC  ",
             f"commit: {commit_id()}  torch {torch.__version__}  triton {triton.__version__}  dtype: bfloat16\n",
             "| B,H,T,D | mode | provider | ms | TFLOP/s | triton speedup |", "|---|---|---|---|---|---|"]
    for shape in SHAPES:
        check_correctness(shape)
    cases = [(s, m, p) for s in SHAPES for m in MODES for p in providers]
    times = {}
    for shape, mode, provider in tqdm(cases, desc="attention", file=sys.stderr):
        try:
            times[shape, mode, provider] = do_bench(make_case(provider, mode, shape), rep=args.rep,
                                                    return_mode="median")
        except torch.cuda.OutOfMemoryError:
            times[shape, mode, provider] = float("nan")
        torch.cuda.empty_cache()
    for shape, mode, provider in cases:
        ms, ours = times[shape, mode, provider], times.get((shape, mode, "triton"), float("nan"))
        lines.append(f"| {','.join(map(str, shape))} | {mode} | {provider} | {ms:.3f} | "
                     f"{flops(mode, *shape) / ms / 1e9:.1f} | {ms / ours:.2f}x |")
    lines += ["\n| decode B,H,L,D | provider | us | triton-decode speedup |", "|---|---|---|---|"]
    for shape in DECODE:
        fns = decode_fns(*shape)
        us = {name: 1e3 * do_bench(fn, rep=args.rep, return_mode="median") for name, fn in fns.items()}
        for name, t in us.items():
            lines.append(f"| {','.join(map(str, shape))} | {name} | {t:.1f} | {t / us['triton-decode']:.2f}x |")
    report = "\n".join(lines)
    print(report)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"attention_{datetime.date.today():%Y%m%d}.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(report + "\n")
    print(f"wrote {out}")
    return 0


# -------------------------------------------------------------- pytest-benchmark entry points
try:
    import pytest
except ImportError:  # the script itself needs no pytest
    pytest = None

if pytest is not None:
    @pytest.mark.parametrize("provider", PROVIDERS)
    @pytest.mark.parametrize("mode", MODES)
    def test_attention_gpt2_1024(benchmark, mode, provider):
        if not torch.cuda.is_available():
            pytest.skip(NO_GPU)
        fn = make_case(provider, mode, SHAPES[0])
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)

    @pytest.mark.parametrize("provider", ["sdpa", "triton-decode"])
    def test_decode_cache_1024(benchmark, provider):
        if not torch.cuda.is_available():
            pytest.skip(NO_GPU)
        fn = decode_fns(*DECODE[0])[provider]
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=100, warmup_rounds=10)


if __name__ == "__main__":
    sys.exit(main())
