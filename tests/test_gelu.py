"""gelu / bias_gelu (Triton) against the reference tanh-GELU, forward and gradients."""
import math

import pytest
import torch

from gptfast.kernels.gelu import _bwd_tiles, bias_gelu, bias_gelu_ref, gelu
from kernel_checks import (assert_close, assert_each_within_2x, assert_within_2x, scale_device,
                           scale_params)


def _inputs(shape, dtype, device, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread
    bias = torch.randn(shape[-1], generator=g)
    dy = torch.randn(shape, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, bias, dy)]


def _run(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


# (40, 300): forward, 3 row blocks x 2 column blocks of the 1-D grid; backward (on CPU), 2 row
# groups of 32 rows walked in 2 steps of 16, each group its own dbias partial
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 768), (2, 3072), (1, 2, 1027), (40, 300)])
def test_bias_gelu_fp32_matches_reference(shape, device):
    x, bias, dy = _inputs(shape, torch.float32, device)
    ours = _run(bias_gelu, (x, bias), dy)
    ref = _run(bias_gelu_ref, (x, bias), dy)
    for name, a, r in zip(("y", "dx", "dbias"), ours, ref):
        assert_close(a, r, 1e-5, f"{shape} {name}")


def test_the_40x300_case_walks_two_row_groups_in_two_steps():
    # the CPU tiling the (40, 300) case above is there to cover, still the one it gets
    groups, _, rows_per_prog, block_m, _ = _bwd_tiles(40, 300, torch.device("cpu"))
    assert (groups, rows_per_prog // block_m) == (2, 2), f"{groups} row groups of {rows_per_prog // block_m} steps"


def test_gelu_without_bias_matches_reference(device):
    x, _, dy = _inputs((4, 333), torch.float32, device, seed=1)
    ours = _run(gelu, (x,), dy)
    ref = _run(bias_gelu_ref, (x,), dy)
    for name, a, r in zip(("y", "dx"), ours, ref):
        assert_close(a, r, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (4, 768)])
def test_bias_gelu_low_precision_within_2x_of_torch(shape, dtype, device):
    x, bias, dy = _inputs(shape, dtype, device, seed=2)
    ours = _run(bias_gelu, (x, bias), dy)
    low_ref = _run(bias_gelu_ref, (x, bias), dy)
    truth = _run(bias_gelu_ref, (x.float(), bias.float()), dy.float())
    for name, a, lr, t in zip(("y", "dx", "dbias"), ours, low_ref, truth):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}, expected {dtype}"
        assert_within_2x(a, lr, t, f"{shape} {name}")


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e30), (torch.float16, 6e4), (torch.bfloat16, 1e30)])
def test_gelu_large_inputs_stay_finite_and_exact(dtype, big, device):
    """Large |x|: gelu(x) -> x or 0 and gelu'(x) -> 1 or 0, never NaN/inf (fp64 reference)."""
    mags = torch.tensor([10.0, 30.0, 100.0, 1e3, 1e4, 6e4, 1e10, 1e30])
    mags = mags[mags <= big]
    x = torch.cat([-mags, mags]).to(device=device, dtype=dtype).requires_grad_()
    y = gelu(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all(), f"non-finite: y={y}, dx={dx}"
    x64 = x.detach().double().requires_grad_()
    y64 = bias_gelu_ref(x64)
    (dx64,) = torch.autograd.grad(y64.sum(), x64)
    assert_close(y.double(), y64, 1e-6, "y")
    assert_close(dx.double(), dx64, 1e-6, "dx")


def test_gelu_negative_tail_is_relatively_accurate(device):
    """In the tail gelu(x) is tiny and 1 + tanh cancels even in fp64, so the truth is the
    identical x * sigmoid(2u) in fp64; the kernel keeps relative accuracy there."""
    x = torch.linspace(-9.0, -3.0, 61, device=device)
    y = gelu(x).double()
    x64 = x.double()
    y64 = x64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3))
    assert_close(bias_gelu_ref(x64), y64, 1e-6, "identity check")
    rel = ((y - y64).abs() / y64.abs()).max().item()
    assert rel < 1e-4, f"worst relative error in the negative tail {rel:.3g}"


def test_bias_gelu_rejects_bad_input(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="bias has shape"):
        bias_gelu(x, torch.zeros(7, device=device))
    with pytest.raises(ValueError, match="dtype"):
        gelu(x.double())


@pytest.mark.gpu
def test_gelu_long_1d_input_on_gpu():
    """One row of 2**24 + 3 elements: more 256-wide column tiles than a grid's y dimension takes."""
    x, _, dy = _inputs((2**24 + 3,), torch.float32, "cuda", seed=5)
    ours = _run(gelu, (x,), dy)
    ref = _run(bias_gelu_ref, (x,), dy)
    for name, a, r in zip(("y", "dx"), ours, ref):
        assert_close(a, r, 1e-5, name)


@pytest.mark.parametrize("size,dtype", scale_params())
def test_gelu_at_gpt2_scale(size, dtype, device):
    """bias_gelu and gelu on GPT-2 124M's feed-forward hidden layer (16 x 1024 tokens x 3072):
    output and every gradient within 2x of torch's error in that dtype, against fp64."""
    dev = scale_device(size, device)
    shape = (16 * 1024, 3072) if size == "gpt2" else (5, 3072)
    g = torch.Generator(dev).manual_seed(12)
    x, dy = 3 * torch.randn(shape, device=dev, generator=g), torch.randn(shape, device=dev, generator=g)
    bias = torch.randn(shape[-1], device=dev, generator=g)
    for name, ours_fn, ref_fn, args in (("bias_gelu", bias_gelu, bias_gelu_ref, (x, bias)),
                                        ("gelu", gelu, bias_gelu_ref, (x,))):
        low = [t.to(dtype) for t in args]
        ours = _run(ours_fn, low, dy.to(dtype))
        low_ref = _run(ref_fn, low, dy.to(dtype))
        truth = _run(ref_fn, [t.double() for t in low], dy.double())
        names = [f"{name} {n}" for n in ("y", "dx", "dbias")[:len(ours)]]
        assert_each_within_2x(names, ours, low_ref, truth, dtype)
