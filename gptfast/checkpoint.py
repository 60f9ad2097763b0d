"""Checkpoints: written atomically, loaded with `weights_only=True`, checked before anything
is allocated.

A checkpoint is one torch file: {"config": GPTConfig dict, "model": state dict, and for
training runs "optimizer", "scheduler", "step", "rng", "train"}. Nothing in it needs
pickle beyond tensors and plain containers, so `weights_only=True` always loads it.
The classic code's files load too: a plain state dict (`torch.save(model.state_dict(), ...)`)
or {"model_state_dict", "optimizer_state_dict"}; they carry no config, so it comes from a preset
or from the tensors' shapes (see `load_checkpoint`).
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

from .backends import resolve_device
from .config import PRESETS, GPTConfig
from .files import _first_line, atomic_file, existing_file, remove_orphaned_temporaries
from .model import GPTModel, upgrade_state_dict

__all__ = ["atomic_save", "save_checkpoint", "load_checkpoint", "load_model", "build_model",
           "check_state_dict", "load_state_dict_checked", "check_fits_in_memory"]
CLASSIC = "classic"  # the "format" load_checkpoint gives a classic file


def atomic_save(obj, path) -> Path:
    """torch.save, atomically (see gptfast.files.atomic_file)."""
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_checkpoint(path, model: torch.nn.Module, optimizer=None, scheduler=None, step: int = 0, **extra) -> Path:
    state = {"config": model.cfg.to_dict(), "model": model.state_dict(), "step": step, **extra}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return atomic_save(state, path)


def load_checkpoint(path, map_location="cpu", preset: str | GPTConfig | None = None) -> dict:
    """A checkpoint dict, loaded safely; a missing, empty or damaged file is a one-line error.

    Always has "config" (a GPTConfig dict) and "model" (a state dict). A classic file gets
    "format": "classic" (and its "optimizer_state_dict", if any); its config is `preset`'s (a
    preset name or a GPTConfig) or, without one, read from the tensors with GPT-2's head width
    64 (a warning says so).
    Temporary files orphaned by a killed save beside `path` are removed."""
    path = existing_file(path, "checkpoint")
    remove_orphaned_temporaries(path)
    if path.stat().st_size == 0:
        raise RuntimeError(f"checkpoint {path} is empty (0 bytes): an interrupted copy or download?")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is truncated or corrupt ({_first_line(e)})") from None
    state = _with_classic_formats(state, path)
    _check_state_dict_type(state["model"], path)
    if "config" not in state:
        state["config"] = _config_without_one(state["model"], preset, path)
    return state


def _with_classic_formats(state, path) -> dict:
    """gptfast's dict as it is; the classic files put into its shape."""
    if isinstance(state, dict) and "model" in state:
        return state
    if isinstance(state, dict) and "model_state_dict" in state:  # the classic training checkpoint
        return {"format": CLASSIC, "model": state["model_state_dict"],
                **({"optimizer_state_dict": state["optimizer_state_dict"]} if "optimizer_state_dict" in state else {})}
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return {"format": CLASSIC, "model": state}  # torch.save(model.state_dict(), path)
    raise RuntimeError(f"checkpoint {path} is neither a gptfast checkpoint (no 'model' entry) nor a model's "
                       f"state dict (it holds a {type(state).__name__})")


