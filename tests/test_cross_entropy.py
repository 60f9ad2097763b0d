"""cross_entropy / linear_cross_entropy (Triton) against F.cross_entropy (and F.linear), loss and grads."""
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels.cross_entropy import (cross_entropy, cross_entropy_ref, linear_cross_entropy,
                                           linear_cross_entropy_ref)
from kernel_checks import (SCALE_ATOL, assert_close, assert_each_within_2x, assert_within_2x, scale_device,
                           scale_params)


def _inputs(shape, V, dtype, device, seed=0, ignore_every=3, spread=2.0):
    """Logits shape + (V,), targets shape with every `ignore_every`-th one set to -100."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, V, generator=g) * spread).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, shape, generator=g)
    if ignore_every:
        targets.view(-1)[::ignore_every] = -100
    return logits, targets.to(device)


def _run(fn, leaves, *args, grad_scale=1.0, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves, *args, **kw)
    grads = torch.autograd.grad(loss * grad_scale, leaves)
    return [loss.detach(), *grads]


@pytest.mark.parametrize("shape,V", [((1,), 2), ((5,), 7), ((3,), 50257), ((2, 4), 33), ((17,), 1000)])
def test_cross_entropy_fp32_matches_torch(shape, V, device):
    logits, targets = _inputs(shape, V, torch.float32, device, ignore_every=3 if shape != (1,) else 0)
    ours = _run(cross_entropy, [logits], targets, grad_scale=2.5)
    ref = _run(cross_entropy_ref, [logits], targets, grad_scale=2.5)
    assert ours[0].dtype == torch.float32
    for name, a, r in zip(("loss", "dlogits"), ours, ref):
        assert_close(a, r, 1e-5, f"{shape}x{V} {name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,V", [((6,), 257), ((2,), 50257)])
def test_cross_entropy_low_precision_within_2x_of_torch(shape, V, dtype, device):
    logits, targets = _inputs(shape, V, dtype, device, seed=1)
    ours = _run(cross_entropy, [logits], targets)
    low_ref = _run(cross_entropy_ref, [logits], targets)
    truth = _run(cross_entropy_ref, [logits.float()], targets)
    assert ours[1].dtype == dtype
    # loss: fp32 in both; dlogits: one ulp of atol, as the interpreter truncates fp32 -> bf16 stores
    assert_within_2x(ours[0], low_ref[0].float(), truth[0], f"{shape}x{V} loss", atol=1e-4)
    assert_within_2x(ours[1], low_ref[1], truth[1], f"{shape}x{V} dlogits")


def test_cross_entropy_fp16_under_a_grad_scaler(device):
    """fp16 training multiplies the fp32 loss by a GradScaler's 65536 (inf in fp16), and
    softmax / n_valid can fall below fp16's subnormals: each gradient element must be the
    fp32 truth to fp16 rounding (relative 2**-10: two roundings; absolute: 2 subnormal steps)."""
    logits, targets = _inputs((8,), 257, torch.float16, device, seed=5, ignore_every=4, spread=4.0)
    for grad_scale in (1.0, 65536.0):
        dlogits = _run(cross_entropy, [logits], targets, grad_scale=grad_scale)[1]
        truth = _run(cross_entropy_ref, [logits.float()], targets, grad_scale=grad_scale)[1].double()
        assert dlogits.dtype == torch.float16
        err = (dlogits.double() - truth).abs() - (2**-10 * truth.abs() + 2 * 2**-24)
        i = int(err.argmax())
        assert err.max() <= 0, (f"grad_scale {grad_scale}: dlogits {dlogits.view(-1)[i].item():.6g} vs "
                                f"truth {truth.view(-1)[i].item():.6g} at flat index {i}")


def test_cross_entropy_all_ignored_is_zero_not_nan(device):
    logits, _ = _inputs((4,), 11, torch.float32, device)
    targets = torch.full((4,), -100, device=device)
    loss, dlogits = _run(cross_entropy, [logits], targets)
    assert loss.item() == 0.0, f"loss {loss.item()} with every target ignored"
    assert torch.isfinite(dlogits).all() and (dlogits == 0).all(), "gradient must be all zero"
    assert torch.isnan(cross_entropy_ref(logits, targets)), "F.cross_entropy's NaN here is why ours defines 0"


def test_cross_entropy_custom_ignore_index(device):
    logits, targets = _inputs((9,), 13, torch.float32, device, seed=2, ignore_every=0)
    targets[::2] = 5  # ignore class 5
    ours = _run(cross_entropy, [logits], targets, ignore_index=5)
    ref = _run(cross_entropy_ref, [logits], targets, ignore_index=5)
    for name, a, r in zip(("loss", "dlogits"), ours, ref):
        assert_close(a, r, 1e-5, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_extreme_logits(dtype, device):
    """Logits of +-1e4: the online softmax stays finite; fp64 F.cross_entropy is the truth."""
    logits, targets = _inputs((6,), 300, torch.float32, device, seed=3, spread=1.0)
    logits = (torch.sign(logits) * 1e4).to(dtype)
    logits[1, 7] = 0.0
    targets[1] = 7  # a target far below the max: loss ~1e4
    ours = _run(cross_entropy, [logits], targets)
    truth = _run(cross_entropy_ref, [logits.double()], targets)
    assert_close(ours[0].double(), truth[0], 1e-6, "loss")
    assert_close(ours[1].double(), truth[1], 1e-2 if dtype == torch.bfloat16 else 1e-6, "dlogits")


def test_cross_entropy_inplace_overwrites_logits_with_gradient(device):
    logits, targets = _inputs((5,), 50, torch.float32, device, seed=4)
    ref_loss, ref_grad = _run(cross_entropy_ref, [logits], targets)
    work = logits.clone().requires_grad_()
    buf = work.detach()  # same storage: receives the gradient during the forward
    loss = cross_entropy(work, targets, inplace=True)
    assert_close(buf, ref_grad, 1e-5, "logits buffer after forward")
    (grad,) = torch.autograd.grad(loss, work)
    assert_close(loss.detach(), ref_loss, 1e-5, "loss")
    assert_close(grad, ref_grad, 1e-5, "dlogits")


def test_cross_entropy_backward_twice_is_an_error(device):
    """Backward scales the stored gradient in place, so a second backward must refuse, not be wrong."""
    logits, targets = _inputs((3,), 10, torch.float32, device)
    logits.requires_grad_()
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_rejects_bad_targets(device):
    logits, targets = _inputs((4,), 10, torch.float32, device)
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):  # CPU tensors: checked at once
        cross_entropy(logits.cpu(), torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="targets have 3 elements"):
        cross_entropy(logits, targets[:3])
    with pytest.raises(ValueError, match="targets have dtype"):
        cross_entropy(logits, targets.float())


def _linear_inputs(M, H, V, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(M, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (M,), generator=g)
    targets[::4] = -100
    return hidden, weight, targets.to(device)


@pytest.mark.parametrize("M,H,V", [(37, 16, 101), (6, 32, 50257), (1, 8, 5), (7, 16, 128)])  # 128: no padding
def test_linear_cross_entropy_fp32_matches_torch(M, H, V, device):
    hidden, weight, targets = _linear_inputs(M, H, V, torch.float32, device)
    if M == 1:
        targets[:] = 3
    ours = _run(linear_cross_entropy, [hidden, weight], targets, grad_scale=0.5)
    ref = _run(linear_cross_entropy_ref, [hidden, weight], targets, grad_scale=0.5)
    for name, a, r in zip(("loss", "dhidden", "dweight"), ours, ref):
        assert_close(a, r, 1e-5, f"{M}x{H}x{V} {name}")


def test_linear_cross_entropy_bf16_within_2x_of_torch(device):
    hidden, weight, targets = _linear_inputs(40, 32, 1000, torch.bfloat16, device, seed=1)
    ours = _run(linear_cross_entropy, [hidden, weight], targets)
    low_ref = _run(linear_cross_entropy_ref, [hidden, weight], targets)
    truth = _run(linear_cross_entropy_ref, [hidden.float(), weight.float()], targets)
    for name, a, lr, t in zip(("loss", "dhidden", "dweight"), ours, low_ref, truth):
        assert_within_2x(a.float(), lr.float(), t, name, atol=1e-4)


def test_linear_cross_entropy_fp16_under_a_grad_scaler(device):
    """fp16 autocast training: the fp32 loss times a GradScaler's 65536. PyTorch's path in that
    dtype is fp16 logits, fp32 loss, fp16 linear backward (the reference backend's)."""
    hidden, weight, targets = _linear_inputs(24, 16, 300, torch.float16, device, seed=4)
    ours = _run(linear_cross_entropy, [hidden, weight], targets, grad_scale=65536.0)
    low_ref = _run(lambda h, w, t: cross_entropy_ref(F.linear(h, w).float(), t), [hidden, weight], targets,
                   grad_scale=65536.0)
    truth = _run(linear_cross_entropy_ref, [hidden.float(), weight.float()], targets, grad_scale=65536.0)
    for name, a, lr, t in zip(("loss", "dhidden", "dweight"), ours, low_ref, truth):
        assert_within_2x(a.float(), lr.float(), t, name, atol=1e-3 * t.abs().max().item())


def test_linear_cross_entropy_leading_dims_and_all_ignored(device):
    hidden, weight, targets = _linear_inputs(12, 16, 29, torch.float32, device, seed=2)
    h3, t3 = hidden.view(2, 6, 16), targets.view(2, 6)  # (B, T, H), (B, T)
    ours = _run(linear_cross_entropy, [h3, weight], t3)
    ref = _run(linear_cross_entropy_ref, [h3, weight], t3)
    for name, a, r in zip(("loss", "dhidden", "dweight"), ours, ref):
        assert_close(a, r, 1e-5, name)
    loss, dh, dw = _run(linear_cross_entropy, [h3, weight], torch.full_like(t3, -100))
    assert loss.item() == 0.0 and (dh == 0).all() and (dw == 0).all(), "all ignored: loss and grads 0"


def test_linear_cross_entropy_without_grad(device):
    hidden, weight, targets = _linear_inputs(10, 16, 50, torch.float32, device, seed=3)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets)
    assert_close(loss, linear_cross_entropy_ref(hidden, weight, targets), 1e-5, "loss")
    with pytest.raises(ValueError, match="weight has shape"):
        linear_cross_entropy(hidden, weight.T, targets)


