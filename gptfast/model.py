"""The GPT model, top to bottom: the classic reference modules, one parameter layout for
every backend, and the backend switch.

The op modules that backends implement differently (LayerNorm, GELU, FeedForward, the causal
attention core, the LM-head loss) name their op in `op`; `GPTModel.set_backend` gives each one
the class of the chosen backend (gptfast.backends explains the scheme). Only classes change,
never parameters, so every backend uses one state dict.

Layout (state-dict keys): tok_emb, pos_emb, trf_blocks.N.{norm1, att.qkv, att.out_proj,
norm2, ff.layers.0, ff.layers.2}, final_norm, out_head. A state dict from the classic
from-scratch code (separate att.W_query/W_key/W_value and a saved att.mask) loads too.
"""
from __future__ import annotations

import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backends import BACKENDS, TORCH_MODULES, causal_mask, triton_interpreting, warn_once
from .config import GPTConfig


class LayerNorm(nn.Module):
    """LayerNorm with `scale`/`shift` parameters and eps 1e-5 (the classic names)."""
    op = "layer_norm"

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift

    def add_norm(self, x, residual):
        """(x + residual, norm(x + residual)): the pre-norm block's residual step (one kernel on triton)."""
        s = x + residual
        return s, self(s)


class GELU(nn.Module):
    """GPT-2's tanh approximation of GELU."""
    op = "gelu"

    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


class FeedForward(nn.Module):
    op = "feed_forward"  # triton fuses the first layer's bias into its GELU kernel

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), GELU(), nn.Linear(4 * cfg.emb_dim, cfg.emb_dim))

    def forward(self, x):
        return self.layers(x)


class CausalAttention(nn.Module):
    """softmax(q k^T / sqrt(D)) v over the keys each query may see, dropout on the weights.
    q (B, H, T, D), k and v (B, H, S, D): the queries are the last T of the S positions, unless
    a KV cache (gptfast.kv_cache) gives a mask (padding, per-row lengths)."""
    op = "attention"

    def __init__(self, dropout_p: float):
        super().__init__()
        self.dropout_p = dropout_p

    def forward(self, q, k, v, kv_cache=None):
        T, S = q.shape[-2], k.shape[-2]
        mask = None if kv_cache is None else kv_cache.mask(T)  # broadcasts to (B, H, T, S)
        if mask is None:
            mask = causal_mask(T, S, q.device)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, H, T, S)
        weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        return F.dropout(weights, self.dropout_p, self.training) @ v  # (B, H, T, D)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with one fused query/key/value projection."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.attend = CausalAttention(cfg.drop_rate)
        self.out_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.register_load_state_dict_pre_hook(lambda module, sd, prefix, *_: fuse_classic_qkv(sd, prefix))

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        if kv_cache is not None:  # generation: the cache stores k, v and returns every key so far
            k, v = kv_cache.update(k, v)  # (B, H, S, D)
        y = self.attend(q, k, v, kv_cache)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


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
    """Pre-norm block: x + att(norm1(x)), then + ff(norm2(.)), with dropout on each branch.
    The feed-forward branch is returned beside x, not added: the next norm adds it (add_norm,
    one kernel on triton), as norm2 adds the attention branch."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.att = MultiHeadAttention(cfg)
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x, branch=None, kv_cache=None):
        """(x, branch) -> (x + branch, this block's feed-forward branch); branch None: nothing to add."""
        x, h = self.norm1.add_norm(x, branch) if branch is not None else (x, self.norm1(x))
        x, h = self.norm2.add_norm(x, self.drop_shortcut(self.att(h, kv_cache)))  # x + att, and norm2 of it
        return x, self.drop_shortcut(self.ff(h))


class LMLoss(nn.Module):
    """Mean cross-entropy of the output head's logits (the padding rows are never a class);
    it takes the head as an argument, so the triton loss can fuse a plain head's matmul."""
    op = "loss"

    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, hidden, head, targets, ignore_index=-100):
        logits = head(hidden)[..., : self.vocab_size]
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=ignore_index)


REFERENCE_MODULES = {m.op: m for m in (LayerNorm, GELU, FeedForward, CausalAttention, LMLoss)}


