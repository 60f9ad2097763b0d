"""Comparison helpers for the kernel tests: they print the worst mismatch when they fail.

- fp32: max |actual - expected| <= rtol * max |expected| (relative to the tensor's scale).
- fp16/bf16 (flash-attention's rule): the kernel's error against the fp32 truth is at most
  2x the error of the PyTorch reference run in that dtype, plus a small atol.
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
