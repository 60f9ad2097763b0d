"""Launch configurations of the memory-bound backward kernels, chosen from timings on a GPU.

    python benchmarks/tune_gpu.py                 # every op's candidates at GPT-2 124M training shapes
    python benchmarks/tune_gpu.py --ops gelu      # one op

For each candidate the module's knobs are set (kernels/layer_norm.py: BWD_PROGRAMS_PER_SM;
kernels/gelu.py: NUM_WARPS and BWD_PROGRAMS_PER_SM), the backward is
checked against the fp32 truth by the tests' 2x rule at the benchmark shape, then timed
(median of triton.testing.do_bench, L2 flushed) beside the PyTorch-native op's backward. The
table goes to stdout and, with --out, to a markdown file; the best candidate is the one to write
into the kernel file (the current defaults are marked).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from pathlib import Path

import torch

from kernel_bench import DTYPE, TOKENS, WIDTH, assert_within_2x, copy_bandwidth, pass_fn, time_ms


def _layer_norm_case():
    from bench_layer_norm import native_layer_norm

    module = importlib.import_module("gptfast.kernels.layer_norm")  # the package exports the function
    g = torch.Generator(device="cuda").manual_seed(0)
    x, dy = (torch.randn(TOKENS, WIDTH, device="cuda", generator=g, dtype=DTYPE) for _ in range(2))
    scale = 1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=g, dtype=DTYPE)
    shift = 0.1 * torch.randn(WIDTH, device="cuda", generator=g, dtype=DTYPE)
    knobs = {"BWD_PROGRAMS_PER_SM": [2, 4, 8, 16, 32]}
    return module, module.layer_norm, native_layer_norm, module.layer_norm_ref, [x, scale, shift], dy, 3, knobs


def _gelu_case():
    from bench_gelu import native_bias_gelu

    module = importlib.import_module("gptfast.kernels.gelu")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = 2 * torch.randn(TOKENS, 4 * WIDTH, device="cuda", generator=g, dtype=DTYPE)
    bias = 0.1 * torch.randn(4 * WIDTH, device="cuda", generator=g, dtype=DTYPE)
    dy = torch.randn(TOKENS, 4 * WIDTH, device="cuda", generator=g, dtype=DTYPE)
    knobs = {"NUM_WARPS": [4, 8], "BWD_PROGRAMS_PER_SM": [2, 4, 8, 16]}
    return module, module.bias_gelu, native_bias_gelu, module.bias_gelu_ref, [x, bias], dy, 3, knobs


CASES = {"layer_norm": _layer_norm_case, "gelu": _gelu_case}


def _grads(fn, args, dy):
    args = [a.detach().requires_grad_() for a in args]
    y = fn(*args)
    return torch.autograd.grad(y, args, dy)


def tune(op: str) -> list[str]:
    module, ours, native, reference, args, dy, tensors_moved, knobs = CASES[op]()
    truth = _grads(reference, [a.float() for a in args], dy.float())
    low = _grads(native, args, dy)
    nbytes = tensors_moved * dy.numel() * dy.element_size()
    native_ms = time_ms(pass_fn(native, [a.detach().requires_grad_() for a in args], (dy,), "bwd"))
    defaults = {k: getattr(module, k) for k in knobs}
    lines = [f"### {op} backward, {tuple(dy.shape)} {str(DTYPE).removeprefix('torch.')}: native {native_ms:.4f} ms "
             f"({nbytes / native_ms / 1e6:.0f} GB/s; copy {copy_bandwidth():.0f} GB/s)", "",
             "| " + " | ".join(knobs) + " | ms | GB/s | vs native | |", "|" + "---|" * (len(knobs) + 4)]
    try:
        for values in itertools.product(*knobs.values()):
            setting = dict(zip(knobs, values))
            for k, v in setting.items():
                setattr(module, k, v)
            for i, (a, lo, t) in enumerate(zip(_grads(ours, args, dy), low, truth)):
                assert_within_2x(a, lo, t, f"{op} {setting} grad {i}", atol=1e-3 * t.abs().max().item())
            ms = time_ms(pass_fn(ours, [a.detach().requires_grad_() for a in args], (dy,), "bwd"))
            mark = "default" if setting == defaults else ""
            lines.append("| " + " | ".join(map(str, values)) + f" | {ms:.4f} | {nbytes / ms / 1e6:.0f} | "
                         f"{native_ms / ms:.2f}x | {mark} |")
            print(lines[-1], flush=True)
    finally:
        for k, v in defaults.items():
            setattr(module, k, v)
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_gpu.py: no CUDA GPU visible to torch (the timings only mean something on one)")
    report = [f"# Backward launch configurations on {torch.cuda.get_device_name()}", ""]
    for op in args.ops:
        report += tune(op) + [""]
    print("\n".join(report))
    if args.out:
        args.out.write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
