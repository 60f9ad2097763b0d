"""GPT-2 BPE through tiktoken, offline: the ranks file ships inside the package."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import tiktoken
import tiktoken.load
import torch

ASSETS = Path(__file__).parent / "assets"
RANKS_FILE = ASSETS / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding, built from the bundled ranks file (no network)."""
    data = RANKS_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise RuntimeError(f"{RANKS_FILE}: sha256 {digest} does not match the GPT-2 ranks ({RANKS_SHA256}); reinstall gptfast")
    ranks = tiktoken.load.load_tiktoken_bpe(str(RANKS_FILE), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT_TOKEN: EOT_ID})


def text_to_token_ids(text: str, tokenizer: tiktoken.Encoding | None = None) -> torch.Tensor:
    """Encode `text` to a (1, T) int64 tensor (the classic helper)."""
    tokenizer = tokenizer or get_tokenizer()
    ids = tokenizer.encode(text, allowed_special={EOT_TOKEN})
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer: tiktoken.Encoding | None = None) -> str:
    """Decode a (1, T) or (T,) tensor of ids to text; ids outside the vocabulary are an error."""
    tokenizer = tokenizer or get_tokenizer()
    flat = torch.as_tensor(token_ids).reshape(-1).tolist()
    bad = [i for i in flat if not 0 <= i < tokenizer.n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the GPT-2 vocabulary [0, {tokenizer.n_vocab})")
    return tokenizer.decode(flat)
