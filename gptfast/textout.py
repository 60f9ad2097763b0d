"""One prompt's output as generation produces it (gptfast.engine): token ids, text decoded
incrementally and safely for streaming, and the rules that stop it (eos, stop strings, budget)."""
from __future__ import annotations

import codecs


class TextOutput:
    """One prompt's output: token ids, text decoded incrementally (incomplete UTF-8 bytes are
    held back until the token that completes them), and its stopping rules."""

    def __init__(self, tokenizer, max_new_tokens, eos_id, stop):
        self.tokenizer, self.max_new, self.eos_id, self.stop = tokenizer, int(max_new_tokens), eos_id, stop
        self.ids, self.text, self.emitted, self.ids_emitted = [], "", 0, 0
        self.n_tokens = 0  # tokens generated, a final eos included (usage counts)
        self.finish = "length" if self.max_new == 0 else None  # "stop": eos or a stop string
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def done(self) -> bool:
        return self.finish is not None

    def push(self, token: int):
        self.n_tokens += 1
        if token == self.eos_id:
            return self._finish("stop")
        self.ids.append(token)
        if self.tokenizer is not None:
            start = len(self.text)
            self.text += self.utf8.decode(self.tokenizer.decode_single_token_bytes(token))
            hits = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:  # cut at the earliest stop string, which is not part of the output
                self.text = self.text[: min(hits)]
                return self._finish("stop", flush=False)
        if len(self.ids) >= self.max_new:
            self._finish("length")

    def _finish(self, reason, flush=True):
        if flush and self.tokenizer is not None:
            self.text += self.utf8.decode(b"", final=True)
        self.finish = reason

    def new_text(self) -> str:
        """Text not yet streamed; a tail that could begin a stop string waits for the next token."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece

    def new_ids(self) -> list[int]:
        ids, self.ids_emitted = self.ids[self.ids_emitted:], len(self.ids)
        return ids
