"""PNG plots of training curves (matplotlib, headless), written atomically."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

from .files import atomic_file


@contextlib.contextmanager
def figure(path, ncols: int = 1, figsize=(5, 3)):
    """Yields a row of `ncols` axes; on exit the figure is saved to `path` (format from its
    suffix, png by default) through a temporary file, so a crash never leaves half a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=figsize, squeeze=False)
    try:
        yield list(axes[0])
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", dpi=100)  # tmp ends in .tmp
    finally:
        plt.close(fig)


def plot_curves(x, series: dict, xlabel: str, ylabel: str, path) -> Path:
    """One PNG with a line per series (train solid, the others dash-dotted)."""
    with figure(path) as (ax,):
        for label, ys in series.items():
            ax.plot(x[: len(ys)], ys, label=label, linestyle="-" if "train" in label else "-.")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend()
    return Path(path)


def plot_losses(steps, tokens_seen, train_loss, val_loss, path) -> Path:
    """Train/val loss and perplexity against steps, tokens seen on the top axis (the trainer's loss.png)."""
    with figure(path, ncols=2, figsize=(11, 4)) as axes:
        for ax, fn, name in ((axes[0], lambda v: v, "loss"), (axes[1], lambda v: math.exp(min(v, 50)), "perplexity")):
            ax.plot(steps, [fn(v) for v in train_loss], label=f"train {name}")
            ax.plot(steps, [fn(v) for v in val_loss], linestyle="-.", label=f"val {name}")
            ax.set_xlabel("step")
            ax.set_ylabel(name)
            ax.legend()
            top = ax.twiny()  # tokens seen, aligned with the step axis
            top.plot(tokens_seen, [fn(v) for v in train_loss], alpha=0)
            top.set_xlabel("tokens seen")
        axes[1].set_yscale("log")
    return Path(path)
