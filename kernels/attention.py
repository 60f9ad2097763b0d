"""Causal flash attention (forward + backward) in Triton; flash-decoding is attention_decode.py.

Notation, per (batch, head): queries i = 0..T-1 sit at positions i + S - T of the S keys
(T < S while decoding with a KV cache, T == S in training), D = head_dim, c = 1/sqrt(D).
    s_ij = c q_i.k_j              (visible iff j <= i + S - T when causal)
    P_ij = softmax_j(s_ij)
    O_i  = sum_j Z_ij P_ij v_j    (Z_ij = keep_ij / (1 - p) with dropout, else 1)
Forward: one program per block of queries streams the key blocks with an online softmax
(running max m_i and running sum l_i, rescaling the accumulator when the max grows), so
no [T x S] matrix ever exists; it saves lse_i = log sum_j exp(s_ij) for the backward.
Exponentials are base 2 (exp2 is one instruction): logits are pre-scaled by c * log2(e),
and lse is stored in the same base-2 units.
Backward (FlashAttention-2) recomputes P_ij = exp(s_ij - lse_i) block by block:
    delta_i = dO_i.O_i  (= sum_j P_ij dP_ij, so dropout does not change it)
    dV_j = sum_i Z_ij P_ij dO_i
    dS_ij = P_ij (Z_ij dO_i.v_j - delta_i)
    dK_j = c sum_i dS_ij q_i        (one program per key block: no atomics)
    dQ_i = c sum_j dS_ij k_j        (one program per query block: no atomics)
Dropout keeps (i, j) iff uniform(Philox(seed; j, i, batch*head)) >= p, so the forward and
both backward kernels regenerate the identical mask without storing it.

`TritonCausalAttention` is the "triton" backend's attention core (see gptfast.backends): it
picks flash attention or flash-decoding; `attention_ref` is the reference the tests and
benchmarks check both against. What the two share (input checks, precision, head sizes) is
in _attention_common.py.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptfast.backends import TorchCausalAttention, causal_mask, fused_dtypes
from gptfast.backends import triton_interpreting as _interpreting

from ._attention_common import HEAD_DIMS, LOG2E, MAX_BATCH_HEADS, _cast, _check_qkv, _precision, _unit_last
from .attention_decode import attention_decode


def attention_ref(q, k, v, mask=None, upcast: bool = False):
    """softmax(q k^T / sqrt(D)) v in q's dtype (or in fp32 with `upcast`) for q (B, H, T, D) and
    k, v (B, H, S, D): causal with the queries the last T of the S positions, or `mask`
    (broadcast to (B, H, T, S), True = visible) says which keys each query sees."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    mask = causal_mask(q.shape[-2], k.shape[-2], q.device) if mask is None else mask
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])  # (B, H, T, S)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v  # (B, H, T, D)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _dropout_keep(seed, bh, rows, cols, p_drop):
    """Keep mask for the broadcast of `rows` x `cols`: a pure function of (seed, bh, row, col)."""
    c0 = cols + rows * 0  # broadcast both index vectors to the 2-D block
    c1 = rows + cols * 0
    zero = c1 * 0
    r, _, _, _ = tl.philox(seed, c0, c1, zero + bh, zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def _dot(a, b, PREC: tl.constexpr):
    """a @ b accumulated in fp32. PREC: "ieee" (exact fp32, no tf32), "tf32" (fp16/bf16 inputs:
    ignored) or "upcast": bf16 under Triton's CPU interpreter, whose tl.dot multiplies the raw
    bf16 bit patterns (triton-lang/triton#11584), so multiply in fp32 there (exact for bf16)."""
    if PREC == "upcast":
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee" if PREC == "upcast" else PREC)

@triton.jit
def _head_ptrs(Q, K, V, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, H):
    """Q, K, V advanced to this program's (batch, head), with program_id(1) = b * H + h."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh, V + b * stride_vb + h * stride_vh


@triton.jit
def _query_block(Q, stride_qt, T, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
    """(start_m, offs_m, row_ok, q) of this program's block of queries. Causal work grows
    with the query index, so program 0 takes the last block: the heaviest go first."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    return start_m, offs_m, row_ok, q


@triton.jit
def _key_range(start_m, T, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(diag, full_end, hi) for the query block at start_m (forward and dQ): row i sees keys
    j <= i + diag; keys [0, full_end) are visible to every row of the block (no mask), keys
    [full_end, hi) need the per-element mask (causal diagonal, keys past S), keys >= hi no row sees."""
    diag = S - T
    if CAUSAL:
        full_end = (start_m + diag + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(S, start_m + BLOCK_M + diag)
    else:
        full_end = S // BLOCK_N * BLOCK_N
        hi = S
    return diag, full_end, hi


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, lo, hi, S, diag,
                    qk_scale, seed, bh, p_drop,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """Online-softmax over key blocks [lo, hi); MASK=False for blocks every row fully sees."""
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT_ptrs = K + offs_n[None, :] * stride_kt + offs_d[:, None]  # (D, BLOCK_N)
        v_ptrs = V + offs_n[:, None] * stride_vt + offs_d[None, :]  # (BLOCK_N, D)
        if MASK:
            kT = tl.load(kT_ptrs, mask=offs_n[None, :] < S, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < S, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = _dot(q, kT, PREC) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASK:
            visible = offs_n[None, :] < S
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], p_drop), p, 0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype, PREC), v, PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
              stride_vb, stride_vh, stride_vt, H, T, S, qk_scale, seed, p_drop,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """O and lse for one block of BLOCK_M queries of one (batch, head); grid (T/BLOCK_M, B*H)."""
    bh = tl.program_id(1)
    Q, K, V = _head_ptrs(Q, K, V, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, H)
    start_m, offs_m, row_ok, q = _query_block(Q, stride_qt, T, BLOCK_M, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)

    diag, full_end, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, 0, full_end,
                                    S, diag, qk_scale, seed, bh, p_drop,
                                    HEAD_DIM, BLOCK_N, False, CAUSAL, DROPOUT, PREC)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, K, V, stride_kt, stride_vt, offs_m, full_end, hi,
                                    S, diag, qk_scale, seed, bh, p_drop,
                                    HEAD_DIM, BLOCK_N, True, CAUSAL, DROPOUT, PREC)
    # every real row sees key 0, so l_i > 0; rows past T are computed but never stored
    acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * (1.0 / (1.0 - p_drop))
    row = bh.to(tl.int64) * T + offs_m  # O and LSE are contiguous (B*H, T, D) / (B*H, T)
    tl.store(O + row[:, None] * HEAD_DIM + offs_d[None, :], _cast(acc, O.dtype.element_ty, PREC),
             mask=row_ok[:, None])
    tl.store(LSE + row, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, N_ROWS, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta_i = dO_i . O_i over the (B*H*T, D) rows of O and dO, in fp32."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < N_ROWS
    ptrs = offs_m.to(tl.int64)[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + offs_m, tl.sum(o * do, 1), mask=ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, stride_qb, stride_qh, stride_qt,
                   stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                   H, T, S, sm_scale, qk_scale, seed, p_drop,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """dK, dV for one block of BLOCK_N keys, looping over the query blocks that see it.

    Works in the transposed (key, query) orientation so dK = dS^T Q and dV = P^T dO are
    plain dots. Query rows past T load as zeros (q = dO = lse = delta = 0), which makes
    their dS and dO exactly 0: they add nothing, so only the causal mask is applied.
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    Q, K, V = _head_ptrs(Q, K, V, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, H)
    DO += bh.to(tl.int64) * T * HEAD_DIM
    LSE += bh.to(tl.int64) * T
    DELTA += bh.to(tl.int64) * T
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < S
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    diag = S - T
    if CAUSAL:
        # rows i >= start_n - diag see part of the block; rows from m_full on see all of it
        m_lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    else:
        m_lo = 0
        m_full = 0
    for start_m in range(m_lo, T, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < T
        q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
        pT = tl.exp2(_dot(k, tl.trans(q), PREC) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if CAUSAL:
            if start_m < m_full:  # diagonal blocks only
                pT = tl.where(offs_n[:, None] <= offs_m[None, :] + diag, pT, 0.0)
        dpT = _dot(v, tl.trans(do), PREC)  # dP^T_ji = v_j . dO_i
        if DROPOUT:
            zT = tl.where(_dropout_keep(seed, bh, offs_m[None, :], offs_n[:, None], p_drop),
                          1.0 / (1.0 - p_drop), 0.0)
            dv += _dot(_cast(pT * zT, do.dtype, PREC), do, PREC)
            dpT = dpT * zT
        else:
            dv += _dot(_cast(pT, do.dtype, PREC), do, PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += _dot(_cast(dsT, q.dtype, PREC), q, PREC)
    row = bh.to(tl.int64) * S + offs_n  # DK, DV are contiguous (B*H, S, D)
    out_ptrs = row[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_ptrs, _cast(dk * sm_scale, DK.dtype.element_ty, PREC), mask=col_ok[:, None])
    tl.store(DV + out_ptrs, _cast(dv, DV.dtype.element_ty, PREC), mask=col_ok[:, None])


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, stride_qb, stride_qh, stride_qt,
                 stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                 H, T, S, sm_scale, qk_scale, seed, p_drop,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr):
    """dQ for one block of BLOCK_M queries, looping over the key blocks it sees."""
    bh = tl.program_id(1)
    Q, K, V = _head_ptrs(Q, K, V, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, H)
    start_m, offs_m, row_ok, q = _query_block(Q, stride_qt, T, BLOCK_M, HEAD_DIM)
    offs_d = tl.arange(0, HEAD_DIM)
    row = bh.to(tl.int64) * T + offs_m  # DO, DQ contiguous (B*H, T, D); LSE, DELTA (B*H, T)
    do = tl.load(DO + row[:, None] * HEAD_DIM + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    diag, full_end, hi = _key_range(start_m, T, S, BLOCK_M, BLOCK_N, CAUSAL)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < S
        kT = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vT = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        p = tl.exp2(_dot(q, kT, PREC) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if start_n >= full_end:  # boundary blocks: causal diagonal and keys past S
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + diag)
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, vT, PREC)  # dP_ij = dO_i . v_j
        if DROPOUT:
            dp = dp * tl.where(_dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], p_drop),
                               1.0 / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(_cast(ds, kT.dtype, PREC), tl.trans(kT), PREC)
    tl.store(DQ + row[:, None] * HEAD_DIM + offs_d[None, :], _cast(dq * sm_scale, DQ.dtype.element_ty, PREC),
             mask=row_ok[:, None])


@triton.jit
def _dropout_mask_kernel(MASK, T, S, seed, p_drop, BLOCK: tl.constexpr):
    """The kernels' dropout keep-mask as a (B*H, T, S) bool tensor (debug/tests)."""
    bh = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    for start_n in range(0, S, BLOCK):
        cols = start_n + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], p_drop)
        ptrs = MASK + (bh.to(tl.int64) * T + rows[:, None]) * S + cols[None, :]
        tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < T) & (cols[None, :] < S))

