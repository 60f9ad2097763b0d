"""Flash attention kernels (gptfast.kernels.attention) against the reference and SDPA
(flash-decoding: test_attention_decode.py).

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1), so the
shapes are small; they still cross several block boundaries (odd T, T < S, D = 16..128).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from gptfast.kernels.attention import attention, attention_dropout_mask, attention_ref
from kernel_checks import (assert_each_within_2x, assert_rel_close, assert_within_2x, fused_qkv, make_qkv, scale_device,
                           scale_params)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)  # upstream gradients come from the global generator


def run(fn, q, k, v, do):
    """fn's output and (dq, dk, dv) for upstream gradient do."""
    out = fn(q, k, v)
    return [out.detach()] + list(torch.autograd.grad(out, (q, k, v), do))


def causal_sdpa(q, k, v):
    T, S = q.shape[-2], k.shape[-2]
    mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # last T of S positions
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


NAMES = ("out", "dq", "dk", "dv")


def assert_within_2x_of(low_ref, q, k, v, do):
    """Flash-attention's rule on the output and each gradient: |ours - fp32 reference| <=
    2 |low_ref run in q's dtype - fp32 reference| + atol."""
    ours = run(attention, q, k, v, do)
    low = run(low_ref, q, k, v, do)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    exact = run(attention_ref, q32, k32, v32, do.float())
    for name, got, lo, ex in zip(NAMES, ours, low, exact):
        assert_within_2x(got, lo, ex, name, atol=1e-3)


@pytest.mark.parametrize("T", [1, 17, 67])
@pytest.mark.parametrize("D", [16, 32, 64])
def test_fp32_matches_reference_and_sdpa(T, D, device):
    B, H = (2, 1) if D == 32 else (1, 2)
    q, k, v = make_qkv(B, H, T, T, D, device=device, seed=T * D)
    do = torch.randn(B, H, T, D, device=device)
    ours = run(attention, q, k, v, do)
    for name, got, ref, sdpa in zip(NAMES, ours, run(attention_ref, q, k, v, do), run(causal_sdpa, q, k, v, do)):
        assert_rel_close(f"{name} vs reference", got, ref, 1e-4)
        assert_rel_close(f"{name} vs sdpa", got, sdpa, 1e-4)


@pytest.mark.parametrize("T,S,D", [(1, 67, 32), (17, 67, 16), (33, 40, 128)])
def test_fewer_queries_than_keys(T, S, D, device):
    """Queries are the last T of S positions (decoding with a cache): row i sees keys <= i + S - T."""
    q, k, v = make_qkv(2, 2, T, S, D, device=device, seed=S + T)
    do = torch.randn(2, 2, T, D, device=device)
    ours = run(attention, q, k, v, do)
    for name, got, ref, sdpa in zip(NAMES, ours, run(attention_ref, q, k, v, do), run(causal_sdpa, q, k, v, do)):
        assert_rel_close(f"{name} vs reference", got, ref, 1e-4)
        assert_rel_close(f"{name} vs sdpa", got, sdpa, 1e-4)


def test_non_causal_matches_sdpa(device):
    q, k, v = make_qkv(1, 2, 17, 40, 32, device=device, seed=3)
    do = torch.randn(1, 2, 17, 32, device=device)
    ours = run(lambda q, k, v: attention(q, k, v, causal=False), q, k, v, do)
    for name, got, want in zip(NAMES, ours, run(F.scaled_dot_product_attention, q, k, v, do)):
        assert_rel_close(name, got, want, 1e-4)


def test_strided_views_of_fused_qkv(device):
    """The model splits one (B, T, 3, H, D) projection: q, k, v arrive as non-contiguous views."""
    B, T, H, D = 2, 17, 2, 32
    qkv = torch.randn(B, T, 3 * H * D, device=device).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
    q, k, v = (t.requires_grad_() for t in qkv.detach().unbind(0))
    assert not q.is_contiguous()
    do = torch.randn(B, H, T, D, device=device)
    for name, got, want in zip(NAMES, run(attention, q, k, v, do), run(attention_ref, q, k, v, do)):
        assert_rel_close(name, got, want, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_reference_error(dtype, device):
    """Flash-attention's rule: |fused - fp32 ref| <= 2 |ref in dtype - fp32 ref| + atol."""
    q, k, v = make_qkv(1, 2, 67, 67, 64, dtype=dtype, device=device, seed=11)
    do = torch.randn(1, 2, 67, 64, device=device, dtype=dtype)
    assert_within_2x_of(attention_ref, q, k, v, do)


# ---------------------------------------------------------------------------- dropout

def test_dropout_is_deterministic_by_seed(device):
    q, k, v = make_qkv(1, 2, 17, 17, 16, device=device)
    a = attention(q, k, v, dropout_p=0.5, seed=7)
    assert torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=7))
    assert not torch.equal(a, attention(q, k, v, dropout_p=0.5, seed=8))
    torch.manual_seed(123)
    b = attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(123)
    assert torch.equal(b, attention(q, k, v, dropout_p=0.5)), "seed=None must follow torch.manual_seed"


