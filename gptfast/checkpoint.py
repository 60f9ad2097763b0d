"""Checkpoints: written atomically, loaded with `weights_only=True`, checked tensor by tensor.

A checkpoint is one torch file: {"config": GPTConfig dict, "model": state dict, and for
training runs "optimizer", "scheduler", "step", "rng", "train"}. Nothing in it needs
pickle beyond tensors and plain containers, so `weights_only=True` always loads it.

The model is imported only by the functions that build or upgrade one, so the modules that
just write files atomically (data, plotting, lora) do not pull it in.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .backends import resolve_device
from .config import GPTConfig


@contextlib.contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path`; when the block succeeds, move it onto `path`
    in one rename, so a crash never leaves a half-written file where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj, path) -> Path:
    """torch.save, atomically (see atomic_file)."""
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


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict safely; a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise RuntimeError(f"checkpoint {path} is not a gptfast checkpoint (no 'model' entry)")
    return state


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
    from .model import upgrade_state_dict

    state_dict = upgrade_state_dict(model, state_dict)
    check_state_dict(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)


def load_model(path, backend: str = "auto", device=None):
    """A GPTModel rebuilt from a checkpoint's config and weights, in eval mode."""
    from .model import GPTModel

    state = load_checkpoint(path)
    if "config" not in state:
        raise RuntimeError(f"checkpoint {path} has no 'config' entry")
    if state.get("format") == "gptfast-classifier":
        raise RuntimeError(f"checkpoint {path} is a classifier (from finetune-classifier), not a language "
                           "model; use it with `gptfast classify`")
    model = GPTModel(GPTConfig.from_dict(state["config"]), backend=backend)
    load_state_dict_checked(model, state["model"], source=str(path))
    return model.to(resolve_device(device) if device is not None else "cpu").eval()