# ---------------------------------------------------------------------------- launchers

def _blocks(head_dim: int, dtype: torch.dtype):
    """Launch configs (BLOCK_M, BLOCK_N, num_warps, num_stages) for (forward, dK/dV, dQ)."""
    if _interpreting():
        # small, unequal tiles: cheap on the CPU interpreter, and even tiny test shapes cross
        # several block boundaries with BLOCK_M != BLOCK_N
        return (32, 16, 4, 1), (16, 32, 4, 1), (32, 16, 4, 1)
    # picked from ptxas register/spill reports for sm_90 (tests/test_triton_compile.py, which
    # compiles with the JIT's divisibility hints at GPT-2 shapes: none spills with Triton 3.6 or
    # 3.9); not yet timed on a GPU
    if dtype == torch.float32:  # twice the bytes per element: smaller tiles, fewer stages
        # fp32 dots run on FMA units: at D=128 the pipelined (64, 32) forward and dQ tiles spill,
        # and (32, 64) dK/dV tiles do at D=64
        if head_dim == 128:
            return (32, 64, 8, 1), (32, 32, 8, 2), (64, 32, 8, 1)
        return (64, 32, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2)
    if head_dim == 128:
        return (128, 64, 8, 3), (32, 64, 8, 2), (64, 64, 8, 3)
    # query-major forward/dQ tiles, key-major dK/dV tiles (as in FlashAttention-2)
    return (128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)

