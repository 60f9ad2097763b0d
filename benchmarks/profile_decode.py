"""Where a decode token's time goes on CPU: gptfast's `Generator` (GPT-2 124M, random init,
batch 1, greedy) under torch.profiler, per weight format: the linear layers (gptfast::linear)
against everything else (attention, LayerNorm, GELU, the KV-cache writes, the sampler, and the
Python between ops, which the profiler sees as the gap between op times and the wall time), and
what the engine adds around the step (generate's time per token minus the step's).

    python benchmarks/profile_decode.py [--dtypes float32 int8 int4] [--tokens 100] [--threads 1]

Prints a table per token (ms) and the heaviest non-matmul ops; writes
benchmarks/results/decode_profile_cpu.md.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gptfast import GPTConfig, GPTModel
from gptfast.generate import Generator

from common import commit_id, device_name, load_average  # noqa: E402

PROMPT = [6109, 3626, 6100, 345]


def profile_dtype(model, dtype, tokens):
    """(generate's wall ms per token, [a decode step's ms: plain, profiled], {op: self ms per
    profiled step}). The
    engine decodes on its own thread, which the profiler does not see, so the profiled steps
    are the engine's runner driven from this thread over the same model and cache."""
    gen = Generator(model, dtype=dtype)
    gen.generate_ids([PROMPT], 8)  # warm-up
    t = time.perf_counter()
    gen.generate_ids([PROMPT], tokens)
    wall = (time.perf_counter() - t) / tokens
    runner, m = gen.engine.runner, gen.engine.model
    steps = []
    with torch.inference_mode():
        for profiled in (False, True):  # timed plainly, then again under the profiler for the ops
            runner.reserve(m, 1)
            runner.prefill(m, [0], [PROMPT])
            with profile(activities=[ProfilerActivity.CPU]) if profiled else contextlib.nullcontext() as prof:
                t = time.perf_counter()
                for i in range(tokens):
                    runner.decode(m, [PROMPT[-1]], [len(PROMPT) + i])
                steps.append(1e3 * (time.perf_counter() - t) / tokens)
    ops = collections.Counter()
    for e in prof.key_averages():
        ops[e.key] += e.self_cpu_time_total / 1e3 / tokens  # ms per step
    return 1e3 * wall, steps, ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "int4"])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--top", type=int, default=8, help="non-matmul ops listed per format")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_profile_cpu.md"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small"), backend="auto").eval()
    lines = [f"# Decode time per token on CPU, GPT-2 124M, batch 1, {args.tokens} tokens (torch.profiler)",
             f"device: {device_name('cpu')}, torch {torch.__version__}, date "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}, "
             f"load average {load_average()}", "",
             "| weights | generate ms/token | decode step ms: plain / profiled | matmuls (gptfast::linear) | other ops "
             "| Python and gaps | engine (generate - step) | matmul share of the step |",
             "|---|---|---|---|---|---|---|---|"]
    details = []
    for dtype in args.dtypes:
        wall, (step, profiled), ops = profile_dtype(model, dtype, args.tokens)
        mm = ops.pop("gptfast::linear", 0.0)
        other = sum(ops.values())
        lines.append(f"| {dtype} | {wall:.2f} | {step:.2f} / {profiled:.2f} | {mm:.2f} | {other:.2f} "
                     f"| {max(0.0, profiled - mm - other):.2f} | {wall - step:.2f} | {100 * mm / profiled:.0f}% |")
        top = ", ".join(f"{k} {v:.3f}" for k, v in ops.most_common(args.top))
        details.append(f"- {dtype}: heaviest other ops (ms/token): {top}")
    text = "\n".join(lines + [""] + details)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
