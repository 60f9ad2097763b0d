"""Where a loaded engine's time goes, without HTTP: --clients threads each submit bench_serve's
request mix to one `Engine` (GPT-2 124M random init, greedy, the CPU default dtype), one request
after another, for --seconds; the engine's decode steps, the steps that take prompts beside the
decoding rows, and any eager prefills are timed as they run.
bench_serve.py measures the server end to end; this splits the engine's share of it.

    python benchmarks/engine_load.py [--clients 16] [--seconds 30] [--dtype int8] [--kv-dtype float16]
                                     [--prefill-chunk 64]

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
from gptfast.engine import PREFILL_CHUNK, Engine
from gptfast.quant import DTYPES, FLOAT_DTYPES, auto_dtype, inference_copy
from gptfast.sampling import SamplingParams

from bench_serve import workload  # noqa: E402  (benchmarks/ is on sys.path)
from common import ComputeProbe, commit_id, device_name, load_average, save_report  # noqa: E402


class Timed:
    """Wraps the runner's three kinds of call: decode steps (rows decoded), steps that take prompts
    beside the decoding rows (fused_step: prompt tokens, decoding rows) and eager prefills
    (prompt tokens); their seconds and calls."""

    def __init__(self, runner):
        self.reset()
        for name in ("prefill", "decode", "fused_step"):
            setattr(runner, name, self._wrap(name, getattr(runner, name)))

    def reset(self):
        self.seconds, self.calls, self.rows, self.prompt_tokens = (collections.Counter() for _ in range(4))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds[name] += time.perf_counter() - t
            self.calls[name] += 1
            if name == "decode":  # (model, tokens, lengths, ...)
                self.rows[name] += len(args[1])
            elif name == "prefill":  # (model, rows, windows)
                self.prompt_tokens[name] += len(args[2]) * len(args[2][0])
            else:  # (rows, windows, starts, outputs): a decoding row is one token past position 0
                decoding = sum(len(w) == 1 and start > 0 for w, start in zip(args[1], args[2]))
                self.rows[name] += decoding  # (so is a prompt's last chunk of one token, rarely)
                self.prompt_tokens[name] += sum(map(len, args[1])) - decoding
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
    ap.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK,
                    help="prompt tokens a step takes at most (0: every waiting prompt whole)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "engine_load_cpu.md"))
    args = ap.parse_args()
    if args.clients < 1 or args.seconds <= 0 or args.prefill_chunk < 0:
        ap.error("--clients must be at least 1, --seconds positive and --prefill-chunk at least 0")
    torch.manual_seed(0)
    dtype = auto_dtype("cpu") if args.dtype == "auto" else args.dtype
    model = inference_copy(GPTModel(GPTConfig.from_preset("gpt2-small")).eval(), dtype, torch.device("cpu"))
    engine = Engine(model, max_batch=32, kv_dtype=FLOAT_DTYPES.get(args.kv_dtype),
                    prefill_chunk=args.prefill_chunk or None)
    timed = Timed(engine.runner)
    list(engine.submit([[1, 2, 3]], 4, SamplingParams()).updates())  # warm-up, not counted
    probe = ComputeProbe()
    host = [probe.summary("before the run")]
    timed.reset()
    tokens, wall = run(engine, args.clients, args.seconds)
    engine.close()
    host.append(probe.summary("after it"))
    sec, calls, rows, prompts = timed.seconds, timed.calls, timed.rows, timed.prompt_tokens
    steps = max(1, calls["decode"])
    ms_row = 1e3 * sec["decode"] / max(1, rows["decode"])
    # a prompt token's share of the steps it joined: their time less their decoding rows at the
    # decode-only steps' time per row
    marginal = (1e3 * sec["fused_step"] - ms_row * rows["fused_step"]) / max(1, prompts["fused_step"])
    lines = [f"# One Engine under load, no HTTP: GPT-2 124M random init, {dtype} weights, "
             f"KV cache {engine.runner.kv_dtype}, greedy",
             f"device: {device_name('cpu')}, torch {torch.__version__}, date "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}, "
             f"load average {load_average()}",
             f"command: python benchmarks/engine_load.py --clients {args.clients} --seconds {args.seconds:g} "
             f"--dtype {args.dtype} --prefill-chunk {args.prefill_chunk}"
             + (f" --kv-dtype {args.kv_dtype}" if args.kv_dtype else ""),
             "mix: bench_serve.py's (prompts of 8/32/96 tokens with 32/64/96 new tokens, in turn)", *host, "",
             "decode steps: only decoding rows; steps with prompts: prompts prefilled in the same fused call as "
             "the decoding rows (their share per prompt token estimated as the step's time less its decoding rows "
             "at the decode steps' time per row); eager prefills: prompts through the model's forward", "",
             "| clients | tokens/s | wall s | decode steps | s | rows per step | ms per step | ms per row "
             "| steps with prompts | s | prompt tokens | decoding rows | ms per prompt token "
             "| eager prefill s | other s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {args.clients} | {tokens / wall:.1f} | {wall:.1f} | {calls['decode']} | {sec['decode']:.1f} "
             f"| {rows['decode'] / steps:.1f} | {1e3 * sec['decode'] / steps:.1f} | {ms_row:.2f} "
             f"| {calls['fused_step']} | {sec['fused_step']:.1f} | {prompts['fused_step']} | {rows['fused_step']} "
             f"| {marginal:.2f} | {sec['prefill']:.1f} | {wall - sum(sec.values()):.1f} |"]
    save_report(lines, args.out)


if __name__ == "__main__":
    main()
