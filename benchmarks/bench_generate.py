"""Generation speed and quality, one command: GPT-2 124M (random init, the same weights in every
engine), greedy, 4-token prompts, batch 1, 4 and 16: gptfast's `Generator` in every weight
format next to Hugging Face transformers (fp32) and CTranslate2 (float32 and int8, converted
from the same weights), then the quality gate of each format on a model trained on The Verdict
(benchmarks/quality.py).

    python benchmarks/bench_generate.py                 # everything (CPU: over an hour on 2 cores at ~6 GB/s)
    python benchmarks/bench_generate.py --rounds 3 --new-tokens 100   # the README table (~25 min there)
    python benchmarks/bench_generate.py --batches 1 --rounds 3 --engines ct2-int8 int8 int4 --no-quality

Correctness first: gptfast's and transformers' fp32 logits agree, and every fp32 engine's greedy
tokens equal gptfast's (a divergence is accepted only at a near tie). Then the engines run
interleaved in rounds (the order rotated each round, the read-bandwidth floor measured in every
round), so machine load hits them alike; the table gives best and median per engine of the time
to first token and of the decode rate (tokens after the first / the time after the first).
Writes benchmarks/results/generate_<device>.md with device, date, commit and load average.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path

import torch

from gptfast import GPTConfig, GPTModel
from gptfast.backends import resolve_device
from gptfast.data import VERDICT, read_text
from gptfast.quant import DTYPES, KernelLinear
from gptfast.tokenizer import get_tokenizer

import engines  # noqa: E402  (benchmarks/ is on sys.path)
import quality  # noqa: E402
from common import PROMPT, ReadFloor, commit_id, device_name, interleaved, load_average, save_report  # noqa: E402

PEERS = ("transformers-fp32", "ct2-float32", "ct2-int8")
DEFAULT_ENGINES = PEERS + DTYPES


def prompts(batch: int) -> list[list[int]]:
    """`batch` different 4-token prompts (the first is "Every effort moves you")."""
    ids = get_tokenizer().encode(read_text(VERDICT))
    return [PROMPT] + [ids[4 * i:4 * i + 4] for i in range(1, batch)]


def weight_bytes(model, dtype) -> int:
    """Bytes of linear weights (and scales) a decode step reads in gptfast's `dtype` copy."""
    from gptfast.quant import inference_copy
    layers = [m for m in inference_copy(model, dtype, "cpu").modules() if isinstance(m, KernelLinear)]
    return sum(t.numel() * t.element_size() for m in layers for t in (m.weight, m.scale) if t is not None)


def check_fp32(built, model, prompt, ref, device):
    """Every fp32 engine's greedy tokens equal gptfast fp32's, up to a near tie."""
    for name, engine in built.items():
        if name in ("transformers-fp32", "ct2-float32"):
            engines.check_greedy(model, prompt, engine.run([prompt], len(ref))[0][0], ref, name, device)


