"""Training: one loop for pretraining and fine-tuning. The classic semantics (evaluate every
`eval_freq` steps on `eval_iter` batches, a text sample after each epoch, tokens seen) with
what a fast trainer needs: fused AdamW (or the book's exact AdamW), bf16/fp16 autocast,
gradient accumulation and clipping, warm-up + cosine decay, torch.compile, training
throughput and MFU, a JSONL metrics log, plots, a NaN guard, exact resume, and DDP under
torchrun when WORLD_SIZE > 1. Fine-tuning passes its own `Task` (loss, metrics, what
tokens_seen counts) and `RunFiles`.

Resume is exact because every batch is a pure function of (seed, step) (gptfast.batches),
the RNG state that dropout draws from is saved in the checkpoint, and a checkpoint is only
ever written at a step boundary: Ctrl-C finishes the current step (and its evaluation)
first. The loss is read back from the device only at logging, evaluation and saves; no
save ever writes non-finite weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from .backends import resolve_device
from .batches import IndexedBatches, TokenFileBatches, WindowBatches, split_text_batches  # noqa: F401 (API)
from .checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from .config import PRESETS, GPTConfig
from .data import VERDICT, read_text
from .evaluation import autocast, calc_loss_loader, eval_mode, mean_over_batches  # noqa: F401 (API)
from .files import atomic_file, check_writable
from .generate import generate
from .model import GPTModel
from .plotting import plot_losses
from .tokenizer import text_to_token_ids, token_ids_to_text
from .train_config import (FLOAT, INT, TrainConfig, add_config_args, check_options,  # noqa: F401 (API)
                           flops_per_token, lr_at, make_optimizer, peak_flops)


class TrainingDiverged(RuntimeError):
    exit_code = 3  # gptfast.cli exits with it


def process_rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes files."""
    return int(os.environ.get("RANK", "0"))


# ---- what is trained: pretraining's task; fine-tuning brings its own ------------------------

def lm_loss(runner, x, y):
    """Mean next-token loss, through the model's forward (DDP and torch.compile see it)."""
    return runner(x, targets=y)


def lm_metrics(model, x, y):
    """The mean next-token loss of an evaluation batch."""
    return model(x, targets=y)


def count_tokens(x, y) -> int:
    return x.numel()


