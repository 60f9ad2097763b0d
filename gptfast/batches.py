"""Step-indexed batch sources: micro-batch i is a pure function of (seed, i), so a resumed
run sees exactly the batches an uninterrupted one would (the trainer's exact resume).

Each source has `batch(i)`, `steps_per_epoch` (and `len()`), and iterates one pass in
order for evaluation.
"""
from __future__ import annotations

import torch

from .data import GPTDatasetV1, TokenFileLoader
from .tokenizer import get_tokenizer


def stack_pairs(items):
    """The default collate: (x, y) pairs of equal-length tensors -> (x (B, T), y (B, T))."""
    x, y = zip(*items)
    return torch.stack(x), torch.stack(y)


class IndexedBatches:
    """Batches of a map-style dataset; the shuffle of epoch e comes from a generator seeded
    with seed + e, so step s always gets the same batch."""

    def __init__(self, dataset, batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                 collate=stack_pairs):
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"the training data has {len(dataset)} examples, fewer than one batch of {batch_size}; "
                             "use a smaller --batch-size or --context-length, or more data")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        self.collate = collate
        # training drops the last partial batch, as the classic loader does; evaluation keeps it
        self.steps_per_epoch = len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)

    def batch(self, i: int):
        """Micro-batch number i, counting over all epochs (and over all ranks under DDP)."""
        epoch, j = divmod(i, self.steps_per_epoch)
        order = (torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(len(self.dataset)))
        rows = order[j * self.batch_size:(j + 1) * self.batch_size].tolist()
        return self.collate([self.dataset[r] for r in rows])

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):  # one pass in order, for evaluation
        for j in range(self.steps_per_epoch):
            yield self.batch(j)


class WindowBatches(IndexedBatches):
    """Batches of a sliding-window dataset (GPTDatasetV1)."""


class TokenFileBatches:
    """Random windows of a prepared token file; step s always gets the same batch."""

    def __init__(self, path, batch_size: int, context_length: int, seed: int, steps_per_epoch: int = 1000):
        self.loader = TokenFileLoader(path, batch_size, context_length, seed)
        self.seed, self.steps_per_epoch = seed, steps_per_epoch

    def batch(self, i: int):
        self.loader.generator.manual_seed(self.seed * 1_000_003 + i)
        return self.loader.next_batch()

    def __len__(self):
        return self.steps_per_epoch

    def __iter__(self):
        for j in range(self.steps_per_epoch):
            yield self.batch(j)


def split_text_batches(text: str, context_length: int, stride: int, batch_size: int, seed: int,
                       val_fraction: float = 0.1):
    """The classic 90/10 character split into train and val window batches."""
    cut = int((1 - val_fraction) * len(text))
    tok = get_tokenizer()
    parts = {}
    for name, part in (("training", text[:cut]), ("validation", text[cut:])):
        try:
            parts[name] = GPTDatasetV1(part, tok, context_length, stride)
        except ValueError as e:
            raise ValueError(f"{name} split: {e}") from None
    return (WindowBatches(parts["training"], batch_size, seed),
            WindowBatches(parts["validation"], batch_size, seed, shuffle=False, drop_last=False))
