"""The quality gate of the generation benchmark: a model trained on The Verdict (once; cached in
benchmarks/.cache/, which git ignores), then for each weight format, against fp32:
validation-split perplexity, max / mean |logit error| over the validation windows, and greedy
agreement (200 tokens from each of 5 prompts: tokens equal to fp32's before the first
divergence). Targets (issue 15): int8 and the float formats within 1% of fp32's perplexity,
int4 within 5%.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gptfast.checkpoint import load_model
from gptfast.data import VERDICT, read_text
from gptfast.generate import Generator
from gptfast.quant import inference_copy
from gptfast.tokenizer import get_tokenizer
from gptfast.train import split_text_batches

from common import agreeing_prefix  # noqa: E402  (benchmarks/ is on sys.path)

CACHE = Path(__file__).resolve().parent / ".cache"
# `make demo`'s run for mini: 20 epochs, the validation loss past its minimum (6.09 at step 100
# of 180, 6.26 at the end; training loss 2.6)
TRAIN_ARGS = {"mini": ["--epochs", "20", "--batch-size", "4", "--lr", "1e-3", "--eval-freq", "10"],
              "book-124m": ["--epochs", "10", "--batch-size", "2", "--lr", "4e-4", "--eval-freq", "10"]}
PROMPTS = ["Every effort moves you", "I had always thought Jack Gisburn", "The sketch of the donkey",
           "Mrs. Gisburn said", "It was not till three years later"]
GATE = {"int4": 0.05}  # allowed perplexity increase over fp32 by weight kind; others 1%


def gate_for(dtype: str) -> float:
    return GATE["int4"] if dtype.startswith("int4") else 0.01


def trained_model(preset: str):
    """The preset trained on The Verdict by `gptfast train` (run once, then read from the cache)."""
    out = CACHE / f"verdict-{preset}"
    if not out.exists():  # trained aside, then moved: an interrupted run leaves no half-trained model
        print(f"training {preset} on The Verdict once for the quality gate (cached in {out})", flush=True)
        part = out.with_name(out.name + ".partial")
        subprocess.run([sys.executable, "-m", "gptfast.cli", "train", "--preset", preset, "--out", str(part),
                        "--sample-tokens", "0", *TRAIN_ARGS[preset]], check=True)
        part.rename(out)
    return load_model(out / "checkpoint.pt", backend="torch")


def validation_windows(model):
    """(inputs, targets) (N, T): the classic 90/10 split's validation windows, stride T."""
    T = model.cfg.context_length
    val = split_text_batches(read_text(VERDICT), T, T, 1, seed=0)[1].dataset
    x, y = zip(*(val[i] for i in range(len(val))))
    return torch.stack(x), torch.stack(y)


@torch.inference_mode()
def measure(model, dtype, windows, ref_logits=None, ref_ids=None, head=None):
    """One table row's numbers for `dtype` (the fp32 row when ref_logits is None)."""
    x, y = windows
    qmodel = inference_copy(model, dtype, "cpu", head=head)
    logits = qmodel(x).float()  # (N, T, V)
    ppl = torch.exp(F.cross_entropy(logits.flatten(0, 1), y.flatten())).item()
    engine = Generator(qmodel, dtype=None)
    tok = get_tokenizer()
    ids = [engine.generate_ids([tok.encode(p)], 200)[0] for p in PROMPTS]
    row = {"dtype": dtype + (f" (head {head})" if head else ""), "ppl": ppl, "ids": ids}
    if ref_logits is not None:
        err = (logits - ref_logits).abs()
        row.update(max_err=err.max().item(), mean_err=err.mean().item(),
                   agree=sum(agreeing_prefix(o, r) for o, r in zip(ids, ref_ids)), logits=None)
    else:
        row["logits"] = logits
    return row


def quality_rows(preset: str, dtypes, head_variants=()):
    """Rows for fp32 and each dtype (and (dtype, head) pairs), with the gate's verdict."""
    model = trained_model(preset)
    windows = validation_windows(model)
    ref = measure(model, "float32", windows)
    rows = [ref]
    for dtype, head in [(d, None) for d in dtypes if d != "float32"] + list(head_variants):
        row = measure(model, dtype, windows, ref["logits"], ref["ids"], head)
        row["ratio"] = row["ppl"] / ref["ppl"]
        row["passes"] = row["ratio"] - 1 <= gate_for(dtype)
        rows.append(row)
    ref.update(max_err=0.0, mean_err=0.0, agree=sum(map(len, ref["ids"])), ratio=1.0, passes=True)
    return model, rows


def quality_table(preset: str, rows) -> list[str]:
    n = sum(map(len, rows[0]["ids"]))
    lines = [f"## Quality gate: {preset} trained on The Verdict, validation split, fp32 activations",
             "", "| weights | val perplexity | vs fp32 | max abs logit error | mean abs logit error "
             f"| greedy tokens equal to fp32 (of {n}) | gate |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gate = "reference" if r["dtype"] == "float32" else \
            f"{'pass' if r['passes'] else 'FAIL'} (<= +{100 * gate_for(r['dtype']):.0f}%)"
        lines.append(f"| {r['dtype']} | {r['ppl']:.2f} | {100 * (r['ratio'] - 1):+.2f}% | {r['max_err']:.3f} | "
                     f"{r['mean_err']:.4f} | {r['agree']} | {gate} |")
    return lines
