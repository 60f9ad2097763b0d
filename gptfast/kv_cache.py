"""Static, preallocated key/value cache for generation, one object per attention layer.

The cache stores keys and values and knows which slots a query may see; how to attend is the
attention module's choice (gptfast.model.CausalAttention and its backend variants). Its
interface to attention, for T new queries of every row:

- `update(k, v)` stores the new (B, H, T, D) keys/values and returns the keys and values to
  attend over, (B, H, S, D) — slot s of them is cache slot s;
- `mask(T)`: None when the plain causal rule holds (the T queries are the last T of the S slots
  and each sees every slot up to its own), else a bool mask broadcasting to (B, H, T, S),
  True where query t may see slot s;
- `lengths()`: for one query per row, how many leading slots each row sees — an int for every
  row or a (B,) device tensor (the flash-decoding kernel takes either) — or None when what a
  row sees is not a prefix of the slots (padding).

Batched prompts of different lengths are left-padded: `reset(key_valid)` marks the padding.

- eager mode: `update` writes at the Python offset `length` and returns views of the
  filled prefix (B, H, length, D).
- static mode (CUDA graphs): `update` writes at the device tensor `write_pos` and returns the
  whole buffer, so every decode step has the same shapes and can be replayed as one graph;
  the slots past `write_pos` are masked.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, dtype, device,
                 write_pos: torch.Tensor | None = None):
        shape = (batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0  # filled slots (eager mode)
        self.key_valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False: padding
        self.padded = False
        self.static = False
        # static mode's slot: a device tensor (one per model, shared by its layers' caches) that
        # the caller sets in place before each step, so a captured graph reads the current value
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device) if write_pos is None else write_pos

    def reset(self, key_valid: torch.Tensor | None = None):
        """Empty the cache; `key_valid` (B, T) marks the prompt's real (non-padding) slots."""
        self.length = 0
        self.key_valid.fill_(True)
        self.padded = key_valid is not None and not bool(key_valid.all())
        if key_valid is not None:
            self.key_valid[:, : key_valid.shape[1]] = key_valid

    def update(self, k: torch.Tensor, v: torch.Tensor):
        if self.static:
            self.k.index_copy_(2, self.write_pos, k)
            self.v.index_copy_(2, self.write_pos, v)
            return self.k, self.v
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > capacity {self.max_len}")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def mask(self, T: int) -> torch.Tensor | None:
        """Which of the slots `update` returned each of the T new queries sees (see above)."""
        if self.static:  # one query per row, in slot write_pos
            slots = torch.arange(self.max_len, device=self.k.device)
            return ((slots <= self.write_pos) & self.key_valid)[:, None, None, :]  # (B, 1, 1, S)
        if not self.padded:
            return None
        # query slot t sees slots s <= t that are not padding; a padding query sees itself,
        # so no row is fully masked (that would give NaNs that leak through 0 * NaN)
        S = self.length
        q_slot = torch.arange(S - T, S, device=self.k.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=self.k.device)[None, :]  # (1, S)
        allowed = (k_slot <= q_slot) & self.key_valid[:, None, :S] | (k_slot == q_slot)  # (B, T, S)
        return allowed[:, None]  # (B, 1, T, S)

    def lengths(self) -> int | torch.Tensor | None:
        """For one query per row: the leading slots each row sees (None: padding)."""
        if self.padded:
            return None
        return (self.write_pos + 1).expand(self.k.shape[0]) if self.static else self.length


def make_caches(model, batch: int, max_len: int, dtype, device, write_pos=None) -> list[KVCache]:
    """One cache per layer; `write_pos` (a (1,) long tensor), when given, is shared by all of them."""
    cfg = model.cfg
    return [KVCache(batch, cfg.n_heads, max_len, cfg.head_dim, dtype, device, write_pos)
            for _ in range(cfg.n_layers)]
