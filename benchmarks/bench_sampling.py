"""sample_top_k benchmark: the fused op (gptfast._C) vs the classic six-op PyTorch path
(topk, compare, where, / temperature, softmax, multinomial) at V = 50257, B in {1, 8, 64},
k in {1, 50, 1000}, side by side in one run, on the CPU and (when present) on CUDA.

    python benchmarks/bench_sampling.py                  # table for every device here
    python benchmarks/bench_sampling.py --save           # ... and write benchmarks/results/
    pytest benchmarks/bench_sampling.py --benchmark-only # the same cases under pytest-benchmark

Impls: six-op = gptfast.sampling.reference_sample_top_k; op = torch.ops.gptfast.sample_top_k
(raw dispatch); api = gptfast.sampling.sample_top_k (argument checks, seed tensor, and on CUDA
an eager NaN check that syncs). Times are medians of torch.utils.benchmark's blocked_autorange.
Targets: CPU >= 1.5x over six-op at B=1, k=50; H100 >= 2x at B=1 and <= 30 us.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.benchmark as tbench

from gptfast import sampling
from gptfast.sampling import reference_sample_top_k, sample_top_k

from common import commit_id, device_name  # noqa: E402  (benchmarks/ is on sys.path)

V, TEMPERATURE = 50257, 0.8
BATCHES, KS = (1, 8, 64), (1, 50, 1000)
IMPLS = ("six-op", "op", "api")
ROOT = Path(__file__).resolve().parents[1]


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_case(device: str, B: int, k: int, impl: str):
    """(logits, a no-argument callable running impl once)."""
    g = torch.Generator(device=device).manual_seed(B * 7919 + k)
    logits = 3 * torch.randn(B, V, device=device, generator=g)  # (B, V) fp32, GPT-2-like spread
    seed = torch.tensor([1234, 0], device=device)
    if impl == "six-op":
        return logits, lambda: reference_sample_top_k(logits, k, TEMPERATURE, generator=g)
    if impl == "op":
        return logits, lambda: torch.ops.gptfast.sample_top_k(logits, k, TEMPERATURE, 1.0, seed, False)
    return logits, lambda: sample_top_k(logits, k, TEMPERATURE, seed=seed)


def check(device: str, B: int, k: int) -> None:
    """Correctness first: the op's top-k equals torch.topk's and its ids lie inside it."""
    logits, _ = make_case(device, B, k, "op")
    ids, values, indices = torch.ops.gptfast.sample_top_k(logits, k, TEMPERATURE, 1.0,
                                                           torch.tensor([1, 0], device=device), True)
    ref = torch.topk(logits, k)
    assert torch.equal(values, ref.values), f"{device} B={B} k={k}: top-k values differ from torch.topk"
    assert (ids[:, None] == ref.indices).any(-1).all(), f"{device} B={B} k={k}: id outside the top-k"


def median_us(fn) -> float:
    fn()  # warm-up
    m = tbench.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3)
    return m.median * 1e6


def measure(device: str, batches=BATCHES, ks=KS) -> list[dict]:
    from tqdm import tqdm
    rows = []
    cases = [(B, k) for B in batches for k in ks]
    for B, k in cases:
        check(device, B, k)
    for B, k in tqdm(cases, desc=f"sampling {device}", unit="case"):
        row = {"device": device, "B": B, "k": k}
        for impl in IMPLS:
            row[impl] = median_us(make_case(device, B, k, impl)[1])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| device | B | k | six-op us | op us | api us | op speed-up | api speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['device']} | {r['B']} | {r['k']} | {r['six-op']:.1f} | {r['op']:.1f} | {r['api']:.1f} "
                     f"| {r['six-op'] / r['op']:.2f}x | {r['six-op'] / r['api']:.2f}x |")
    return "\n".join(lines)


# files whose change makes a result stale
MEASURED = ["csrc", "gptfast/sampling.py", "benchmarks/bench_sampling.py", "setup.py"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], action="append", help="default: every device here")
    ap.add_argument("--save", action="store_true", help="write the table to benchmarks/results/")
    ap.add_argument("--batches", type=int, nargs="+", default=list(BATCHES), help=f"batch sizes (default {BATCHES})")
    ap.add_argument("--ks", type=int, nargs="+", default=list(KS), help=f"top-k values (default {KS})")
    args = ap.parse_args(argv)
    if not sampling.has_kernel("cpu"):
        raise SystemExit(f"bench_sampling: gptfast._C is not built ({sampling._C_ERROR}); pip install -e . first")
    now, commit = datetime.datetime.now(datetime.timezone.utc), commit_id(MEASURED)
    for device in args.device or devices():
        if device == "cuda" and not sampling.has_kernel("cuda"):
            if args.device:  # asked for by name: a failure, not a skip
                raise SystemExit("bench_sampling: gptfast._C was built without its CUDA kernel "
                                 "(GPTFAST_CUDA=1 pip install --no-build-isolation -e .; make gpu-check does it)")
            print("cuda: skipped, gptfast._C was built without its CUDA kernel")
            continue
        text = "\n".join([
            f"# sample_top_k: fused op vs six-op PyTorch path, {device_name(device)}", "",
            f"- date: {now:%Y-%m-%d %H:%M} UTC", f"- commit: {commit}",
            f"- torch {torch.__version__}; V={V}, fp32 logits, temperature {TEMPERATURE}; median microseconds",
            f"- load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machines: noisy)",
            f"- command: python benchmarks/bench_sampling.py {' '.join(sys.argv[1:])}".rstrip(), "",
            table(measure(device, args.batches, args.ks)), ""])
        print(text)
        if args.save:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device) if device == "cuda" else "cpu").strip("-").lower()
            path = ROOT / "benchmarks" / "results" / f"sampling-{slug}-{now:%Y%m%d}-{commit}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return 0


@pytest.mark.skipif(not sampling.has_kernel("cpu"), reason=f"gptfast._C not built: {sampling._C_ERROR}")
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_sample_top_k(benchmark, impl, B, k, device):
    if device == "cuda" and not sampling.has_kernel("cuda"):
        pytest.skip("gptfast._C was built without its CUDA kernel")
    check(device, B, k)
    _, fn = make_case(device, B, k, impl)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    benchmark.group = f"sample_top_k {device} B={B} k={k}"
    benchmark.pedantic(lambda: (fn(), sync()), rounds=50, warmup_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