def test_dropout_zero_is_no_dropout(device):
    q, k, v = make_qkv(1, 2, 67, 67, 32, device=device)
    plain = attention(q, k, v)
    assert torch.equal(attention(q, k, v, dropout_p=0.0, seed=5), plain)
    # the dropout code path with (almost surely) nothing dropped: 1/(1-1e-9) rounds to 1 in fp32
    torch.testing.assert_close(attention(q, k, v, dropout_p=1e-9, seed=5), plain, rtol=1e-6, atol=0)


def test_dropout_mask_read_from_forward(device):
    """v = identity turns the output into the dropped weight matrix Z * P itself: read the
    forward's mask from it and check it against attention_dropout_mask and the keep-rate."""
    B, H, T, D, p = 1, 2, 64, 64, 0.3
    q, k, _ = make_qkv(B, H, T, T, D, device=device, seed=5)
    eye = torch.eye(T, device=device).expand(B, H, T, T)
    with torch.no_grad():
        probs = attention(q, k, eye)  # P, (B, H, T, S=T)
        dropped = attention(q, k, eye, dropout_p=p, seed=99)
    visible = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    assert (probs[..., visible] > 0).all()
    kept = dropped != 0
    mask = attention_dropout_mask(99, B * H, T, T, p, device=device).view(B, H, T, T)
    assert torch.equal(kept[..., visible], mask[..., visible]), "forward mask != attention_dropout_mask"
    assert not kept[..., ~visible].any()
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    n = visible.sum().item() * B * H
    rate = kept[..., visible].float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f}, expected {1 - p}"


def test_dropout_mask_statistics(device):
    p = 0.2
    m = attention_dropout_mask(3, 3, 64, 200, p, device=device).float()  # (B*H, T, S)
    n = m.numel()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(m.mean().item() - (1 - p)) < 5 * sigma, f"keep rate {m.mean().item():.4f}"
    # different heads, rows and seeds get independent masks: agreement rate p^2 + (1-p)^2
    agree = p * p + (1 - p) * (1 - p)
    others = [m[1], m[0].roll(1, dims=0), attention_dropout_mask(4, 3, 64, 200, p, device=device)[0].float()]
    for other in others:
        rate = (m[0] == other).float().mean().item()
        assert abs(rate - agree) < 5 * math.sqrt(agree * (1 - agree) / m[0].numel()), f"agreement {rate:.4f}"


@pytest.mark.parametrize("T,S", [(67, 67), (17, 67)])
def test_dropout_backward_matches_masked_reference(T, S, device):
    """Gradients of the kernel equal autograd through explicit math with the same mask."""
    B, H, D, p, seed = 1, 2, 32, 0.2, 1234
    q, k, v = make_qkv(B, H, T, S, D, device=device, seed=T)
    do = torch.randn(B, H, T, D, device=device)
    keep = attention_dropout_mask(seed, B * H, T, S, p, device=device).view(B, H, T, S)

    def masked_reference(q, k, v):
        causal = torch.ones(T, S, dtype=torch.bool, device=device).triu(S - T + 1)
        w = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(causal, float("-inf")), -1)
        return (w * keep / (1 - p)) @ v

    ours = run(lambda q, k, v: attention(q, k, v, dropout_p=p, seed=seed), q, k, v, do)
    for name, got, want in zip(NAMES, ours, run(masked_reference, q, k, v, do)):
        assert_rel_close(name, got, want, 1e-4)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("shapes,kwargs,match", [
    (((1, 2, 8, 24), (1, 2, 8, 24)), {}, "head_dim 24"),
    (((1, 2, 9, 16), (1, 2, 8, 16)), {}, "T <= S"),
    (((1, 2, 8, 16), (1, 3, 8, 16)), {}, "shapes"),
    (((2, 8, 16), (2, 8, 16)), {}, "4-D"),
    (((1, 2, 8, 16), (1, 2, 8, 16)), {"dropout_p": 1.0}, "dropout_p"),
    (((65536, 1, 1, 16), (65536, 1, 1, 16)), {}, "batch x heads"),
])
def test_bad_input_is_rejected(shapes, kwargs, match, device):
    q = torch.randn(*shapes[0], device=device)
    k = torch.randn(*shapes[1], device=device)
    with pytest.raises(ValueError, match=match):
        attention(q, k, k, **kwargs)