class GPTModel(nn.Module):
    """GPT-2. `backend`: "reference", "torch", "triton" or "auto" (see gptfast.backends);
    every backend uses the same parameters, so `model.set_backend(...)` switches freely."""

    def __init__(self, cfg: GPTConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(cfg, GPTConfig):  # e.g. the classic code's dict: GPTConfig.from_dict reads it
            raise TypeError(f"GPTModel takes a GPTConfig, got {type(cfg).__name__}; "
                            "use GPTModel(GPTConfig.from_dict(cfg)) for a config dict")
        self.cfg = cfg
        vocab = cfg.padded_vocab_size
        self.tok_emb = nn.Embedding(vocab, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, vocab, bias=False)
        self.lm_loss = LMLoss(cfg.vocab_size)
        if cfg.init == "gpt2":
            self.apply(self._init_gpt2)
            for block in self.trf_blocks:  # scale residual projections by depth (GPT-2 paper)
                for proj in (block.att.out_proj, block.ff.layers[2]):
                    nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
            self.register_load_state_dict_pre_hook(_refuse_untied_weights)
        self.set_backend(backend)

    @staticmethod
    def _init_gpt2(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

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
        if self._fallback:  # triton asked for, torch runs: say why (once), now that it matters
            warn_once(self._fallback)
        pos = torch.arange(start_pos, start_pos + T, device=idx.device) if positions is None else positions
        x, branch = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos)), None  # (B, T, C)
        for i, block in enumerate(self.trf_blocks):
            x, branch = block(x, branch, None if kv_caches is None else kv_caches[i])
        return self.final_norm.add_norm(x, branch)[1]  # n_layers >= 1: the last block's branch

    def forward(self, idx, kv_caches=None, start_pos=0, *, targets=None, ignore_index=-100, positions=None):
        """Logits (B, T, vocab_size) for token ids (B, T); with `targets`, the mean loss instead
        (through `forward` so that DistributedDataParallel sees the call)."""
        if targets is not None:
            return self.loss(idx, targets, ignore_index)
        logits = self.out_head(self.hidden_states(idx, kv_caches, start_pos, positions))
        return logits[..., : self.cfg.vocab_size]  # without the padding rows

    def loss(self, idx, targets, ignore_index=-100):
        """Mean next-token cross-entropy (on triton a plain head's logits never exist at once)."""
        return self.lm_loss(self.hidden_states(idx), self.out_head, targets, ignore_index)

    def num_parameters(self, exclude_head: bool = False) -> int:
        """Distinct parameters; `exclude_head` leaves out an untied output head."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_head and not self.cfg.tie_weights:
            n -= self.out_head.weight.numel()
        return n

    # ---- the backend switch ----------------------------------------------------------------
    @property
    def backend(self) -> str:
        """The backend asked for ("auto" included); `active_backend` is the one that runs."""
        return self._backend

    @backend.setter
    def backend(self, name: str):
        self.set_backend(name)

    def set_backend(self, name: str) -> GPTModel:
        """Run on backend `name`: every op module takes that backend's class for the model's
        device (same parameters). Decided again whenever the model moves (see `_apply`); a
        fallback from "triton" warns once, when the model first runs where it fell back."""
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
        self._backend = name
        self.active_backend, classes, self._fallback = choose_backend(name, self.tok_emb.weight.device)
        for m in self.modules():
            op = getattr(type(m), "op", None)
            if op is not None:
                m.__class__ = classes.get(op, REFERENCE_MODULES[op])
        return self

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)  # .to(), .cuda(), .half(), ...: the device may have changed
        return self.set_backend(self._backend)


def choose_backend(name: str, device: torch.device) -> tuple[str, dict[str, type], str | None]:
    """(the backend that runs `name` on `device`, its op classes (an op left out keeps the
    reference class), why "triton" fell back to "torch" here or None)."""
    if name == "reference":
        return name, {}, None
    if name == "torch" or not (device.type == "cuda" or (name == "triton" and triton_interpreting())):
        why = None if name != "triton" else (f"backend 'triton' needs a CUDA tensor (or TRITON_INTERPRET=1); "
                                              f"using 'torch' on {device.type}")
        return "torch", TORCH_MODULES, why
    modules, why = triton_modules()
    if modules is None:
        return "torch", TORCH_MODULES, (f"backend 'triton': {why}; using 'torch'" if name == "triton" else None)
    return "triton", modules, None


def triton_modules() -> tuple[dict[str, type] | None, str | None]:
    """(gptfast.kernels' op classes, None), or (None, why Triton cannot run in this process)."""
    if "tensorflow" in sys.modules and "triton" not in sys.modules:  # importing it now aborts
        return None, ("tensorflow was imported before triton, and importing triton now would abort the "
                      "process (LLVM option clash); import triton (or gptfast.kernels) before tensorflow")
    try:
        from gptfast.kernels import op_modules
    except Exception as e:  # Triton missing or broken: fall back, never crash
        return None, f"Triton is unavailable ({type(e).__name__}: {e})"
    if triton_interpreting() and (why := interpreter_problem()):
        return None, why
    return op_modules(), None


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run the kernels with the installed versions, or None:
    before Triton 3.7 it turns a runtime loop bound into an int by int() of a 1-element array,
    which NumPy 2.4 rejects (triton-lang/triton#9171): every kernel with a row loop fails."""
    import numpy
    import triton

    def major_minor(version: str) -> tuple[int, ...]:  # "3.6.0+git..." and "3.7rc1" alike
        return tuple(int(part) for part in re.findall(r"\d+", version)[:2])

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails under NumPy {numpy.__version__} (triton-lang/"
                f"triton#9171: 'only 0-dimensional arrays can be converted to Python scalars'); install numpy<2.4 "
                f"or Triton >= 3.7")
    return None
