"""cross_entropy benchmark at GPT-2 124M training shapes (16 x 1024 tokens, vocab 50257, bf16):
the loss on given logits, and the fused output head + loss (hidden 768 x weight 50257 x 768).
Reference module (fp32 upcast + F.cross_entropy) vs F.cross_entropy in bf16 vs torch.compile
of the reference vs gptfast's Triton kernels; time and peak memory.

    python benchmarks/bench_cross_entropy.py          (same as: pytest benchmarks/bench_cross_entropy.py --benchmark-only)

Our forward already writes the gradient (backward only scales it), so "bwd" is measured for
every implementation alike as (fwd+bwd) - fwd. peak_MiB is the memory a fwd+bwd allocates on
top of its inputs (the logits alone are 16384 x 50257 bf16 = 1571 MiB). GB/s counts reading the
logits (and writing their gradient); linear_cross_entropy reports TFLOP/s of its three matmuls.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels.cross_entropy import cross_entropy, cross_entropy_ref, linear_cross_entropy
from kernel_bench import (DTYPE, PASSES, TOKENS, VOCAB, WIDTH, assert_within_2x, compiled, pass_fn,
                          requires_cuda, run, time_ms)

pytestmark = requires_cuda


def reference_cross_entropy(logits, targets):  # the model's reference loss: fp32 softmax
    return cross_entropy_ref(logits, targets, upcast=True)


def reference_linear_cross_entropy(hidden, weight, targets):  # low-precision matmul, fp32 softmax
    return cross_entropy_ref(F.linear(hidden, weight), targets, upcast=True)


def native_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets)


def native_linear_cross_entropy(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets)


MOVED = {"fwd": 1, "bwd": 1, "fwd+bwd": 2}  # cross_entropy: (TOKENS, VOCAB) tensors read or written

OPS = {
    "cross_entropy": {"reference": reference_cross_entropy, "native": native_cross_entropy,
                      "compile": reference_cross_entropy, "triton": cross_entropy,
                      "triton-inplace": lambda logits, targets: cross_entropy(logits, targets, inplace=True)},
    "linear_cross_entropy": {"reference": reference_linear_cross_entropy, "native": native_linear_cross_entropy,
                             "compile": reference_linear_cross_entropy, "triton": linear_cross_entropy},
}


def _inputs(op, dtype=DTYPE):
    g = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(0, VOCAB, (TOKENS,), device="cuda", generator=g)
    targets[::10] = -100  # some masked tokens, as in instruction fine-tuning
    if op == "cross_entropy":
        args = [2 * torch.randn(TOKENS, VOCAB, device="cuda", generator=g, dtype=dtype)]
    else:
        args = [torch.randn(TOKENS, WIDTH, device="cuda", generator=g, dtype=dtype),
                torch.randn(VOCAB, WIDTH, device="cuda", generator=g, dtype=dtype) / WIDTH**0.5]
    return [a.requires_grad_() for a in args] + [targets]


@pytest.fixture(scope="module")
def checked():
    """Correctness first, at the benchmark shape: ours vs the fp32 truth within 2x of bf16 torch's error."""
    for op, impls in OPS.items():
        *args, targets = _inputs(op)
        outs = {}
        for name, fn, a in (("triton", impls["triton"], args), ("native", impls["native"], args),
                            ("truth", impls["native"], [t.detach().float().requires_grad_() for t in args])):
            loss = fn(*a, targets)
            outs[name] = [loss.detach().float(), *torch.autograd.grad(loss, a)]
            del loss
        for i, (ours, low, truth) in enumerate(zip(outs["triton"], outs["native"], outs["truth"])):
            atol = 1e-4 if i == 0 else 1e-3 * truth.abs().max().item()  # grads are ~1/tokens: scale atol
            assert_within_2x(ours, low, truth, f"{op} loss/grad {i}", atol=atol)
        del outs
    torch.cuda.empty_cache()
    return True


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl,op", [(i, op) for op, impls in OPS.items() for i in impls])
def test_cross_entropy(benchmark, checked, op, impl, pass_):
    fn = compiled(OPS[op][impl]) if impl == "compile" else OPS[op][impl]
    *args, targets = _inputs(op)
    forward = lambda *a: fn(*a, targets)  # noqa: E731
    ms = None
    if pass_ == "bwd":  # forward+backward minus forward (see the module docstring)
        fwd, both = pass_fn(forward, args, (None,), "fwd"), pass_fn(forward, args, (None,), "fwd+bwd")
        both(), fwd()  # compile first
        ms = max(time_ms(both) - time_ms(fwd), 0.0)  # ours: ~0 (the gradient exists after the forward)
    step = pass_fn(forward, args, (None,), "fwd+bwd" if pass_ == "bwd" else pass_)
    M, V = TOKENS, VOCAB
    if op == "cross_entropy":
        cost = dict(nbytes=MOVED[pass_] * M * V * DTYPE.itemsize)
    else:
        cost = dict(flops={"fwd": 2, "bwd": 4, "fwd+bwd": 6}[pass_] * M * WIDTH * V)
    run(benchmark, op=op, impl=impl, pass_=pass_, fn=step, ms=ms, memory=pass_ == "fwd+bwd", **cost,
        note="(fwd+bwd) - fwd" if ms is not None else None)
    del args, step
    torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
