"""The GPT model, top to bottom: the classic reference modules, one parameter layout for
every backend, and the backend switch (see `gptfast.backends`).

Layout (state-dict keys): tok_emb, pos_emb, trf_blocks.N.{norm1, att.qkv, att.out_proj,
norm2, ff.layers.0, ff.layers.2}, final_norm, out_head. A state dict from the classic
from-scratch code (separate att.W_query/W_key/W_value and a saved att.mask) loads too.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from .backends import BACKENDS, ReferenceBackend, get_backend, reference_gelu
from .config import GPTConfig

REFERENCE = ReferenceBackend()


class LayerNorm(nn.Module):
    """LayerNorm with `scale`/`shift` parameters and eps 1e-5 (the classic names)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x, ops=REFERENCE):
        return ops.layer_norm(x, self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""

    def forward(self, x):
        return reference_gelu(x)


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim))

    def forward(self, x, ops=REFERENCE):
        up, down = self.layers[0], self.layers[2]
        return down(ops.linear_gelu(x, up.weight, up.bias))


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with one fused query/key/value projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.dropout_p = cfg.drop_rate
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.register_load_state_dict_pre_hook(lambda module, sd, prefix, *_: fuse_classic_qkv(sd, prefix))

    def forward(self, x, ops=REFERENCE, kv_cache=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if kv_cache is None:
            y = ops.attention(q, k, v, self.dropout_p, self.training)  # (B, H, T, D)
        else:  # generation: the cache (gptfast.kv_cache) stores k, v and attends; it knows the padding
            y = kv_cache.attention(q, *kv_cache.update(k, v), ops)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.out_proj(y)


def fuse_classic_qkv(state_dict, prefix):
    """Classic W_query/W_key/W_value -> one qkv projection, in place; drop the saved mask."""
    state_dict.pop(prefix + "mask", None)
    for kind in ("weight", "bias"):
        names = [f"{prefix}{p}.{kind}" for p in ("W_query", "W_key", "W_value")]
        if all(n in state_dict for n in names):
            state_dict[f"{prefix}qkv.{kind}"] = torch.cat([state_dict.pop(n) for n in names])


def upgrade_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """A copy of `state_dict` with every classic attention layout in `model` translated."""
    state_dict = dict(state_dict)
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadAttention):
            fuse_classic_qkv(state_dict, name + ".")
    return state_dict


def _refuse_untied_weights(module, state_dict, prefix, *_):
    """Loading distinct embedding and head weights into one tied parameter would keep only
    the head's, silently (the classic model's head is its own)."""
    if getattr(module.out_head, "weight", None) is not module.tok_emb.weight:  # a replaced head: not tied
        return
    emb, head = state_dict.get(prefix + "tok_emb.weight"), state_dict.get(prefix + "out_head.weight")
    if emb is not None and head is not None and emb is not head and not torch.equal(emb, head):
        raise ValueError("the state dict has distinct tok_emb.weight and out_head.weight, but this model ties "
                         "them (tie_weights=True); build it with tie_weights=False (the classic model's setting)")


class TransformerBlock(nn.Module):
    """Pre-norm block: x + att(norm1(x)), then + ff(norm2(.)), with dropout on each branch."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, ops=REFERENCE, kv_cache=None):
        h = self.drop_shortcut(self.att(self.norm1(x, ops), ops, kv_cache))
        x, h = ops.add_layer_norm(h, x, self.norm2.scale, self.norm2.shift, self.norm2.eps)
        return x + self.drop_shortcut(self.ff(h, ops))


class GPTModel(nn.Module):
    """GPT-2. `backend`: "reference", "torch", "triton" or "auto" (see gptfast.backends);
    every backend uses the same parameters, so `model.backend = ...` switches freely."""

    def __init__(self, cfg: GPTConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(cfg, GPTConfig):  # e.g. the classic code's dict: GPTConfig.from_dict reads it
            raise TypeError(f"GPTModel takes a GPTConfig, got {type(cfg).__name__}; "
                            "use GPTModel(GPTConfig.from_dict(cfg)) for a config dict")
        self.cfg = cfg
        self.backend = backend
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, vocab, bias=False)
        if cfg.init == "gpt2":
            self.apply(self._init_gpt2)
            for block in self.trf_blocks:  # scale residual projections by depth (GPT-2 paper)
                for proj in (block.att.out_proj, block.ff.layers[2]):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
            self.register_load_state_dict_pre_hook(_refuse_untied_weights)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str):
        if name not in BACKENDS:  # only the name: the device is known at the first forward
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        self._backend = name

    @staticmethod
    def _init_gpt2(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def ops(self, device=None):
        return get_backend(self.backend, device or self.tok_emb.weight.device)

    def hidden_states(self, idx, kv_caches=None, start_pos=0, positions=None):
        """Final-norm hidden states (B, T, emb_dim); `start_pos` is idx's first position, or
        `positions` (B, T) gives each token's own (left-padded batches of prompts)."""
        B, T = idx.shape
        if start_pos + T > self.cfg.context_length:
            raise ValueError(f"sequence of {start_pos + T} tokens is longer than the context "
                             f"({self.cfg.context_length}); truncate the input from the left")
        # ids outside the vocabulary: checked on CPU only, where it costs no host sync
        if idx.device.type == "cpu" and idx.numel() and not 0 <= idx.min() <= idx.max() < self.cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}); got {int(idx.min())}..{int(idx.max())}")
        ops = self.ops(idx.device)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device) if positions is None else positions
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, ops, None if kv_caches is None else kv_caches[i])
        return self.final_norm(x, ops)

    def forward(self, idx, kv_caches=None, start_pos=0, *, targets=None, ignore_index=-100, positions=None):
        """Logits (B, T, vocab_size) for token ids (B, T); with `targets`, the mean loss instead
        (through `forward` so that DistributedDataParallel sees the call)."""
        if targets is not None:
            return self.loss(idx, targets, ignore_index)
        logits = self.out_head(self.hidden_states(idx, kv_caches, start_pos, positions))
        if logits.shape[-1] > self.cfg.vocab_size:  # drop the padding rows
            logits = logits[..., : self.cfg.vocab_size]
        return logits

    def loss(self, idx, targets, ignore_index=-100):
        """Mean next-token cross-entropy; fused backends never materialise the logits."""
        ops = self.ops(idx.device)
        h = self.hidden_states(idx)
        head = self.out_head
        if isinstance(head, nn.Linear) and head.bias is None and head.weight.shape[0] >= self.cfg.vocab_size:
            return ops.linear_cross_entropy(h, head.weight[: self.cfg.vocab_size], targets, ignore_index)
        logits = head(h)[..., : self.cfg.vocab_size]  # a replaced or wrapped head (fine-tuning, LoRA)
        return ops.cross_entropy(logits, targets, ignore_index)

    def num_parameters(self, exclude_head: bool = False) -> int:
        """Distinct parameters; `exclude_head` leaves out an untied output head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_head and not self.cfg.tie_weights:
            n -= self.out_head.weight.numel()
        return n
