"""LoRA: low-rank adapters on a model's linear layers (Hu et al., 2021).

A wrapped layer computes  y = x W^T + b + (alpha / rank) * (x A^T) B^T  with the base W, b
frozen, A (rank, in) random and B (out, rank) zero, so a freshly wrapped model computes
exactly what the base model does. Only A and B train; only A and B are saved.

A wrapped layer is a plain module swap: it only has `forward` (two thin matmuls beside the
frozen layer), and the model's fused paths take it as any layer that is not an nn.Linear (the
feed-forward runs its layers, the loss builds the head's logits), on every backend.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .files import atomic_file


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable rank-`rank` update scaled by `alpha / rank`."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(linear).__name__}")
        if int(rank) <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.linear = linear.requires_grad_(False)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        w = linear.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, linear.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, self.rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in peft
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def effective_weight(self) -> torch.Tensor:
        """W + (alpha / rank) B A (differentiable in A and B)."""
        return self.linear.weight if self.merged else self.linear.weight + self.delta_weight()

    def forward(self, x):
        y = self.linear(x)
        if self.merged:
            return y
        # two thin matmuls: never builds the (out, in) update
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self):
        """Fold the update into the base weight (a fresh tensor, so a tied weight is untied)."""
        if not self.merged:
            self.linear.weight = nn.Parameter(self.linear.weight + self.delta_weight(), requires_grad=False)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.linear.weight = nn.Parameter(self.linear.weight - self.delta_weight(), requires_grad=False)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, merged={self.merged}"


def _matches(name: str, targets) -> bool:
    """A name filter: a target matches the whole name, a dotted component run, or a suffix."""
    if not targets:
        return True
    padded = f".{name}."
    return any(f".{t.strip('.')}." in padded for t in targets)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets=None, exclude=None) -> list[str]:
    """Freeze `model` and wrap its nn.Linear layers in LoRALinear, in place.

    `targets`: name filters (e.g. ["att.qkv", "ff"]; all linear layers when None);
    `exclude`: filters for layers to leave alone. Returns the wrapped layers' names.
    """
    # every check before the model changes: a failed call leaves it unfrozen and unwrapped
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (0 < alpha < math.inf):
        raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
    if lora_layers(model):  # wrapping again would nest adapters inside adapters
        raise ValueError(f"the model already has LoRA on {len(lora_layers(model))} layers; merge or unwrap them first")
    chosen = [name for name, m in model.named_modules()
              if type(m) is nn.Linear and _matches(name, targets) and not (exclude and _matches(name, exclude))]
    if not chosen:
        raise ValueError(f"no linear layer matches the LoRA targets {targets}")
    model.requires_grad_(False)
    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha))
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module):
    for m in lora_layers(model).values():
        m.unmerge()


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain nn.Linear back (the state dict's usual keys)."""
    for name, m in lora_layers(model).items():
        m.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.linear)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict the model would have with every adapter merged and unwrapped;
    the model itself is left as it is."""
    sd = dict(model.state_dict())
    for name, m in lora_layers(model).items():
        p = f"{name}." if name else ""
        for key in ("lora_A", "lora_B"):
            del sd[p + key]
        sd[p + "weight"] = m.effective_weight().detach().clone()
        del sd[p + "linear.weight"]
        if m.linear.bias is not None:
            sd[p + "bias"] = sd.pop(p + "linear.bias")
    return sd


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapters(model: nn.Module, path) -> Path:
    """Write only the adapters (A and B of every LoRALinear) to a safetensors file."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save; apply_lora first")
    if any(m.merged for m in layers.values()):
        raise ValueError("unmerge the LoRA layers before saving the adapters")
    first = next(iter(layers.values()))
    tensors = {f"{n}.{k}": getattr(m, k).detach().contiguous().cpu()
               for n, m in layers.items() for k in ("lora_A", "lora_B")}
    meta = {"format": "gptfast-lora", "rank": str(first.rank), "alpha": str(first.alpha),
            "layers": json.dumps(list(layers))}
    with atomic_file(path) as tmp:  # a crash never leaves half a file
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def load_adapters(model: nn.Module, path) -> list[str]:
    """Load adapters saved by `save_adapters`, wrapping the named layers first when the
    model has no LoRA layers yet. Returns the adapted layers' names."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not safetensors, or damaged
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != "gptfast-lora" or not {"layers", "rank", "alpha"} <= set(meta):
        raise ValueError(f"{path} is not a gptfast LoRA adapter file (no 'format: gptfast-lora' metadata)")
    names = json.loads(meta["layers"])
    missing = [f"{n}.{k}" for n in names for k in ("lora_A", "lora_B") if f"{n}.{k}" not in tensors]
    if missing:
        raise ValueError(f"{path}: adapter tensor {missing[0]} is missing")
    layers = lora_layers(model)
    if layers and sorted(layers) != sorted(names):
        odd = sorted(set(layers) ^ set(names))[0]
        raise ValueError(f"{path}: adapters are for {len(names)} layers, the model has LoRA on {len(layers)} "
                         f"(they differ at {odd})")
    # every check before the model changes: a failed load leaves it as it was
    modules = dict(model.named_modules())
    for n in names:
        m = modules.get(n)
        if type(m) is not nn.Linear and not isinstance(m, LoRALinear):
            raise ValueError(f"{path}: adapters for {n}, which is not a linear layer of this model "
                             "(adapters of another model?)")
        r = m.rank if isinstance(m, LoRALinear) else int(meta["rank"])
        for k, want in (("lora_A", (r, m.in_features)), ("lora_B", (m.out_features, r))):
            if tuple(tensors[f"{n}.{k}"].shape) != want:
                raise ValueError(f"{path}: {n}.{k} has shape {tuple(tensors[f'{n}.{k}'].shape)}, the model "
                                 f"expects {want} (adapters of another model or rank?)")
    if not layers:
        apply_lora(model, int(meta["rank"]), float(meta["alpha"]), targets=names)
    with torch.no_grad():
        for n, m in lora_layers(model).items():
            m.lora_A.copy_(tensors[f"{n}.lora_A"])
            m.lora_B.copy_(tensors[f"{n}.lora_B"])
    return names
