"""layer_norm / add_layer_norm (Triton) against the reference LayerNorm, forward and gradients."""
import pytest
import torch

from gptfast.kernels.layer_norm import MAX_WIDTH, add_layer_norm, layer_norm, layer_norm_ref
from kernel_checks import (assert_close, assert_each_within_2x, assert_within_2x, scale_device,
                           scale_params)

SHAPES = [(1, 1, 768), (3, 7), (2, 5, 33), (1, 8192), (4, 1), (2, 3, 130)]


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(device)
    scale = (1 + 0.5 * torch.randn(N, generator=g)).to(device)
    shift = (0.3 * torch.randn(N, generator=g)).to(device)
    dy = torch.randn(shape, generator=g).to(device)
    return [t.to(dtype) for t in (x, scale, shift, dy)]


def _run(fn, inputs, dy):
    """Outputs and gradients of fn(*inputs) (fn returns one tensor or a tuple) for cotangents dy."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    grads = torch.autograd.grad(outs, leaves, dy[: len(outs)], allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]  # unused: 0
    return [o.detach() for o in outs] + grads


@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_fp32_matches_reference(shape, device):
    x, scale, shift, dy = _inputs(shape, torch.float32, device)
    ours = _run(layer_norm, (x, scale, shift), (dy,))
    ref = _run(layer_norm_ref, (x, scale, shift), (dy,))
    for name, a, r in zip(("y", "dx", "dscale", "dshift"), ours, ref):
        assert_close(a, r, 1e-5, f"{shape} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 7), (4, 768), (1, 8192)])
def test_layer_norm_low_precision_within_2x_of_torch(shape, dtype, device):
    x, scale, shift, dy = _inputs(shape, dtype, device)
    ours = _run(layer_norm, (x, scale, shift), (dy,))
    low_ref = _run(layer_norm_ref, (x, scale, shift), (dy,))
    truth = _run(layer_norm_ref, [t.float() for t in (x, scale, shift)], (dy.float(),))
    for name, a, lr, t in zip(("y", "dx", "dscale", "dshift"), ours, low_ref, truth):
        assert a.dtype == dtype, f"{name} has dtype {a.dtype}, expected {dtype}"
        assert_within_2x(a, lr, t, f"{shape} {name}")


def _reference_add_layer_norm(x, residual, scale, shift):
    s = x + residual
    return s, layer_norm_ref(s, scale, shift)


@pytest.mark.parametrize("shape,dtype", [((2, 5, 33), torch.float32), ((1, 768), torch.float32),
                                         ((3, 1, 768), torch.bfloat16), ((4, 96), torch.float16)])
def test_add_layer_norm_matches_reference(shape, dtype, device):
    x, scale, shift, dy = _inputs(shape, dtype, device, seed=1)
    residual, ds = _inputs(shape, dtype, device, seed=2)[::3]
    args, cot = (x, residual, scale, shift), (ds, dy)
    ours = _run(add_layer_norm, args, cot)
    names = ("sum", "y", "dx", "dresidual", "dscale", "dshift")
    if dtype == torch.float32:
        for name, a, r in zip(names, ours, _run(_reference_add_layer_norm, args, cot)):
            assert_close(a, r, 1e-5, f"{shape} {name}")
    else:
        low_ref = _run(_reference_add_layer_norm, args, cot)
        truth = _run(_reference_add_layer_norm, [t.float() for t in args], [c.float() for c in cot])
        for name, a, lr, t in zip(names, ours, low_ref, truth):
            assert_within_2x(a, lr, t, f"{shape} {name}")


@pytest.mark.parametrize("used", ["sum", "normed"])
def test_add_layer_norm_one_output_used(used, device):
    """Backward works when only one of the two outputs reaches the loss."""
    x, scale, shift, dy = _inputs((3, 40), torch.float32, device, seed=3)
    residual = _inputs((3, 40), torch.float32, device, seed=4)[0]
    pick = 0 if used == "sum" else 1
    ours = _run(lambda *a: add_layer_norm(*a)[pick], (x, residual, scale, shift), (dy,))
    ref = _run(lambda *a: _reference_add_layer_norm(*a)[pick], (x, residual, scale, shift), (dy,))
    for name, a, r in zip(("out", "dx", "dresidual", "dscale", "dshift"), ours, ref):
        assert_close(a, r, 1e-5, f"{used} {name}")


def test_add_layer_norm_promotes_mixed_dtypes(device):
    """A bf16 branch added to an fp32 residual stream (autocast) gives an fp32 sum, as torch would."""
    x, scale, shift, _ = _inputs((2, 64), torch.float32, device, seed=5)
    s, y = add_layer_norm(x.bfloat16(), x, scale, shift)
    s_ref, y_ref = _reference_add_layer_norm(x.bfloat16(), x, scale, shift)
    assert s.dtype == y.dtype == torch.float32
    assert_close(s, s_ref, 1e-6, "sum")
    assert_close(y, y_ref, 1e-5, "y")


def test_layer_norm_rejects_bad_input(device):
    x = torch.randn(2, 8, device=device)
    with pytest.raises(ValueError, match="scale has shape"):
        layer_norm(x, torch.ones(7, device=device), torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="supported widths"):
        wide = torch.randn(1, MAX_WIDTH + 1, device=device)
        layer_norm(wide, torch.ones(MAX_WIDTH + 1, device=device), torch.zeros(MAX_WIDTH + 1, device=device))
    with pytest.raises(ValueError, match="dtype"):
        layer_norm(x.double(), torch.ones(8, device=device), torch.zeros(8, device=device))
    with pytest.raises(ValueError, match="residual has"):
        add_layer_norm(x, x[:1], torch.ones(8, device=device), torch.zeros(8, device=device))


# ------------------------------------------------------------------- GPT-2 scale (make gpu-check)

@pytest.mark.parametrize("size,dtype", scale_params())
def test_layer_norms_at_gpt2_scale(size, dtype, device):
    """layer_norm and add_layer_norm on GPT-2 124M training activations (16 x 1024 tokens x 768):
    outputs and every gradient within 2x of torch's error in that dtype, against fp64."""
    dev = scale_device(size, device)
    shape = (16 * 1024, 768) if size == "gpt2" else (3, 5, 768)
    g = torch.Generator(dev).manual_seed(11)
    x, residual, dy, ds = (2 * torch.randn(shape, device=dev, generator=g) + 0.5 for _ in range(4))
    scale, shift = 1 + 0.5 * torch.randn(2, 768, device=dev, generator=g)
    for name, ours_fn, ref_fn, args, cot in (
            ("layer_norm", layer_norm, layer_norm_ref, (x, scale, shift), (dy,)),
            ("add_layer_norm", add_layer_norm, _reference_add_layer_norm, (x, residual, scale, shift), (ds, dy))):
        low = [t.to(dtype) for t in args]
        ours = _run(ours_fn, low, [c.to(dtype) for c in cot])
        low_ref = _run(ref_fn, low, [c.to(dtype) for c in cot])
        truth = _run(ref_fn, [t.double() for t in low], [c.double() for c in cot])
        outs = ("y",) if name == "layer_norm" else ("sum", "y")
        grads = tuple(f"d{a}" for a in ("x", "residual", "scale", "shift") if a != "residual" or len(args) == 4)
        assert_each_within_2x([f"{name} {n}" for n in outs + grads], ours, low_ref, truth, dtype)