# ------------------------------------------------------------------------- GPU scale

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 1000])
def test_gpt2_scale_bf16_on_gpu(T):
    """GPT-2 124M attention shapes, bf16, against an fp32 reference (2x rule)."""
    q, k, v = make_qkv(2, 12, T, T, 64, dtype=torch.bfloat16, device="cuda", seed=T)
    do = torch.randn(2, 12, T, 64, device="cuda", dtype=torch.bfloat16)
    assert_within_2x_of(causal_sdpa, q, k, v, do)

def causal_flash(q, k, v):
    """PyTorch's fused attention (flash on CUDA for fp16/bf16): the reference in the low dtype."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_attention_within_2x(shape, dtype, device, seed):
    B, H, T, D = shape
    q, k, v = fused_qkv(B, H, T, D, dtype, device, seed)
    do = torch.randn(B, H, T, D, device=device, generator=torch.Generator(device).manual_seed(seed + 1)).to(dtype)
    ours = run(attention, q, k, v, do)
    low = run(causal_flash, q, k, v, do)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = run(attention_ref, *leaves, do.double())
    assert_each_within_2x([f"{shape} {n}" for n in NAMES], ours, low, truth, dtype)


@pytest.mark.parametrize("size,dtype", scale_params())
def test_attention_at_gpt2_scale(size, dtype, device):
    """GPT-2 124M training shape (16 x 12 heads x 1024 x 64): output and dq, dk, dv within 2x of
    SDPA's error in that dtype, against fp64."""
    shape = (16, 12, 1024, 64) if size == "gpt2" else (1, 1, 40, 64)
    check_attention_within_2x(shape, dtype, scale_device(size, device), seed=21)


@pytest.mark.parametrize("size,dtype", scale_params())
def test_attention_long_context_head_dim_128(size, dtype, device):
    """T = 4096 with head_dim 128 (6 heads of GPT-2's 768): the other launch configs."""
    shape = (1, 6, 4096, 128) if size == "gpt2" else (1, 1, 40, 128)
    check_attention_within_2x(shape, dtype, scale_device(size, device), seed=22)


@pytest.mark.parametrize("size", ["small", pytest.param("gpt2", marks=pytest.mark.gpu)])
def test_attention_dropout_at_gpt2_scale(size, device):
    """Dropout over B x H x T = 16 x 12 x 1024 (bf16, as in training): the kernels' mask is
    attention_dropout_mask's (output and gradients within 2x of the masked reference in bf16,
    against fp64 with the same mask), and the keep-rate is 1 - p."""
    dev = scale_device(size, device)
    B, H, T, D = (16, 12, 1024, 64) if size == "gpt2" else (1, 1, 17, 16)
    p, seed = 0.1, 4321
    q, k, v = fused_qkv(B, H, T, D, torch.bfloat16, dev, seed=23)
    do = torch.randn(B, H, T, D, device=dev, generator=torch.Generator(dev).manual_seed(24)).to(torch.bfloat16)
    keep = attention_dropout_mask(seed, B * H, T, T, p, device=dev).view(B, H, T, T)
    visible = torch.ones(T, T, dtype=torch.bool, device=dev).tril()

    def masked_reference(q, k, v):
        s = (q @ k.transpose(-2, -1) / math.sqrt(D)).masked_fill(~visible, float("-inf"))
        return (torch.softmax(s, -1) * keep / (1 - p)).to(q.dtype) @ v

    ours = run(lambda q, k, v: attention(q, k, v, dropout_p=p, seed=seed), q, k, v, do)
    low = run(masked_reference, q, k, v, do)
    truth = run(masked_reference, *(t.detach().double().requires_grad_() for t in (q, k, v)), do.double())
    assert_each_within_2x([f"dropout {n}" for n in NAMES], ours, low, truth, torch.bfloat16)
    n = visible.sum().item() * B * H
    rate = keep[..., visible].float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.5f}, expected {1 - p}"
