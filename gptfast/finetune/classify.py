"""Text classification by fine-tuning a GPT (the classic SMS spam classifier, any number of classes).

Recipe: read `label<TAB>text` lines, balance the classes by undersampling, split 70/10/20
by seed, pad/truncate every message to the longest training message with token 50256,
replace the output head by a `num_classes` linear layer that reads the last token's hidden
state, and train the last block + final norm + head (or everything, or LoRA adapters).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import random
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..backends import BACKENDS, resolve_device
from ..batches import IndexedBatches
from ..checkpoint import atomic_save, load_checkpoint, load_state_dict_checked
from ..config import GPTConfig
from ..data import read_text
from ..model import GPTModel
from ..plotting import plot_curves
from ..tokenizer import EOT_ID, get_tokenizer
from ..train import INT, Task, Trainer, TrainConfig, process_rank
from . import (ASSETS, RECIPE, add_model_args, add_training_args, check_finetune_options, load_base_model,
               maybe_apply_lora, report_trainable, run_files, train_config, write_json)

SPAM_DATA = ASSETS / "SMSSpamCollection"


# ---------------------------------------------------------------- data

def read_labelled(path, labels=None) -> tuple[list[tuple[str, int]], list[str]]:
    """Read `label<TAB>text` lines (`label,text` CSV rows for *.csv) into (text, class) pairs.

    TSV is read line by line without quote handling (SMS texts contain stray quotes).
    `labels`: the allowed labels in class order; by default every label in the file, sorted.
    """
    path = Path(path)
    f = io.StringIO(read_text(path), newline="")  # a missing, empty or non-UTF-8 file is an error
    rows = []  # (line number, label, text)
    if path.suffix.lower() == ".csv":
        reader = csv.reader(f)
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2 or not row[0].strip():
                raise ValueError(f"{path}:{reader.line_num}: expected 'label,text', got {row!r:.60}")
            rows.append((reader.line_num, row[0].strip(), row[1]))
    else:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, tab, text = line.partition("\t")
            if not tab or not label.strip():
                raise ValueError(f"{path}:{n}: expected 'label<TAB>text', got {line[:60]!r}")
            rows.append((n, label.strip(), text))
    if not rows:
        raise ValueError(f"{path}: no labelled examples")
    if rows[0][1:] == ("label", "text"):  # a header row
        rows = rows[1:]
    names = list(labels) if labels else sorted({r[1] for r in rows})
    if len(set(names)) != len(names):
        raise ValueError(f"labels {names} name a class twice")
    index = {name: i for i, name in enumerate(names)}
    examples = []
    for n, label, text in rows:
        if label not in index:
            raise ValueError(f"{path}:{n}: unknown label {label!r} (expected one of {', '.join(names)})")
        examples.append((text, index[label]))
    if len(names) < 2:
        raise ValueError(f"{path}: a classifier needs at least 2 classes, found only {names}")
    return examples, names


def balance(examples, seed: int = 123):
    """Undersample every class to the size of the smallest (a seeded random subset)."""
    rng = random.Random(seed)
    by_class: dict[int, list] = {}
    for ex in examples:
        by_class.setdefault(ex[1], []).append(ex)
    n = min(len(v) for v in by_class.values())
    return [ex for c in sorted(by_class) for ex in rng.sample(by_class[c], n)]


def split(examples, train_frac=0.7, val_frac=0.1, seed: int = 123):
    """Shuffle by seed, then cut into train / validation / test (the rest)."""
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * train_frac)
    n_val = int(len(shuffled) * val_frac)
    return shuffled[:n_train], shuffled[n_train:n_train + n_val], shuffled[n_train + n_val:]


def encode(texts, max_length: int, tokenizer=None, pad_id: int = EOT_ID) -> torch.Tensor:
    """Token ids (N, max_length): truncated, then right-padded with `pad_id`."""
    tokenizer = tokenizer or get_tokenizer()
    rows = [tokenizer.encode(t)[:max_length] for t in texts]
    return torch.tensor([r + [pad_id] * (max_length - len(r)) for r in rows], dtype=torch.long)


def make_loader(examples, max_length, batch_size, shuffle=False, drop_last=False, seed=123) -> IndexedBatches:
    """(token ids (B, max_length), labels (B,)) batches; batch i is a pure function of (seed, i)."""
    ids = encode([t for t, _ in examples], max_length)
    labels = torch.tensor([c for _, c in examples], dtype=torch.long)
    return IndexedBatches(TensorDataset(ids, labels), batch_size, seed, shuffle=shuffle,
                          drop_last=drop_last and len(examples) > batch_size)


# ---------------------------------------------------------------- model

def make_classifier(model: GPTModel, num_classes: int, train_all: bool = False) -> GPTModel:
    """Swap the LM head for a `num_classes` head; freeze all but last block + final norm +
    head (or nothing with `train_all`)."""
    model.out_head = nn.Linear(model.cfg.emb_dim, num_classes).to(model.tok_emb.weight.device)
    model.requires_grad_(train_all)
    for m in (model.trf_blocks[-1], model.final_norm, model.out_head):
        m.requires_grad_(True)
    return model


def class_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """(B, num_classes) from the last token's hidden state, which attends to the whole message
    (through the model's forward, so DDP and torch.compile see the call)."""
    return model(idx)[:, -1, :]


def classification_metrics(model, x, y) -> torch.Tensor:
    """(mean loss, accuracy) of one batch."""
    logits = class_logits(model, x).float()
    return torch.stack([F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()])


CLASSIFY = Task(loss=lambda runner, x, y: F.cross_entropy(class_logits(runner, x).float(), y),
                metrics=classification_metrics, metric_names=("loss", "acc"), count=lambda x, y: len(y),
                perplexity=False, eval_first_step=False, example_weighted=True)


def train_classifier(model, loaders: dict, epochs=5, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"],
                     eval_batches=None, progress=True, *, cfg: TrainConfig | None = None, files=None,
                     resume=None) -> dict:
    """Train on loaders["train"] with the Trainer (default: the classic recipe); after each
    epoch, loss and accuracy on every split. `cfg` replaces the keyword settings; `files`
    (a RunFiles) and `resume` (a checkpoint) as for the Trainer. Returns the history:
    {split}_loss, {split}_acc and examples_seen per epoch, and the step of each."""
    if cfg is None:
        recipe = {k: v for k, v in RECIPE.items() if k != "batch_size"}
        cfg = TrainConfig(**{**recipe, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                             "eval_iter": eval_batches, "sample_tokens": 0})
    # evaluate at each epoch's end
    cfg = dataclasses.replace(cfg, eval_freq=max(1, loaders["train"].steps_per_epoch // cfg.grad_accum))
    trainer = Trainer(model, loaders["train"], None, cfg, files, device=next(model.parameters()).device,
                      task=CLASSIFY, evals=loaders, progress=progress)
    if resume:
        trainer.resume(resume)
    h = trainer.fit()
    return {"step": h["steps"], "examples_seen": h["tokens_seen"],
            **{f"{s}_{m}": h[f"{s}_{m}"] for s in loaders for m in ("loss", "acc")}}


class Classifier:
    """A fine-tuned GPT classifier: `classify(text) -> (label, probability)`."""

    def __init__(self, model: GPTModel, labels, max_length: int, pad_id: int = EOT_ID):
        self.model, self.labels, self.max_length, self.pad_id = model, list(labels), int(max_length), pad_id

    @torch.no_grad()
    def probabilities(self, texts) -> torch.Tensor:
        """(N, num_classes) class probabilities."""
        self.model.eval()
        idx = encode(texts, self.max_length, pad_id=self.pad_id).to(self.model.tok_emb.weight.device)
        return torch.softmax(class_logits(self.model, idx).float(), dim=-1).cpu()

    def classify(self, text: str) -> tuple[str, float]:
        p = self.probabilities([text])[0]
        i = int(p.argmax())
        return self.labels[i], float(p[i])

    def save(self, path) -> Path:
        """One torch file: config, weights (LoRA merged), labels, max_length, pad id."""
        from ..lora import merged_state_dict

        state = {k: v.detach().cpu() for k, v in merged_state_dict(self.model).items()}
        return atomic_save({"format": "gptfast-classifier", "config": self.model.cfg.to_dict(), "model": state,
                            "labels": self.labels, "max_length": self.max_length, "pad_id": self.pad_id}, path)

    @classmethod
    def load(cls, path, backend="auto", device=None) -> "Classifier":
        ckpt = load_checkpoint(path)
        if ckpt.get("format") != "gptfast-classifier":
            raise ValueError(f"{path} is not a gptfast classifier (save one with `gptfast finetune-classifier`)")
        model = make_classifier(GPTModel(GPTConfig.from_dict(ckpt["config"]), backend=backend), len(ckpt["labels"]))
        load_state_dict_checked(model, ckpt["model"], source=str(path))
        return cls(model.to(resolve_device(device)).eval(), ckpt["labels"], ckpt["max_length"], ckpt["pad_id"])


# ---------------------------------------------------------------- command line

def add_parser(sub):
    p = sub.add_parser("finetune-classifier", help="fine-tune a GPT into a text classifier (e.g. spam)",
                       description=__doc__.split("\n\n")[0] + " Data: 'label<TAB>text' lines (or 'label,text' CSV).")
    p.add_argument("--data", default=str(SPAM_DATA), help="labelled TSV/CSV (default: the bundled SMS Spam Collection)")
    p.add_argument("--labels", nargs="+", default=None, help="allowed labels in class order (default: all, sorted)")
    p.add_argument("--no-balance", action="store_true", help="keep every example instead of undersampling")
    p.add_argument("--limit", type=int, default=None, help="use a random N of the examples after balancing (demos)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per message (default: longest in train)")
    p.add_argument("--train-all", action="store_true", help="train every layer (default: last block, final norm, head)")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="evaluate on at most N batches per split after each epoch (default: all)")
    p.add_argument("--out", default="classifier.pt", help="classifier file; its loss/accuracy plots, history "
                   "and training log (OUT-metrics.jsonl; OUT-checkpoint.pt on Ctrl-C) go beside it "
                   "(default: classifier.pt)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")
    add_training_args(p, {"epochs": 5})
    add_model_args(p)
    p.set_defaults(func=run_finetune)

    c = sub.add_parser("classify", help="label texts with a fine-tuned classifier",
                       description="Print label and probability for each text (arguments, or stdin lines).")
    c.add_argument("text", nargs="*", help="texts to classify (default: read lines from stdin)")
    c.add_argument("--classifier", default="classifier.pt", help="file from `gptfast finetune-classifier` "
                   "(default: classifier.pt)")
    c.add_argument("--backend", default="auto", choices=BACKENDS, help="compute backend (default: auto)")
    c.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when present)")
    c.set_defaults(func=run_classify)


def _outputs(out: Path) -> dict:
    return {"model": out, "history": out.with_name(f"{out.stem}-history.json"),
            "loss": out.with_name(f"{out.stem}-loss.png"), "acc": out.with_name(f"{out.stem}-acc.png")}


def run_finetune(args):
    check_finetune_options(args, {"limit": (INT, ">=", 1), "max_length": (INT, ">=", 1),
                                  "eval_batches": (INT, ">=", 1)})
    if args.train_all and args.lora_rank:
        raise ValueError("--train-all and --lora-rank exclude each other (LoRA trains only the adapters)")
    cfg = train_config(args, eval_iter=args.eval_batches)
    outputs = _outputs(Path(args.out))
    files = run_files(outputs["model"].parent, f"{outputs['model'].stem}-", outputs.values())
    examples, labels = read_labelled(args.data, args.labels)
    counts = Counter(labels[c] for _, c in examples)
    if not args.no_balance:
        examples = balance(examples, args.seed)
    if args.limit:
        examples = random.Random(args.seed).sample(examples, min(args.limit, len(examples)))
    train, val, test = split(examples, 0.7, 0.1, args.seed)
    if not (train and val and test):
        raise ValueError(f"{args.data}: {len(examples)} examples are too few for a 70/10/20 split")
    model = load_base_model(args)
    context = model.cfg.context_length
    tokenizer = get_tokenizer()
    max_length = args.max_length or min(context, max(len(tokenizer.encode(t)) for t, _ in train))
    if max_length > context:
        raise ValueError(f"--max-length {max_length} exceeds the model's context length {context}")
    print(f"{args.data}: {dict(counts)} -> {len(train)} train / {len(val)} val / {len(test)} test; "
          f"{max_length} tokens per message")
    loaders = {"train": make_loader(train, max_length, cfg.batch_size, True, True, args.seed),
               "val": make_loader(val, max_length, cfg.batch_size),
               "test": make_loader(test, max_length, cfg.batch_size)}
    torch.manual_seed(args.seed)  # seeds the new head, the LoRA initialisation and training
    make_classifier(model, len(labels), args.train_all)
    wrapped = maybe_apply_lora(model, args)
    report_trainable(model, wrapped)
    history = train_classifier(model, loaders, progress=not args.quiet, cfg=cfg, files=files, resume=args.resume)
    if process_rank() != 0:  # under torchrun, rank 0 writes the outputs
        return 0
    Classifier(model, labels, max_length).save(outputs["model"])
    write_json(history, outputs["history"])
    for metric, ylabel in (("loss", "loss"), ("acc", "accuracy")):
        plot_curves(history["examples_seen"], {f"{s} {ylabel}": history[f"{s}_{metric}"] for s in loaders},
                    "examples seen", ylabel, outputs[metric])
    print(f"test accuracy {history['test_acc'][-1]:.2%}; saved {outputs['model']}, its loss/accuracy plots and "
          "history")
    return 0


def run_classify(args):
    clf = Classifier.load(args.classifier, args.backend, args.device)
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for text in texts:
        label, prob = clf.classify(text)
        print(f"{label}\t{prob:.3f}\t{text}")
    return 0
