"""Fine-tuning a pretrained GPT: `classify` (text classification, e.g. spam) and
`instruct` (Alpaca-style instruction following), both optionally with LoRA.

Both train through gptfast.train's Trainer (AMP, accumulation, clipping, schedules, the NaN
guard, exact resume, metrics log, DDP) with the classic recipe's settings as defaults. This
module holds what both share: choosing the base model, LoRA options, the training options
and their checks, atomic JSON output (plots: gptfast.plotting).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..backends import BACKENDS, resolve_device
from ..config import PRESETS, GPTConfig
from ..files import atomic_file, check_writable
from ..model import GPTModel
from ..train import FLOAT, INT, RunFiles, TrainConfig, add_config_args, check_options
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


# the classic fine-tuning recipe: the book's AdamW at a constant rate, no clipping
RECIPE = dict(optimizer="classic", schedule="constant", grad_clip=0.0, lr=5e-5, weight_decay=0.1, batch_size=8)
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "schedule", "min_lr", "warmup_steps",
                 "grad_clip", "grad_accum", "dtype", "compile", "max_steps", "log_every", "save_every")
# the numeric options of add_model_args (the training options are checked by TrainConfig's rules)
MODEL_CHECKS = {"lora_rank": (INT, ">=", 0), "lora_alpha": (FLOAT, ">", 0)}


def add_training_args(p, defaults: dict, names=TRAIN_OPTIONS) -> None:
    """The trainer's options (gptfast.train) with fine-tuning's defaults, plus --resume."""
    g = p.add_argument_group("training (the gptfast train options; defaults: the classic recipe)")
    add_config_args(g, names, {**RECIPE, **defaults})
    g.add_argument("--resume", metavar="CHECKPOINT", help="continue an interrupted run from the checkpoint its "
                   "Ctrl-C (or --save-every) wrote; give the same data and model options")


def check_finetune_options(args, extra: dict) -> None:
    """Every numeric option in range before any work (one line naming the flag)."""
    check_options(args, {**MODEL_CHECKS, **extra})


def run_files(directory, prefix: str, outputs) -> RunFiles:
    """The trainer's files for a fine-tuning run (its checkpoint on Ctrl-C or --save-every and
    its metrics log; the run's own outputs are the result), checked writable with `outputs`."""
    files = RunFiles(Path(directory), prefix, final=False, best=False, plot=False)
    files.check()
    for path in outputs:
        check_writable(path)
    return files


def train_config(args, **fixed) -> TrainConfig:
    """The TrainConfig of a fine-tuning command's arguments (no text samples)."""
    return TrainConfig.from_args(args, sample_tokens=0, **fixed)


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


def report_trainable(model, wrapped) -> None:
    """Print how much of the model trains (and on how many layers LoRA sits)."""
    from ..lora import count_trainable

    print(f"training {count_trainable(model):,} of {model.num_parameters():,} parameters"
          + (f" (LoRA on {len(wrapped)} layers)" if wrapped else ""))


def write_json(obj, path, indent=1) -> Path:
    """JSON output, written atomically (see gptfast.files.atomic_file)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return Path(path)
