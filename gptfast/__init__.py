"""gptfast: a GPT-2 engine, fast where it counts."""
from .config import GPTConfig, PRESETS
from .model import GPTModel
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "get_tokenizer", "text_to_token_ids", "token_ids_to_text"]
__version__ = "0.1.0"