def _peak_bytes(fn):
    """Peak CUDA memory fn allocates on top of what is allocated already."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
def test_cross_entropy_memory_a_third_of_torch():
    """GPT-2 training shape (16 x 1024 tokens, vocab 50257, bf16): in-place fused cross-entropy
    fwd+bwd peaks at <= 1/3 of F.cross_entropy's, counting the logits themselves."""
    logits, targets = _inputs((16 * 1024,), 50257, torch.bfloat16, "cuda", spread=1.0)
    size = logits.numel() * logits.element_size()

    def run(fn):
        x = logits.clone().requires_grad_()
        return size + _peak_bytes(lambda: torch.autograd.grad(fn(x), x))

    ours = run(lambda x: cross_entropy(x, targets, inplace=True))
    torch_peak = run(lambda x: F.cross_entropy(x, targets))
    assert ours <= torch_peak / 3, f"peak {ours / 2**20:.0f} MiB vs F.cross_entropy {torch_peak / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_linear_cross_entropy_memory_a_quarter_of_torch():
    """GPT-2 124M output head + loss (16 x 1024 tokens, 768 -> 50257, bf16): the chunked fused
    version peaks at <= 1/4 of F.linear + F.cross_entropy, counting hidden and weight."""
    hidden, weight, targets = _linear_inputs(16 * 1024, 768, 50257, torch.bfloat16, "cuda")
    size = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        return size + _peak_bytes(lambda: torch.autograd.grad(fn(h, w, targets), (h, w)))

    ours = run(linear_cross_entropy)
    torch_peak = run(lambda h, w, t: F.cross_entropy(F.linear(h, w), t))
    assert ours <= torch_peak / 4, f"peak {ours / 2**20:.0f} MiB vs torch {torch_peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_on_padded_rows(dtype, device):
    """Logits sliced from a wider head (pad_vocab: rows of 64, kernel rows 16-aligned): same
    loss and gradient as on contiguous rows, and the caller's padding columns are left alone."""
    full, targets = _inputs((6,), 64, dtype, device, seed=7)
    full.requires_grad_()
    V = 57  # rows padded to 64 (a multiple of 16: the kernel reads up to 64 but counts 57)
    loss = cross_entropy(full[:, :V], targets)
    (grad,) = torch.autograd.grad(loss, full)
    ref_loss, ref_grad = _run(cross_entropy_ref, [full.detach()[:, :V].float()], targets)
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert_close(grad[:, :V].float(), ref_grad, 1e-5 if dtype == torch.float32 else 1e-2, "dlogits")
    assert (grad[:, V:] == 0).all(), "padding columns must get no gradient"


