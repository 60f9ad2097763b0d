"""Model configuration: one dataclass, named presets (gpt-fast style)."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304  # next multiple of 64: faster matmuls on GPUs

# The classic code's GPT_CONFIG_124M. Its dicts name these seven fields; `from_dict` gives the
# fields a dict leaves out the classic code's values (below), so the classic dict builds the
# classic model: untied output head, PyTorch's default initialisation, 163,009,536 parameters.
BOOK_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                    "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}
BOOK_DEFAULTS = dict(BOOK_CONFIG_124M, tie_weights=False, pad_vocab=False, init="torch")


@dataclass
class GPTConfig:
    vocab_size: int = GPT2_VOCAB_SIZE
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True
    # Pad the embedding/output rows to a multiple of 64 for speed. Logits are
    # always cut back to `vocab_size`, so padding never changes results.
    pad_vocab: bool = False
    # "gpt2": N(0, 0.02) weights as in OpenAI's GPT-2; "torch": PyTorch's default
    # initialisation, as the classic from-scratch code has it.
    init: str = "gpt2"

    def __post_init__(self):
        # types first: a string "128" or a float 1.5 from a hand-edited JSON is a one-line error
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        for name in ("qkv_bias", "tie_weights", "pad_vocab"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTConfig.{name} must be true or false, got {getattr(self, name)!r}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        drop = self.drop_rate
        if isinstance(drop, bool) or not isinstance(drop, numbers.Real) or not 0.0 <= drop < 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be a number in [0, 1), got {drop!r}")
        if self.init not in ("gpt2", "torch"):
            raise ValueError(f"GPTConfig.init must be 'gpt2' or 'torch', got {self.init!r}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // 64) * 64 if self.pad_vocab else self.vocab_size

    def num_parameters(self) -> int:
        """GPTModel(self).num_parameters(), by arithmetic: sizes a model before anything is built."""
        C, V = self.emb_dim, self.padded_vocab_size
        block = (3 * C * C + 3 * C * self.qkv_bias) + (C * C + C) + (8 * C * C + 5 * C) + 4 * C  # att, ff, norms
        return V * C * (1 if self.tie_weights else 2) + self.context_length * C + self.n_layers * block + 2 * C

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        """A config from `to_dict`'s output or the classic code's config dict (the fields it
        leaves out take the classic values: BOOK_DEFAULTS)."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a dict of GPTConfig fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(map(str, unknown))}")
        return cls(**{**BOOK_DEFAULTS, **d})

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


_GPT2 = dict(context_length=1024, qkv_bias=True, tie_weights=True, drop_rate=0.0)

PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 sizes (qkv bias, tied head, context 1024)
    "gpt2-small": GPTConfig(emb_dim=768, n_heads=12, n_layers=12, **_GPT2),
    "gpt2-medium": GPTConfig(emb_dim=1024, n_heads=16, n_layers=24, **_GPT2),
    "gpt2-large": GPTConfig(emb_dim=1280, n_heads=20, n_layers=36, **_GPT2),
    "gpt2-xl": GPTConfig(emb_dim=1600, n_heads=25, n_layers=48, **_GPT2),
    # The classic "build a GPT from scratch" model as it is trained there: GPT_CONFIG_124M with
    # context 256 (dropout 0.1, no qkv bias, untied head, PyTorch's default initialisation).
    "book-124m": GPTConfig.from_dict(dict(BOOK_CONFIG_124M, context_length=256)),
    # For tests: everything small but GPT-2's vocabulary.
    "tiny": GPTConfig(context_length=128, emb_dim=128, n_heads=4, n_layers=4, drop_rate=0.1,
                      qkv_bias=False, tie_weights=True),
    # The demo (`make demo`): learns The Verdict in about two minutes on a 2-core CPU.
    "mini": GPTConfig(context_length=128, emb_dim=256, n_heads=4, n_layers=4, drop_rate=0.1,
                      qkv_bias=False, tie_weights=True),
}


class OptionError(ValueError):
    """A setting out of range: one line naming the setting, the rule and the value."""


def check_number(name: str, value, integer: bool = False, op: str | None = None, bound=None,
                 optional: bool = False) -> None:
    """`value` must be a number (an int when `integer`; never a bool, NaN or infinity) with
    `value op bound` (op one of ">=", ">"); None passes when `optional`. Raises OptionError."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise OptionError(f"{name} must be a number, got {value!r}")
    if integer and not isinstance(value, numbers.Integral):
        raise OptionError(f"{name} must be an integer, got {value!r}")
    if not math.isfinite(value):
        raise OptionError(f"{name} must be a finite number, got {value!r}")
    if op is not None and not (value >= bound if op == ">=" else value > bound):
        raise OptionError(f"{name} must be {op} {bound}, got {value!r}")
