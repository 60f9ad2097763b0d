"""Top-k (+ top-p) sampling of the next token: one fused op, or the classic six-op path.

`sample_top_k` runs `torch.ops.gptfast.sample_top_k` (csrc/, built into gptfast._C) when the
extension has a kernel for the logits' device, and otherwise `reference_sample_top_k`, the
classic PyTorch path (topk, compare, where, / temperature, softmax, multinomial), warning once.

Randomness: the op draws one uniform per row from a counter-based hash of (seed, offset, row)
(csrc/sampling_common.h), so CPU and CUDA draw the same u for the same seed; their ids agree
except when u lands within fp32 rounding (~1e-5 relative at V=50257) of a cumulative-probability
boundary: ~10% of rows when the whole vocabulary is kept, under 1% with k <= 1000. For CUDA
graphs and torch.compile pass `seed` as an int64 tensor [2] (seed, offset) and advance it in
place (an int seed is baked into a captured graph; a generator is read on the host).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from .backends import FUSED_DTYPES

try:
    from gptfast import _C  # noqa: F401  (loading it registers torch.ops.gptfast.sample_top_k)
    _C_ERROR = None
except ImportError as e:  # not built: pure-PyTorch path
    _C_ERROR = e

if _C_ERROR is None:
    @torch.library.register_fake("gptfast::sample_top_k")
    def _sample_top_k_fake(logits, k, temperature, top_p, seed, return_topk):
        B, V = logits.shape
        shape = (B, min(k, V)) if return_topk else (0,)
        return (logits.new_empty((B,), dtype=torch.long), logits.new_empty(shape),
                logits.new_empty(shape, dtype=torch.long))

# Looked up once: a plain dict read is what torch.compile can trace without a graph break.
_KERNELS = {d: _C_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("gptfast::sample_top_k", d.upper())
            for d in ("cpu", "cuda")}
_ARGMAX_OP = _C_ERROR is None and hasattr(torch.ops.gptfast, "argmax_rows")
_warned: set[str] = set()


def argmax_ids(logits: torch.Tensor) -> torch.Tensor:
    """Greedy ids: logits (B, V).argmax(-1), through gptfast._C's argmax_rows where it is built
    (on CPU a vector kernel over the rows in parallel: 68 us against torch's 469 for 16 x 50257
    fp32 logits; elsewhere torch's argmax); the same ids, the first largest value or the first NaN."""
    return torch.ops.gptfast.argmax_rows(logits) if _ARGMAX_OP else logits.argmax(-1)


def has_kernel(device_type: str) -> bool:
    """Whether gptfast._C has a sample_top_k kernel for this device type ("cpu", "cuda")."""
    return _KERNELS.get(device_type, False)


# The rules for the sampling settings, written once: SamplingParams, sample_top_k and the CLI
# use them. Type checks too: a string or a bool setting is a one-line error, never coerced.
def check_temperature(t):
    if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")


def check_top_k(k):
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"top_k must be a positive integer or None, got {k!r}")