def test_cross_entropy_padding_is_never_counted(device):
    """The padding of a wider buffer may hold anything (here +inf and NaN): never counted."""
    full, targets = _inputs((4,), 48, torch.float32, device, seed=8)
    full[:, 40:44], full[:, 44:] = float("inf"), float("nan")
    ours = _run(lambda x, t: cross_entropy(x[:, :40], t), [full], targets)
    ref = _run(lambda x, t: cross_entropy_ref(x[:, :40], t), [full], targets)
    for name, a, r in zip(("loss", "dlogits"), ours, ref):
        assert_close(a[..., :40] if a.dim() else a, r[..., :40] if r.dim() else r, 1e-5, name)


def test_cross_entropy_kernel_gives_nan_for_a_target_out_of_range(device):
    """On CUDA the range check runs on the device (no host sync); the kernel itself must then
    never read outside the row for such a target: its loss is NaN, the other rows are exact."""
    from gptfast.kernels.cross_entropy import _launch
    logits, _ = _inputs((3,), 20, torch.float32, device, seed=9)
    targets = torch.tensor([4, 20, -7], device=device)  # 20 and -7 lie outside [0, 20)
    loss_rows = torch.zeros(3, device=device)
    _launch(logits, logits, targets, loss_rows, torch.tensor(3, device=device), -100, False, None)
    assert torch.isnan(loss_rows[1:]).all(), f"out-of-range targets gave losses {loss_rows[1:].tolist()}"
    want = F.cross_entropy(logits[:1], targets[:1], reduction="none")
    assert_close(loss_rows[:1], want, 1e-5, "in-range row")