def _check_state_dict_type(sd, path) -> None:
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"checkpoint {path}: 'model' must be a state dict (tensor name -> tensor), "
                         f"got {type(sd).__name__}")
    bad = next((k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise ValueError(f"checkpoint {path}: model entry {bad!r} is a {type(sd[bad]).__name__}, not a tensor")


def _config_without_one(sd: dict, preset: str | GPTConfig | None, path) -> dict:
    """The config of a classic state dict: the preset's, or read from the tensors."""
    if isinstance(preset, GPTConfig):
        return preset.to_dict()
    if preset is not None:
        return GPTConfig.from_preset(preset).to_dict()
    try:
        V, C = sd["tok_emb.weight"].shape
        T = sd["pos_emb.weight"].shape[0]
    except (KeyError, ValueError):
        raise ValueError(f"checkpoint {path} has no config and no tok_emb/pos_emb weights to size it from; "
                         f"give a preset ({', '.join(PRESETS)})") from None
    if C % 64:
        raise ValueError(f"checkpoint {path} has no config and emb_dim {C} is not a multiple of GPT-2's head "
                         f"width 64; give a preset ({', '.join(PRESETS)})")
    head = sd.get("out_head.weight")
    tied = head is None or torch.equal(head, sd["tok_emb.weight"])
    qkv_bias = any(re.fullmatch(r"trf_blocks\.0\.att\.(qkv|W_query)\.bias", k) for k in sd)
    cfg = GPTConfig.from_dict(dict(vocab_size=V, context_length=T, emb_dim=C, n_heads=C // 64,
                                   n_layers=len(_layers(sd)), qkv_bias=qkv_bias, tie_weights=tied))
    warnings.warn(f"checkpoint {path} has no config: read from its tensors as {cfg.n_layers} layers, emb_dim {C}, "
                  f"{cfg.n_heads} heads of 64 (give a preset if the model had another head count)",
                  RuntimeWarning, stacklevel=3)
    return cfg.to_dict()


def _layers(sd: dict) -> set[int]:
    return {int(m.group(1)) for k in sd if (m := re.match(r"trf_blocks\.(\d+)\.", k))}


def config_of(state: dict, source) -> GPTConfig:
    """A checkpoint's GPTConfig; a bad one is a one-line error naming `source`."""
    try:
        return GPTConfig.from_dict(state["config"])
    except ValueError as e:
        raise ValueError(f"{source}: bad model config: {e}") from None


def check_state_dict(expected: dict, state_dict: dict, source="checkpoint") -> None:
    """A one-line error naming the first missing, unexpected or wrongly shaped tensor of
    `state_dict` against `expected` (a model's state dict, real or on the meta device)."""
    for name, tensor in state_dict.items():
        if name in expected and expected[name].shape != tensor.shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected "
                             f"{tuple(expected[name].shape)} (weights of another config?)")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise ValueError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected)")


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, source="checkpoint"):
    """load_state_dict, but a config mismatch is check_state_dict's one-line error."""
    state_dict = upgrade_state_dict(model, state_dict)
    check_state_dict(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def check_fits_in_memory(cfg: GPTConfig, device, bytes_per_parameter: int, source) -> None:
    """Refuse, before anything is allocated, a config whose weights alone exceed the device's memory
    (a config.json saying 10**6 layers would otherwise allocate for minutes)."""
    device = torch.device(device)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return  # unknown: let the allocator decide
    need = cfg.num_parameters() * bytes_per_parameter
    if need > have:
        raise ValueError(f"{source}: the config ({cfg.n_layers} layers, emb_dim {cfg.emb_dim}, vocabulary "
                         f"{cfg.vocab_size}) makes a model of {need / 2**30:,.1f} GiB, more than the "
                         f"{have / 2**30:,.1f} GiB of memory on {device.type}")


def build_model(cfg: GPTConfig, state: dict, backend: str = "auto", dtype=None, device=None,
                source: str = "weights") -> GPTModel:
    """A GPTModel holding `state`'s tensors themselves (no random init, no copy when the dtype
    already matches: memory-mapped tensors stay memory-mapped). Sizes and shapes are checked
    before the model is built; a classic attention layout (W_query/W_key/W_value) is fused."""
    from .quant import FLOAT_DTYPES

    if isinstance(dtype, str):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(FLOAT_DTYPES)}")
        dtype = FLOAT_DTYPES[dtype]
    state = {k: v for k, v in state.items() if v is not None}
    target = torch.device("cpu") if device is None else resolve_device(device)
    width = (dtype or next(iter(state.values())).dtype).itemsize
    check_fits_in_memory(cfg, target, width, source)
    if len(_layers(state)) != cfg.n_layers:  # before building n_layers blocks, even on the meta device
        raise ValueError(f"{source}: the config has n_layers={cfg.n_layers} but the weights hold "
                         f"{len(_layers(state))} layers")
    if cfg.tie_weights and "tok_emb.weight" in state:
        state.setdefault("out_head.weight", state["tok_emb.weight"])
    with torch.device("meta"):  # skip the (slow, discarded) random initialisation
        model = GPTModel(cfg, backend=backend)
    state = upgrade_state_dict(model, state)
    check_state_dict(model.state_dict(), state, source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model.load_state_dict(state, assign=True)
    except ValueError as e:  # distinct embedding and head for a tied config
        raise ValueError(f"{source}: {e}") from None
    if cfg.tie_weights:  # assign=True made two parameters; make them one again
        model.out_head.weight = model.tok_emb.weight
    return model.to(target).eval()


def load_model(path, backend: str = "auto", device=None, preset: str | None = None) -> GPTModel:
    """A GPTModel rebuilt from a checkpoint's config and weights, in eval mode. A classic file
    (no config) is sized by `preset` or by its tensors (see load_checkpoint)."""
    state = load_checkpoint(path, preset=preset)
    if state.get("format") == "gptfast-classifier":
        raise RuntimeError(f"checkpoint {path} is a classifier (from finetune-classifier), not a language "
                           "model; use it with `gptfast classify`")
    return build_model(config_of(state, path), state["model"], backend=backend, device=device, source=str(path))
