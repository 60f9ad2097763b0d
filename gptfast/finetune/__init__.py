"""Fine-tuning a pretrained GPT: `classify` (text classification, e.g. spam) and
`instruct` (Alpaca-style instruction following), both optionally with LoRA.

This module holds what both share: choosing the base model, LoRA options, option checks,
atomic JSON output (plots: gptfast.plotting).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backends import BACKENDS, resolve_device
from ..checkpoint import atomic_file
from ..cli import CLIError
from ..config import PRESETS, GPTConfig
from ..model import GPTModel
from ..weights import SIZES, load_source

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def add_model_args(p):
    """Base-model options shared by the fine-tuning commands."""
    g = p.add_argument_group("base model (choose one)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--gpt2", metavar="SIZE_OR_PATH",
                     help=f"GPT-2 weights: a size ({', '.join(SIZES)}) from --models-dir (see `gptfast download-gpt2`), "
                     "or a path (OpenAI, Hugging Face or `gptfast convert` folder)")
    src.add_argument("--checkpoint", metavar="PATH", help="a gptfast checkpoint (from `gptfast train`)")
    src.add_argument("--preset", metavar="NAME", choices=list(PRESETS),
                     help="a randomly initialised model (tests and demos): " + ", ".join(PRESETS))
    g.add_argument("--models-dir", default="models", help="where GPT-2 weights live (default: models)")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="compute backend (default: auto = triton on CUDA, else torch)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    p.add_argument("--seed", type=int, default=123, help="seed for splits, initialisation and shuffling")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-rank", type=int, default=0, help="train rank-R adapters instead of weights (0: off)")
    lo.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: equal to the rank)")
    lo.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                    help="only wrap linear layers matching these names, e.g. att.qkv ff out_head "
                    "(default: all; finetune-instruct leaves the vocabulary head out)")


def check_options(args, at_least: dict, above: dict):
    """Numeric options out of range are one-line errors before any work starts.
    `at_least` / `above`: {dest: bound} for `>= bound` / `> bound`; None (not given) passes.
    The LoRA options of add_model_args are always checked."""
    checks = [(dest, low, ">=") for dest, low in {**at_least, "lora_rank": 0}.items()]
    checks += [(dest, low, ">") for dest, low in {**above, "lora_alpha": 0}.items()]
    for dest, low, op in checks:
        value = getattr(args, dest)
        if value is None:
            continue
        if not (value >= low if op == ">=" else value > low):  # `not` also rejects NaN
            raise CLIError(f"--{dest.replace('_', '-')} must be {op} {low}, got {value}")


def load_base_model(args) -> GPTModel:
    """The model named by --gpt2 / --checkpoint / --preset, on args.device."""
    device = resolve_device(args.device)
    if args.gpt2 or args.checkpoint:
        return load_source(args.checkpoint, args.gpt2, args.models_dir, backend=args.backend, device=device)
    torch.manual_seed(args.seed)
    return GPTModel(GPTConfig.from_preset(args.preset), backend=args.backend).to(device)


def maybe_apply_lora(model, args, default_exclude=None) -> list[str]:
    """Wrap the model's linear layers when --lora-rank is set; returns their names.
    `default_exclude` applies only when --lora-targets is not given."""
    if not args.lora_rank:
        return []
    from ..lora import apply_lora

    alpha = args.lora_alpha if args.lora_alpha is not None else args.lora_rank
    exclude = None if args.lora_targets else default_exclude
    return apply_lora(model, args.lora_rank, alpha, targets=args.lora_targets, exclude=exclude)


def make_adamw(model, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """The classic fine-tuning optimiser: plain AdamW over the trainable parameters."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def report_trainable(model, wrapped) -> None:
    """Print how much of the model trains (and on how many layers LoRA sits)."""
    from ..lora import count_trainable

    print(f"training {count_trainable(model):,} of {model.num_parameters():,} parameters"
          + (f" (LoRA on {len(wrapped)} layers)" if wrapped else ""))


def write_json(obj, path, indent=1) -> Path:
    """JSON output, written atomically (see gptfast.checkpoint.atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return Path(path)
