"""Inference copies of a GPTModel: bf16/fp16 weights, int8 weight-only linear layers
(per-output-row scales; the matmul is torch's own `_weight_int8pack_mm`, which reads a quarter
of fp32's bytes — generation at batch 1 is bound by reading the weights), or fp32 on CPU with
the linear weights stored (in, out), the faster layout for one-token matmuls there.

The int8 copy keeps embeddings, LayerNorms, attention and the residual stream in fp32; only
the inputs of the linear layers are rounded to bf16 (the kernel's activation dtype on CPU).
The copies swap the linear layers only, so they keep whatever backend the model has (the
triton feed-forward runs a swapped first layer as a layer instead of fusing its bias).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPES = (*FLOAT_DTYPES, "int8")


def int8_supported(device="cpu") -> bool:
    """Whether this torch has a working `_weight_int8pack_mm` on `device`."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 64, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """y = x W^T + b with W stored as int8 rows times a bf16 scale per row (symmetric)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight_int8", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), False)

    def forward(self, x):
        lead, k = x.shape[:-1], x.shape[-1]
        y = torch._weight_int8pack_mm(x.reshape(-1, k).to(torch.bfloat16), self.weight_int8, self.scale)
        y = y.to(x.dtype).view(*lead, -1)  # (..., out)
        return y if self.bias is None else y + self.bias


class InputMajorLinear(nn.Module):
    """y = x W^T + b with W stored transposed, (in, out) like GPT-2's Conv1D: for one token
    on CPU, fp32 x @ W(in, out) runs ~30% faster than F.linear's W(out, in) (measured here)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), False)  # (in, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        y = torch.mm(x2, self.weight_t) if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)
        return y.view(*x.shape[:-1], -1)  # (..., out)


def inference_copy(model: nn.Module, dtype: str | None, device) -> nn.Module:
    """`model` on `device` in `dtype` ("float32", "bfloat16", "float16", "int8"; None keeps its
    weights and layout): the model itself when nothing changes, else a converted copy in eval mode."""
    device = torch.device(device)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
    current = model.tok_emb.weight
    want = current.dtype if dtype in (None, "int8") else FLOAT_DTYPES[dtype]
    same_device = current.device.type == device.type and device.index in (None, current.device.index)
    layer = Int8Linear if dtype == "int8" else InputMajorLinear if dtype == "float32" and device.type == "cpu" else None
    if same_device and current.dtype == want and layer is None:
        return model
    if dtype == "int8" and not int8_supported(device):
        raise ValueError(f"dtype 'int8' needs torch._weight_int8pack_mm on {device.type}; this torch lacks it")
    out = copy.deepcopy(model).to(device=device, dtype=torch.float32 if dtype == "int8" else want)
    if layer is not None:  # plain module swaps: the copy keeps the model's backend
        for block in out.trf_blocks:
            block.att.qkv, block.att.out_proj = layer(block.att.qkv), layer(block.att.out_proj)
            block.ff.layers[0], block.ff.layers[2] = layer(block.ff.layers[0]), layer(block.ff.layers[2])
        out.out_head = layer(out.out_head)
    return out.eval()
