"""Where a loaded engine's time goes, without HTTP: --clients threads each submit bench_serve's
request mix to one `Engine` (GPT-2 124M random init, greedy, the CPU default dtype), one request
after another, for --seconds; the engine's decode steps and prefills are timed as they run.
bench_serve.py measures the server end to end; this splits the engine's share of it.

    python benchmarks/engine_load.py [--clients 16] [--seconds 30] [--dtype int8] [--kv-dtype float16]

Prints a table and writes benchmarks/results/engine_load_cpu.md (device, date, commit).
"""
from __future__ import annotations

import argparse
import collections
import datetime
import threading
import time
from pathlib import Path

import torch

from gptfast import GPTConfig, GPTModel
from gptfast.engine import Engine
from gptfast.quant import DTYPES, FLOAT_DTYPES, auto_dtype, inference_copy
from gptfast.sampling import SamplingParams

from bench_serve import workload  # noqa: E402  (benchmarks/ is on sys.path)
from common import ComputeProbe, commit_id, device_name, load_average, save_report  # noqa: E402


class Timed:
    """Wraps the runner's prefill and decode: seconds, calls, rows decoded, tokens prefilled."""

    def __init__(self, runner):
        self.reset()
        for name in ("prefill", "decode"):
            setattr(runner, name, self._wrap(name, getattr(runner, name)))

    def reset(self):
        self.seconds, self.calls, self.rows, self.prompt_tokens = collections.Counter(), collections.Counter(), 0, 0

    def _wrap(self, name, fn):
        def timed(model, *args, **kwargs):
            t = time.perf_counter()
            out = fn(model, *args, **kwargs)
            self.seconds[name] += time.perf_counter() - t
            self.calls[name] += 1
            if name == "decode":
                self.rows += len(args[0])
            else:
                self.prompt_tokens += len(args[1]) * len(args[1][0])
            return out
        return timed


def run(engine, clients: int, seconds: float) -> tuple[int, float]:
    """(tokens generated, wall seconds) of `clients` closed-loop clients for `seconds`."""
    tokens, lock, stop = [0], threading.Lock(), time.perf_counter() + seconds

    def client(c):
        i = 0
        while time.perf_counter() < stop:
            prompt, new = workload(c, i)
            i += 1
            for batch in engine.submit([prompt], new, SamplingParams()).updates():
                with lock:
                    tokens[0] += sum(len(u.ids) for u in batch)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return tokens[0], time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), help="weight format (auto: CPU default)")
    ap.add_argument("--kv-dtype", default=None, choices=("float16", "float32"),
                    help="KV cache dtype (default: the engine's choice, float16 under the fused CPU step)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_load_cpu.md"))
    args = ap.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients must be at least 1 and --seconds positive")
    torch.manual_seed(0)
    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    model = inference_copy(GPTModel(GPTConfig.from_preset("gpt2-small")).eval(), dtype, torch.device("cpu"))
    engine = Engine(model, max_batch=32, kv_dtype=FLOAT_DTYPES.get(args.kv_dtype))
    timed = Timed(engine.runner)
    list(engine.submit([[1, 2, 3]], 4, SamplingParams()).updates())  # warm-up, not counted
    probe = ComputeProbe()
    host = [probe.summary("before the run")]
    timed.reset()
    tokens, wall = run(engine, args.clients, args.seconds)
    engine.close()
    host.append(probe.summary("after it"))
    dec, pre = timed.seconds["decode"], timed.seconds["prefill"]
    steps = max(1, timed.calls["decode"])
    lines = [f"# One Engine under load, no HTTP: GPT-2 124M random init, {dtype} weights, "
             f"KV cache {engine.runner.kv_dtype}, greedy",
             f"device: {device_name('cpu')}, torch {torch.__version__}, date "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}, "
             f"load average {load_average()}",
             f"command: python benchmarks/engine_load.py --clients {args.clients} --seconds {args.seconds:g} "
             f"--dtype {args.dtype}" + (f" --kv-dtype {args.kv_dtype}" if args.kv_dtype else ""),
             "mix: bench_serve.py's (prompts of 8/32/96 tokens with 32/64/96 new tokens, in turn)", *host, "",
             "| clients | tokens/s | wall s | decode s | steps | rows per step | ms per step | ms per row "
             "| prefill s | prompt tokens | ms per prompt token | other s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {args.clients} | {tokens / wall:.1f} | {wall:.1f} | {dec:.1f} | {steps} | {timed.rows / steps:.1f} "
             f"| {1e3 * dec / steps:.1f} | {1e3 * dec / max(1, timed.rows):.2f} | {pre:.1f} | {timed.prompt_tokens} "
             f"| {1e3 * pre / max(1, timed.prompt_tokens):.2f} | {wall - dec - pre:.1f} |"]
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
