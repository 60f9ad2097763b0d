"""Data: text files -> GPT-2 tokens -> (input, target) windows shifted by one.

Two paths: the classic in-memory sliding-window dataset for small texts, and `prepare`
+ `TokenFileLoader` for corpora far larger than memory (uint16 token files, memory-mapped).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .files import atomic_file, existing_file
from .tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer

VERDICT = Path(__file__).parent / "assets" / "the-verdict.txt"


def read_text(path) -> str:
    """Read a UTF-8 text file; a missing, empty or non-UTF-8 file is a one-line error."""
    path = existing_file(path, "text file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {path} is not UTF-8 (bad byte at offset {e.start})") from None
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    return text


class GPTDatasetV1(Dataset):
    """Sliding windows of `max_length` tokens every `stride` tokens; targets = inputs shifted by one."""

    def __init__(self, txt: str, tokenizer, max_length: int, stride: int):
        if max_length <= 0 or stride <= 0:
            raise ValueError(f"max_length and stride must be positive, got {max_length} and {stride}")
        ids = torch.tensor(tokenizer.encode(txt, allowed_special={EOT_TOKEN}), dtype=torch.long)
        if len(ids) < max_length + 1:
            raise ValueError(f"text has {len(ids)} tokens; one window of context {max_length} needs "
                             f"at least {max_length + 1}")
        starts = range(0, len(ids) - max_length, stride)
        self.input_ids = [ids[i:i + max_length] for i in starts]
        self.target_ids = [ids[i + 1:i + max_length + 1] for i in starts]

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, idx):
        return self.input_ids[idx], self.target_ids[idx]


def create_dataloader(txt: str, batch_size: int = 4, max_length: int = 256, stride: int = 128,
                      shuffle: bool = True, drop_last: bool = True, num_workers: int = 0,
                      generator: torch.Generator | None = None) -> DataLoader:
    """The classic `create_dataloader_v1`, with an optional generator for reproducible shuffles."""
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      num_workers=num_workers, generator=generator)


def prepare(inputs, out_dir, val_fraction: float = 0.1, chunk_chars: int = 1 << 20) -> dict:
    """Tokenize text files into `out_dir/train.bin` and `val.bin` (uint16, EOT between files).

    Each file is read in chunks of about `chunk_chars` characters, cut at whitespace, so
    memory stays flat however large the corpus. The last `val_fraction` of every file's
    tokens goes to val. Returns the token counts.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    inputs = [existing_file(p, "text file") for p in inputs]
    for p in inputs:  # what `train --data` would refuse, refused before anything is written
        if not any(chunk.strip() for chunk in _read_chunks(p, chunk_chars)):
            raise ValueError(f"text file {p} is empty (or only whitespace)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = get_tokenizer()
    counts = {"train": 0, "val": 0}
    total = sum(p.stat().st_size for p in inputs)
    # both files appear only when both are complete (and never half-written)
    with atomic_file(out_dir / "train.bin") as train_tmp, atomic_file(out_dir / "val.bin") as val_tmp, \
            open(train_tmp, "wb") as ftrain, open(val_tmp, "wb") as fval, \
            tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for p in inputs:
            ids = []
            for chunk in _read_chunks(p, chunk_chars):
                ids.extend(tok.encode_ordinary(chunk))
                bar.update(len(chunk.encode("utf-8")))
            ids.append(EOT_ID)
            n_val = int(len(ids) * val_fraction)
            for split, f, part in (("train", ftrain, ids[:len(ids) - n_val]), ("val", fval, ids[len(ids) - n_val:])):
                np.asarray(part, dtype=np.uint16).tofile(f)
                counts[split] += len(part)
    return counts


def _read_chunks(path: Path, chunk_chars: int):
    """Yield pieces of a UTF-8 file that end at whitespace (so no BPE word is split)."""
    carry = ""
    with open(path, encoding="utf-8", errors="strict") as f:
        while True:
            try:
                block = f.read(chunk_chars)
            except UnicodeDecodeError:
                raise ValueError(f"text file {path} is not UTF-8") from None
            if not block:
                break
            text = carry + block
            cut = max(text.rfind(" "), text.rfind("\n"))
            carry, text = (text[cut:], text[:cut]) if cut > 0 else ("", text)
            if text:
                yield text
    if carry:
        yield carry


class TokenFileLoader:
    """Random (input, target) windows from a uint16 token file, memory-mapped (nanoGPT style)."""

    def __init__(self, path, batch_size: int, context_length: int, seed: int = 0):
        if not Path(path).exists():
            raise FileNotFoundError(f"token file {path} does not exist (run `gptfast prepare` first)")
        path = existing_file(path, "token file")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) < context_length + 1:
            raise ValueError(f"token file {path} has {len(self.tokens)} tokens; context {context_length} "
                             f"needs at least {context_length + 1}")
        self.batch_size, self.context_length = batch_size, context_length
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self):
        T = self.context_length
        starts = torch.randint(len(self.tokens) - T, (self.batch_size,), generator=self.generator)
        rows = np.stack([self.tokens[s:s + T + 1] for s in starts.tolist()]).astype(np.int64)  # (B, T+1)
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


def add_parser(sub):
    p = sub.add_parser("prepare", help="tokenize text files into uint16 token files for large-corpus training",
                       description="Tokenize UTF-8 text files with GPT-2 BPE into OUT/train.bin and OUT/val.bin "
                                   "(uint16, memory-mappable; train with `gptfast train --tokens OUT`).")
    p.add_argument("inputs", nargs="+", help="UTF-8 text files")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of each file's tokens for validation")
    p.set_defaults(func=lambda a: print(prepare(a.inputs, a.out, a.val_fraction)))
