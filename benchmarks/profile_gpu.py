"""Where the GPU time goes, on CUDA: a GPT-2 124M training step, or a batch-1 decode token.

    python benchmarks/profile_gpu.py train                     # triton, torch.compile: bf16, 16 x 1024
    python benchmarks/profile_gpu.py train --backends triton torch --steps 3 --top 30
    python benchmarks/profile_gpu.py decode [--dtypes bfloat16 float32] [--tokens 200]

train: each backend's step (forward, backward, fused AdamW; bench_train.py's step) is warmed
up, then profiled with torch.profiler over --steps steps: wall ms per step, GPU-busy ms (the sum
of kernel times), kernel launches per step, the top kernels with their share of GPU time, and
the copies and casts by input shapes.

decode: gptfast's Generator (random init, greedy, prompt "Every effort moves you", the
generation bench_generate.py times), per dtype:
  A  engine wall ms/token (Generator.generate_ids, its own clock: what bench_generate reports)
  B  runner-only ms/token: Runner.decode + ids.tolist() in a loop on this thread (no engine bookkeeping)
  C  GPU ms/token of the captured step alone (graph replays back to back, CUDA events)
  whether the decode step is a CUDA graph, and torch.profiler counts per token (engine path: a
  long run minus a short one, so the prefill cancels; runner-only path): kernels, GPU-busy us,
  kernel-launch API calls, graph launches, copies, syncs; the top kernels.
Nothing is downloaded; without CUDA it says so and exits.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch

from common import PROMPT  # benchmarks/ is on sys.path when run as a script
from engines import Gptfast


def profile_decode(model, dtype, n_tokens, rounds):
    print(f"\n=== gptfast {dtype}, batch 1, {len(PROMPT)}-token prompt, {n_tokens} new tokens ===")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = Gptfast(model, dtype, "cuda")  # bench_generate's engine and warm-up (captures the batch-1 graph)
    for w in caught:
        print(f"  warning during warm-up: {w.category.__name__}: {w.message}")
    print(f"  build + warm-up (Triton compiles, capture): {time.perf_counter() - t0:.1f} s")
    runner, emodel = ours.generator.engine.runner, ours.generator.engine.model
    graphs = {k: ("CUDA graph" if v is not False else "EAGER (no graph: capture failed)")
              for k, v in runner.graphs.items()}
    print(f"  runner.static={runner.static}  graphs (size, sampling, backend) -> kind: {graphs or 'none'}")

    # A: the engine, as the benchmark times it
    tps, ttft = [], []
    for _ in range(rounds):
        ids, first_s, tokens_per_s = ours.run([PROMPT], n_tokens)
        assert len(ids[0]) == n_tokens, len(ids[0])
        tps.append(tokens_per_s)
        ttft.append(first_s * 1e3)
    a_ms = 1e3 / statistics.median(tps)
    print(f"  A engine: decode {max(tps):.0f} best / {statistics.median(tps):.0f} median tokens/s = "
          f"{a_ms:.3f} ms/token; time to first token {min(ttft):.2f} ms")

    # B: runner.decode + the one host read per step, on this thread (what the engine adds is A - B)
    def runner_loop(n):
        tok, pos = PROMPT[-1], len(PROMPT)
        with torch.inference_mode():
            for i in range(n):
                _, ids = runner.decode(emodel, [tok], [pos + i])
                tok = ids.tolist()[0]

    runner_loop(5)
    torch.cuda.synchronize()
    t = time.perf_counter()
    runner_loop(n_tokens)
    b_ms = 1e3 * (time.perf_counter() - t) / n_tokens
    print(f"  B runner.decode + tolist loop: {b_ms:.3f} ms/token")

    # C: the captured step's GPU time alone (replays queued back to back)
    graph = next((v for k, v in runner.graphs.items() if k[0] == 1 and v is not False), None)
    if graph is not None:
        n = 100
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        t = time.perf_counter()
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        host = 1e3 * (time.perf_counter() - t) / n
        end.synchronize()
        c_ms = start.elapsed_time(end) / n
        print(f"  C graph replay: GPU {c_ms:.3f} ms/step (host cost of one replay call ~{host:.3f} ms)")
        print(f"  => GPU step {c_ms:.3f} | runner host+sync overhead (B-C) {b_ms - c_ms:.3f} | "
              f"engine bookkeeping + thread handoff (A-B) {a_ms - b_ms:.3f} ms/token; "
              f"GPU-only ceiling {1 / c_ms * 1e3:.0f} tokens/s")
    else:
        print("  C graph replay: no batch-1 graph captured")

    # profiles
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]

    def prof(fn):
        with profile(activities=acts) as p:
            fn()
        return summarize(p)

    short, long_ = 8, 40
    s1 = prof(lambda: ours.run([PROMPT], short))
    s2 = prof(lambda: ours.run([PROMPT], long_))
    eng = {k: (s2[k] - s1[k]) / (long_ - short) for k in s1 if k != "kernels_by_name"}
    s3 = prof(lambda: runner_loop(long_))
    run = {k: v / long_ for k, v in s3.items() if k != "kernels_by_name"}
    print(f"  profiler per token          {'engine':>10} {'runner-only':>12}")
    for key, label in (("kernels", "GPU kernels"), ("gpu_us", "GPU busy us"),
                       ("launch_calls", "kernel launch API calls"),
                       ("graph_launches", "cudaGraphLaunch"), ("memcpy_calls", "cudaMemcpy* calls"),
                       ("d2h", "memcpy D2H"), ("h2d", "memcpy H2D"), ("syncs", "*Synchronize calls")):
        print(f"    {label:26s} {eng[key]:10.2f} {run[key]:12.2f}")
    if eng["syncs"] == 0 and eng["memcpy_calls"] == 0:
        print("    (engine column: runtime API calls of the engine's thread were not recorded by the profiler; "
              "the runner-only column has them)")
    print("  top kernels, runner-only (per token: count, GPU us):")
    for name, (cnt, us) in sorted(s3["kernels_by_name"].items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"    {cnt / long_:6.2f} {us / long_:8.2f}  {name[:100]}")
    torch.cuda.empty_cache()


def summarize(p) -> dict:
    """Totals over a profile's key_averages: device-side kernels/copies and CUDA API calls."""
    out = dict(kernels=0, gpu_us=0.0, launch_calls=0, graph_launches=0, memcpy_calls=0, d2h=0, h2d=0, syncs=0,
               kernels_by_name={})
    for a in p.key_averages():
        name, cnt = a.key, a.count
        if a.device_type.name == "CUDA":  # a kernel, copy or memset on the GPU
            us = a.self_device_time_total
            out["gpu_us"] += us
            low = name.lower()
            if "memcpy" in low or "memset" in low:
                out["d2h"] += cnt * ("dtoh" in low)
                out["h2d"] += cnt * ("htod" in low)
            else:
                out["kernels"] += cnt
                out["kernels_by_name"][name] = (cnt, us)
        else:
            if name.startswith(("cuda", "cu")) and "LaunchKernel" in name:
                out["launch_calls"] += cnt
            elif name.startswith(("cudaGraphLaunch", "cuGraphLaunch")):
                out["graph_launches"] += cnt
            elif name.startswith(("cudaMemcpy", "cuMemcpy")):
                out["memcpy_calls"] += cnt
            if name.startswith(("cuda", "cu")) and "Synchronize" in name:
                out["syncs"] += cnt
    return out


