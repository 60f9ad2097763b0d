"""Fine-tuning step speed: examples/s (and peak memory) of one AdamW step of
classification fine-tuning (spam recipe: batch 8 x 120 tokens, 2-class head) and of
instruction fine-tuning (batch 8, padded with the instruction collate), per backend,
training the classic parameter subsets or LoRA adapters (rank 16; every linear layer, but
the vocabulary head for instruction tuning).

    python benchmarks/bench_finetune.py                  # GPT-2 124M on CUDA; "tiny" on CPU
    python benchmarks/bench_finetune.py --preset gpt2-small --steps 3 --device cpu

Correctness first: each workload's loss must agree across backends (same weights, same
batch) before anything is timed. Prints a table with ratios to the reference backend and
writes it to benchmarks/results/finetune-<device>-<date>-<commit>.md. On CPU the Triton
backend would run in Triton's interpreter (a debugging tool), so it is left out there.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import time
from pathlib import Path

import torch

from gptfast import GPTConfig, GPTModel
from gptfast.finetune import RECIPE
from gptfast.finetune.classify import CLASSIFY, make_classifier
from gptfast.finetune.instruct import INSTRUCT, collate
from gptfast.lora import apply_lora, count_trainable
from gptfast.train import TrainConfig, make_optimizer

from common import PeakMemory, commit_id, device_name  # noqa: E402  (benchmarks/ is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


def batches(cfg, batch_size, cls_len, inst_len, seed=0):
    """Synthetic batches (speed does not depend on the text): classification ids + labels;
    instruction inputs + targets from the real collate (lengths from half to full)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, cls_len), generator=g)
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    lengths = torch.randint(inst_len // 2, inst_len, (batch_size,), generator=g).tolist()
    rows = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    return (ids, labels), collate(rows, allowed_max_length=inst_len)


def build(base, task, mode):
    """A fresh copy of `base` set up for `task` ("classify"/"instruct") and `mode`."""
    model = copy.deepcopy(base).train()
    torch.manual_seed(1)  # the same new head and adapters for every backend
    if task == "classify":
        make_classifier(model, 2, train_all=(mode == "all layers"))
    else:
        model.requires_grad_(True)
    if mode == "LoRA r16":  # as the commands do: the instruct vocabulary head stays frozen (fused loss)
        apply_lora(model, rank=16, alpha=16, exclude=["out_head"] if task == "instruct" else None)
    return model


def loss_fn(model, task, batch):
    """The loss the fine-tuning commands train on (their Trainer tasks)."""
    return (CLASSIFY if task == "classify" else INSTRUCT).loss(model, *batch)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model, task, batch, steps, warmup, device):
    """(examples/s over `steps` AdamW steps after `warmup` ones, peak MiB added by all of them)."""
    opt = make_optimizer(model, TrainConfig(**{**RECIPE, "lr": 1e-5}))  # the fine-tuning commands' AdamW
    x, y = (t.to(device) for t in batch)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model, task, (x, y)).backward()
        opt.step()

    with PeakMemory(device) as mem:  # from the first step on, so optimizer state counts
        for _ in range(warmup):
            step()
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        elapsed = time.perf_counter() - t
    return x.shape[0] * steps / elapsed, mem.mib


def check_backends_agree(base, task, batch, backends, device):
    """Same weights, same batch: every backend's loss and gradients match the reference's."""
    results = {}
    for name in backends:
        model = build(base, task, "default").to(device)
        model.backend = name
        model.eval()  # no dropout: the comparison is exact math, not noise
        loss = loss_fn(model, task, tuple(t.to(device) for t in batch))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[name] = (loss.item(), grad.float().cpu())
    ref_loss, ref_grad = results["reference"]
    for name, (loss, grad) in results.items():
        err = (grad - ref_grad).abs().max().item()
        if abs(loss - ref_loss) > 1e-3 * max(1.0, abs(ref_loss)) or err > 1e-3 * max(1.0, ref_grad.abs().max().item()):
            raise SystemExit(f"{task}: backend {name} disagrees with the reference (loss {loss:.6f} vs "
                             f"{ref_loss:.6f}, worst gradient difference {err:.3g}); not timing")
    return ref_loss


def write_report(args, device, preset, steps, inst_len, rows):
    """The results table: printed and written to args.out with device, date and commit."""
    name = device_name(device)
    date = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# Fine-tuning step speed ({preset}, fp32, batch {args.batch_size})", "",
             f"- device: {name}", f"- date: {date:%Y-%m-%d %H:%M} UTC", f"- commit: {commit_id()}",
             f"- torch {torch.__version__}; {steps} timed AdamW steps after {args.warmup} warm-up",
             f"- classify: {args.cls_len} tokens, 2-class head; instruct: up to {inst_len} tokens, collate padding",
             f"- command: python benchmarks/bench_finetune.py --device {device.type} --preset {preset} --steps {steps}"
             + (f" --threads {args.threads}" if args.threads else ""), "",
             "| task | trained | backend | trainable params | examples/s | vs reference | peak memory added (MiB) |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for task, mode, backend, n, speed, ratio, peak in rows:
        lines.append(f"| {task} | {mode} | {backend} | {n:,} | {speed:.1f} | {ratio:.2f}x | "
                     f"{peak:,.0f} |")
    if device.type != "cuda":
        lines += ["", "Peak memory on CPU: growth of resident memory from the first step on. Triton is left "
                  "out on CPU (interpreter only)."]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"finetune-{device.type}-{preset}-{date:%Y%m%d}-{commit_id()}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]), f"\nwrote {path}", sep="\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--preset", default=None, help="model preset (default: gpt2-small on CUDA, tiny on CPU)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cls-len", type=int, default=120, help="classification tokens per message (spam: 120)")
    ap.add_argument("--inst-len", type=int, default=256, help="longest instruction sequence in a batch")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    preset = args.preset or ("gpt2-small" if device.type == "cuda" else "tiny")
    steps = args.steps or (20 if device.type == "cuda" else 5)
    cfg = GPTConfig.from_preset(preset, drop_rate=0.0)
    inst_len = min(args.inst_len, cfg.context_length)
    backends = ["reference", "torch"] + (["triton"] if device.type == "cuda" else [])
    torch.manual_seed(0)
    base = GPTModel(cfg, backend="reference").to(device)
    if "triton" in backends and GPTModel(cfg, backend="triton").to("meta").active_backend != "triton":
        backends.remove("triton")  # the model warned why
    cls_batch, inst_batch = batches(cfg, args.batch_size, args.cls_len, inst_len)
    workloads = [("classify", cls_batch, ["default", "all layers", "LoRA r16"]),
                 ("instruct", inst_batch, ["all layers", "LoRA r16"])]

    rows = []
    for task, batch, modes in workloads:
        loss = check_backends_agree(base, task, batch, backends, device)
        print(f"{task}: losses agree across {', '.join(backends)} ({loss:.4f})")
        for mode in modes:
            ref_speed = None
            for name in backends:
                model = build(base, task, mode)
                model.backend = name
                speed, peak = measure(model, task, batch, steps, args.warmup, device)
                ref_speed = ref_speed or speed
                rows.append((task, mode, name, count_trainable(model), speed, speed / ref_speed, peak))
                print(f"  {task:8s} {mode:10s} {name:9s} {speed:9.1f} ex/s  x{speed / ref_speed:.2f}"
                      + f"  peak {peak:,.0f} MiB")
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    write_report(args, device, preset, steps, inst_len, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