def check_top_p(p):
    if p is not None and (isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 < p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")


def check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen, checked once when made (frozen: it stays valid).
    temperature 0 (or top_k 1) is greedy argmax; top_k keeps the k most likely tokens, top_p
    the smallest prefix of those whose probability reaches p; seed makes the draws repeatable."""
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self):
        check_temperature(self.temperature)
        check_top_k(self.top_k)
        check_top_p(self.top_p)
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _validate(logits, k, temperature, top_p):
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"sample_top_k: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2:
        raise ValueError(f"sample_top_k: logits must be 2-D (B, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in FUSED_DTYPES:
        raise ValueError(f"sample_top_k: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] == 0:  # else the reference path would call it an all -inf row
        raise ValueError(f"sample_top_k: logits must have V >= 1 columns, got shape {tuple(logits.shape)}")
    try:
        check_top_k(k)
        check_temperature(temperature)
        check_top_p(top_p)
    except ValueError as e:
        raise ValueError(f"sample_top_k: {e}") from None


def _check_values(logits):
    # A host sync: skipped while compiling or capturing a CUDA graph (the CUDA kernel then
    # returns id -1 for a NaN/+inf row; the CPU kernel raises in its single pass).
    if torch.compiler.is_compiling() or (logits.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    finite, rows_ok = torch.stack(((logits < math.inf).all(), (logits > -math.inf).any(dim=-1).all())).tolist()
    if not finite:  # both flags read back at once: one sync, not two
        raise ValueError("sample_top_k: logits contain NaN or +inf (-inf is allowed: masked tokens)")
    if not rows_ok:
        raise ValueError("sample_top_k: a logits row is all -inf (nothing to sample)")


def seed_tensor(seed, generator) -> torch.Tensor:
    """The op's (seed, offset) int64 tensor from an int, an (int, int) or a tensor [2]."""
    if seed is not None and generator is not None:
        raise ValueError("sample_top_k: pass seed or generator, not both")
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 2:
            raise ValueError("sample_top_k: a seed tensor must be int64 with 2 elements (seed, offset)")
        return seed
    if seed is None:  # one draw from the generator (torch.manual_seed governs the default one)
        device = generator.device if generator is not None else "cpu"
        return torch.tensor([torch.randint(0, 2**62, (), generator=generator, device=device).item(), 0])
    pair = (seed, 0) if isinstance(seed, int) else tuple(seed) if isinstance(seed, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise ValueError(f"sample_top_k: seed must be an int, an (seed, offset) pair or a tensor, got {seed!r}")
    return torch.tensor([(s + 2**63) % 2**64 - 2**63 for s in pair])  # wrap into int64


def sample_top_k(logits: torch.Tensor, k: int | None, temperature: float, top_p: float | None = None,
                 generator: torch.Generator | None = None, seed=None, return_topk: bool = False):
    """Sample one token id per row of `logits` (B, V) from softmax(top-k logits / temperature).

    k=None (or k >= V) keeps every token; temperature=0 (or k=1) is greedy argmax; top_p keeps
    the smallest high-probability prefix of the top-k whose mass reaches top_p. seed: int,
    (seed, offset) or int64 tensor [2]; else one seed is drawn from `generator` (default: torch's).
    Returns ids (B,) int64, plus the sorted top-k (values, indices) when return_topk.
    """
    _validate(logits, k, temperature, top_p)
    if has_kernel(logits.device.type):
        if logits.device.type != "cpu":  # the CPU kernel checks values in its own pass
            _check_values(logits)
        return _sample(logits, k, temperature, top_p, seed_tensor(seed, generator), None, return_topk)
    if logits.device.type not in _warned:
        _warned.add(logits.device.type)
        why = f"gptfast._C did not load ({_C_ERROR})" if _C_ERROR else f"no {logits.device.type} kernel built"
        warnings.warn(f"sample_top_k: {why}; using the pure-PyTorch reference path", RuntimeWarning, stacklevel=2)
    _check_values(logits)
    seed = None if seed is None else seed_tensor(seed, generator)
    return _sample(logits, k, temperature, top_p, seed, generator, return_topk)


def sample(logits: torch.Tensor, params: SamplingParams, seed: torch.Tensor) -> torch.Tensor:
    """Ids (B,) for logits (B, V) under `params`, already validated (SamplingParams), with the
    int64 [2] (seed, offset) tensor `seed`. No checks and no host sync: the per-step call of
    a decode loop that owns its logits (on CUDA a NaN row gives id -1; the CPU op raises)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return _sample(logits, params.top_k, params.temperature, params.top_p, seed, None, False)


def _sample(logits, k, temperature, top_p, seed, generator, return_topk):
    """The op when gptfast._C has a kernel for the device, else the reference path drawing
    from a generator seeded by (seed, offset), or from `generator` (None: torch's default)."""
    V = logits.shape[-1]
    kk = V if k is None else min(k, V)
    if has_kernel(logits.device.type):
        ids, values, indices = torch.ops.gptfast.sample_top_k(
            logits, kk, float(temperature), 1.0 if top_p is None else float(top_p), seed, return_topk)
        return (ids, values, indices) if return_topk else ids
    if seed is not None:  # keep "same seed, same ids" on this path too
        s, off = seed.tolist()
        generator = torch.Generator(logits.device).manual_seed((s * 1_000_003 + off) % 2**63)
    return reference_sample_top_k(logits, kk, temperature, top_p, generator, return_topk)


def reference_sample_top_k(logits: torch.Tensor, k: int | None, temperature: float,
                           top_p: float | None = None, generator: torch.Generator | None = None,
                           return_topk: bool = False):
    """The classic path: topk, compare, where, / temperature, softmax, multinomial (+ top-p)."""
    V = logits.shape[-1]
    kk = V if k is None else min(k, V)
    greedy = temperature == 0 or kk == 1  # k=1 too, whatever ties the where would keep
    topk = torch.topk(logits, kk, dim=-1) if return_topk or (kk < V and not greedy) else None  # (B, kk)
    if greedy:
        ids = torch.argmax(logits, dim=-1)
    else:
        if kk < V:
            logits = torch.where(logits < topk.values[:, -1:], -math.inf, logits)
        probs = torch.softmax(logits / temperature, dim=-1, dtype=torch.float32)  # (B, V)
        if top_p is not None and top_p < 1:
            sorted_p, order = torch.sort(probs, dim=-1, descending=True)
            sorted_p = torch.where(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0, sorted_p)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    return (ids, topk.values, topk.indices) if return_topk else ids
