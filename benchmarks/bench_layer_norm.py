"""layer_norm benchmark: LayerNorm and the fused residual-add + LayerNorm at GPT-2 124M training
shapes (16 x 1024 tokens, width 768, bf16): reference module vs F.layer_norm vs torch.compile of
the reference vs gptfast's Triton kernel; forward, backward, forward+backward.

    python benchmarks/bench_layer_norm.py          (same as: pytest benchmarks/bench_layer_norm.py --benchmark-only)

GB/s counts the bytes the op must move (read x, write y; backward: read x and dy, write dx).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels.layer_norm import add_layer_norm, layer_norm, layer_norm_ref
from kernel_bench import DTYPE, PASSES, TOKENS, WIDTH, assert_within_2x, compiled, pass_fn, requires_cuda, run

pytestmark = requires_cuda


def native_layer_norm(x, scale, shift):
    return F.layer_norm(x, (x.shape[-1],), scale, shift, 1e-5)


def reference_add_layer_norm(x, residual, scale, shift):
    s = x + residual
    return s, layer_norm_ref(s, scale, shift)


def native_add_layer_norm(x, residual, scale, shift):
    s = x + residual
    return s, native_layer_norm(s, scale, shift)


OPS = {  # op -> implementations, number of row-sized tensors moved per pass
    "layer_norm": ({"reference": layer_norm_ref, "native": native_layer_norm,
                    "compile": layer_norm_ref, "triton": layer_norm}, {"fwd": 2, "bwd": 3, "fwd+bwd": 5}),
    "add_layer_norm": ({"reference": reference_add_layer_norm, "native": native_add_layer_norm,
                        "compile": reference_add_layer_norm, "triton": add_layer_norm},
                       {"fwd": 4, "bwd": 4, "fwd+bwd": 8}),
}


def _inputs(op, dtype=DTYPE):
    g = torch.Generator(device="cuda").manual_seed(0)
    x, residual, dy, dsum = (torch.randn(TOKENS, WIDTH, device="cuda", generator=g, dtype=dtype) for _ in range(4))
    scale = 1 + 0.1 * torch.randn(WIDTH, device="cuda", generator=g, dtype=dtype)
    shift = 0.1 * torch.randn(WIDTH, device="cuda", generator=g, dtype=dtype)
    args = (x, scale, shift) if op == "layer_norm" else (x, residual, scale, shift)
    grads = (dy,) if op == "layer_norm" else (dsum, dy)
    return [a.requires_grad_() for a in args], grads


@pytest.fixture(scope="module")
def checked():
    """Correctness first, at the benchmark shape: fused vs fp32 truth within 2x of torch's bf16 error."""
    for op, (impls, _) in OPS.items():
        args, grads = _inputs(op)
        outs = {}
        for name, fn, a, g in (("triton", impls["triton"], args, grads),
                               ("reference", impls["reference"], args, grads),
                               ("truth", impls["reference"], [t.detach().float().requires_grad_() for t in args],
                                [t.float() for t in grads])):
            out = fn(*a)
            out = out if isinstance(out, tuple) else (out,)
            outs[name] = [o.detach() for o in out] + list(torch.autograd.grad(out, a, g))
        for i, (ours, low, truth) in enumerate(zip(outs["triton"], outs["reference"], outs["truth"])):
            assert_within_2x(ours, low, truth, f"{op} output/grad {i}")
    return True


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", ["reference", "native", "compile", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_layer_norm(benchmark, checked, op, impl, pass_):
    impls, moved = OPS[op]
    fn = compiled(impls[impl]) if impl == "compile" else impls[impl]
    args, grads = _inputs(op)
    run(benchmark, op=op, impl=impl, pass_=pass_, fn=pass_fn(fn, args, grads, pass_),
        nbytes=moved[pass_] * TOKENS * WIDTH * DTYPE.itemsize)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
