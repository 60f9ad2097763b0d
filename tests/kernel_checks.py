"""Comparison helpers for the kernel tests: they print the worst mismatch when they fail.

- fp32: max |actual - expected| <= rtol * max |expected| (relative to the tensor's scale).
- fp16/bf16 (flash-attention's rule): the kernel's error against the fp32 truth is at most
  2x the error of the PyTorch reference run in that dtype, plus a small atol.
Also the inputs both attention test files build (make_qkv, fused_qkv) and their check
assert_rel_close.
"""
from __future__ import annotations

import torch

LOW_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _worst(actual, expected):
    diff = (actual.double() - expected.double()).abs()
    i = int(diff.argmax()) if diff.numel() else 0
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape)) if diff.dim() else ()
    return diff.max().item() if diff.numel() else 0.0, idx, actual.reshape(-1)[i].item(), expected.reshape(-1)[i].item()


def assert_close(actual, expected, rtol=1e-5, name="output"):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err, idx, a, e = _worst(actual, expected)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-30, (f"{name}: worst error {err:.3g} > {rtol} x {scale:.3g} at {idx}: "
                                         f"got {a:.8g}, expected {e:.8g}")


def assert_within_2x(actual, low_ref, truth, name="output", atol=None):
    """Low-precision rule: err(actual) <= 2 err(low_ref) + atol, both against the fp32 truth."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    atol = LOW_ATOL[actual.dtype] if atol is None else atol
    err, idx, a, e = _worst(actual, truth)
    ref_err = _worst(low_ref, truth)[0]
    assert err <= 2 * ref_err + atol, (f"{name} ({actual.dtype}): worst error {err:.3g} > 2 x {ref_err:.3g} "
                                       f"(PyTorch in that dtype) + {atol} at {idx}: got {a:.6g}, truth {e:.6g}")


# ------------------------------------------------- checks at GPT-2 scale (`make gpu-check`)

SCALE_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}  # x max |truth|


def scale_params():
    """(size, dtype) parameters of a check at GPT-2 scale: every dtype at "gpt2" (marked gpu:
    `make gpu-check` runs them), and the same code at "small" in bf16 on every machine, so the
    CPU suite runs each GPU check's path under Triton's interpreter."""
    import pytest
    return [pytest.param("small", torch.bfloat16, id="small-bf16")] + [
        pytest.param("gpt2", dtype, marks=pytest.mark.gpu, id=f"gpt2-{str(dtype).removeprefix('torch.')}")
        for dtype in (torch.float32, torch.float16, torch.bfloat16)]


def scale_device(size, device):
    """The device a scale_params check runs on: CUDA at GPT-2 scale, else the test's device."""
    return "cuda" if size == "gpt2" else device


def assert_each_within_2x(names, ours, low_refs, truths, dtype):
    """The 2x rule on each output and gradient against an fp64 truth (fp32 included: its torch
    reference has an error too), with atol relative to each truth's scale."""
    for name, a, low, truth in zip(names, ours, low_refs, truths, strict=True):
        assert_within_2x(a, low, truth, name, atol=SCALE_ATOL[dtype] * truth.abs().max().item())


# ------------------------------------------ attention inputs (test_attention, test_attention_decode)

def make_qkv(B, H, T, S, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (T, S, S))
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def fused_qkv(B, H, T, D, dtype, device, seed):
    """q, k, v (B, H, T, D) as the model makes them: strided views of one fused projection."""
    g = torch.Generator(device).manual_seed(seed)
    qkv = torch.randn(B, T, 3, H, D, device=device, generator=g).to(dtype)
    return [t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).detach()]  # each (B, H, T, D)


def assert_rel_close(name, got, want, rtol):
    """max |got - want| <= rtol * max(max |want|, 1), reporting the worst element on failure.
    (Inputs are unit-scale; the floor of 1 covers all-zero gradients such as dq at T=1.)"""
    err = (got.float() - want.float()).abs()
    bound = rtol * max(want.float().abs().max().item(), 1.0)
    i = err.argmax().item()
    assert err.max().item() <= bound, (
        f"{name}: max err {err.max().item():.3g} > {bound:.3g} at flat index {i} "
        f"(got {got.flatten()[i].item():.6g}, want {want.flatten()[i].item():.6g})")
