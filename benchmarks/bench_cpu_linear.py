"""CPU decode matmuls, GPT-2 124M: every linear layer of one decode step (12 layers x qkv,
out_proj, up, down, then the 50257 x 768 output head; distinct weights per layer, so they
stream from memory as in generation) for M = 1, 4, 16 rows of x, in each weight format, by
each kernel PyTorch offers and by gptfast's own (csrc/linear_cpu.cpp, every path this CPU has).

    python benchmarks/bench_cpu_linear.py [--rows 1 4 16] [--rounds 7] [--formats fp32 int8 ...]

Correctness first: each kernel's output for the step is checked against x @ W^T in fp32 with
the dequantised weights it holds (relative error printed; a kernel that fails is not timed).
Timing: all kernels and the read-bandwidth floor (Tensor.max over 256 MB) run interleaved in
rounds; best and median per kernel. GB/s = the weight bytes the kernel reads per step (scales
included) / time; "% floor" is its best GB/s over the best floor of the same run. Writes
benchmarks/results/cpu_linear.md with device, date, commit and load.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gptfast import cpu_linear as cl
from gptfast.quant import SHORT_DTYPES

from common import ReadFloor, commit_id, device_name, interleaved, load_average, save_report  # noqa: E402

LAYERS, EMB, VOCAB = 12, 768, 50257
SHAPES = [(3 * EMB, EMB), (EMB, EMB), (4 * EMB, EMB), (EMB, 4 * EMB)]  # (out, in) per block
# bf16 activations (torch's int8/int4 kernels) round x and y to 8 bits: ~1e-2 of the scale
MAX_ERROR = 3e-2
FORMATS = ("fp32", "bf16", "fp16", "int8", "int4-g32", "int4-g64", "int4-g128")


def model_weights():
    """Random fp32 weights (out, in) of every linear layer of GPT-2 124M, head last."""
    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(shape, generator=gen) * 0.02 for _ in range(LAYERS) for shape in SHAPES]
    return ws + [torch.randn(VOCAB, EMB, generator=gen) * 0.02]


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def torch_int4(w, group):
    """torch._weight_int4pack_mm_for_cpu's operands for w: (q - 8) * scale + zero per group, the
    same asymmetric 4-bit grid as ours (rows padded to a multiple of 16, as its packing needs)."""
    pad = -w.shape[0] % 16
    packed, sm = cl.quantize_int4(F.pad(w, (0, 0, 0, pad)), group)
    q = cl.unpack_int4(packed).int()  # (N, K)
    s, m = sm.float().unbind(-1)  # (N, groups)
    qsz = torch.stack([s, m + 8 * s], -1).transpose(0, 1).contiguous().bfloat16()  # (groups, N, 2)
    wq = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    deq = ((q.float() - 8).view(q.shape[0], -1, group) * qsz.float().transpose(0, 1)[..., :1]
           + qsz.float().transpose(0, 1)[..., 1:]).view(q.shape[0], -1)[: w.shape[0]]
    return (lambda x: torch._weight_int4pack_mm_for_cpu(x.bfloat16(), wq, group, qsz)[:, : w.shape[0]],
            nbytes(wq, qsz), deq)


def stored(fmt, w):
    """(weight, scale, group) operands of gptfast's op for w in format fmt (fp32/bf16/fp16 are
    this table's short names)."""
    return cl.quantize(w, SHORT_DTYPES.get(fmt, fmt))


def kernels_for(fmt, w, paths):
    """{kernel name: (fn(x) -> y, bytes read, fp32 weight it computes with)} for one layer."""
    out = {}
    wq, scale, group = stored(fmt, w)
    if fmt in ("fp32", "bf16", "fp16"):
        out["torch F.linear"] = (lambda x: F.linear(x.to(wq.dtype), wq), nbytes(wq), wq.float())
        if fmt == "fp32":
            wt = w.t().contiguous()
            out["torch x @ W (in, out)"] = (lambda x: x @ wt, nbytes(wt), w)
    elif fmt == "int8":
        sb = scale.bfloat16()
        if hasattr(torch, "_weight_int8pack_mm"):
            out["torch _weight_int8pack_mm"] = (lambda x: torch._weight_int8pack_mm(x.bfloat16(), wq, sb),
                                                nbytes(wq, sb), wq.float() * sb.float()[:, None])
    elif hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        out["torch _weight_int4pack_mm_for_cpu"] = torch_int4(w, group)
    deq = cl.dequantize(wq, scale, group, w.shape[1])
    # int8: the packed copy the fused decode step keeps, given to the paths that read it (without
    # it the avx512 path's small-row timings had been theirs without the copy, which misplaced the
    # rows from which the amx tiles win)
    packed = cl.pack_int8(wq) if fmt == "int8" and "avx2" in paths else None
    for p in paths:
        copy = packed if p in cl.PACKED_PATHS else None
        out[f"gptfast {p}"] = (lambda x, p=p, copy=copy: torch.ops.gptfast.linear(x, wq, scale, None, group, p, copy),
                               nbytes(wq, scale), deq)
    return out


def decode_step(layers, xs):
    """fn() running every layer once on its x (x's width matches the layer's input)."""
    def step():
        for fn, x in zip(layers, xs):
            fn(x)
    return step