def _forward(q, k, v, causal, p, seed, blocks=None):
    """blocks: the forward's (BLOCK_M, BLOCK_N, num_warps, num_stages); None takes _blocks' (the tuner sets it)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, T), dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = blocks or _blocks(D, q.dtype)[0]
    sm_scale = 1.0 / math.sqrt(D)
    _attn_fwd[(triton.cdiv(T, block_m), B * H)](
        q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T, S,
        sm_scale * LOG2E, seed, p, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        DROPOUT=p > 0, PREC=_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, p, seed, blocks=None):
    """blocks: (dK/dV config, dQ config) as in _blocks; None takes _blocks' (the tuner sets it)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    do = do.contiguous()  # same (B*H, T, D) layout as o
    delta = torch.empty_like(lse)
    _attn_bwd_delta[(triton.cdiv(B * H * T, 64),)](o, do, delta, B * H * T, HEAD_DIM=D, BLOCK_M=64)
    dq = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, S, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, S, D), dtype=v.dtype, device=q.device)
    (m1, n1, w1, s1), (m2, n2, w2, s2) = blocks or _blocks(D, q.dtype)[1:]
    sm_scale = 1.0 / math.sqrt(D)
    common = dict(HEAD_DIM=D, CAUSAL=causal, DROPOUT=p > 0, PREC=_precision(q.dtype))
    args = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], H, T, S, sm_scale, sm_scale * LOG2E, seed, p)
    _attn_bwd_dkdv[(triton.cdiv(S, n1), B * H)](q, k, v, do, lse, delta, dk, dv, *args, BLOCK_M=m1,
                                                BLOCK_N=n1, num_warps=w1, num_stages=s1, **common)
    _attn_bwd_dq[(triton.cdiv(T, m2), B * H)](q, k, v, do, lse, delta, dq, *args, BLOCK_M=m2,
                                              BLOCK_N=n2, num_warps=w2, num_stages=s2, **common)
    return dq, dk, dv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, p, seed):
        o, lse = _forward(q, k, v, causal, p, seed)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.p, ctx.seed = causal, p, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(do, q, k, v, o, lse, ctx.causal, ctx.p, ctx.seed)
        return dq, dk, dv, None, None, None


