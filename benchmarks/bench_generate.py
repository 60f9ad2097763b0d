"""Generation speed, GPT-2 124M (random init, same weights everywhere), batch 1, greedy,
a 4-token prompt: the classic no-cache `generate`, gptfast's `Generator` (fp32 and reduced
precision) and Hugging Face transformers' `GPT2LMHeadModel.generate`, side by side.

    python benchmarks/bench_generate.py [--new-tokens 200] [--no-cache-tokens 200] [--device cuda]

Correctness first: the two models' logits agree, and every fp32 engine's greedy tokens equal
gptfast's (a divergence is accepted only at a near tie, reported). Times are medians over
--repeats runs (CUDA: synchronised). Prints a table (time to first token, tokens/s, ratios)
and writes it to benchmarks/results/generate_<device>.md with device, date and commit.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from gptfast import GPTConfig, GPTModel
from gptfast.backends import resolve_device
from gptfast.generate import Generator, generate
from gptfast.quant import int8_supported
from gptfast.weights import to_hf_state_dict

from common import commit_id, device_name, save_report  # noqa: E402  (benchmarks/ is on sys.path)

PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you"


def to_transformers(model: GPTModel):
    """A GPT2LMHeadModel holding `model`'s weights (gptfast's own export mapping)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    state, config = to_hf_state_dict(model)
    hf = GPT2LMHeadModel(GPT2Config(**config))
    missing, unexpected = hf.load_state_dict(state, strict=False)
    # a tied head is left out of the export: transformers ties lm_head to wte itself
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.eval()


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def median_runs(run, repeats):
    """(ids, median time to first token, median tokens/s) over `repeats` calls of run() ->
    (ids, ttft, tokens/s); every run must produce the same ids."""
    runs = [run() for _ in range(repeats)]
    assert all(r[0] == runs[0][0] for r in runs), "greedy output changed between identical runs"
    return runs[0][0], statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


def bench_ours(model, dtype, device, n, repeats):
    engine = Generator(model, dtype=dtype, device=device)
    engine.generate_ids([PROMPT], 8)  # warm-up (and CUDA-graph capture for batch 1)

    def run():  # the engine's own clock: it reads each token back to the host, so it is synchronised
        ids = engine.generate_ids([PROMPT], n)[0]
        return ids, engine.stats["time_to_first_token_s"], n / engine.stats["total_s"]
    return median_runs(run, repeats)


def bench_no_cache(model, device, n):
    idx = torch.tensor([PROMPT], device=device)
    generate(model, idx, 2, model.cfg.context_length, use_cache=False)  # warm-up
    ttft, _ = timed(lambda: generate(model, idx, 1, model.cfg.context_length, use_cache=False))
    total, out = timed(lambda: generate(model, idx, n, model.cfg.context_length, use_cache=False))
    return out[0, len(PROMPT):].tolist(), ttft, n / total


