"""Training-step throughput: the `reference` backend vs the `torch` backend (and `triton` and
torch.compile on CUDA), fp32 and bf16 autocast, side by side in one run.

    pytest benchmarks/bench_train.py --benchmark-only          # table at the end
    GPTFAST_BENCH_PRESET=book-124m GPTFAST_BENCH_T=256 GPTFAST_BENCH_B=2 pytest ...   # other sizes

Default shape: on CUDA GPT-2 124M (`gpt2-small`), batch 16 x 1024; on CPU `book-124m`, batch
2 x 256 (the classic run). Each step is forward, backward
and a fused-AdamW update. Correctness first: every variant's loss on the first batch must
match the reference backend's before it is timed. Peak memory (from the first step on, so the
optimizer state counts): CUDA's allocator peak, or on CPU the growth of resident memory.
benchmarks/conftest.py prints the table at the end.
"""
from __future__ import annotations

import os

import pytest
import torch
from common import PeakMemory, device_name

from gptfast import GPTConfig, GPTModel
from gptfast.train import TrainConfig, autocast, make_optimizer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
PRESET = os.environ.get("GPTFAST_BENCH_PRESET", "gpt2-small" if ON_GPU else "book-124m")
T = int(os.environ.get("GPTFAST_BENCH_T", "1024" if ON_GPU else "256"))
B = int(os.environ.get("GPTFAST_BENCH_B", "16" if ON_GPU else "2"))
ROUNDS = int(os.environ.get("GPTFAST_BENCH_ROUNDS", "3"))
RESULTS: list[dict] = []

VARIANTS = [("reference", "fp32", False), ("torch", "fp32", False), ("reference", "bf16", False),
            ("torch", "bf16", False), ("triton", "bf16", False), ("torch", "bf16", True)]


def inputs():
    """(config, reference state, x, y): one batch of random tokens and a model's initial state."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(PRESET, context_length=T, drop_rate=0.0)
    state = GPTModel(cfg, backend="reference").state_dict()
    x = torch.randint(cfg.vocab_size, (B, T))
    return cfg, state, x, x.roll(-1, 1)


@pytest.fixture(scope="module")
def setup():
    return inputs()


def make_step(cfg, state, x, y, backend, dtype, compiled):
    model = GPTModel(cfg, backend=backend).to(DEVICE)
    model.load_state_dict(state)
    runner = torch.compile(model) if compiled else model
    opt = make_optimizer(model, TrainConfig())
    x, y = x.to(DEVICE), y.to(DEVICE)

    def step():
        with autocast(DEVICE, dtype):
            loss = runner(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return model, step


@pytest.mark.parametrize("backend, dtype, compiled", VARIANTS,
                         ids=[f"{b}-{d}{'-compile' if c else ''}" for b, d, c in VARIANTS])
def test_train_step(benchmark, setup, backend, dtype, compiled):
    if (backend == "triton" or compiled) and not ON_GPU:
        pytest.skip("the triton backend and torch.compile are timed on CUDA only (on CPU: interpreter, no compiler)")
    cfg, state, x, y = setup
    model, step = make_step(cfg, state, x, y, backend, dtype, compiled)
    with torch.no_grad():  # correctness first: the loss against the reference backend in fp32
        ref = GPTModel(cfg, backend="reference").to(DEVICE)
        ref.load_state_dict(state)
        xd, yd = x.to(DEVICE), y.to(DEVICE)
        exact = ref(xd, targets=yd).item()
        with autocast(DEVICE, dtype):
            ref_low = ref(xd, targets=yd).item()  # the reference's own error in this dtype
            got = model(xd, targets=yd).item()
        del ref
    assert abs(got - exact) <= 2 * abs(ref_low - exact) + 1e-4, (backend, dtype, got, exact, ref_low)
    with PeakMemory(DEVICE) as mem:  # from the first step on, so optimizer state counts
        step()  # warm-up: allocator, autotuning, compilation
        benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    peak = mem.mib
    seconds = benchmark.stats.stats.median
    row = {"backend": backend + ("+compile" if compiled else ""), "dtype": dtype, "ms": seconds * 1e3,
           "tokens_per_s": B * T / seconds, "peak_mib": peak}
    benchmark.extra_info.update(row)
    RESULTS.append(row)


def table() -> str:
    base = next((r["tokens_per_s"] for r in RESULTS if r["backend"] == "reference" and r["dtype"] == "fp32"), None)
    lines = [f"training step, {PRESET}, batch {B} x {T}, {DEVICE} "
             f"({device_name(DEVICE)})",
             f"{'backend':<18}{'dtype':<7}{'ms/step':>10}{'tokens/s':>11}{'vs ref fp32':>13}{'peak MiB':>10}"]
    for r in RESULTS:
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        lines.append(f"{r['backend']:<18}{r['dtype']:<7}{r['ms']:>10.1f}{r['tokens_per_s']:>11.0f}{ratio:>13}"
                     f"{r['peak_mib']:>10.0f}")
    return "\n".join(lines)