def profile_train(backend: str, steps: int, top: int, compiled: bool = False) -> list[str]:
    import bench_train
    from torch.profiler import ProfilerActivity, profile
    cfg, state, x, y = bench_train.inputs()
    _, step = bench_train.make_step(cfg, state, x, y, backend, "bf16", compiled)
    for _ in range(2):
        step()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    wall = (time.perf_counter() - start) / steps * 1e3
    totals = summarize(prof)
    busy = totals["gpu_us"] / steps / 1e3
    name = backend + ("+compile" if compiled else "")
    lines = ["", f"### {name} bf16: {wall:.1f} ms/step wall (under the profiler), {busy:.1f} ms GPU-busy, "
             f"{totals['kernels'] / steps:.0f} kernels/step", "", "| kernel | calls/step | ms/step | % of GPU time |",
             "|---|---|---|---|"]
    for kernel, (count, us) in sorted(totals["kernels_by_name"].items(), key=lambda kv: -kv[1][1])[:top]:
        ms = us / steps / 1e3
        lines.append(f"| {kernel[:90]} | {count / steps:.0f} | {ms:.2f} | {100 * ms / busy:.1f}% |")
    # the copies and casts by the op and shapes that made them: what to fuse or keep in one dtype
    copies = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.key in ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous")]
    lines += ["", "| copy op | input shapes | calls/step | device ms/step |", "|---|---|---|---|"]
    for e in sorted(copies, key=lambda e: -e.device_time_total)[:top // 2]:
        lines.append(f"| {e.key} | {str(e.input_shapes)[:80]} | {e.count / steps:.0f} | "
                     f"{e.device_time_total / steps / 1e3:.2f} |")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    tr = sub.add_parser("train", help="a training step's top kernels per backend")
    tr.add_argument("--backends", nargs="+", default=["triton", "torch+compile"],
                    choices=["triton", "torch", "torch+compile", "reference"])
    tr.add_argument("--steps", type=int, default=2, help="profiled steps (>= 1)")
    tr.add_argument("--top", type=int, default=25, help="kernels listed (>= 1)")
    de = sub.add_parser("decode", help="a batch-1 decode token: engine, runner and GPU time, kernels")
    de.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["float32", "bfloat16", "float16"],
                    help="gptfast dtypes")
    de.add_argument("--tokens", type=int, default=200, help="new tokens per generation (the benchmark: 200)")
    de.add_argument("--rounds", type=int, default=3, help="timed generations per dtype (best and median)")
    args = ap.parse_args(argv)
    if args.what == "decode" and (not 8 <= args.tokens <= 1000 or args.rounds < 1):
        ap.error("--tokens must be in [8, 1000] (the runner loop must fit the 1024 context), --rounds >= 1")
    if args.what == "train" and (args.steps < 1 or args.top < 1):
        ap.error("--steps and --top must be >= 1")
    if not torch.cuda.is_available():
        raise SystemExit("profile_gpu.py: no CUDA GPU visible to torch")
    import triton
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    if args.what == "train":
        for b in args.backends:
            print("\n".join(profile_train(b.removesuffix("+compile"), args.steps, args.top, b.endswith("+compile"))),
                  flush=True)
        return 0
    from gptfast import GPTConfig, GPTModel
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small"), backend="auto").to("cuda").eval()
    print(f"model backend: {model.active_backend}")
    for dtype in args.dtypes:
        profile_decode(model, dtype, args.tokens, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