def speed_table(batch, times, bytes_of, floor):
    """Markdown lines for one batch size: {engine: [(ttft s, decode tokens/s) per round]}."""
    med = {name: statistics.median(r[1] for r in runs) for name, runs in times.items()}
    lines = [f"### batch {batch}", "", "| engine | weights MB | time to first token ms: best / median "
             "| decode tokens/s: best / median | x CTranslate2 float32 | x CTranslate2 int8 "
             "| % of its floor (median) |", "|---|---|---|---|---|---|---|"]
    for name, runs in times.items():
        ttft, tps = [r[0] * 1e3 for r in runs], [r[1] for r in runs]
        vs = [f"{med[name] / med[p]:.2f}x" if p in med else "-" for p in ("ct2-float32", "ct2-int8")]
        mb = bytes_of.get(name)
        # at batch 1 each token reads every weight once: tokens/s x bytes is the bandwidth used
        share = f"{100 * med[name] * mb / (floor * 1e9):.0f}%" if mb and batch == 1 else "-"
        lines.append(f"| {engines.label(name)} | {f'{mb / 1e6:.0f}' if mb else '-'} | {min(ttft):.1f} / "
                     f"{statistics.median(ttft):.1f} | {max(tps):.1f} / {statistics.median(tps):.1f} | {vs[0]} "
                     f"| {vs[1]} | {share} |")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (then gptfast and transformers only)")
    ap.add_argument("--engines", nargs="+", default=list(DEFAULT_ENGINES), choices=DEFAULT_ENGINES,
                    help="gptfast dtypes and peers to time")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16], help="prompts per generate call")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (best and median reported)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for every engine (default: torch's)")
    ap.add_argument("--quality-preset", default="mini", choices=sorted(quality.TRAIN_ARGS),
                    help="model trained on The Verdict for the quality gate")
    ap.add_argument("--no-quality", action="store_true", help="skip the quality gate")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, n = resolve_device(args.device), args.new_tokens
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small"), backend="auto").to(device).eval()
    built = engines.build(args.engines, model, device, quality.CACHE / "gpt2-124m-random")
    ref_ids = engines.check_logits_and_reference(model, built, device, prompts(1)[0], n)
    check_fp32(built, model, prompts(1)[0], ref_ids, device)

    floor = ReadFloor(device)
    fns = {"floor": floor}
    for batch in args.batches:
        ps = prompts(batch)
        for name, engine in built.items():
            fns[batch, name] = lambda e=engine, ps=ps: e.run(ps, n)[1:]
    times = interleaved(fns, args.rounds)
    floors = times.pop("floor")
    bytes_of = {name: weight_bytes(model, name) for name in built if name in DTYPES}
    bytes_of.update({p: bytes_of.get(d) for p, d in (("transformers-fp32", "float32"), ("ct2-float32", "float32"),
                                                     ("ct2-int8", "int8")) if d in bytes_of})
    lines = header(args, device, floors, floor.mbytes)
    for batch in args.batches:
        lines += speed_table(batch, {name: times[b, name] for b, name in times if b == batch}, bytes_of,
                             statistics.median(floors)) + [""]
    if not args.no_quality and device.type == "cpu":
        lines += quality_section(args, times)
    lines.append(f"load average at the end: {load_average()}")
    save_report(lines, Path(args.out) / f"generate_{device.type}.md")


def header(args, device, floors, floor_mb):
    cmd = " ".join(["python benchmarks/bench_generate.py", "--batches", *map(str, args.batches), "--rounds",
                    str(args.rounds), "--new-tokens", str(args.new_tokens)]
                   + (["--engines", *args.engines] if list(args.engines) != list(DEFAULT_ENGINES) else [])
                   + (["--threads", str(args.threads)] if args.threads else []) + (["--no-quality"] * args.no_quality))
    return [f"# Generation: GPT-2 124M (random init), greedy, 4-token prompts, {args.new_tokens} new tokens",
            f"device: {device.type} ({device_name(device)}), torch {torch.__version__}, "
            f"{engines.versions()}, date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"commit {commit_id()}", f"command: {cmd}", f"load average at the start: {engines.START_LOAD}",
            f"read floor (Tensor.max over {floor_mb} MB, once per round): best {max(floors):.1f}, median "
            f"{statistics.median(floors):.1f} GB/s; '% of its floor' = tokens/s x weight bytes / median floor",
            f"{args.rounds} interleaved rounds per engine and batch size", ""]


def quality_section(args, times):
    dtypes = [d for d in DTYPES if d in args.engines or d == "float32"]
    _, rows = quality.quality_rows(args.quality_preset, dtypes, [("int4", "float32")] * ("int4" in dtypes))
    lines = quality.quality_table(args.quality_preset, rows) + [""]
    speed = {name: statistics.median(r[1] for r in runs) for (b, name), runs in times.items() if b == min(args.batches)}
    passing = [r["dtype"] for r in rows if r["passes"] and r["dtype"] in speed]
    if passing:
        best = max(passing, key=speed.get)
        lines += [f"Fastest format passing the gate at batch {min(args.batches)} (median): **{best}** "
                  f"({speed[best]:.1f} tokens/s)", ""]
    return lines



if __name__ == "__main__":
    main()
