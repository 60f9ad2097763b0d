"""Flash-decoding in Triton: one new query per sequence against a KV cache, inference only.

Per (batch, head) the query q sees the first cache_len of the L_max cached keys and values.
A single query row is too little work for one program, so the cache is cut into num_splits
chunks that run in parallel (step 1, `_decode_split`): each keeps the online-softmax state of
attention.py's forward, the running max m and sum l in base-2 units and the unnormalised
sum acc of exp2(s - m) v. Step 2 (`_decode_combine`) merges the partial softmaxes:
    O = sum_s w_s acc_s / sum_s w_s l_s,  w_s = exp2(m_s - max_s m_s).
`attention_decode` launches both; TritonCausalAttention (attention.py) calls it for decode
steps on CUDA, and `attention_ref` there is the reference the tests check it against.
`cache_append` writes a decode step's new keys and values into the cache in one kernel (the
runner's choice for the triton backend on CUDA; gptfast.kv_cache's torch indexing elsewhere).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gptfast.backends import triton_interpreting as _interpreting

from ._attention_common import HEAD_DIMS, LOG2E, _cast, _check_device, _check_qkv, _precision, _sm_count, _unit_last


@triton.jit
def _decode_split(Q, K, V, LENS, PART_ACC, PART_M, PART_L, stride_qb, stride_qh,
                  stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
                  H, L_MAX, cache_len, split_len, num_splits, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PER_ROW: tl.constexpr):
    """Flash-decoding, step 1: unnormalised softmax stats of one query over one cache split.

    Stores m (max base-2 logit), l = sum exp2(s - m) and acc = sum exp2(s - m) v for keys
    [split * split_len, min((split + 1) * split_len, cache_len)); an empty split stores
    m = -inf, l = 0, acc = 0, which the combine step weighs by exp2(-inf) = 0.
    """
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if PER_ROW:  # lengths differ per sequence: LENS holds them; else cache_len is shared
        cache_len = tl.minimum(tl.load(LENS + b), L_MAX)
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + offs_d).to(tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, cache_len)
    # one query row is too thin for tl.dot: the products are plain broadcasts and reductions
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        ok = offs_n < hi
        k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=ok[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1) * qk_scale  # (BLOCK_N,)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    part = bh.to(tl.int64) * num_splits + split
    tl.store(PART_ACC + part * HEAD_DIM + offs_d, acc)
    tl.store(PART_M + part, m_i)
    tl.store(PART_L + part, l_i)


@triton.jit
def _decode_combine(PART_ACC, PART_M, PART_L, O, num_splits, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
                    PREC: tl.constexpr):
    """Flash-decoding, step 2: O = sum_s w_s acc_s / sum_s w_s l_s with w_s = exp2(m_s - max m)."""
    bh = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < num_splits
    part = bh * num_splits + offs_s
    m = tl.load(PART_M + part, mask=ok, other=float("-inf"))
    l = tl.load(PART_L + part, mask=ok, other=0.0)
    acc = tl.load(PART_ACC + part[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))  # (BLOCK_S,)
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(O + bh * HEAD_DIM + offs_d, _cast(out, O.dtype.element_ty, PREC))


@triton.jit
def _cache_append(K_NEW, V_NEW, K_CACHE, V_CACHE, SLOTS, stride_kb, stride_kh, stride_vb, stride_vh,
                  stride_cb, stride_ch, stride_ct, H, L_MAX, HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Row b's new key and value of head h go to slot SLOTS[b] of the caches (both caches share
    their strides); a slot outside [0, L_MAX) writes nothing (not another head's or row's slots)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    d = tl.arange(0, HEAD_DIM)
    slot = tl.load(SLOTS + b).to(tl.int64) + tl.zeros([HEAD_DIM], tl.int64)  # (HEAD_DIM,): the mask's shape
    inside = (slot >= 0) & (slot < L_MAX)
    dst = b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch + slot * stride_ct + d
    k = tl.load(K_NEW + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + d)
    v = tl.load(V_NEW + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + d)
    tl.store(K_CACHE + dst, _cast(k, K_CACHE.dtype.element_ty, PREC), mask=inside)
    tl.store(V_CACHE + dst, _cast(v, V_CACHE.dtype.element_ty, PREC), mask=inside)


def cache_append(k_cache, v_cache, k, v, slots):
    """k_cache[b, :, slots[b]] = k[b, :, 0] (and v alike) for rows b < n, in one kernel: a decode
    step's cache write, where torch indexing takes an arange and two index_put kernels.

    k_cache, v_cache (rows, H, L_max, D), same shape and strides, unit last stride, D in
    HEAD_DIMS; k, v (n, H, 1, D), n <= rows; slots (n,) integers on the device, values in [0, L_max)
    (not checked on the host: that would sync, and the call may be captured in a CUDA graph; a row
    whose slot is outside writes nothing, where torch indexing would raise or wrap a negative slot).
    """
    if k.dim() != 4 or k.shape[2] != 1 or k.shape[3] not in HEAD_DIMS:
        raise ValueError(f"cache_append: new keys must be (n, H, 1, D) with D in {HEAD_DIMS}, got {tuple(k.shape)}")
    n, H, _, D = k.shape
    if (k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1
            or k_cache.dim() != 4 or k_cache.shape[1] != H or k_cache.shape[3] != D or v.shape != k.shape
            or n > k_cache.shape[0]):
        raise ValueError(f"cache_append: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} (strides "
                         f"{k_cache.stride()} / {v_cache.stride()}) do not take new keys {tuple(k.shape)} / "
                         f"values {tuple(v.shape)}: same shapes and strides, unit last stride")
    _check_device("k_cache", k_cache)
    if k.device != k_cache.device or v.device != k_cache.device:
        raise ValueError(f"cache_append: new keys/values on {k.device} / {v.device}, the caches on {k_cache.device}")
    if slots.shape != (n,) or slots.dtype.is_floating_point or slots.device != k_cache.device:
        raise ValueError(f"cache_append: slots must be ({n},) integers on {k_cache.device}, got "
                         f"{tuple(slots.shape)} {slots.dtype} on {slots.device}")
    k, v, slots = _unit_last(k), _unit_last(v), slots.contiguous()
    if n:
        _cache_append[(n * H,)](k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                *k_cache.stride()[:3], H, k_cache.shape[2], HEAD_DIM=D,
                                PREC=_precision(k_cache.dtype))


def attention_decode(q, k_cache, v_cache, cache_len, num_splits: int | None = None):
    """One new query per sequence against a KV cache (flash-decoding), inference only.

    q (B, H, 1, D); k_cache, v_cache (B, H, L_max, D) of which the first cache_len positions
    are valid: an int, or a (B,) integer tensor (values in [1, L_max]) for sequences of
    different lengths. The cache is cut into num_splits chunks (chosen to fill the GPU when
    None) that run in parallel; a second kernel merges their partial softmaxes.
    """
    _check_qkv(q, k_cache, v_cache)
    B, H, T, D = q.shape
    L_max = k_cache.shape[2]
    if T != 1:
        raise ValueError(f"attention_decode: q must hold one query per sequence (B, H, 1, D), got T={T}")
    if isinstance(cache_len, torch.Tensor):
        if cache_len.shape != (B,) or cache_len.dtype.is_floating_point or cache_len.device != q.device:
            raise ValueError(f"attention_decode: cache_len tensor must be ({B},) integers on {q.device}, "
                             f"got {tuple(cache_len.shape)} {cache_len.dtype} on {cache_len.device}")
        lens = cache_len.to(torch.int32).contiguous()  # no copy when it is int32 already (CacheStep.seen)
        L = L_max  # no host sync (CUDA graphs): splits past a row's length exit at once
    else:
        if not 1 <= int(cache_len) <= L_max:
            raise ValueError(f"attention_decode: cache_len must be in [1, {L_max}], got {cache_len}")
        lens, L = None, int(cache_len)
    q, k_cache, v_cache = _unit_last(q), _unit_last(k_cache), _unit_last(v_cache)
    block_n = 16 if _interpreting() else 64
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"attention_decode: num_splits must be >= 1, got {num_splits}")
    if num_splits is None:
        # aim at ~4 programs per SM: small batches split the cache, big ones need no split
        sms = _sm_count(q.device)
        num_splits = max(1, min(triton.cdiv(L, block_n), triton.cdiv(4 * sms, B * H)))
    split_len = triton.cdiv(triton.cdiv(L, num_splits), block_n) * block_n
    num_splits = triton.cdiv(L, split_len)
    part_acc = torch.empty((B * H, num_splits, D), dtype=torch.float32, device=q.device)
    part_m = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    _decode_split[(num_splits, B * H)](
        q, k_cache, v_cache, q if lens is None else lens, part_acc, part_m, part_l, q.stride(0), q.stride(1),
        *k_cache.stride()[:3], *v_cache.stride()[:3], H, L_max, L, split_len, num_splits,
        LOG2E / math.sqrt(D), HEAD_DIM=D, BLOCK_N=block_n, PER_ROW=lens is not None, num_warps=4)
    o = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    _decode_combine[(B * H,)](part_acc, part_m, part_l, o, num_splits, HEAD_DIM=D,
                              BLOCK_S=max(2, triton.next_power_of_2(num_splits)), PREC=_precision(q.dtype))
    return o