def check(layers, refs, xs):
    """Largest error of a kernel over the step, relative to each output's scale."""
    worst = 0.0
    for fn, w, x in zip(layers, refs, xs):
        y, ref = fn(x).float(), x @ w.t()
        worst = max(worst, ((y - ref).abs().max() / ref.abs().max()).item())
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16], help="rows of x (batch at decode)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (best and median reported)")
    ap.add_argument("--steps", type=int, default=3, help="decode steps per kernel per round (mean taken)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--crossover", action="store_true",
                    help="instead: the kernel vs dequantise + F.linear at prefill sizes "
                         "(sets cpu_linear.MAX_KERNEL_ROWS)")
    ap.add_argument("--out", default=None,
                    help="default: benchmarks/results/cpu_linear.md (--crossover: cpu_linear_crossover.md)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = cl.kernel_paths()
    if not paths:
        print("gptfast._C has no CPU linear kernel (not built): only PyTorch's kernels are timed")
    weights = model_weights()
    title = ("the kernel vs dequantise + F.linear per pass over the 48 block layers (ms, best of the rounds)"
             if args.crossover else "GPT-2 124M linear layers (48 + head) per decode step")
    lines = [f"# CPU decode matmuls: {title}",
             f"device: {device_name('cpu')}, torch {torch.__version__}, "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}",
             "command: python benchmarks/bench_cpu_linear.py " + (
                 "--crossover" if args.crossover else f"--rows {' '.join(map(str, args.rows))} --steps {args.steps}")
             + f" --rounds {args.rounds}" + (f" --threads {args.threads}" if args.threads else "")
             + (f" --formats {' '.join(args.formats)}" if args.formats != list(FORMATS) else ""),
             f"load average at the start: {load_average()}", ""]
    if args.crossover:
        lines += crossover(weights[:-1], args) + [""]
    else:
        floor = ReadFloor()
        for M in args.rows:
            lines += bench_rows(M, weights, args, paths, floor) + [""]
    lines.append(f"load average at the end: {load_average()}")
    save_report(lines, args.out or Path(__file__).parent / "results" /
                ("cpu_linear_crossover.md" if args.crossover else "cpu_linear.md"))


def bench_rows(M, weights, args, paths, floor):
    """Table lines for M rows: every format's kernels, interleaved with the floor."""
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(M, w.shape[1], generator=gen) for w in weights]
    fns, info = {"floor": floor}, {}
    for fmt in args.formats:
        per_layer = [kernels_for(fmt, w, paths) for w in weights]
        for name in per_layer[0]:
            layers = [k[name][0] for k in per_layer]
            err = check(layers, [k[name][2] for k in per_layer], xs)
            if err > MAX_ERROR:
                print(f"{fmt} {name}: relative error {err:.2e} > {MAX_ERROR}, not timed")
                continue
            info[fmt, name] = (sum(k[name][1] for k in per_layer), err)
            step = decode_step(layers, xs)
            fns[fmt, name] = lambda step=step: _time(step, args.steps)
    times = interleaved(fns, args.rounds)
    best_floor = max(times.pop("floor"))
    out = [f"## M = {M} rows; read floor (Tensor.max, 256 MB): best {best_floor:.1f} GB/s",
           "", "| format | kernel | max rel. error | MB read | best ms | median ms | best GB/s | % floor "
           "| vs torch (best) |", "|---|---|---|---|---|---|---|---|---|"]
    for (fmt, name), ts in times.items():
        mb, err = info[fmt, name]
        base = [min(t) for (f, k), t in times.items() if f == fmt and k.startswith("torch")]
        gbs = mb / min(ts) / 1e9
        vs = f"{min(base) / min(ts):.2f}x" if base else "-"
        out.append(f"| {fmt} | {name} | {err:.1e} | {mb / 1e6:.0f} | {1e3 * min(ts):.2f} | "
                   f"{1e3 * statistics.median(ts):.2f} | {gbs:.1f} | {100 * gbs / best_floor:.0f}% | {vs} |")
    return out


def crossover(weights, args):
    """Table lines, ms per pass over the 48 block layers at M rows: gptfast's kernel vs what
    cpu_linear.linear does above MAX_KERNEL_ROWS (dequantise, then F.linear), interleaved."""
    fns = {}
    for fmt in ("fp32", "fp16", "int8", "int4-g32", "int4-g128"):
        packed = [stored(fmt, w) for w in weights]
        for M in (16, 32, 64, 128, 256, 512):
            xs = [torch.randn(M, w.shape[1]) for w in weights]
            fns[fmt, M, "kernel"] = lambda p=packed, xs=xs: _time(
                decode_step([lambda x, q=q: torch.ops.gptfast.linear(x, q[0], q[1], None, q[2]) for q in p], xs), 1)
            fns[fmt, M, "dequantise + F.linear"] = lambda p=packed, xs=xs: _time(
                decode_step([lambda x, q=q: cl.reference_linear(x, q[0], q[1], None, q[2]) for q in p], xs), 1)
    times = interleaved(fns, args.rounds)
    lines = ["| format | M | gptfast kernel ms | dequantise + F.linear ms |", "|---|---|---|---|"]
    for fmt, M, _ in list(times)[::2]:
        lines.append(f"| {fmt} | {M} | {1e3 * min(times[fmt, M, 'kernel']):.1f} | "
                     f"{1e3 * min(times[fmt, M, 'dequantise + F.linear']):.1f} |")
    return lines


def _time(step, n):
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


if __name__ == "__main__":
    main()