def bench_transformers(hf, device, n, repeats):
    idx = torch.tensor([PROMPT], device=device)
    kw = dict(do_sample=False, use_cache=True, pad_token_id=0, attention_mask=torch.ones_like(idx))
    with torch.inference_mode():
        hf.generate(idx, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up

        def run():
            ttft, _ = timed(lambda: hf.generate(idx, max_new_tokens=1, **kw))
            total, out = timed(lambda: hf.generate(idx, max_new_tokens=n, min_new_tokens=n, **kw))
            return out[0, len(PROMPT):].tolist(), ttft, n / total
        return median_runs(run, repeats)


def check_greedy(model, ids, ref, label, device):
    """fp32 greedy tokens must equal `ref`, except after a near tie: at the first divergence
    the fp32 top-2 logit gap must be within 1e-4 of the logit scale (fp32 engines differ by
    summation order only, ~1e-6 relative). Returns 'k/n' tokens equal, for the table."""
    n = min(len(ids), len(ref))
    k = next((i for i in range(n) if ids[i] != ref[i]), n)
    if k < n:
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT + ref[:k]], device=device))[0, -1].float()
        top2 = logits.topk(2).values
        gap, scale = (top2[0] - top2[1]).item(), logits.abs().max().item()
        assert gap <= 1e-4 * scale, f"{label}: greedy tokens differ at step {k}, top-2 gap {gap:.3g} (no tie)"
        print(f"{label}: greedy tokens diverge at step {k}, a near tie (top-2 gap {gap:.2e})")
    return f"{k}/{n}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--no-cache-tokens", type=int, default=200, help="fewer keeps the slow baseline short; 0 skips it")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16", "float16", "int8"], default=None,
                    help="engines' dtypes (default: all; gptfast fp32 always runs: the greedy reference)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per engine (median reported)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, n, reps = resolve_device(args.device), args.new_tokens, args.repeats
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small"), backend="auto").to(device).eval()
    hf = to_transformers(model).to(device)
    reduced = "bfloat16" if device.type == "cuda" else "float16"  # Generator's dtype="auto"

    with torch.inference_mode():  # same weights: the two models' logits agree
        idx = torch.tensor([PROMPT], device=device)
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    print(f"max |logits(gptfast) - logits(transformers)| = {diff:.2e} (fp32)")
    assert diff < 1e-3, diff

    wanted = set(args.dtypes or ["float32", "bfloat16", "float16", "int8"])
    rows = {}  # label -> (ids, ttft, tokens/s, dtype)
    if args.no_cache_tokens:
        rows["classic generate, no cache (fp32)"] = (*bench_no_cache(model, device, args.no_cache_tokens), "float32")
    if "float32" in wanted:
        rows["transformers generate (fp32)"] = (*bench_transformers(hf, device, n, reps), "float32")
    if device.type == "cuda" and "bfloat16" in wanted:
        rows["transformers generate (bf16)"] = (*bench_transformers(hf.to(torch.bfloat16), device, n, reps),
                                                "bfloat16")
    rows["gptfast Generator (fp32)"] = (*bench_ours(model, "float32", device, n, reps), "float32")
    for dtype in dict.fromkeys([reduced, "bfloat16", "float16"] + ["int8"] * int8_supported(device)):
        if dtype not in wanted:
            continue
        label = f"gptfast Generator ({dtype}{', the default' if dtype == reduced else ''})"
        rows[label] = (*bench_ours(model, dtype, device, n, reps), dtype)

    ref = rows["gptfast Generator (fp32)"][0]
    agree = {label: (check_greedy(model, ids, ref, label, device) if dtype == "float32" else
                     f"{next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ids))}/{len(ids)}")
             for label, (ids, _, _, dtype) in rows.items()}
    base_nc = rows["classic generate, no cache (fp32)"][2] if args.no_cache_tokens else None
    base_hf = {d: r[2] for label, r in rows.items() if label.startswith("transformers") for d in [r[3]]}
    threads = f" --threads {args.threads}" if args.threads else ""
    lines = [f"# Generation, GPT-2 124M random init, batch 1, greedy, 4-token prompt, {n} new tokens",
             f"device: {device.type} ({device_name(device)}), torch {torch.__version__}, "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}",
             f"command: python benchmarks/bench_generate.py --device {device} --new-tokens {n} "
             f"--no-cache-tokens {args.no_cache_tokens} --repeats {reps}{threads}"
             + (f" --dtypes {' '.join(args.dtypes)}" if args.dtypes else ""),
             f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             "| engine | tokens | time to first token (ms) | tokens/s | vs no-cache | vs transformers fp32 "
             "| vs transformers, same dtype | greedy tokens equal to gptfast fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for label, (ids, ttft, tps, dtype) in rows.items():
        same = f"{tps / base_hf[dtype]:.2f}x" if dtype in base_hf else "-"
        lines.append(f"| {label} | {len(ids)} | {1000 * ttft:.1f} | {tps:.1f} | {tps / base_nc:.1f}x "
                     f"| {tps / base_hf['float32']:.2f}x | {same} | {agree[label]} |")
    save_report(lines, Path(args.out) / f"generate_{device.type}.md")


if __name__ == "__main__":
    main()
