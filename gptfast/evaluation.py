"""Evaluation: the mean loss of a model over batches or over a text, in eval mode.

One module for what `gptfast eval-gpt2`, the trainer and the fine-tuning commands measure.
"""
from __future__ import annotations

import contextlib
import itertools

import torch

from .batches import WindowBatches, split_text_batches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # "fp32": no autocast


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """`model` in eval mode (dropout off) inside the block; its previous mode after. A model
    already in eval mode is left alone (no walk over its modules: cheap per decode step)."""
    if not model.training:
        yield model
        return
    model.eval()
    try:
        yield model
    finally:
        model.train()


def autocast(device: torch.device, dtype: str):
    """bf16/fp16 autocast on `device`; "fp32" is no autocast."""
    if dtype not in AMP_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AMP_DTYPES[dtype])


@torch.no_grad()
def mean_over_batches(fn, batches, num_batches=None, device=None, dtype="fp32", weighted=False) -> torch.Tensor:
    """Mean over the first `num_batches` (all when None) of `fn(x, y)`, a tensor of values
    per batch (e.g. the loss, or (loss, accuracy)), with the batches moved to `device`.
    `weighted`: each batch counts by its number of examples (a short last batch counts less);
    else every batch counts once, as the classic loss helper does. No host sync: the
    caller reads the result."""
    total, n = 0.0, 0
    for x, y in itertools.islice(batches, num_batches):
        with autocast(x.device if device is None else torch.device(device), dtype):
            value = torch.as_tensor(fn(x.to(device), y.to(device))).double()
        weight = len(x) if weighted else 1
        total, n = total + value * weight, n + weight
    return total / n if n else torch.tensor(float("nan"))


def calc_loss_loader(batches, model, device, num_batches=None, dtype="fp32") -> float:
    """Mean loss over the first `num_batches` batches (all when None), the classic helper."""
    with eval_mode(model):
        return mean_over_batches(lambda x, y: model(x, targets=y), batches, num_batches, device, dtype).item()


def evaluate_text_loss(model, text: str, context_length: int = 256, stride: int = 256,
                       train_ratio: float = 0.9, batch_size: int = 8) -> tuple[float, float]:
    """(train, val) mean next-token loss over `text` split by characters at `train_ratio`, in
    windows of `context_length` tokens every `stride` tokens (the classic set-up). OpenAI's
    GPT-2 124M gives about 3.75 / 3.56 on The Verdict with the defaults."""
    # batch size 1 here: only the windows are used (the training batches would need >= batch_size)
    splits = split_text_batches(text, context_length, stride, 1, seed=0, val_fraction=1 - train_ratio)
    device = model.tok_emb.weight.device
    with eval_mode(model):
        # every window once; the last batch may be short, so each counts by its size
        return tuple(mean_over_batches(lambda x, y: model(x, targets=y),
                                       WindowBatches(split.dataset, batch_size, seed=0, shuffle=False,
                                                     drop_last=False), device=device, weighted=True).item()
                     for split in splits)
