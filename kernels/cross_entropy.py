"""cross_entropy: mean token cross-entropy with the gradient written during the forward.

One program per row of logits: a first sweep keeps the online-softmax running max and sum
(fp32) over vocabulary blocks, so any vocabulary size (50257) works; a second sweep writes
d loss / d logits = (softmax - onehot) / n_valid. Backward is then only a scale by the
incoming gradient, applied in place (so backward can run once per forward) by a kernel that
reads the factor on the device and leaves the buffer alone when it is 1 (the usual
loss.backward()): no host sync, and no second pass over the logits. fp16 is different:
softmax / n_valid over a 50257 vocabulary falls below its smallest subnormal, and a
GradScaler's 65536 is inf in it, so fp16 gradients are stored as (softmax - onehot) * 2**14
(|value| <= 16384, few probabilities subnormal) and backward applies grad_output / (n_valid *
2**14) in fp32 (linear_cross_entropy keeps its fp16 chunks unscaled, times 1, so their
grad_weight products stay in range). Targets equal to `ignore_index` give a zero loss and a zero
gradient row; the mean is over the others, and with none left the loss is 0 (not NaN).
Targets are range-checked without a host sync on CUDA (a device-side assertion, as
F.cross_entropy's); on CPU the check raises a ValueError at once.

Rows of 50257 logits start at unaligned addresses, which compiles the loads to scalar 2-byte
ones. Logits whose rows are padded (a view of wider rows, such as a `pad_vocab` head's, or the
fused linear-CE's own chunk buffer, 50304 wide) are read up to the next multiple of 16 columns
with the padding masked out, so the JIT's divisibility hints apply and the loads vectorise
(tests/test_triton_compile.py checks the PTX).

`linear_cross_entropy(hidden, weight, targets)` is the output head + loss (Liger-Kernel's
FusedLinearCrossEntropy design): tokens go through in chunks; each chunk's logits are computed
with a torch matmul, overwritten in place with their gradient by the kernel, and folded into
grad_hidden and grad_weight right away, so the [tokens x vocab] logits never exist at once (one
chunk buffer serves every chunk; fp16/bf16 grad_weight products go straight into the fp32 sum
on CUDA). The weight is padded with zero rows to a multiple of 64, so every GEMM has aligned
sizes: cuBLAS's kernels for an odd 50257 are several times slower.

`LinearCrossEntropyLoss` is the "triton" backend's LM-head loss module (see gptfast.backends);
`cross_entropy_ref` / `linear_cross_entropy_ref` are the references the tests and benchmarks
check these kernels against.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

from gptfast.backends import FUSED_DTYPES, fused_dtypes


def cross_entropy_ref(logits, targets, ignore_index: int = -100, upcast: bool = False):
    """F.cross_entropy of logits (..., V) against targets (...), in the logits' dtype (or in fp32
    with `upcast`, as the model's reference loss computes it)."""
    logits = logits.flatten(0, -2)  # (M, V)
    return F.cross_entropy(logits.float() if upcast else logits, targets.flatten(), ignore_index=ignore_index)


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index: int = -100, upcast: bool = False):
    """cross_entropy_ref of the logits hidden @ weight.T, built in full (in fp32 with `upcast`)."""
    if upcast:
        hidden, weight = hidden.float(), weight.float()
    return cross_entropy_ref(F.linear(hidden, weight), targets, ignore_index)


