"""The fused CPU step: one call of `torch.ops.gptfast.decode_step` (csrc/decode_cpu.cpp) runs a
GPT-2 step for rows at different lengths (embeddings, every block, the KV-cache write, the head)
where the eager step runs ~350 small ops and the Python between them. Its tokens are any mix of
decoding rows (one token each) and prompts being prefilled (all their tokens), so prompts that
arrive while others decode join their step's matmuls.

`FusedDecode.for_model(model)` decides once whether the C++ step computes what the model does:
a GPTModel of the classic blocks with nothing swapped or hooked, linear layers that are
nn.Linear (fp32) or gptfast.quant's, contiguous fp32 embeddings and norms, in eval mode, on the
torch backend (the reference backend runs the reference modules, triton its kernels), with _C
built; else None, and the model's own forward runs. The step reads the model's tensors at each
call, so weights updated in place are seen. Beyond `max_rows` tokens in a call
(cpu_linear.MAX_KERNEL_ROWS of its weights) torch's GEMM beats the step's matmuls: a step of
more decoding rows alone takes the eager step; beside prompts they go in several calls, and the
prompts in chunks of at most max_rows (gptfast.engine). The reference is the model's own forward through the KV cache
(gptfast.runner); tests/test_cpu_decode.py checks one against the other.

int8 weights are also kept packed (cpu_linear.pack_int8, as much memory again) where the kernel
path runs the avx2 or avx512 tiles (cpu_linear.packs_int8, decided when the step is made; amx
runs them below its own tiles' rows): those tiles of 3 or more rows then skip repacking every block of 16 weight rows
at each call (a GPT-2 step's matmuls at 16 rows: median 26.9 against 32.2 ms; the whole step
under benchmarks/engine_load.py's 16 clients 27.7 against 30.3, one alternating pair). A weight
changed in place is packed again at the next call, as its version counter tells; writes that
bypass the counter go unseen by steps of 3 or more rows: through `.data`, numpy, DLPack or the
storage, and any change to an inference tensor (it has none). Build a new Engine or Generator
after those.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import cpu_linear
from .model import GPTModel, MultiHeadAttention, TransformerBlock
from .quant import FloatLinear, Int4Linear, Int8Linear

_HAS_OP = cpu_linear.op_built("decode_step")


def has_kernel() -> bool:
    """Whether gptfast._C was built with the fused CPU decode step."""
    return _HAS_OP


def _linear_operands(layer) -> tuple | None:
    """(weight, scale, bias, group) of a layer the C++ step multiplies by, or None."""
    if type(layer) in (FloatLinear, Int8Linear, Int4Linear):
        return layer.weight, layer.scale, layer.bias, layer.group
    if type(layer) is nn.Linear and _fp32(layer.weight) and (layer.bias is None or _fp32(layer.bias)):
        return layer.weight, None, layer.bias, 0
    return None


def _fp32(*tensors) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _op(module) -> str | None:
    return getattr(type(module), "op", None)


def _classic(model) -> bool:
    """The blocks the C++ step computes, in eval mode on the torch backend, with no hooks."""
    hooks = nn.modules.module
    if (type(model) is not GPTModel or model.active_backend != "torch" or model.training
            or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
            or any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())):
        return False
    return all(type(b) is TransformerBlock and type(b.att) is MultiHeadAttention and _op(b.att.attend) == "attention"
               and _op(b.ff) == "feed_forward" and len(b.ff.layers) == 3 and _op(b.ff.layers[1]) == "gelu"
               for b in model.trf_blocks)


class FusedDecode:
    """The operands of one model for `torch.ops.gptfast.decode_step`."""

    def __init__(self, model, norms, linears, groups, eps):
        cfg = model.cfg
        self.tok_emb, self.pos_emb = model.tok_emb.weight, model.pos_emb.weight
        self.norms, self.linears, self.groups = norms, linears, groups
        self.n_heads, self.eps, self.vocab_size = cfg.n_heads, eps, cfg.vocab_size
        self.max_rows = min(cpu_linear.MAX_KERNEL_ROWS[w.dtype] for w in linears[::3])
        self._packs = cpu_linear.packs_int8()
        int8 = [w for w in linears[::3] if w.dtype == torch.int8] if self._packs else []
        self._tracked = [w for w in int8 if not w.is_inference()]  # packed again when changed in place
        self._pack()

    def _pack(self):
        """The int8 weights' packed copies (None for the others), and the versions they were made
        from (read first: a change while packing, from another thread, then packs again)."""
        self._versions = [w._version for w in self._tracked]
        self.packed = [cpu_linear.pack_int8(w) if w.dtype == torch.int8 and self._packs else None
                       for w in self.linears[::3]]

    @classmethod
    def for_model(cls, model) -> FusedDecode | None:
        if not _HAS_OP or not _classic(model):
            return None
        norm_modules = [n for b in model.trf_blocks for n in (b.norm1, b.norm2)] + [model.final_norm]
        if not _fp32(model.tok_emb.weight, model.pos_emb.weight) or any(
                _op(n) != "layer_norm" or not _fp32(n.scale, n.shift) for n in norm_modules):
            return None
        eps = {n.eps for n in norm_modules}
        layers = [m for b in model.trf_blocks for m in (b.att.qkv, b.att.out_proj, b.ff.layers[0], b.ff.layers[2])]
        operands = [_linear_operands(m) for m in layers + [model.out_head]]
        if len(eps) != 1 or any(o is None for o in operands):
            return None
        norms = [t for n in norm_modules for t in (n.scale, n.shift)]
        linears = [t for weight, scale, bias, _ in operands for t in (weight, scale, bias)]
        return cls(model, norms, linears, [o[3] for o in operands], eps.pop())

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, outputs: torch.Tensor,
                 caches) -> torch.Tensor:
        """Logits (len(outputs), vocab_size) of one step of n tokens (int64 tensors (n,)): token i
        at positions[i] of cache row rows[i], its key/value written to that slot; a row's tokens
        are one run of consecutive positions. outputs: the tokens whose logits are returned."""
        if any(w._version != v for w, v in zip(self._tracked, self._versions)):
            self._pack()
        return torch.ops.gptfast.decode_step(
            tokens, positions, rows, outputs, self.tok_emb, self.pos_emb, self.norms, self.linears, self.groups,
            self.packed, [c.k for c in caches], [c.v for c in caches], self.n_heads, self.eps, self.vocab_size)
