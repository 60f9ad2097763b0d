"""Launch configurations of the memory-bound kernels, chosen from timings on a GPU.

    python benchmarks/tune_gpu.py                  # every op's candidates at GPT-2 124M training shapes
    python benchmarks/tune_gpu.py --ops gelu       # one op

For each candidate the module's knobs are set (kernels/layer_norm.py: BWD_PROGRAMS_PER_SM;
kernels/gelu.py: BWD_NUM_WARPS, BWD_PROGRAMS_PER_SM; kernels/cross_entropy.py: MAX_BLOCK_V,
BLOCK_PER_WARP), the timed pass is checked against the fp32 truth by the tests' 2x rule at the
benchmark shape, then timed (median of triton.testing.do_bench, L2 flushed) beside the
PyTorch-native op. The table goes to stdout and, with --out, to a markdown file; the best
candidate is the one to write into the kernel file (the current defaults are marked). Exits 1
when a default configuration fails its check or its compile (gpu_run.py's tune stage then fails).
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from common import save_report
from kernel_bench import DTYPE, assert_within_2x, copy_bandwidth, pass_fn, time_ms


@dataclass
class Case:
    module: object  # the kernel file, whose knobs are set
    ours: Callable
    native: Callable
    reference: Callable  # run in fp32: the truth
    args: list  # inputs, the ones with gradients first
    grad_out: torch.Tensor
    timed: str  # the pass timed: "bwd", or "fwd+bwd" where the forward writes the gradient
    nbytes: int  # bytes the timed pass must move
    knobs: dict  # knob -> candidate values


def _layer_norm() -> Case:
    import bench_layer_norm as bench  # its benchmark's inputs and native op
    module = importlib.import_module("gptfast.kernels.layer_norm")  # the package exports the function
    args, (dy,) = bench._inputs("layer_norm")
    moved = bench.OPS["layer_norm"][1]["bwd"] * dy.numel() * dy.element_size()
    return Case(module, module.layer_norm, bench.native_layer_norm, module.layer_norm_ref, args, dy, "bwd", moved,
                {"BWD_PROGRAMS_PER_SM": [2, 4, 8, 16, 32]})


def _gelu() -> Case:
    import bench_gelu as bench
    module = importlib.import_module("gptfast.kernels.gelu")
    args, (dy,) = bench._inputs()
    moved = bench.MOVED["bwd"] * dy.numel() * dy.element_size()
    return Case(module, module.bias_gelu, bench.native_bias_gelu, module.bias_gelu_ref, args, dy, "bwd", moved,
                {"BWD_NUM_WARPS": [4, 8], "BWD_PROGRAMS_PER_SM": [2, 4, 8, 16]})


def _cross_entropy() -> Case:
    import bench_cross_entropy as bench
    module = importlib.import_module("gptfast.kernels.cross_entropy")
    logits, targets = bench._inputs("cross_entropy")
    return Case(module, lambda x: module.cross_entropy(x, targets), lambda x: bench.native_cross_entropy(x, targets),
                lambda x: module.cross_entropy_ref(x, targets), [logits], torch.tensor(1.0, device="cuda"),
                "fwd+bwd", bench.MOVED["fwd+bwd"] * logits.numel() * logits.element_size(),
                {"MAX_BLOCK_V": [8192, 16384, 32768], "BLOCK_PER_WARP": [512, 1024, 2048]})


CASES = {"layer_norm": _layer_norm, "gelu": _gelu, "cross_entropy": _cross_entropy}


def _grads(fn, args, grad_out):
    args = [a.detach().requires_grad_() for a in args]
    return torch.autograd.grad(fn(*args), args, grad_out)


def _time(fn, case: Case) -> float:
    return time_ms(pass_fn(fn, [a.detach().requires_grad_() for a in case.args], (case.grad_out,), case.timed))


def tune(op: str) -> tuple[list[str], bool]:
    """The sweep of `op`'s knobs as markdown lines (printed as they come), and whether its default failed."""
    case = CASES[op]()
    truth = _grads(case.reference, [a.float() for a in case.args], case.grad_out.float())
    low = _grads(case.native, case.args, case.grad_out)
    native_ms = _time(case.native, case)
    defaults = {k: getattr(case.module, k) for k in case.knobs}
    shape = tuple(case.args[0].shape)
    lines = [f"### {op} {case.timed}, {shape} {str(DTYPE).removeprefix('torch.')}: native {native_ms:.4f} ms "
             f"({case.nbytes / native_ms / 1e6:.0f} GB/s; copy {copy_bandwidth():.0f} GB/s)", "",
             "| " + " | ".join(case.knobs) + " | ms | GB/s | vs native | |", "|" + "---|" * (len(case.knobs) + 4)]
    print("\n".join(lines), flush=True)
    default_failed = False
    try:
        for values in itertools.product(*case.knobs.values()):
            setting = dict(zip(case.knobs, values))
            for k, v in setting.items():
                setattr(case.module, k, v)
            mark = "default" if setting == defaults else ""
            try:  # a candidate that fails to compile, or to be right, is a row, not the end
                for i, (a, lo, t) in enumerate(zip(_grads(case.ours, case.args, case.grad_out), low, truth)):
                    assert_within_2x(a, lo, t, f"grad {i}", atol=1e-3 * t.abs().max().item())
                ms = _time(case.ours, case)
            except Exception as e:  # noqa: BLE001
                default_failed |= bool(mark)
                lines.append("| " + " | ".join(map(str, values)) + f" | failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]} | | | {mark} |")
            else:
                lines.append("| " + " | ".join(map(str, values)) + f" | {ms:.4f} | {case.nbytes / ms / 1e6:.0f} | "
                             f"{native_ms / ms:.2f}x | {mark} |")
            print(lines[-1], flush=True)
    finally:
        for k, v in defaults.items():
            setattr(case.module, k, v)
    return lines, default_failed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ops", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--out", type=Path, help="also write the tables to this markdown file")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_gpu.py: no CUDA GPU visible to torch (the timings only mean something on one)")
    report = [f"# Launch configurations on {torch.cuda.get_device_name()}", ""]
    print(report[0], flush=True)
    failed = []
    for op in args.ops:
        lines, default_failed = tune(op)
        report += lines + [""]  # (its rows printed as they come)
        failed += [op] * default_failed
    if args.out:
        save_report(report, args.out, echo=False)  # makes the folder
    if failed:  # the configuration as shipped fails its check or its launch
        print(f"tune_gpu.py: the default configuration failed for {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