@pytest.mark.gpu
def test_cross_entropy_bad_target_fails_on_the_device():
    """CUDA: no host sync, so a target out of range trips a device-side assertion (which ends
    the CUDA context, hence a subprocess), as F.cross_entropy's own check does."""
    code = ("import torch; from gptfast.kernels.cross_entropy import cross_entropy; "
            "x = torch.randn(4, 10, device='cuda'); "
            "cross_entropy(x, torch.tensor([0, 1, 10, 2], device='cuda')); torch.cuda.synchronize()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "device-side assert" in proc.stderr, (
        f"exit {proc.returncode}, stderr:\n{proc.stderr[-2000:]}")


# ------------------------------------------------------------------- GPT-2 scale (make gpu-check)

def _device_targets(M, V, device, seed):
    targets = torch.randint(0, V, (M,), device=device, generator=torch.Generator(device).manual_seed(seed))
    targets[::7] = -100
    return targets


def _grad(fn, logits, targets):
    """(loss, dlogits) of fn without copying the logits (none of the functions writes them)."""
    x = logits.detach().requires_grad_()
    loss = fn(x, targets)
    return loss.detach(), torch.autograd.grad(loss, x)[0]


def _fp64_errors(logits, targets, results, rows=2048):
    """Worst |loss - truth| and |dlogits - truth| of each (loss, dlogits) in results, the true loss
    and the truth's largest |dlogits|: F.cross_entropy in fp64, computed a few thousand rows at a time
    (16 x 1024 x 50257 fp64 would be 6.6 GB a tensor)."""
    n_valid = (targets != -100).sum()
    loss, grad_err, scale = 0.0, [0.0] * len(results), 0.0
    for start in range(0, logits.shape[0], rows):
        x = logits[start:start + rows].double().requires_grad_()
        part = F.cross_entropy(x, targets[start:start + rows], reduction="sum") / n_valid
        (truth,) = torch.autograd.grad(part, x)
        loss += part.item()
        scale = max(scale, truth.abs().max().item())
        for i, (_, g) in enumerate(results):
            grad_err[i] = max(grad_err[i], (g[start:start + rows].double() - truth).abs().max().item())
    return [abs(r[0].item() - loss) for r in results], grad_err, loss, scale