def attention(q, k, v, causal: bool = True, dropout_p: float = 0.0, seed: int | None = None):
    """Flash attention softmax(q k^T / sqrt(D)) v on (B, H, T, D) q and (B, H, S, D) k, v.

    Queries are the last T of the S key positions (T == S in training). With dropout_p > 0
    the attention weights are dropped in-kernel from `seed` (drawn from torch's generator when
    None, so torch.manual_seed reproduces it) and the kept ones scaled by 1 / (1 - p).
    Differentiable in q, k and v.
    """
    _check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p == 0.0:
        seed = 0  # unused
    elif seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    elif not isinstance(seed, int):
        raise ValueError(f"attention: seed must be an int or None, got {type(seed).__name__}")
    return _Attention.apply(_unit_last(q), _unit_last(k), _unit_last(v), bool(causal), float(dropout_p), seed)


def attention_dropout_mask(seed: int, batch_heads: int, T: int, S: int, dropout_p: float,
                           device="cpu") -> torch.Tensor:
    """The keep-mask (batch_heads, T, S) that `attention` uses for this seed and p (for tests)."""
    mask = torch.empty((batch_heads, T, S), dtype=torch.int8, device=device)
    _dropout_mask_kernel[(triton.cdiv(T, 32), batch_heads)](mask, T, S, seed, float(dropout_p), BLOCK=32)
    return mask.bool()

class TritonCausalAttention(TorchCausalAttention):
    """The attention core on these kernels. It owns the prefill/decode choice: one query per
    row against a KV cache on CUDA is flash-decoding over each row's first `kv_cache.lengths()`
    slots; training and plain causal prefill are flash attention; a masked cache (padded rows)
    and head sizes, batch x heads or dtypes the kernels do not cover go to the torch module."""

    def forward(self, q, k, v, kv_cache=None):
        T = q.shape[-2]
        covered = (q.shape[-1] in HEAD_DIMS and q.shape[0] * q.shape[1] <= MAX_BATCH_HEADS
                   and fused_dtypes(q, k, v))
        if covered and kv_cache is not None and T == 1 and q.is_cuda and not q.requires_grad:
            lengths = kv_cache.lengths()  # an int, or (B,) per row; None: not a prefix (padding)
            if lengths is not None:
                return attention_decode(q, k, v, lengths)
        if covered and (kv_cache is None or kv_cache.mask(T) is None):
            return attention(q, k, v, causal=True, dropout_p=self.dropout_p if self.training else 0.0)
        return super().forward(q, k, v, kv_cache)