@dataclass(frozen=True)
class Task:
    """What the Trainer optimises and reports. `loss(runner, x, y)`: the mean loss of a
    micro-batch, through the forward of `runner` (the model, maybe DDP/compiled);
    `metrics(model, x, y)`: a tensor of values named `metric_names`, averaged over an
    evaluation set (in eval mode); `count(x, y)`: what tokens_seen adds (CPU tensors);
    `perplexity`: log exp(loss) too; `eval_first_step`: the classic loop also evaluates
    after step 1; `example_weighted`: a short last evaluation batch counts by its size (the
    classic accuracy) instead of as a whole batch (the classic loss)."""
    loss: Callable = lm_loss
    metrics: Callable = lm_metrics
    metric_names: tuple = ("loss",)
    count: Callable = count_tokens
    perplexity: bool = True
    eval_first_step: bool = True
    example_weighted: bool = False


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes: PREFIX + checkpoint.pt, metrics.jsonl, best.pt (when the validation
    loss improves; weights only), loss.png, in `directory`. `final`: checkpoint.pt at the end
    too (fine-tuning writes its own outputs instead)."""
    directory: Path
    prefix: str = ""
    final: bool = True
    best: bool = True
    plot: bool = True

    def path(self, name: str) -> Path:
        return Path(self.directory) / (self.prefix + name)

    def check(self) -> None:
        """An unusable output folder fails now, not at the first save."""
        for name in ("checkpoint.pt", "metrics.jsonl") + ("best.pt",) * self.best + ("loss.png",) * self.plot:
            check_writable(self.path(name))


def cut_metrics(path: Path, step: int) -> None:
    """Keep only the metrics lines up to `step` (a resumed run rewrites the rest; a line torn
    by a kill is dropped)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    with atomic_file(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")


def generate_sample(model: GPTModel, start_context: str, max_new_tokens: int, device) -> str:
    with eval_mode(model):
        idx = text_to_token_ids(start_context).to(device)
        out = generate(model, idx, max_new_tokens=max_new_tokens, context_size=model.cfg.context_length)
    return token_ids_to_text(out.cpu())


class Trainer:
    """Runs `cfg` on `model` over the `train` batch source (gptfast.batches), evaluating on
    `evals` (default {"train": train, "val": val}) and writing into `out_dir` (a folder, a
    RunFiles, or None for no files)."""

    def __init__(self, model: GPTModel, train, val, cfg: TrainConfig, out_dir=None, device=None, log=print, *,
                 task: Task = Task(), evals: dict | None = None, progress: bool = True):
        self.cfg, self.task, self.log, self.progress = cfg, task, log, progress
        self.files = RunFiles(Path(out_dir)) if isinstance(out_dir, (str, os.PathLike)) else out_dir
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = process_rank()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if device is None and self.world > 1 and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.train_batches = train
        self.evals = evals if evals is not None else {"train": train, "val": val}
        self.optimizer = make_optimizer(model, cfg)
        self.total_steps = cfg.epochs * train.steps_per_epoch // (cfg.grad_accum * self.world)
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        if self.total_steps == 0:
            raise ValueError(f"{cfg.epochs} epoch(s) of {train.steps_per_epoch} micro-batches make no optimizer step "
                             f"of {cfg.grad_accum * self.world} micro-batches; lower --grad-accum or raise --epochs")
        if self.is_main and self.files is not None:
            self.files.check()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "fp16")
        self.step, self.tokens_seen, self.best_val = 0, 0, math.inf
        self.history = {"steps": [], "tokens_seen": [], "step_loss": [],
                        **{f"{s}_{m}": [] for s in self.evals for m in task.metric_names}}
        # FLOPs per token: 6N, plus attention's share per token of context (a micro-batch's T)
        self._flops_6n = flops_per_token(model, 0)
        self._flops_per_t = flops_per_token(model, 1) - self._flops_6n
        self._pending = []  # per-step losses still on the device
        self._kept = None  # (path, step) of the last checkpoint known good
        self._resumed = self._stop = self._in_step = self._updating = False
        self._rng_at_step = None
        self._reset_clock()
        runner = model
        if self.world > 1:
            runner = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index]
                                                               if self.device.type == "cuda" else None)
        self.runner = torch.compile(runner) if cfg.compile else runner

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def checkpoint_path(self) -> Path | None:
        return self.files.path("checkpoint.pt") if self.files else None

    # -- checkpoints ---------------------------------------------------------------------
    def _rng_state(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _check_weights(self) -> None:
        """No save ever writes non-finite weights (one host sync; at saves only)."""
        if not torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all():
            raise TrainingDiverged(self._diverged(f"the weights became non-finite by step {self.step}"))

    def _diverged(self, what: str) -> str:
        kept = (f"the last good checkpoint {self._kept[0]} (step {self._kept[1]}) is kept" if self._kept
                else "no checkpoint of this run was written")
        return f"{what}; stopped: {kept} (try a lower --lr)"

    def save(self, best: bool = False) -> None:
        """checkpoint.pt (everything a resume needs), or best.pt (weights only)."""
        if not self.is_main or self.files is None:
            return
        self._check_weights()
        path, t0 = self.files.path("best.pt" if best else "checkpoint.pt"), time.perf_counter()
        if best:
            save_checkpoint(path, self.model, step=self.step, val_loss=self.best_val)
        else:
            save_checkpoint(path, self.model, self.optimizer, step=self.step, rng=self._rng_state(),
                            tokens_seen=self.tokens_seen, history=self.history, best_val=self.best_val,
                            scaler=self.scaler.state_dict(), train=dataclasses.asdict(self.cfg))
            self._kept = (path, self.step)
        self._say(f"saved {path} (step {self.step}) in {time.perf_counter() - t0:.1f} s", always=True)

    def resume(self, path):
        """Continue the run that saved `path` exactly; a file of weights only (best.pt, a classic .pth)
        has no optimizer, step or RNG state: start from its weights at step 0 (one line says so)."""
        state = load_checkpoint(path, map_location=self.device, preset=self.model.cfg)
        load_state_dict_checked(self.model, state["model"], source=str(path))
        if "optimizer" not in state:
            unused = " (its classic optimizer_state_dict is not used)" if "optimizer_state_dict" in state else ""
            self.log(f"{path} holds weights only: training starts from its weights at step 0 with a fresh "
                     f"optimizer state{unused}")
            return
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):  # fp16 runs only; an empty state means the scaler was off
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.history = state["step"], state["tokens_seen"], state["history"]
        self.best_val = state.get("best_val", math.inf)
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        self._kept, self._resumed = (Path(path), self.step), True
        if self.is_main and self.files is not None:
            cut_metrics(self.files.path("metrics.jsonl"), self.step)  # lines a killed run wrote after it
        self.log(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------
    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns its mean loss, left on the device."""
        cfg, count, loss_sum = self.cfg, 0, 0.0
        self._rng_at_step, self._in_step = self._rng_state(), True  # a Ctrl-C inside saves this state
        for g in self.optimizer.param_groups:
            g["lr"] = lr_at(self.step, self.total_steps, cfg)
        for m in range(cfg.grad_accum):
            # under DDP each rank takes its own micro-batch: the global batch is world x batch_size
            x, y = self.train_batches.batch((self.step * cfg.grad_accum + m) * self.world + self.rank)
            count += self.task.count(x, y)
            self._work["tokens"] += x.numel()
            self._work["flops"] += x.numel() * (self._flops_6n + self._flops_per_t * x.shape[-1])
            x, y = x.to(self.device), y.to(self.device)
            sync = self.world == 1 or m == cfg.grad_accum - 1  # DDP: all-reduce on the last micro-batch
            with (contextlib.nullcontext() if sync else self.runner.no_sync()), autocast(self.device, cfg.dtype):
                loss = self.task.loss(self.runner, x, y) / cfg.grad_accum
            self.scaler.scale(loss).backward()
            loss_sum = loss_sum + loss.detach()
        self._updating = True  # from here until the step is counted, a Ctrl-C must not save
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += count * self.world
        self._pending.append(loss_sum)
        self._updating = self._in_step = False
        return loss_sum

    def fit(self) -> dict:
        """Train to total_steps; returns the history. Ctrl-C: the current step finishes, a
        checkpoint is saved, then KeyboardInterrupt propagates."""
        self._start_run()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step",
                         disable=not (self.is_main and self.progress), dynamic_ncols=True)
        try:
            with self._ctrl_c_at_step_boundary():
                while self.step < self.total_steps:
                    if self._stop:
                        raise KeyboardInterrupt
                    self.train_step()
                    self._bar.update(1)
                    self._after_step()
                self._read_losses()
        except KeyboardInterrupt:
            self._save_interrupted()
            raise
        finally:
            self._bar.close()
        if self.files is not None and self.files.final:
            self.save()
        if self.is_main and self.files is not None and self.files.plot:
            self.plot()
        self._summary()
        return self.history

    def _after_step(self):
        cfg, step = self.cfg, self.step
        steps_per_epoch = max(1, self.train_batches.steps_per_epoch // (cfg.grad_accum * self.world))
        last = step == self.total_steps
        evaluate = step % cfg.eval_freq == 0 or last or (step == 1 and self.task.eval_first_step)
        save = cfg.save_every is not None and step % cfg.save_every == 0
        sample = self.is_main and cfg.sample_tokens and (step % steps_per_epoch == 0 or last)
        if evaluate or save or sample or step % cfg.log_every == 0:
            self._read_losses()
        if evaluate:
            self._record(self.evaluate())
        if save:
            self.save()
        if sample:
            text = generate_sample(self.model, cfg.start_context, cfg.sample_tokens, self.device)
            self._say(f"epoch {(step - 1) // steps_per_epoch + 1} sample: {text!r}")
        if evaluate or save or sample:
            self._clock["mark"] = time.perf_counter()  # evaluation, saves and samples are not training time

    def _read_losses(self):
        """The per-step losses since the last read, in one host sync; a non-finite one stops."""
        if self._pending:
            values = torch.stack(self._pending).tolist()
            self._pending.clear()
            first = self.step - len(values) + 1
            bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if bad is not None:
                raise TrainingDiverged(self._diverged(f"loss became {values[bad]} at step {first + bad}"))
            self.history["step_loss"].extend(values)
            self._bar.set_postfix(loss=f"{values[-1]:.3f}")
        now = time.perf_counter()
        self._clock["train_s"] += now - self._clock["mark"]
        self._clock["mark"] = now

    def evaluate(self) -> dict[str, list[float]]:
        """{set name: [metric values]}: each metric's mean over cfg.eval_iter batches of each set."""
        with eval_mode(self.model):
            means = {name: mean_over_batches(lambda x, y: self.task.metrics(self.model, x, y), batches,
                                             self.cfg.eval_iter, self.device, self.cfg.dtype,
                                             self.task.example_weighted)
                     for name, batches in self.evals.items()}
        return {name: torch.atleast_1d(v).tolist() for name, v in means.items()}

    @contextlib.contextmanager
    def _ctrl_c_at_step_boundary(self):
        """The first Ctrl-C asks to stop after the current step; a second one interrupts at
        once. (Main thread of a single process only: ranks of a DDP run stop together.)"""
        if self.world > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            self._say("Ctrl-C: stopping after this step to save a checkpoint (Ctrl-C again: stop now)", always=True)
        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _save_interrupted(self):
        """Save at the last step boundary; nothing when the weights may be half-updated."""
        if self.files is None:
            return
        if self._updating:
            self._say(f"interrupted during the update of step {self.step + 1}; nothing saved"
                      + (f", the last checkpoint {self._kept[0]} (step {self._kept[1]}) is kept" if self._kept else ""),
                      always=True)
            return
        if self._in_step:  # between micro-batches: the weights are those of the last boundary
            torch.set_rng_state(self._rng_at_step["torch"])
            if "cuda" in self._rng_at_step:
                torch.cuda.set_rng_state(self._rng_at_step["cuda"], self.device)
            self.optimizer.zero_grad(set_to_none=True)
        try:
            self._read_losses()
            self.save()
        except TrainingDiverged as e:
            self._say(str(e), always=True)
            return
        self._say(f"interrupted at step {self.step}; checkpoint saved to {self.checkpoint_path} "
                  f"(continue with --resume {self.checkpoint_path})", always=True)

    def _start_run(self):
        """A fresh run into a folder that holds an earlier one starts a new log (one line says so)."""
        self._reset_clock()
        if not self.is_main or self.files is None or self._resumed:
            return
        metrics, ckpt = self.files.path("metrics.jsonl"), self.files.path("checkpoint.pt")
        if metrics.exists() or ckpt.exists():
            self.log(f"note: {self.files.directory} holds an earlier run; this new run starts a new "
                     f"{metrics.name} and replaces its checkpoints (to continue it instead: --resume {ckpt})")
            metrics.unlink(missing_ok=True)

    def _reset_clock(self):
        """Time and work since the run started: training time excludes evaluation, samples, saves."""
        now = time.perf_counter()
        self._clock = {"mark": now, "train_s": 0.0, "wall0": now}
        self._work = {"tokens": 0, "flops": 0.0}
        self._window = {"tokens": 0, "train_s": 0.0, "wall": now, "flops": 0.0}

    def _say(self, text: str, always: bool = False):
        if self.is_main and (always or self.progress):
            (tqdm.write if self.progress else self.log)(text)  # tqdm.write: below the progress bar

    def _throughput(self) -> tuple[float, float, float | None]:
        """(training tokens/s, wall tokens/s, MFU or None) since the last report, all ranks."""
        w, now = self._window, time.perf_counter()
        tokens, flops = self._work["tokens"] - w["tokens"], self._work["flops"] - w["flops"]
        train_s, wall_s = self._clock["train_s"] - w["train_s"], now - w["wall"]
        self._window = {"tokens": self._work["tokens"], "flops": self._work["flops"],
                        "train_s": self._clock["train_s"], "wall": now}
        peak = peak_flops(self.device)
        return (tokens * self.world / max(train_s, 1e-9), tokens * self.world / max(wall_s, 1e-9),
                flops / max(train_s, 1e-9) / peak if peak else None)

    def _record(self, results: dict):
        h, task = self.history, self.task
        h["steps"].append(self.step)
        h["tokens_seen"].append(self.tokens_seen)
        rec = {"step": self.step, "tokens_seen": self.tokens_seen}
        for name, values in results.items():
            for metric, v in zip(task.metric_names, values):
                h[f"{name}_{metric}"].append(v)
                rec[f"{name}_{metric}"] = v
            if task.perplexity:
                rec[f"{name}_ppl"] = math.exp(min(values[0], 50))
        tok_s, wall_tok_s, mfu = self._throughput()
        rec.update(lr=lr_at(self.step, self.total_steps, self.cfg), tokens_per_s=tok_s, wall_tokens_per_s=wall_tok_s,
                   mfu=mfu)
        if self.is_main and self.files is not None:
            with open(self.files.path("metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        sets = " | ".join(f"{name} " + ", ".join(_metric_text(m, v, task.perplexity)
                                                  for m, v in zip(task.metric_names, values))
                          for name, values in results.items())
        mfu_txt = f", MFU {mfu:.1%}" if mfu is not None else ""
        self._say(f"step {self.step:5d}: {sets} | training {tok_s:,.0f} tokens/s{mfu_txt} "
                  f"(wall {wall_tok_s:,.0f})")
        val = results.get("val", [math.inf])[0]
        if val < self.best_val:  # NaN never improves
            self.best_val = val
            if self.files is not None and self.files.best:
                self.save(best=True)

    def _summary(self):
        wall = time.perf_counter() - self._clock["wall0"]
        train_s, tokens = self._clock["train_s"], self._work["tokens"] * self.world
        peak = peak_flops(self.device)
        mfu = f", MFU {self._work['flops'] / max(train_s, 1e-9) / peak:.1%}" if peak else ""
        self._say(f"{self.step} steps: {train_s:.1f} s of training at {tokens / max(train_s, 1e-9):,.0f} tokens/s"
                  f"{mfu}, {wall:.1f} s wall (evaluation, samples and saves: {wall - train_s:.1f} s)")

    def plot(self) -> Path | None:
        """loss.png: train/val loss and perplexity against steps (tokens seen on top)."""
        h = self.history
        if not h["steps"] or "train_loss" not in h or "val_loss" not in h:
            return None
        return plot_losses(h["steps"], h["tokens_seen"], h["train_loss"], h["val_loss"],
                           self.files.path("loss.png"))


def _metric_text(metric: str, value: float, perplexity: bool) -> str:
    if metric == "acc":
        return f"acc {value:.1%}"
    ppl = f" (ppl {math.exp(min(value, 50)):.1f})" if perplexity and metric == "loss" else ""
    return f"{metric} {value:.3f}{ppl}"


# ---- gptfast train -----------------------------------------------------------------------------

def add_parser(sub):
    p = sub.add_parser("train", help="pretrain a GPT on a text file (default: The Verdict)",
                       description="Pretrain a GPT from scratch: evaluates every --eval-freq steps, prints a "
                                   "sample each epoch, logs OUT/metrics.jsonl, plots OUT/loss.png and saves "
                                   "OUT/checkpoint.pt (resumable) and OUT/best.pt (lowest validation loss). "
                                   "Multi-GPU: torchrun --nproc-per-node N -m gptfast.cli train ...")
    p.add_argument("--preset", default="mini", choices=PRESETS, help="model preset (default: mini)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", default=str(VERDICT), help="UTF-8 text file, split 90/10 (default: The Verdict)")
    src.add_argument("--tokens", help="directory with train.bin/val.bin from `gptfast prepare`")
    p.add_argument("--out", default="runs/train", help="output directory (default: runs/train)")
    p.add_argument("--resume", help="checkpoint to resume from (e.g. OUT/checkpoint.pt); weights only (best.pt, "
                                    "the classic .pth with --preset book-124m): step 0, a fresh optimizer")
    p.add_argument("--context-length", type=int, help="override the preset's context length")
    p.add_argument("--stride", type=int, help="sliding-window stride (default: the context length)")
    p.add_argument("--backend", default="auto", help="reference, torch, triton or auto (default)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    add_config_args(p)
    p.set_defaults(func=run_cli)


def run_cli(args) -> int:
    check_options(args, {"context_length": (INT, ">=", 1), "stride": (INT, ">=", 1)})
    cfg = TrainConfig.from_args(args)
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
    trainer.fit()  # Ctrl-C: fit saves a checkpoint, then gptfast.cli reports it (exit 130); NaN: exit 3
    if trainer.is_main:
        print(f"checkpoint: {trainer.checkpoint_path}\nbest:       {args.out}/best.pt\n"
              f"metrics:    {args.out}/metrics.jsonl\nplot:       {args.out}/loss.png")
    return 0
