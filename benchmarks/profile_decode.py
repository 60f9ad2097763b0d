"""Where a decode token's time goes on CPU: gptfast's `Generator` (GPT-2 124M, random init,
greedy, batch 1 or --rows prompts at once), per weight format. A step is one call of the fused C++ step
(gptfast.cpu_decode), so the split is measured, not profiled: the step's 49 matmuls called on
their own (the same operands through gptfast::linear) against the whole step; the rest of the
step is attention, LayerNorm, GELU, the KV-cache writes and the embeddings; the engine's share
is generate's time per token minus the step's. The eager step (the model's forward, ~350 ops
and the Python between them) is timed beside it for comparison. Interleaved rounds, medians.

    python benchmarks/profile_decode.py [--dtypes float32 int8 int4] [--tokens 100] [--rows 16] [--cached 100] [--threads 1]

Prints a table per step (ms); writes benchmarks/results/decode_profile_cpu.md.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

from gptfast import GPTConfig, GPTModel
from gptfast.generate import Generator

from common import PROMPT, commit_id, device_name, load_average, save_report  # noqa: E402

COLUMNS = ("generate", "step", "matmuls", "eager step")


class Timer:
    """The four times (ms per token) of one weight format, one round at a time."""

    def __init__(self, model, dtype, rows, prompt):
        self.gen, self.rows, self.prompt = Generator(model, dtype=dtype, max_batch=rows), rows, prompt
        self.gen.generate_ids([prompt] * rows, 8)  # warm-up
        self.runner, self.model = self.gen.engine.runner, self.gen.engine.model
        self.fused = self.runner.fused
        if self.fused is None:
            raise SystemExit(f"{dtype}: no fused CPU decode step here (gptfast._C not built?)")
        ops = self.fused.linears
        # inputs per layer: the weight's columns (packed int4: two a byte)
        self.matmuls = [(torch.randn(rows, w.shape[1] * (2 if w.dtype == torch.uint8 else 1)), w, scale, bias, group)
                        for (w, scale, bias), group in zip(zip(ops[::3], ops[1::3], ops[2::3]), self.fused.groups)]

    def _steps(self, tokens, fn) -> float:
        """ms per call of fn(i) over `tokens` decode positions after a fresh prefill of every row."""
        self.runner.reserve(self.model, self.rows)
        self.runner.prefill(self.model, list(range(self.rows)), [self.prompt] * self.rows)
        t = time.perf_counter()
        for i in range(tokens):
            fn(i)
        return 1e3 * (time.perf_counter() - t) / tokens

    def round(self, tokens) -> dict[str, float]:
        t = time.perf_counter()
        self.gen.generate_ids([self.prompt] * self.rows, tokens)
        out = {"generate": 1e3 * (time.perf_counter() - t) / tokens}
        decode = lambda i: self.runner.decode(self.model, [self.prompt[-1]] * self.rows,  # noqa: E731
                                              [len(self.prompt) + i] * self.rows)
        with torch.inference_mode():
            out["step"] = self._steps(tokens, decode)
            out["matmuls"] = self._steps(tokens, lambda i: [torch.ops.gptfast.linear(*mm) for mm in self.matmuls])
            self.runner.fused = None  # the model's own forward
            try:
                out["eager step"] = self._steps(tokens, decode)
            finally:
                self.runner.fused = self.fused
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16", "int8", "int4-g128"])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians reported)")
    ap.add_argument("--rows", type=int, default=1, help="prompts decoded together (a batched step)")
    ap.add_argument("--cached", type=int, default=len(PROMPT),
                    help="tokens in each row's KV cache when the timed steps start (the prompt's length): "
                         "attention reads them all at every step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/decode_profile_cpu[_rowsN][_cachedN].md")
    args = ap.parse_args()
    if args.rows < 1 or args.tokens < 1 or args.rounds < 1 or args.cached < 1:
        ap.error("--rows, --tokens, --rounds and --cached must be at least 1")
    config = GPTConfig.from_preset("gpt2-small")
    if args.cached + args.tokens > config.context_length:
        ap.error(f"--cached + --tokens must fit the context ({config.context_length})")
    prompt = (PROMPT * args.cached)[:args.cached]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    model = GPTModel(config, backend="auto").eval()
    timers = {dtype: Timer(model, dtype, args.rows, prompt) for dtype in args.dtypes}
    times = {dtype: {c: [] for c in COLUMNS} for dtype in args.dtypes}
    for _ in range(args.rounds):
        for dtype, timer in timers.items():
            for column, ms in timer.round(args.tokens).items():
                times[dtype][column].append(ms)
    lines = [f"# Decode time per step on CPU, GPT-2 124M, batch {args.rows}, {args.tokens} tokens after "
             f"{args.cached} cached",
             f"device: {device_name('cpu')}, torch {torch.__version__}, date "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}, "
             f"load average {load_average()}",
             f"command: python benchmarks/profile_decode.py --dtypes {' '.join(args.dtypes)} --tokens {args.tokens} "
             f"--rounds {args.rounds} --rows {args.rows} --cached {args.cached}"
             + (f" --threads {args.threads}" if args.threads else ""),
             f"medians of {args.rounds} interleaved rounds, ms per step of {args.rows} rows (the matmuls are timed "
             "apart from the step, so noise can make them the larger; generate's time per token includes its "
             "prefill of the cached tokens)", "",
             "| weights | generate | fused step | its matmuls | rest of the step | engine (generate - step) "
             "| matmul share of the step | eager step (model forward) |",
             "|---|---|---|---|---|---|---|---|"]
    for dtype in args.dtypes:
        m = {c: statistics.median(v) for c, v in times[dtype].items()}
        lines.append(f"| {dtype} | {m['generate']:.2f} | {m['step']:.2f} | {m['matmuls']:.2f} "
                     f"| {m['step'] - m['matmuls']:.2f} | {m['generate'] - m['step']:.2f} "
                     f"| {100 * m['matmuls'] / m['step']:.0f}% | {m['eager step']:.2f} |")
    save_report(lines, args.out or Path(__file__).parent / "results" /
                ("decode_profile_cpu" + (f"_rows{args.rows}" if args.rows > 1 else "")
                 + (f"_cached{args.cached}" if args.cached != len(PROMPT) else "") + ".md"))


if __name__ == "__main__":
    main()
