"""gelu benchmark: bias add + tanh-GELU on the feed-forward hidden layer at GPT-2 124M training
shapes (16 x 1024 tokens, 4 x 768 = 3072 wide, bf16): reference module vs F.gelu(tanh) vs
torch.compile of the reference vs gptfast's fused Triton bias_gelu; forward, backward, both.

    python benchmarks/bench_gelu.py          (same as: pytest benchmarks/bench_gelu.py --benchmark-only)

GB/s counts the bytes the op must move (read x, write y; backward: read x and dy, write dx).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels.gelu import bias_gelu, bias_gelu_ref
from kernel_bench import DTYPE, PASSES, TOKENS, WIDTH, assert_within_2x, compiled, pass_fn, requires_cuda, run

pytestmark = requires_cuda
HIDDEN = 4 * WIDTH
MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # tensors of TOKENS x HIDDEN read or written


def native_bias_gelu(x, bias):
    return F.gelu(x + bias, approximate="tanh")


IMPLS = {"reference": bias_gelu_ref, "native": native_bias_gelu, "compile": bias_gelu_ref,
         "triton": bias_gelu}


def _inputs(dtype=DTYPE):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = 2 * torch.randn(TOKENS, HIDDEN, device="cuda", generator=g, dtype=dtype)
    bias = 0.1 * torch.randn(HIDDEN, device="cuda", generator=g, dtype=dtype)
    dy = torch.randn(TOKENS, HIDDEN, device="cuda", generator=g, dtype=dtype)
    return [x.requires_grad_(), bias.requires_grad_()], (dy,)


@pytest.fixture(scope="module")
def checked():
    """Correctness first, at the benchmark shape: fused vs fp32 truth within 2x of torch's bf16 error."""
    args, (dy,) = _inputs()
    args32 = [a.detach().float().requires_grad_() for a in args]
    outs = {}
    for name, fn, a, g in (("triton", bias_gelu, args, dy), ("reference", bias_gelu_ref, args, dy),
                           ("truth", bias_gelu_ref, args32, dy.float())):
        y = fn(*a)
        outs[name] = [y.detach(), *torch.autograd.grad(y, a, g)]
    for name, ours, low, truth in zip(("y", "dx", "dbias"), outs["triton"], outs["reference"], outs["truth"]):
        assert_within_2x(ours, low, truth, f"bias_gelu {name}")
    return True


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
def test_gelu(benchmark, checked, impl, pass_):
    fn = compiled(IMPLS[impl]) if impl == "compile" else IMPLS[impl]
    args, grads = _inputs()
    run(benchmark, op="gelu", impl=impl, pass_=pass_, fn=pass_fn(fn, args, grads, pass_),
        nbytes=MOVED[pass_] * TOKENS * HIDDEN * DTYPE.itemsize)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