@pytest.mark.parametrize("rows", ["contiguous", "padded"])
@pytest.mark.parametrize("size,dtype", scale_params())
def test_cross_entropy_at_gpt2_scale(size, dtype, rows, device):
    """16 x 1024 tokens over GPT-2's 50257 logits, as a plain head gives them (contiguous rows)
    and as a pad_vocab head does (rows 50304 apart): loss and dlogits within 2x of
    F.cross_entropy's error in that dtype, against fp64."""
    dev = scale_device(size, device)
    M, V = (16 * 1024, 50257) if size == "gpt2" else (6, 257)
    width = -(-V // 64) * 64 if rows == "padded" else V
    full = 2 * torch.randn(M, width, device=dev, generator=torch.Generator(dev).manual_seed(31))
    logits, targets = full.to(dtype)[:, :V], _device_targets(M, V, dev, 32)
    del full
    results = [_grad(cross_entropy, logits, targets), _grad(cross_entropy_ref, logits, targets)]  # ours, torch's
    (loss_ours, loss_low), (grad_ours, grad_low), loss, scale = _fp64_errors(logits, targets, results)
    atol = SCALE_ATOL[dtype]
    assert loss_ours <= 2 * loss_low + atol * loss, (f"loss error {loss_ours:.3g} > 2 x {loss_low:.3g} (torch) + "
                                                     f"{atol} x {loss:.3g}")
    assert grad_ours <= 2 * grad_low + atol * scale, (f"dlogits error {grad_ours:.3g} > 2 x {grad_low:.3g} "
                                                      f"(torch) + {atol} x {scale:.3g}")


@pytest.mark.parametrize("size,dtype", scale_params())
def test_linear_cross_entropy_at_gpt2_scale(size, dtype, device):
    """GPT-2 124M output head + loss (16 x 1024 tokens, 768 -> 50257): loss, dhidden, dweight
    within 2x of F.linear + F.cross_entropy's error in that dtype, against fp64."""
    dev = scale_device(size, device)
    M, H, V = (16 * 1024, 768, 50257) if size == "gpt2" else (40, 32, 1000)
    g = torch.Generator(dev).manual_seed(33)
    hidden = torch.randn(M, H, device=dev, generator=g).to(dtype)
    weight = (torch.randn(V, H, device=dev, generator=g) / H**0.5).to(dtype)
    targets = _device_targets(M, V, dev, 34)
    ours = _run(linear_cross_entropy, [hidden, weight], targets)
    low_ref = _run(linear_cross_entropy_ref, [hidden, weight], targets)
    truth = _run(linear_cross_entropy_ref, [hidden.double(), weight.double()], targets)
    assert_each_within_2x(["loss", "dhidden", "dweight"], ours, low_ref, truth, dtype)
