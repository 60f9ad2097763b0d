"""Static, preallocated key/value cache for generation, one object per attention layer, one
row per sequence (gptfast.engine's continuous batching): row r holds one sequence's keys
from slot 0 to its own length, so rows at different lengths decode in one step.

The cache stores keys and values and knows which slots a query may see; how to attend is the
attention module's choice (gptfast.model.CausalAttention and its backend variants). Its
interface to attention, for T new queries of every row:

- `update(k, v)` stores the new (B, H, T, D) keys/values and returns the keys and values to
  attend over, (B, H, S, D) — slot s of them is cache slot s;
- `mask(T)`: None when the plain causal rule holds (the T queries are the last T of the S slots
  and each sees every slot up to its own), else a bool mask broadcasting to (B, H, T, S),
  True where query t may see slot s;
- `lengths()`: for one query per row, how many leading slots each row sees — an int for every
  row or a (B,) device tensor (the flash-decoding kernel takes either).

What a forward does is set once for every layer in their shared `CacheStep` (by gptfast.runner):
- prefill: rows' windows of one length T are written to slots [0, T) of those rows; plain causal;
- decode: one token for each of rows [0, n), written at slot lengths[i] of row i (device
  indices, so a CUDA graph can replay it); row i's query sees its first lengths[i] + 1 slots.
  The keys returned span max(lengths) + 1 slots (eager) or the whole buffer (fixed shapes).
  Eager steps whose rows all have one length (batch 1) write by a slice and need no mask.
"""
from __future__ import annotations

import torch


class CacheStep:
    """The current forward, shared by every layer's cache: a prefill or a decode step."""

    def __init__(self):
        self.prefill_rows: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # (n,) filled slots per row = where its new key goes
        self.span = 0  # slots a forward attends over: the prefill length; max(lengths) + 1 or all
        self.seen: torch.Tensor | None = None  # (n,) int32 lengths + 1: the slots row i's query sees
        self.same: int | None = None  # decode: the one length of every row, when they agree
        self._allowed: torch.Tensor | None = None  # mask(), made at the first layer that asks

    def prefill(self, rows: torch.Tensor, T: int):
        self.prefill_rows, self.span, self.same = rows, T, None

    def decode(self, lengths: torch.Tensor, span: int, same: int | None = None):
        """`same`: the length every row has, when the caller knows they agree (batch 1, or a
        batch started together): the new keys go in by a slice and no mask is needed."""
        self.prefill_rows, self.lengths, self.span, self.same, self._allowed = None, lengths, span, same, None
        # int32, as the flash-decoding kernel reads it: one conversion a step, not one a layer
        self.seen = torch.add(lengths, 1, out=torch.empty(lengths.shape, dtype=torch.int32, device=lengths.device))

    def mask(self) -> torch.Tensor | None:
        """(n, 1, 1, span) bool, slot s < seen; None: plain causal (prefill, or rows of one length)."""
        if self.prefill_rows is not None or self.same is not None:
            return None
        if self._allowed is None:  # once a step, and only for attention that reads a mask
            slots = torch.arange(self.span, device=self.seen.device)
            self._allowed = (slots[None, :] < self.seen[:, None])[:, None, None, :]  # (n, 1, 1, span)
        return self._allowed


class KVCache:
    def __init__(self, rows: int, n_heads: int, max_len: int, head_dim: int, dtype, device, step: CacheStep,
                 append=None):
        shape = (rows, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.step = step
        # a decode step's write at per-row slots: append(k_cache, v_cache, k, v, slots) in one
        # kernel (gptfast.kernels.attention_decode.cache_append), or None: torch indexing
        self.append = append

    def update(self, k: torch.Tensor, v: torch.Tensor):
        st = self.step
        if st.prefill_rows is not None:  # k, v (B, H, T, D) for rows prefill_rows (B,)
            self.k[st.prefill_rows, :, : k.shape[2]] = k.to(self.k.dtype)
            self.v[st.prefill_rows, :, : k.shape[2]] = v.to(self.v.dtype)
            return k, v
        n = k.shape[0]  # k, v (n, H, 1, D); row i's new key goes to slot lengths[i]
        if st.same is not None:
            self.k[:n, :, st.same] = k[:, :, 0]  # (n, H, D)
            self.v[:n, :, st.same] = v[:, :, 0]
        elif self.append is not None:
            self.append(self.k, self.v, k, v, st.lengths)
        else:
            rows = torch.arange(n, device=k.device)
            self.k[rows, :, st.lengths] = k[:, :, 0].to(self.k.dtype)
            self.v[rows, :, st.lengths] = v[:, :, 0].to(self.v.dtype)
        # a cache kept in another dtype (float16 under an fp32 model: gptfast.runner) is read in k's
        return self.k[:n, :, : st.span].to(k.dtype), self.v[:n, :, : st.span].to(k.dtype)

    def mask(self, T: int) -> torch.Tensor | None:
        return self.step.mask()

    def lengths(self) -> int | torch.Tensor:
        st = self.step
        return st.span if st.prefill_rows is not None or st.same is not None else st.seen


def make_caches(model, rows: int, max_len: int, dtype, device, step: CacheStep, append=None) -> list[KVCache]:
    """One cache per layer, all following `step` and writing decode steps through `append`."""
    cfg = model.cfg
    return [KVCache(rows, cfg.n_heads, max_len, cfg.head_dim, dtype, device, step, append)
            for _ in range(cfg.n_layers)]
