"""Fine-tuning a pretrained GPT: `classify` (text classification, e.g. spam) and
`instruct` (Alpaca-style instruction following), both optionally with LoRA.

This module holds what both share: choosing the base model, LoRA options, and plotting.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import PRESETS, GPTConfig
from ..model import GPTModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
GPT2_SIZES = ("124M", "355M", "774M", "1558M")


def add_model_args(p):
    """Base-model options shared by the fine-tuning commands."""
    g = p.add_argument_group("base model (choose one)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--gpt2", metavar="SIZE", choices=GPT2_SIZES,
                     help="OpenAI GPT-2 weights of this size from --models-dir (see `gptfast download`)")
    src.add_argument("--checkpoint", metavar="PATH", help="a gptfast checkpoint (from `gptfast train`)")
    src.add_argument("--preset", metavar="NAME", choices=list(PRESETS),
                     help="a randomly initialised model (tests and demos): " + ", ".join(PRESETS))
    g.add_argument("--models-dir", default="models", help="where GPT-2 weights live (default: models)")
    p.add_argument("--backend", default="auto", choices=["reference", "torch", "triton", "auto"],
                   help="compute backend (default: auto = triton on CUDA, else torch)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--seed", type=int, default=123, help="seed for splits, initialisation and shuffling")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters instead of weights (0: off)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank)")
    lo.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                    help="only wrap linear layers matching these names, e.g. att.qkv ff out_head "
                    "(default: all; finetune-instruct leaves the vocabulary head out)")


def pick_device(name=None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_base_model(args) -> GPTModel:
    """The model named by --gpt2 / --checkpoint / --preset, on args.device."""
    device = pick_device(args.device)
    if args.gpt2:
        from ..weights import load_gpt2  # written separately; heavy, so imported on use

        model = load_gpt2(args.gpt2, models_dir=args.models_dir, backend=args.backend, device=device)
    elif args.checkpoint:
        from ..checkpoint import load_model

        model = load_model(args.checkpoint, backend=args.backend, device=device)
    else:
        torch.manual_seed(args.seed)
        model = GPTModel(GPTConfig.from_preset(args.preset), backend=args.backend)
    return model.to(device)


def maybe_apply_lora(model, args, default_exclude=None) -> list[str]:
    """Wrap the model's linear layers when --lora-rank is set; returns their names.
    `default_exclude` applies only when --lora-targets is not given."""
    if not args.lora_rank:
        return []
    from ..lora import apply_lora

    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    exclude = None if args.lora_targets else default_exclude
    return apply_lora(model, args.lora_rank, alpha, targets=args.lora_targets, exclude=exclude)


def plot_curves(x, series: dict, xlabel: str, ylabel: str, path) -> Path:
    """One PNG with a line per series (matplotlib, headless Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    for label, ys in series.items():
        ax.plot(x[: len(ys)], ys, label=label, linestyle="-" if "train" in label else "-.")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