@triton.jit
def _load_row(X_ROW, start, cols, V, n_cols):
    """fp32 logits [start, start + BLOCK_V) of one row; -inf past the vocabulary. The load is
    bounded by n_cols: a multiple of 16 (padded rows) lets it vectorise, where V would not."""
    x = tl.load(X_ROW + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
    return tl.where(start + cols < V, x, float("-inf"))  # padding may hold anything


@triton.jit
def _cross_entropy_fwd(LOGITS, GRAD, TARGETS, LOSS, N_VALID, V, n_cols, stride_x, stride_g, ignore_index, mult,
                       WRITE_GRAD: tl.constexpr, DIVIDE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Loss of one row; with WRITE_GRAD its gradient times 1 / n_valid (DIVIDE) or times `mult`.
    Rows are n_cols wide (V, or V padded up to a multiple of 16; padding gets a zero gradient),
    stride_x / stride_g apart. A target outside [0, V) gives a NaN loss, never a stray read."""
    row = tl.program_id(0).to(tl.int64)
    x_row = LOGITS + row * stride_x
    g_row = GRAD + row * stride_g
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK_V)
    if target == ignore_index:
        if WRITE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                tl.store(g_row + start + cols, tl.zeros([BLOCK_V], tl.float32).to(GRAD.dtype.element_ty),
                         mask=start + cols < n_cols)
        tl.store(LOSS + row, 0.0)
        return
    # sweep 1: running max m and sum d of exp(x - m), all fp32
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK_V):
        x = _load_row(x_row, start, cols, V, n_cols)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    x_target = tl.load(x_row + target, mask=(target >= 0) & (target < V), other=float("nan")).to(tl.float32)
    tl.store(LOSS + row, m + tl.log(d) - x_target)
    if WRITE_GRAD:  # sweep 2: (softmax - onehot) / n_valid, safe in place (read before write)
        scale = mult
        if DIVIDE:
            scale = 1.0 / tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0)
        for start in range(0, n_cols, BLOCK_V):
            x = _load_row(x_row, start, cols, V, n_cols)
            p = tl.exp(x - m) / d
            p = tl.where(start + cols == target, p - 1.0, p)
            tl.store(g_row + start + cols, (p * scale).to(GRAD.dtype.element_ty), mask=start + cols < n_cols)


@triton.jit
def _scale_grad(G, GRAD_OUT, N_VALID, numel, inv_mult, DIVIDE: tl.constexpr, BLOCK: tl.constexpr):
    """G *= grad_output * inv_mult (/ n_valid when the forward left that out), in fp32; a no-op
    when the factor is exactly 1, decided on the device."""
    factor = tl.load(GRAD_OUT).to(tl.float32) * inv_mult
    if DIVIDE:
        factor = factor / tl.maximum(tl.load(N_VALID).to(tl.float32), 1.0)
    if factor != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(G + offs, (g * factor).to(G.dtype.element_ty), mask=mask)


def _fp16_mult(dtype, mult: float):
    """What the forward multiplies the gradient by instead of 1 / n_valid: `mult` for fp16
    (the division then happens in backward, in fp32), None (divide in the forward) otherwise."""
    return mult if dtype == torch.float16 else None


# the loss kernel's vocabulary block and elements per warp (benchmarks/tune_gpu.py times others);
# GPT-2's 50257 gets the 16 warps it always had, vocabularies of 8192 or fewer half as many
MAX_BLOCK_V, BLOCK_PER_WARP = 16384, 1024


def _block_v(V: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    return block, min(max(block // BLOCK_PER_WARP, 4), 32)


def _check(dtype, M, V, device, targets, ignore_index, name="cross_entropy"):
    """Validate M rows of V logits and their targets (M,); returns the count of non-ignored targets."""
    if dtype not in FUSED_DTYPES:
        raise ValueError(f"{name}: logits would have dtype {dtype}; expected one of fp32, fp16, bf16")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: targets have dtype {targets.dtype}; expected int64 or int32")
    if targets.numel() != M:
        raise ValueError(f"{name}: targets have {targets.numel()} elements; expected {M}, one per row "
                         "of logits")
    if targets.device != device:
        raise ValueError(f"{name}: targets are on {targets.device} but the logits on {device}")
    valid = targets != ignore_index
    bad = (valid & ((targets < 0) | (targets >= V))).any()
    message = f"{name}: a target is outside [0, {V}) and is not ignore_index={ignore_index}"
    if targets.is_cuda:  # no host sync on the hot path: checked on the device (fatal, as F.cross_entropy's)
        torch._assert_async(~bad, message)  # the kernel also gives such a row a NaN loss
    elif bool(bad):
        raise ValueError(message)
    return valid.sum()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _padded_width(t) -> int:
    """Columns the kernel may read in each row of t (M, V): V rounded up to a multiple of 16 when
    t's rows are padded that far (row stride, and storage after the last row), else V. Rows of
    50257 logits are then 16-aligned and their loads vectorise (GPTConfig's padded vocabulary
    50304 gives such rows)."""
    M, V = t.shape
    width = _round_up(V, 16)
    end = t.storage_offset() + (M - 1) * t.stride(0) + width  # elements, past the last row's padding
    if t.stride(1) == 1 and t.stride(0) >= width and end * t.element_size() <= t.untyped_storage().nbytes():
        return width
    return V


def _padded_empty(M: int, V: int, like, pad: bool):
    """(base, view): an (M, V) buffer for gradients or logits, whose rows are 64-aligned (base is
    (M, V rounded up to 64), contiguous) when `pad`; else base is the view, contiguous."""
    base = torch.empty(M, _round_up(V, 64) if pad else V, dtype=like.dtype, device=like.device)
    return base, base[:, :V]


def _launch(logits, grad, targets, loss_rows, n_valid, ignore_index, write_grad, mult, n_cols=None):
    """The loss kernel over (M, V) logits and grad views with unit column stride; n_cols: the row
    width it may read and write (padding included, see _padded_width), V when None."""
    M, V = logits.shape
    if M == 0:
        return
    block, warps = _block_v(V)
    _cross_entropy_fwd[(M,)](logits, grad, targets, loss_rows, n_valid, V, n_cols or V, logits.stride(0),
                             grad.stride(0), ignore_index, 1.0 if mult is None else float(mult),
                             WRITE_GRAD=write_grad, DIVIDE=mult is None, BLOCK_V=block, num_warps=warps)


def _mean(loss_rows, n_valid):
    return loss_rows.sum() / n_valid.clamp(min=1)


def _scale(grads, grad_output, n_valid, mult):
    """Scale the forward's gradients by grad_output (/ (n_valid * mult) if the forward
    multiplied by `mult` instead of dividing by n_valid) in place, and bump
    their version as an in-place torch op would, so autograd itself refuses a second backward
    through the same forward (not traceable: skipped under torch.compile)."""
    grad_output = grad_output.float().contiguous()
    for g in grads:
        if g is None or not g.numel():
            continue
        block = 4096
        _scale_grad[(triton.cdiv(g.numel(), block),)](g, grad_output, n_valid, g.numel(),
                                                      1.0 if mult is None else 1.0 / mult,
                                                      DIVIDE=mult is not None, BLOCK=block, num_warps=8)
        if not torch.compiler.is_compiling():
            torch.autograd.graph.increment_version(g)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, n_valid, ignore_index, inplace, write_grad):
        # logits (M, V), rows maybe padded; in place, padding outside the caller's view stays untouched
        n_cols = logits.shape[1] if inplace else _padded_width(logits)
        if inplace or not write_grad:  # without a gradient to write, `logits` is the (unused) output
            base = grad = logits
        else:  # padded rows when the logits have them: the gradient's loads and stores vectorise too
            base, grad = _padded_empty(*logits.shape, logits, n_cols > logits.shape[1])
        loss_rows = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        ctx.mult = _fp16_mult(logits.dtype, 2.0**14)
        _launch(logits, grad, targets, loss_rows, n_valid, ignore_index, write_grad, ctx.mult, n_cols)
        ctx.save_for_backward(base if write_grad else None, n_valid)
        ctx.V = logits.shape[1]
        return _mean(loss_rows, n_valid)

    @staticmethod
    def backward(ctx, grad_output):
        base, n_valid = ctx.saved_tensors  # exists: backward only runs when logits required grad
        _scale([base], grad_output, n_valid, ctx.mult)  # padding columns are 0: scaled alike
        return base[:, :ctx.V], None, None, None, None, None


def cross_entropy(logits, targets, ignore_index: int = -100, inplace: bool = False):
    """Mean cross-entropy of logits (..., V) against integer targets (...), fp32 result.

    inplace=True overwrites `logits` with its gradient during the forward (saves one
    logits-sized buffer; fp16: the gradient times n_valid * 2**14 until backward); only use it
    when nothing else reads those logits afterwards.
    """
    if inplace and not logits.is_contiguous():
        raise ValueError("cross_entropy: inplace=True needs contiguous logits")
    logits2 = logits.reshape(-1, logits.shape[-1])  # (M, V): a view of padded rows stays one
    if logits2.stride(-1) != 1:
        logits2 = logits2.contiguous()
    targets = targets.reshape(-1)  # (M,)
    n_valid = _check(logits2.dtype, *logits2.shape, logits2.device, targets, ignore_index)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    return CrossEntropyFunction.apply(logits2, targets.contiguous(), n_valid, ignore_index,
                                      inplace, write_grad)


# cuBLAS's fp16/bf16 GEMMs with an fp32 output (torch >= 2.8; addmm for grad_weight, mm for
# grad_hidden): a chunk's grad_weight goes straight into the fp32 sum, no (V, H) temporary between
_FP32_OUT_GEMM = all("dtype_out" in op.overloads() for op in (torch.ops.aten.addmm, torch.ops.aten.mm))


def _dw_accumulator(dw, hidden):
    """add(logits, h): dw (fp32, (V, H)) += logits.T @ h, decided once per forward: in place for
    fp32; fp16/bf16 on CUDA through a GEMM with fp32 output; elsewhere through one (V, H) buffer
    reused by every chunk (never a new full-size temporary per chunk)."""
    if hidden.dtype == dw.dtype:
        return lambda logits, h: dw.addmm_(logits.T, h)
    if hidden.is_cuda and _FP32_OUT_GEMM:
        return lambda logits, h: torch.addmm(dw, logits.T, h, out_dtype=torch.float32, out=dw)
    part = torch.empty(dw.shape, dtype=hidden.dtype, device=dw.device)

    def add(logits, h):
        dw.add_(torch.mm(logits.T, h, out=part))
    return add


def _dh_writer(hidden):
    """(dh, write(logits, weight, rows)): grad_hidden and how a chunk's product goes into it,
    decided once per forward. fp16/bf16 on CUDA write an fp32 dh, cast at the end: a chunk has
    few rows against a 50257-long inner dimension, so cuBLAS splits that dimension, and by default
    (torch's allow_bf16_reduced_precision_reduction) it adds the splits in bf16, which gave 5x
    F.cross_entropy's bf16 error at GPT-2 124M's 16 x 1024 tokens on an H200."""
    M, H = hidden.shape
    if hidden.is_cuda and hidden.dtype != torch.float32 and _FP32_OUT_GEMM:
        dh = torch.empty(M, H, dtype=torch.float32, device=hidden.device)
        return dh, lambda logits, weight, rows: torch.mm(logits, weight, out_dtype=torch.float32, out=dh[rows])
    dh = torch.empty_like(hidden)
    return dh, lambda logits, weight, rows: torch.mm(logits, weight, out=dh[rows])


def _chunk_tokens(M: int, H: int, V: int) -> int:
    """Tokens per chunk: chunk logits about 8x the size of the hidden states (GPT-2 124M at
    16 x 1024 tokens: 2048-token chunks of 200 MiB in bf16, 8 chunks; fewer, larger chunks
    mean fewer passes adding a chunk's grad_weight into the fp32 sum)."""
    return max(1, min(M, triton.next_power_of_2(triton.cdiv(8 * M * H, V))))


def _padded_weight(weight, dtype):
    """weight (V, H) in `dtype`, contiguous, with zero rows appended up to a multiple of 64 rows
    (one copy, cast included; none when it is all that already), so that every GEMM of the chunk
    loop has aligned sizes: for GPT-2's odd 50257, cuBLAS fell back to old CUTLASS kernels (sm75
    `align1`, sm80 `align8`), 25.8 of a 61 ms bf16 training step on an H200
    (benchmarks/results/gpu-bench-nvidia-h200-20261130-1134-*/profile_train.md). The copy costs
    one pass over the weight a forward, also for an fp32 weight that needed none before. The zero
    rows give zero logits (masked by the kernel), zero gradient columns and zero grad_weight rows."""
    V, H = weight.shape
    if V % 64 == 0:
        return weight.to(dtype).contiguous()
    padded = torch.empty(_round_up(V, 64), H, dtype=dtype, device=weight.device)
    padded[:V].copy_(weight)
    padded[V:].zero_()
    return padded


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, n_valid, ignore_index, need_dh, need_dw):
        """hidden (M, H) in the matmul dtype; weight (V, H) in its own (cast here, with the padding)."""
        M, H = hidden.shape
        V = weight.shape[0]
        loss_rows = torch.empty(M, dtype=torch.float32, device=hidden.device)
        # fp16: the gradient unscaled (times 1) keeps the chunk's grad_weight product in range
        ctx.mult = _fp16_mult(hidden.dtype, 1.0)
        ctx.dtypes = hidden.dtype, weight.dtype  # the gradients' dtypes
        weight = _padded_weight(weight, hidden.dtype)  # (Vp, H), Vp = V rounded up to 64
        dh, write_dh = _dh_writer(hidden) if need_dh else (None, None)
        # grad_weight adds up over chunks: accumulate in fp32, whatever the weight dtype
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_dw else None
        add_dw = _dw_accumulator(dw, hidden) if need_dw else None
        chunk = _chunk_tokens(M, H, V)
        # one buffer for every chunk's logits, Vp wide: aligned GEMMs, vectorised kernel loads
        buf = torch.empty(min(chunk, M), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        for start in range(0, M, chunk):
            h = hidden[start:start + chunk]  # (c, H)
            logits = torch.mm(h, weight.T, out=buf[:h.shape[0]])  # (c, Vp), becomes its own gradient
            _launch(logits[:, :V], logits[:, :V], targets[start:start + chunk], loss_rows[start:start + chunk],
                    n_valid, ignore_index, need_dh or need_dw, ctx.mult, n_cols=_round_up(V, 16))
            if need_dh:
                write_dh(logits, weight, slice(start, start + chunk))
            if need_dw:
                add_dw(logits, h)
        ctx.save_for_backward(dh, dw, n_valid)  # dw (and dh on CUDA) stay fp32 until scaled (fp16: unscaled sums)
        ctx.vocab = V
        return _mean(loss_rows, n_valid)

    @staticmethod
    def backward(ctx, grad_output):
        dh, dw, n_valid = ctx.saved_tensors
        _scale([dh, dw], grad_output, n_valid, ctx.mult)
        dw = None if dw is None else dw[:ctx.vocab]  # (V, H): the padding rows are zero
        dh, dw = (None if g is None else g.to(dtype) for g, dtype in zip((dh, dw), ctx.dtypes))
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100):
    """cross_entropy(hidden @ weight.T, targets) without building the full logits.

    hidden (..., H), weight (V, H) (the output head, no bias), targets (...). Under autocast
    both operands take the autocast dtype, as F.linear would give them.
    """
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight has shape {tuple(weight.shape)}; expected "
                         f"(vocab, {hidden.shape[-1]}) to match the last dimension of hidden")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
    else:
        dtype = torch.promote_types(hidden.dtype, weight.dtype)
    hidden2 = hidden.reshape(-1, hidden.shape[-1]).to(dtype).contiguous()  # (M, H)
    targets = targets.reshape(-1).contiguous()  # (M,)
    n_valid = _check(dtype, hidden2.shape[0], weight.shape[0], hidden2.device, targets, ignore_index,
                     "linear_cross_entropy")
    grad = torch.is_grad_enabled()
    with torch.autocast(dev, enabled=False):
        # weight (V, H) as it is: the forward casts it to dtype with its padding, in one copy
        return LinearCrossEntropyFunction.apply(hidden2, weight, targets, n_valid, ignore_index,
                                                grad and hidden.requires_grad, grad and weight.requires_grad)


class LinearCrossEntropyLoss(nn.Module):
    """The LM-head loss on these kernels (the module `gptfast.model.LMLoss` becomes): a plain
    bias-free nn.Linear head goes through linear_cross_entropy, so its logits never exist at
    once; any other head (a classifier, LoRA, int8) through cross_entropy on its logits; dtypes
    the kernels do not take (fp64) through cross_entropy_ref."""
    op = "loss"

    def forward(self, hidden, head, targets, ignore_index=-100):
        V = self.vocab_size
        if type(head) is nn.Linear and head.bias is None and fused_dtypes(hidden, head.weight):
            return linear_cross_entropy(hidden, head.weight[:V], targets, ignore_index)
        logits = head(hidden)[..., :V]  # the padding rows are never a class
        if not fused_dtypes(logits):
            return cross_entropy_ref(logits, targets, ignore_index, upcast=True)
        return cross_entropy(logits, targets, ignore_index)
