"""Instruction fine-tuning on Alpaca-style JSON records (`instruction`, `input`, `output`).

Each record becomes the classic prompt plus response; batches are padded with 50256, the
first padding token stays a target (the model learns to stop) and the rest become -100.
After training, the model answers the test split and the answers go to a JSON file,
optionally scored 0-100 by a judge model behind an Ollama-compatible /api/chat endpoint.
"""
from __future__ import annotations

import dataclasses
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm import tqdm

from ..batches import IndexedBatches
from ..data import read_text
from ..engine import Engine
from ..evaluation import calc_loss_loader
from ..plotting import plot_curves
from ..sampling import SamplingParams
from ..tokenizer import EOT_ID, get_tokenizer
from ..train import INT, Task, Trainer, TrainConfig, process_rank
from . import (ASSETS, RECIPE, TRAIN_OPTIONS, add_model_args, add_training_args, check_finetune_options,
               load_base_model, maybe_apply_lora, report_trainable, run_files, train_config, write_json)

INSTRUCTION_DATA = ASSETS / "instruction-data.json"
IGNORE_INDEX = -100
PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
RESPONSE_HEADER = "\n\n### Response:\n"


def format_input(entry: dict) -> str:
    """The classic Alpaca prompt, up to (not including) the response header."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    return text + (f"\n\n### Input:\n{entry['input']}" if entry.get("input") else "")


def load_instruction_data(path) -> list[dict]:
    """Records with string `instruction` and `output` (and optional `input`); errors name the record."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))  # a missing, empty or non-UTF-8 file is an error
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is a {type(rec).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(rec.get(key), str):
                raise ValueError(f"{path}: record {i} has no string {key!r}")
        if not isinstance(rec.get("input", ""), str):
            raise ValueError(f"{path}: record {i} has a non-string 'input'")
    return data


def split_data(data, train_frac=0.85, test_frac=0.10):
    """The classic split, in file order: first 85% train, next 10% test, last 5% validation."""
    n_train, n_test = int(len(data) * train_frac), int(len(data) * test_frac)
    return data[:n_train], data[n_train + n_test:], data[n_train:n_train + n_test]  # train, val, test


def encode_records(data, tokenizer=None) -> list[tuple[list[int], int]]:
    """(token ids of prompt + response, prompt length in tokens) per record."""
    tokenizer = tokenizer or get_tokenizer()
    out = []
    for rec in data:
        prompt = tokenizer.encode(format_input(rec))
        out.append((prompt + tokenizer.encode(RESPONSE_HEADER + rec["output"]), len(prompt)))
    return out


def collate(batch, pad_id=EOT_ID, ignore_index=IGNORE_INDEX, allowed_max_length=None, mask_prompt=False,
            device=None):
    """Inputs and shifted targets (B, T) for token lists (or (tokens, prompt_len) pairs).

    Every sequence gets one end token `pad_id` and is padded to the longest + 1; targets keep
    that first end token and set the rest of the padding to `ignore_index`. `mask_prompt`
    also ignores the targets inside the prompt (the loss covers only the response), and
    `allowed_max_length` truncates inputs and targets to that many positions.
    """
    items = [(list(b), 0) if not isinstance(b, tuple) else (list(b[0]), int(b[1])) for b in batch]
    width = max(len(ids) for ids, _ in items) + 1
    inputs, targets = [], []
    for ids, prompt_len in items:
        padded = ids + [pad_id] * (width - len(ids))  # at least one end token
        x, y = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        y[len(ids):] = ignore_index  # y[len(ids) - 1] is the end token the model must learn
        if mask_prompt:
            y[: max(prompt_len - 1, 0)] = ignore_index  # targets 0..P-2 are prompt tokens 1..P-1
        if allowed_max_length is not None:
            x, y = x[:allowed_max_length], y[:allowed_max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def make_loader(encoded, batch_size, shuffle=False, drop_last=False, seed=123, **collate_kw) -> IndexedBatches:
    """Padded (inputs, targets) batches of encoded records (see `collate`); batch i is a pure
    function of (seed, i)."""
    return IndexedBatches(encoded, batch_size, seed, shuffle=shuffle, drop_last=drop_last and len(encoded) > batch_size,
                          collate=lambda b: collate(b, **collate_kw))


def evaluate_loss(model, loader, max_batches=None) -> float:
    """Mean loss of the first `max_batches` batches (targets masked with IGNORE_INDEX)."""
    return calc_loss_loader(loader, model, model.tok_emb.weight.device, max_batches)


INSTRUCT = Task(loss=lambda runner, x, y: runner(x, targets=y, ignore_index=IGNORE_INDEX),
                metrics=lambda model, x, y: model(x, targets=y, ignore_index=IGNORE_INDEX),
                count=lambda x, y: int((y != IGNORE_INDEX).sum()), eval_first_step=False)


def train_instruct(model, train_loader, val_loader, epochs=2, lr=RECIPE["lr"], weight_decay=RECIPE["weight_decay"],
                   eval_freq=5, eval_batches=5, progress=True, *, cfg: TrainConfig | None = None, files=None,
                   resume=None) -> dict:
    """Train on the next-token loss of the responses (the fused cross-entropy on the triton
    backend) with the Trainer (default: the classic recipe); train and validation loss
    every `eval_freq` steps and at the end. `cfg` replaces the keyword settings; `files`
    (a RunFiles) and `resume` (a checkpoint) as for the Trainer. Returns the history:
    step, tokens_seen (response tokens trained on), train_loss, val_loss."""
    if cfg is None:
        recipe = {k: v for k, v in RECIPE.items() if k != "batch_size"}
        cfg = TrainConfig(**{**recipe, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                             "eval_freq": eval_freq, "eval_iter": eval_batches, "sample_tokens": 0})
    trainer = Trainer(model, train_loader, val_loader, cfg, files, device=next(model.parameters()).device,
                      task=INSTRUCT, progress=progress)
    if resume:
        trainer.resume(resume)
    h = trainer.fit()
    return {"step": h["steps"], "tokens_seen": h["tokens_seen"], "train_loss": h["train_loss"],
            "val_loss": h["val_loss"]}


def generate_responses(model, data, max_new_tokens=256, progress=True, batch_size=16) -> list[dict]:
    """Greedy answers for each record (a copy with `model_response` added), generated together
    through one engine (up to `batch_size` at a time; each answer as if generated alone)."""
    tokenizer = get_tokenizer()
    engine = Engine(model, max_batch=batch_size)
    handle = engine.submit([tokenizer.encode(format_input(rec)) for rec in data], max_new_tokens, SamplingParams(),
                           eos_id=EOT_ID)
    answers = [[] for _ in data]
    with tqdm(total=len(data), desc="answering", disable=not progress) as bar:
        for batch in handle.updates():
            for u in batch:
                if u.error is not None:
                    raise RuntimeError(f"generating record {u.index}'s response failed: {u.error}")
                answers[u.index] += u.ids  # eos excluded
                bar.update(u.finish is not None)
    return [{**rec, "model_response": tokenizer.decode(ids).replace("### Response:", "").strip()}
            for rec, ids in zip(data, answers)]


# ---------------------------------------------------------------- judge

def query_judge(prompt: str, url: str, model: str = "llama3", timeout: float = 120.0) -> str:
    """One chat turn through an Ollama-compatible /api/chat endpoint (deterministic options)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                       "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}).encode()
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/api/chat") else "/api/chat")
    req = urllib.request.Request(endpoint, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RuntimeError(f"judge at {endpoint} is unreachable ({reason}); start it (e.g. `ollama serve` "
                           f"and `ollama pull {model}`) or leave out --judge-url") from None
    # a streamed reply is one JSON object per line; a plain one is a single object
    return "".join(json.loads(line).get("message", {}).get("content", "")
                   for line in raw.splitlines() if line.strip())


def check_judge(url: str, timeout: float = 5.0):
    """Fail before training, not after, when the judge's server does not answer at all."""
    root = url.rstrip("/").removesuffix("/api/chat") + "/"
    try:
        urllib.request.urlopen(root, timeout=timeout).close()
    except urllib.error.HTTPError:
        pass  # it answered: reachable
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"judge at {root} is unreachable ({getattr(e, 'reason', e)}); start it "
                           "(e.g. `ollama serve`) or leave out --judge-url") from None


def judge_scores(entries, url, model="llama3", progress=True) -> list[int | None]:
    """0-100 scores of each entry's `model_response` against its `output` (None if unparsable)."""
    scores = []
    for e in tqdm(entries, desc="judging", disable=not progress):
        prompt = (f"Given the input `{format_input(e)}` and correct output `{e['output']}`, "
                  f"score the model response `{e['model_response']}` on a scale from 0 to 100, "
                  "where 100 is the best score. Respond with the integer number only.")
        m = re.search(r"\d+", query_judge(prompt, url, model))
        scores.append(min(int(m.group()), 100) if m else None)
    return scores


# ---------------------------------------------------------------- command line

def add_parser(sub):
    p = sub.add_parser("finetune-instruct", help="instruction fine-tuning on Alpaca-style JSON",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(INSTRUCTION_DATA), help="JSON list of records (default: bundled 1,100)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N records (demos)")
    p.add_argument("--allowed-max-length", type=int, default=None,
                   help="truncate training sequences to N tokens (default: the model's context length)")
    p.add_argument("--mask-prompt", action="store_true", help="compute the loss on the response tokens only")
    p.add_argument("--eval-batches", type=int, default=5, help="batches per evaluation (default: 5)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer length limit for the test split (default: 256)")
    p.add_argument("--out-dir", default="instruct-out",
                   help="model.pt (checkpoint), lora.safetensors, responses.json, loss.png, history.json and the "
                   "training log (metrics.jsonl; checkpoint.pt on Ctrl-C) go here (default: instruct-out)")
    p.add_argument("--judge-url", default=None, help="score answers via this Ollama-compatible server "
                   "(e.g. http://localhost:11434); off by default")
    p.add_argument("--judge-model", default="llama3", help="the judge's model name (default: llama3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_training_args(p, {"epochs": 2, "eval_freq": 5}, names=TRAIN_OPTIONS + ("eval_freq",))
    add_model_args(p)
    p.set_defaults(func=run_finetune)


def _outputs(out_dir: Path) -> dict:
    return {name: out_dir / name for name in ("loss.png", "history.json", "lora.safetensors", "responses.json",
                                              "model.pt")}


def run_finetune(args):
    check_finetune_options(args, {"limit": (INT, ">=", 1), "allowed_max_length": (INT, ">=", 1),
                                  "eval_batches": (INT, ">=", 1), "max_new_tokens": (INT, ">=", 1)})
    cfg = train_config(args, eval_iter=args.eval_batches)
    out_dir = Path(args.out_dir)
    outputs = _outputs(out_dir)
    files = run_files(out_dir, "", outputs.values())
    data = load_instruction_data(args.data)[: args.limit]
    train, val, test = split_data(data)
    if not (train and val and test):
        raise ValueError(f"{args.data}: {len(data)} records are too few for an 85/10/5 split")
    if args.judge_url:
        check_judge(args.judge_url)
    model = load_base_model(args)
    max_len = min(args.allowed_max_length or model.cfg.context_length, model.cfg.context_length)
    print(f"{args.data}: {len(train)} train / {len(val)} val / {len(test)} test records")
    kw = dict(allowed_max_length=max_len, mask_prompt=args.mask_prompt)
    train_loader = make_loader(encode_records(train), cfg.batch_size, True, True, args.seed, **kw)
    val_loader = make_loader(encode_records(val), cfg.batch_size, **kw)
    torch.manual_seed(args.seed)  # seeds the LoRA initialisation and training (dropout)
    # the vocabulary head stays frozen by default: it keeps the fused loss (no logits built)
    wrapped = maybe_apply_lora(model, args, default_exclude=["out_head"])
    report_trainable(model, wrapped)
    history = train_instruct(model, train_loader, val_loader, progress=not args.quiet, cfg=cfg, files=files,
                             resume=args.resume)
    if process_rank() != 0:  # under torchrun, rank 0 writes the outputs
        return 0
    plot_curves(history["tokens_seen"], {"train loss": history["train_loss"], "val loss": history["val_loss"]},
                "tokens seen", "loss", outputs["loss.png"])
    write_json(history, outputs["history.json"])
    if wrapped:
        from ..lora import save_adapters

        save_adapters(model, outputs["lora.safetensors"])
    answers = generate_responses(model, test, args.max_new_tokens, progress=not args.quiet)
    write_json(answers, outputs["responses.json"], indent=4)
    _save_model(model, outputs["model.pt"], wrapped)
    if args.judge_url:
        _judge(answers, args, outputs["responses.json"])
    print(f"final losses: train {history['train_loss'][-1]:.3f}, val {history['val_loss'][-1]:.3f}; "
          f"wrote {out_dir}/responses.json, loss.png, model.pt")
    return 0


def _judge(answers, args, path):
    """Add each answer's judge score; rewrite responses.json with them."""
    scores = judge_scores(answers, args.judge_url, args.judge_model, progress=not args.quiet)
    for a, s in zip(answers, scores):
        a["judge_score"] = s
    valid = [s for s in scores if s is not None]
    print(f"judge {args.judge_model}: mean score {sum(valid) / max(len(valid), 1):.1f} "
          f"over {len(valid)} of {len(scores)} answers")
    write_json(answers, path, indent=4)


def _save_model(model, path, wrapped):
    """A plain gptfast checkpoint (adapters merged in), loadable by `gptfast generate`."""
    from ..checkpoint import save_checkpoint

    if wrapped:
        from ..lora import unwrap_lora

        unwrap_lora(model)
        if model.cfg.tie_weights and model.out_head.weight is not model.tok_emb.weight:
            model.cfg = dataclasses.replace(model.cfg, tie_weights=False)  # merging untied the head
    save_checkpoint(path, model)
