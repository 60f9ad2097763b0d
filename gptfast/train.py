"""Pretraining: the classic loop (evaluate every `eval_freq` steps on `eval_iter` batches,
a text sample after each epoch, tokens seen) with what a fast trainer needs: fused AdamW,
bf16/fp16 autocast, gradient accumulation and clipping, warm-up + cosine decay,
torch.compile, tokens/s and MFU, a JSONL metrics log, plots, exact resume, and DDP under
torchrun when WORLD_SIZE > 1.

Resume is exact because every batch is a pure function of (seed, step): the shuffle of
epoch e comes from a generator seeded with seed + e, and the RNG state that dropout
draws from is saved in the checkpoint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from .config import PRESETS, GPTConfig
from .data import VERDICT, GPTDatasetV1, TokenFileLoader, read_text
from .backends import resolve_device
from .model import GPTModel
from .plotting import figure
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text


def _opt(default, help: str):
    """A TrainConfig field whose help text `gptfast train --help` shows."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    epochs: int = _opt(10, "passes over the training windows")
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (also sets the schedule's length)")
    batch_size: int = _opt(2, "windows per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    lr: float = _opt(4e-4, "peak learning rate")
    min_lr: float = _opt(4e-5, "floor of the cosine decay")
    warmup_steps: int = _opt(0, "linear warm-up steps")
    schedule: str = _opt("cosine", "cosine, or constant (the classic loop)")
    weight_decay: float = _opt(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float | None = _opt(1.0, "clip the gradient norm to this (0: off)")
    eval_freq: int = _opt(5, "evaluate every N steps")
    eval_iter: int = _opt(5, "batches per evaluation")
    dtype: str = _opt("fp32", "fp32, or bf16 / fp16 autocast")
    compile: bool = _opt(False, "torch.compile the model")
    seed: int = _opt(123, "seed for initialisation, shuffling and dropout")
    start_context: str = _opt("Every effort moves you", "prompt of the sample printed after each epoch")
    sample_tokens: int = _opt(50, "tokens in that sample (0: no sample)")
    save_every: int | None = _opt(None, "steps between checkpoints (default: every evaluation)")

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_freq", "eval_iter", "lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr], got {self.min_lr}")
        for name in ("max_steps", "save_every"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class TrainingDiverged(RuntimeError):
    pass


class WindowBatches:
    """Batches of a sliding-window dataset; step s always gets the same batch."""

    def __init__(self, dataset: GPTDatasetV1, batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        if drop_last and len(dataset) < batch_size:
            raise ValueError(f"the training data has {len(dataset)} windows, fewer than one batch of {batch_size}; "
                             "use a smaller --batch-size or --context-length, or more text")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        # training drops the last partial batch, as the classic loader does; evaluation keeps it
        self.steps_per_epoch = len(dataset) // batch_size if drop_last else -(-len(dataset) // batch_size)

    def batch(self, i: int):
        """Micro-batch number i, counting over all epochs (and over all ranks under DDP)."""
        epoch, j = divmod(i, self.steps_per_epoch)
        order = (torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch))
                 if self.shuffle else torch.arange(len(self.dataset)))
        rows = order[j * self.batch_size:(j + 1) * self.batch_size].tolist()
        x, y = zip(*(self.dataset[r] for r in rows))
        return torch.stack(x), torch.stack(y)

    def __iter__(self):  # one pass in order, for evaluation
        for j in range(self.steps_per_epoch):
            yield self.batch(j)


class TokenFileBatches:
    """Random windows of a prepared token file; step s always gets the same batch."""

    def __init__(self, path, batch_size: int, context_length: int, seed: int, steps_per_epoch: int = 1000):
        self.loader = TokenFileLoader(path, batch_size, context_length, seed)
        self.seed, self.steps_per_epoch = seed, steps_per_epoch

    def batch(self, i: int):
        self.loader.generator.manual_seed(self.seed * 1_000_003 + i)
        return self.loader.next_batch()

    def __iter__(self):
        for j in range(self.steps_per_epoch):
            yield self.batch(j)


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig):
    """AdamW, decaying only matrices (nanoGPT's groups); fused kernels where torch has them."""
    params = [p for p in model.parameters() if p.requires_grad]
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


def flops_per_token(model: GPTModel, T: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus attention's 12·L·C·T (PaLM appendix B)."""
    cfg = model.cfg
    n = model.num_parameters() - model.pos_emb.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * T


def autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


@torch.no_grad()
def calc_loss_loader(batches, model, device, num_batches=None, dtype="fp32") -> float:
    """Mean loss over the first `num_batches` batches (all when None), the classic helper."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i, (x, y) in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        with autocast(device, dtype):
            total += model(x.to(device), targets=y.to(device)).item()
        n += 1
    model.train(was_training)
    return total / n if n else float("nan")


def generate_sample(model: GPTModel, start_context: str, max_new_tokens: int, device) -> str:
    from .generate import generate  # the engine lives beside the trainer, imported on use
    was_training = model.training
    model.eval()
    idx = text_to_token_ids(start_context).to(device)
    out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=model.cfg.context_length)
    model.train(was_training)
    return token_ids_to_text(out.cpu())


class Trainer:
    """Runs `cfg` on `model` over `train` / `val` batch sources, writing into `out_dir`."""

    def __init__(self, model: GPTModel, train, val, cfg: TrainConfig, out_dir, device=None, log=print):
        self.cfg, self.out_dir, self.log = cfg, Path(out_dir), log
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and self.world > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.train_batches, self.val_batches = train, val
        self.optimizer = make_optimizer(model, cfg)
        self.total_steps = cfg.epochs * train.steps_per_epoch // (cfg.grad_accum * self.world)
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.total_steps == 0:
            raise ValueError(f"{cfg.epochs} epoch(s) of {train.steps_per_epoch} micro-batches make no optimizer step "
                             f"of {cfg.grad_accum * self.world} micro-batches; lower --grad-accum or raise --epochs")
        if self.is_main:  # an unusable output folder fails now, not at the first checkpoint
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_at(s, self.total_steps, cfg) / cfg.lr)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        self.step, self.tokens_seen = 0, 0
        self.history = {"steps": [], "tokens_seen": [], "train_loss": [], "val_loss": [], "step_loss": []}
        runner = model
        if self.world > 1:
            runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index]
                                                               if self.device.type == "cuda" else None)
        self.runner = torch.compile(runner) if cfg.compile else runner

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    # -- checkpoints ---------------------------------------------------------------------
    def save(self):
        if not self.is_main:
            return
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scheduler, self.step,
                        rng=rng, tokens_seen=self.tokens_seen, history=self.history,
                        scaler=self.scaler.state_dict(), train=dataclasses.asdict(self.cfg))

    def resume(self, path):
        state = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in state:
            raise ValueError(f"checkpoint {path} holds weights only (no optimizer state); cannot resume")
        load_state_dict_checked(self.model, state["model"], source=str(path))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):  # fp16 runs only; an empty state means the scaler was off
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.history = state["step"], state["tokens_seen"], state["history"]
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self.log(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------
    def train_step(self) -> float:
        cfg, loss_sum = self.cfg, 0.0
        for m in range(cfg.grad_accum):
            # under DDP each rank takes its own micro-batch: the global batch is world x batch_size
            x, y = self.train_batches.batch((self.step * cfg.grad_accum + m) * self.world + self.rank)
            x, y = x.to(self.device), y.to(self.device)
            sync = self.world == 1 or m == cfg.grad_accum - 1  # DDP: all-reduce on the last micro-batch
            with (contextlib.nullcontext() if sync else self.runner.no_sync()), autocast(self.device, cfg.dtype):
                loss = self.runner(x, targets=y) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum += loss.item()
            self.tokens_seen += x.numel() * self.world
        if not math.isfinite(loss_sum):
            raise TrainingDiverged(f"loss became {loss_sum} at step {self.step + 1}; stopped. The last good "
                                   f"checkpoint is kept at {self.checkpoint_path} (try a lower --lr)")
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        return loss_sum

    def evaluate(self) -> tuple[float, float]:
        n = self.cfg.eval_iter
        return (calc_loss_loader(self.train_batches, self.model, self.device, n, self.cfg.dtype),
                calc_loss_loader(self.val_batches, self.model, self.device, n, self.cfg.dtype))

    def fit(self) -> dict:
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        steps_per_epoch = max(1, self.train_batches.steps_per_epoch // (cfg.grad_accum * self.world))
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.world * self.model.cfg.context_length
        flops = flops_per_token(self.model, self.model.cfg.context_length)
        peak = peak_flops(self.device)
        save_every = cfg.save_every or cfg.eval_freq
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                   disable=not self.is_main, dynamic_ncols=True)
        t0, t0_step = time.perf_counter(), self.step
        try:
            while self.step < self.total_steps:
                loss = self.train_step()
                self.history["step_loss"].append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
                if self.step % cfg.eval_freq == 0 or self.step == 1:
                    dt = time.perf_counter() - t0
                    tok_s = (self.step - t0_step) * tokens_per_step / max(dt, 1e-9)
                    self._record(self.evaluate(), tok_s, tok_s * flops / peak if peak else None, bar)
                if self.step % save_every == 0:
                    self.save()
                if self.step % steps_per_epoch == 0 or self.step == self.total_steps:
                    epoch = (self.step - 1) // steps_per_epoch + 1
                    if self.is_main and cfg.sample_tokens:
                        sample = generate_sample(self.model, cfg.start_context, cfg.sample_tokens, self.device)
                        bar.write(f"epoch {epoch} sample: {sample!r}")
        except KeyboardInterrupt:
            self.save()
            bar.close()
            self.log(f"interrupted at step {self.step}; checkpoint saved to {self.checkpoint_path}")
            raise
        bar.close()
        self.save()
        if self.is_main:
            self.plot()
        return self.history

    def _record(self, losses, tok_s, mfu, bar):
        train_loss, val_loss = losses
        h = self.history
        h["steps"].append(self.step)
        h["tokens_seen"].append(self.tokens_seen)
        h["train_loss"].append(train_loss)
        h["val_loss"].append(val_loss)
        if not self.is_main:
            return
        rec = {"step": self.step, "tokens_seen": self.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
               "train_ppl": math.exp(min(train_loss, 50)), "val_ppl": math.exp(min(val_loss, 50)),
               "lr": self.scheduler.get_last_lr()[0], "tokens_per_s": tok_s, "mfu": mfu}
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        mfu_txt = f", MFU {mfu:.1%}" if mfu is not None else ""
        bar.write(f"step {self.step:5d}: train loss {train_loss:.3f} (ppl {rec['train_ppl']:.1f}), "
                  f"val loss {val_loss:.3f} (ppl {rec['val_ppl']:.1f}), {tok_s:,.0f} tokens/s{mfu_txt}")

    def plot(self) -> Path | None:
        """loss.png: train/val loss and perplexity against steps (tokens seen on top)."""
        h = self.history
        if not h["steps"]:
            return None
        path = self.out_dir / "loss.png"
        with figure(path, ncols=2, figsize=(11, 4)) as axes:
            for ax, fn, name in ((axes[0], lambda v: v, "loss"), (axes[1], lambda v: math.exp(min(v, 50)), "perplexity")):
                ax.plot(h["steps"], [fn(v) for v in h["train_loss"]], label=f"train {name}")
                ax.plot(h["steps"], [fn(v) for v in h["val_loss"]], linestyle="-.", label=f"val {name}")
                ax.set_xlabel("step")
                ax.set_ylabel(name)
                ax.legend()
                top = ax.twiny()  # tokens seen, aligned with the step axis
                top.plot(h["tokens_seen"], [fn(v) for v in h["train_loss"]], alpha=0)
                top.set_xlabel("tokens seen")
            axes[1].set_yscale("log")
        return path


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


def add_parser(sub):
    p = sub.add_parser("train", help="pretrain a GPT on a text file (default: The Verdict)",
                       description="Pretrain a GPT from scratch: evaluates every --eval-freq steps, prints a "
                                   "sample each epoch, logs OUT/metrics.jsonl, plots OUT/loss.png and saves "
                                   "OUT/checkpoint.pt (resumable). Multi-GPU: torchrun --nproc-per-node N -m "
                                   "gptfast.cli train ...")
    p.add_argument("--preset", default="mini", help=f"model preset: {', '.join(PRESETS)} (default: mini)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=str(VERDICT), help="UTF-8 text file, split 90/10 (default: The Verdict)")
    src.add_argument("--tokens", help="directory with train.bin/val.bin from `gptfast prepare`")
    p.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--resume", help="checkpoint to resume from (e.g. OUT/checkpoint.pt)")
    p.add_argument("--context-length", type=int, help="override the preset's context length")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the context length)")
    p.add_argument("--backend", default="auto", help="reference, torch, triton or auto (default)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = f"{f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=text)
        else:  # annotations are strings here ("int | None"): the first name is the type
            kind = {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
            p.add_argument(flag, type=kind, default=f.default, help=text)
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    # `is not None`: an explicit 0 is an error below, not the preset's value
    overrides = {"context_length": args.context_length} if args.context_length is not None else {}
    model_cfg = GPTConfig.from_preset(args.preset, **overrides)
    torch.manual_seed(cfg.seed)
    model = GPTModel(model_cfg, backend=args.backend)
    T = model_cfg.context_length
    if args.tokens:
        train = TokenFileBatches(Path(args.tokens) / "train.bin", cfg.batch_size, T, cfg.seed)
        val = TokenFileBatches(Path(args.tokens) / "val.bin", cfg.batch_size, T, cfg.seed + 1, cfg.eval_iter)
    else:
        train, val = split_text_batches(read_text(args.data), T, T if args.stride is None else args.stride,
                                         cfg.batch_size, cfg.seed)
    trainer = Trainer(model, train, val, cfg, args.out, device=args.device)
    if args.resume:
        trainer.resume(args.resume)
    print(f"model {args.preset}: {model.num_parameters():,} parameters, backend {model.active_backend}, "
          f"device {trainer.device}, {trainer.total_steps} steps")
    try:
        trainer.fit()  # Ctrl-C: fit saves a checkpoint, then gptfast.cli reports it (exit 130)
    except TrainingDiverged as e:
        print(f"gptfast train: error: {e}")
        return 3
    print(f"checkpoint: {trainer.checkpoint_path}\nmetrics:    {args.out}/metrics.jsonl\n"
          f"plot:       {args.out}/loss.png")
    return 0
