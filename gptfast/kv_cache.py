"""Static, preallocated key/value cache for generation, one object per attention layer.

`GPTModel` calls `cache.update(k, v)` with the new (B, H, T_new, D) keys/values and attends
over what it returns; when the cache has an `attention` method the model lets it attend,
so the cache owns the two things only it knows: which slots hold padding (batched prompts
of different lengths are left-padded) and, in static mode, how far the buffer is filled.

- eager mode: `update` writes at the Python offset `length` and returns views of the
  filled prefix (B, H, length, D); attention goes to the model's backend when no row is padded.
- static mode (CUDA graphs): `update` writes at the device tensor `write_pos` and returns the
  whole buffer, so every decode step has the same shapes and can be replayed as one graph.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def decode_kernel(ops, q):
    """The triton backend's flash-decoding kernel for q, or None (SDPA does the work): only
    when the model runs on that backend, on CUDA, for the head sizes and dtypes it covers."""
    return ops.decode_kernel(q) if ops.name == "triton" and q.is_cuda else None


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

    def attention(self, q, k, v, ops):
        """Attention of the T new queries (the last T filled slots) over k, v (B, H, S, D)."""
        T, S = q.shape[-2], k.shape[-2]
        if self.static:
            return self._static_decode(q, ops)
        if not self.padded:
            if T == 1 and ops.name != "reference":  # one query in the last slot sees every key: no mask
                kernel = decode_kernel(ops, q)
                if kernel is not None:
                    return kernel(q, self.k, self.v, S)
                return F.scaled_dot_product_attention(q, k, v)
            return ops.attention(q, k, v)
        # query slot t sees keys s <= t that are not padding; a padding query sees itself,
        # so no row is fully masked (that would give NaNs that leak through 0 * NaN)
        q_slot = torch.arange(S - T, S, device=q.device)[:, None]  # (T, 1)
        k_slot = torch.arange(S, device=q.device)[None, :]  # (1, S)
        allowed = (k_slot <= q_slot) & self.key_valid[:, None, :S] | (k_slot == q_slot)  # (B, T, S)
        return masked_attention(q, k, v, allowed[:, None], reference=ops.name == "reference")

    def _static_decode(self, q, ops):
        """One query per row over the whole buffer; slots past write_pos are masked."""
        kernel = None if self.padded else decode_kernel(ops, q)
        if kernel is not None:
            return kernel(q, self.k, self.v, (self.write_pos + 1).expand(q.shape[0]))
        slots = torch.arange(self.max_len, device=q.device)
        allowed = (slots <= self.write_pos) & self.key_valid  # (B, S)
        return masked_attention(q, self.k, self.v, allowed[:, None, None, :])


def masked_attention(q, k, v, allowed, reference=False):
    """softmax(q k^T / sqrt(D) where allowed) v; `allowed` broadcasts to (B, H, T, S)."""
    if not reference:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, H, T, S)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v  # (B, H, T, D)


def make_caches(model, batch: int, max_len: int, dtype, device, write_pos=None) -> list[KVCache]:
    """One cache per layer; `write_pos` (a (1,) long tensor), when given, is shared by all of them."""
    cfg = model.cfg
    return [KVCache(batch, cfg.n_heads, max_len, cfg.head_dim, dtype, device, write_pos)
            for _ in range(cfg.n_layers)]


class RowState:
    """What every layer's `RowKVCache` needs to know about the current forward, set once per
    forward by the engine (gptfast.runner): a prefill of some rows (windows of one length), or
    a decode step of rows [0, n)."""

    def __init__(self):
        self.prefill_rows: torch.Tensor | None = None
        self.lengths: torch.Tensor | None = None  # (n,) filled slots per row = where its new key goes
        self.span = 0  # keys each decode query may look at: max(lengths) + 1, or the whole buffer
        self.allowed: torch.Tensor | None = None  # (n, 1, 1, span): slot s <= the row's length

    def prefill(self, rows: torch.Tensor):
        self.prefill_rows = rows

    def decode(self, lengths: torch.Tensor, span: int):
        self.prefill_rows, self.lengths, self.span = None, lengths, span
        slots = torch.arange(span, device=lengths.device)
        self.allowed = (slots[None, :] <= lengths[:, None])[:, None, None, :]  # (n, 1, 1, span)


class RowKVCache:
    """One layer's cache for continuous batching: row r holds one sequence, filled from slot 0
    to its own length, so rows at different lengths decode in one step. Its `state` (shared
    by every layer) says what the forward does: prefill writes rows' first T slots and
    attends causally over them; decode writes each row's new key at its own length (device
    indices: a CUDA graph can replay it) and attends over that row's filled slots."""

    def __init__(self, rows: int, n_heads: int, max_len: int, head_dim: int, dtype, device, state: RowState):
        shape = (rows, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.state = state

    def update(self, k: torch.Tensor, v: torch.Tensor):
        st = self.state
        if st.prefill_rows is not None:  # k, v (B, H, T, D) for rows prefill_rows (B,)
            self.k[st.prefill_rows, :, : k.shape[2]] = k
            self.v[st.prefill_rows, :, : k.shape[2]] = v
            return k, v
        n = k.shape[0]  # k, v (n, H, 1, D); row i's new key goes to slot lengths[i]
        rows = torch.arange(n, device=k.device)
        self.k[rows, :, st.lengths] = k[:, :, 0]
        self.v[rows, :, st.lengths] = v[:, :, 0]
        return self.k[:n, :, : st.span], self.v[:n, :, : st.span]

    def attention(self, q, k, v, ops):
        st = self.state
        if st.prefill_rows is not None:
            return ops.attention(q, k, v)  # the rows' own windows: plain causal attention
        kernel = decode_kernel(ops, q)
        if kernel is not None:
            n = q.shape[0]
            return kernel(q, self.k[:n], self.v[:n], st.lengths + 1)
        return masked_attention(q, k, v, st.allowed, reference=ops.name == "reference")


def make_row_caches(model, rows: int, max_len: int, dtype, device, state: RowState) -> list[RowKVCache]:
    cfg = model.cfg
    return [RowKVCache(rows, cfg.n_heads, max_len, cfg.head_dim, dtype, device, state) for _ in range(cfg.n_layers)]
