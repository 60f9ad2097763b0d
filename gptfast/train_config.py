"""What a training run is told: TrainConfig (each field's help text, range check and
choices, shared by `gptfast train` and the fine-tuning commands), the optimizer, the
learning-rate schedule, and the FLOP counts behind MFU."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .config import OptionError, check_number

INT, FLOAT = True, False


def _opt(default, help: str, check=None, choices=None):
    """A TrainConfig field: its help text (`gptfast train --help`), its range check
    (integer?, op, bound), its choices."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "passes over the training data", (INT, ">=", 1))
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (also sets the schedule's length)",
                                 (INT, ">=", 1))
    batch_size: int = _opt(2, "examples per micro-batch", (INT, ">=", 1))
    grad_accum: int = _opt(1, "micro-batches per optimizer step", (INT, ">=", 1))
    lr: float = _opt(4e-4, "peak learning rate", (FLOAT, ">", 0))
    min_lr: float | None = _opt(None, "floor of the cosine decay (default: lr / 10)", (FLOAT, ">=", 0))
    warmup_steps: int = _opt(0, "linear warm-up steps", (INT, ">=", 0))
    schedule: str = _opt("cosine", "learning-rate schedule after warm-up: cosine decay, or constant (the classic loop)",
                         choices=("cosine", "constant"))
    optimizer: str = _opt("nanogpt", "nanogpt: fused AdamW, betas (0.9, 0.95), decay on matrices only; classic: "
                          "the book's torch.optim.AdamW, betas (0.9, 0.999), decay on every parameter",
                          choices=("nanogpt", "classic"))
    weight_decay: float = _opt(0.1, "AdamW weight decay", (FLOAT, ">=", 0))
    grad_clip: float | None = _opt(1.0, "clip the gradient norm to this (0: off)", (FLOAT, ">=", 0))
    eval_freq: int = _opt(5, "evaluate every N steps", (INT, ">=", 1))
    eval_iter: int | None = _opt(5, "batches per evaluation", (INT, ">=", 1))  # None: all
    log_every: int = _opt(10, "read the loss back from the device (progress bar, NaN check) every N steps",
                          (INT, ">=", 1))
    dtype: str = _opt("fp32", "fp32, or bf16 / fp16 autocast", choices=("fp32", "bf16", "fp16"))
    compile: bool = _opt(False, "torch.compile the model")
    seed: int = _opt(123, "seed for initialisation, shuffling and dropout", (INT, ">=", 0))
    start_context: str = _opt("Every effort moves you", "prompt of the sample printed after each epoch")
    sample_tokens: int = _opt(50, "tokens in that sample (0: no sample)", (INT, ">=", 0))
    save_every: int | None = _opt(None, "save the resumable checkpoint every N steps as well (it is always saved "
                                  "on Ctrl-C; by `train` also at the end, with best.pt at each new lowest "
                                  "validation loss)", (INT, ">=", 1))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["check"]:
                check_number(f.name, value, *meta["check"], optional="None" in f.type)
            if meta["choices"] and value not in meta["choices"]:
                raise OptionError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if self.min_lr is not None and self.min_lr > self.lr:
            raise OptionError(f"min_lr must be <= lr ({self.lr}), got {self.min_lr}")
        if self.sample_tokens and not self.start_context:
            raise OptionError("start_context is empty; give a prompt for the samples, or sample_tokens 0 for none")

    @classmethod
    def from_args(cls, args, **fixed) -> "TrainConfig":
        """The config of a command's parsed arguments (the fields it has) and `fixed` values."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **fixed})


def check_options(args, extra: dict | None = None) -> None:
    """Every numeric option of a command, checked before any work: TrainConfig's fields by
    their own rules, `extra` {dest: (integer?, op, bound)} for the command's others. Errors
    name the flag ("--lr must be > 0, got -0.5"); an option not given (None) passes."""
    rules = {f.name: f.metadata["check"] for f in dataclasses.fields(TrainConfig) if f.metadata["check"]}
    for dest, rule in {**rules, **(extra or {})}.items():
        if hasattr(args, dest):
            check_number("--" + dest.replace("_", "-"), getattr(args, dest), *rule, optional=True)


def help_with_default(text: str, default) -> str:
    """`text (default: X)`, once: not when the text names its default itself or there is none."""
    if default is None or default is False or "default" in text:
        return text
    return f"{text} (default: {default})"


def add_config_args(p, names=None, defaults: dict | None = None) -> None:
    """--flags for TrainConfig's fields (`names`, default all) with `defaults` overriding the
    dataclass defaults (fine-tuning's classic recipe)."""
    defaults = defaults or {}
    for f in dataclasses.fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag, default = "--" + f.name.replace("_", "-"), defaults.get(f.name, f.default)
        text = help_with_default(f.metadata["help"], default)
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=text)
        else:  # annotations are strings here ("int | None"): the first name is the type
            kind = {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
            p.add_argument(flag, type=kind, default=default, choices=f.metadata["choices"], help=text)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    floor = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW over the trainable parameters. "nanogpt": decay on matrices only, betas (0.9,
    0.95), fused kernels where torch has them. "classic": exactly the book's
    torch.optim.AdamW(params, lr, weight_decay) (betas (0.9, 0.999), decay on everything)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "classic":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))


# Dense bf16 peak FLOP/s for MFU; None where unknown (MFU is then not reported).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def flops_per_token(model, T: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·C·T (PaLM appendix B)."""
    cfg = model.cfg
    n = model.num_parameters() - model.pos_emb.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * T
