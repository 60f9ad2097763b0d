"""Inference copies of a GPTModel for generation, whose speed at batch 1 is reading the weights:

- on CPU every linear layer (the output head included) becomes a weight-only layer on
  gptfast's decode kernel (gptfast.cpu_linear): float32, bfloat16 or float16 weights, int8
  (one scale per output row) or int4 (asymmetric, a scale and a minimum per group of 32, 64 or
  128 inputs). Embeddings, LayerNorms, attention, the KV cache and the residual stream stay
  fp32; only the weights are stored small. `head=` keeps the output head (a third of the
  bytes of GPT-2 124M) in another format, e.g. "float32" for the most exact logits;
- on CUDA, float dtypes cast the whole model (torch's matmuls); int8 uses torch's
  `_weight_int8pack_mm` with bf16 activations; int4 is CPU-only.
The copies swap the linear layers only, so they keep whatever backend the model has (the
triton feed-forward runs a swapped first layer as a layer instead of fusing its bias).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import cpu_linear

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT4_GROUPS = {"int4": 32, "int4-g64": 64, "int4-g128": 128}  # dtype name -> inputs per group
DTYPES = (*FLOAT_DTYPES, "int8", *INT4_GROUPS)
SHORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train's spellings, for the CLIs


def auto_dtype(device) -> str:
    """The weight format `dtype="auto"` means on `device`: bfloat16 on CUDA; on CPU int8, the
    fastest format at batch 4 and 16 that passes the quality gate and 1.8x float16 at batch 1
    (int4-g128 is faster at batch 1 but changes most greedy tokens where int8 keeps 7 in 10;
    benchmarks/results/generate_cpu.md), or float32 where gptfast's CPU kernel was not built
    (every other format would then dequantise its weights on every call)."""
    if torch.device(device).type != "cpu":
        return "bfloat16"
    return "int8" if cpu_linear.has_kernel() else "float32"


def int8_supported(device="cpu") -> bool:
    """Whether int8 weights can run on `device`: gptfast's kernel (or its PyTorch reference)
    on CPU; elsewhere a working `torch._weight_int8pack_mm`."""
    if torch.device(device).type == "cpu":
        return True
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        x = torch.ones(1, 64, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 64, dtype=torch.int8, device=device)
        torch._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
        return True
    except (RuntimeError, NotImplementedError):
        return False


class KernelLinear(nn.Module):
    """y = x W^T + b with W in one of gptfast.cpu_linear's formats (buffers `weight`, `scale`,
    fp32 `bias`); subclasses choose the format."""
    group = 0  # int4: inputs per group

    def __init__(self, linear: nn.Linear, weight: torch.Tensor, scale: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().contiguous())

    def forward(self, x):  # (..., in) -> (..., out)
        return cpu_linear.linear(x, self.weight, self.scale, self.bias, self.group)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight (out, in) this layer multiplies by."""
        return cpu_linear.dequantize(self.weight, self.scale, self.group, self.in_features)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"weight={self.weight.dtype}" + (f", group={self.group}" if self.group else ""))


class FloatLinear(KernelLinear):
    """Weights stored as float32, bfloat16 or float16; x and y stay in x's dtype."""

    def __init__(self, linear: nn.Linear, dtype=torch.float32):
        super().__init__(linear, linear.weight.detach().to(dtype).contiguous(), None)


class Int8Linear(KernelLinear):
    """int8 weights times one fp32 scale per output row (symmetric): |w - s q| <= s / 2."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear, *cpu_linear.quantize_int8(linear.weight))


class Int4Linear(KernelLinear):
    """4-bit weights, w = s q + m with fp16 (s, m) per group of `group` inputs of a row."""

    def __init__(self, linear: nn.Linear, group: int = 32):
        super().__init__(linear, *cpu_linear.quantize_int4(linear.weight, group))
        self.group = group


def _layer(dtype: str, device: torch.device):
    """The factory nn.Linear -> inference layer for `dtype` on `device`, or None (keep nn.Linear)."""
    if dtype == "int8":
        return Int8Linear
    if dtype in INT4_GROUPS:
        return lambda linear: Int4Linear(linear, INT4_GROUPS[dtype])
    if device.type == "cpu" and dtype in FLOAT_DTYPES:
        return lambda linear: FloatLinear(linear, FLOAT_DTYPES[dtype])
    return None


def _check(dtype, head, device):
    for name, value in (("dtype", dtype), ("head", head)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"unknown {name} {value!r}; choose from {', '.join(DTYPES)}")
    wanted = {dtype, head}
    if "int8" in wanted and not int8_supported(device):
        raise ValueError(f"dtype 'int8' needs torch._weight_int8pack_mm on {device.type}; this torch lacks it")
    if device.type != "cpu" and wanted & set(INT4_GROUPS):
        raise ValueError(f"int4 weights run on CPU only (gptfast's kernel), not on {device.type}")
    if device.type != "cpu" and head not in (None, dtype):
        raise ValueError("head= (a separate output-head format) is a CPU option")


def inference_copy(model: nn.Module, dtype: str | None, device, head: str | None = None) -> nn.Module:
    """`model` on `device` with weights in `dtype` (one of DTYPES; None keeps its weights and
    layout) and the output head in `head` (default: as `dtype`): the model itself when nothing
    changes, else a converted copy in eval mode (the caller's model is never modified)."""
    device = torch.device(device)
    _check(dtype, head, device)
    current = model.tok_emb.weight
    float_cast = device.type != "cpu" and dtype in FLOAT_DTYPES  # CUDA: the whole model in dtype
    want = FLOAT_DTYPES[dtype] if float_cast else current.dtype if dtype is None else torch.float32
    same_device = current.device.type == device.type and device.index in (None, current.device.index)
    layer = None if dtype is None else _layer(dtype, device)
    head_layer = _layer(head, device) if head is not None else layer
    if same_device and current.dtype == want and layer is None and head_layer is None:
        return model
    out = copy.deepcopy(model).to(device=device, dtype=want)
    if layer is not None:  # plain module swaps: the copy keeps the model's backend
        for block in out.trf_blocks:
            block.att.qkv, block.att.out_proj = layer(block.att.qkv), layer(block.att.out_proj)
            block.ff.layers[0], block.ff.layers[2] = layer(block.ff.layers[0]), layer(block.ff.layers[2])
    if head_layer is not None:
        out.out_head = head_layer(out.out_head)
    return out.eval()
