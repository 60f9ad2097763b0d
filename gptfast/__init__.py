"""gptfast: a GPT-2 engine, fast where it counts.

The names below are imported on first use, so `import gptfast.data` (or any other light
module) does not pull in the model and its kernels.
"""
import importlib

_EXPORTS = {"GPTConfig": "config", "PRESETS": "config", "GPTModel": "model", "get_tokenizer": "tokenizer",
            "text_to_token_ids": "tokenizer", "token_ids_to_text": "tokenizer"}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptfast' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__():
    return sorted([*globals(), *_EXPORTS])
