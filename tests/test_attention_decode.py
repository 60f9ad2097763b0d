"""Flash-decoding (gptfast.kernels.attention_decode) against the attention reference.

One query per sequence against a KV cache whose first cache_len slots are valid: an int, or
a per-row length tensor (the CUDA-graph path). On CPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1), so the shapes are small.
"""
import pytest
import torch

from gptfast.kernels.attention import attention_ref
from gptfast.kernels.attention_decode import attention_decode, cache_append
from gptfast.kv_cache import CacheStep, KVCache
from kernel_checks import assert_each_within_2x, assert_rel_close, fused_qkv, make_qkv, scale_device, scale_params


@pytest.mark.parametrize("cache_len,num_splits", [(1, None), (67, None), (80, 1), (67, 7)])
def test_decode_matches_reference_on_prefix(cache_len, num_splits, device):
    B, H, L_max, D = 2, 2, 80, 64
    q, k, v = (t.detach() for t in make_qkv(B, H, 1, L_max, D, device=device, seed=cache_len))
    got = attention_decode(q, k, v, cache_len, num_splits=num_splits)
    want = attention_ref(q, k[:, :, :cache_len], v[:, :, :cache_len])
    assert_rel_close("decode", got, want, 1e-4)


def test_decode_cache_len_as_expanded_device_tensor(device):
    """The static (CUDA-graph) generation path passes (write_pos + 1).expand(B): int64, stride 0."""
    B, H, L_max, D = 2, 2, 48, 16
    q, k, v = (t.detach() for t in make_qkv(B, H, 1, L_max, D, device=device, seed=4))
    lens = (torch.tensor([39], device=device) + 1).expand(B)
    want = attention_ref(q, k[:, :, :40], v[:, :, :40])
    assert_rel_close("decode", attention_decode(q, k, v, lens), want, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_per_row_cache_len(dtype, device):
    B, H, L_max, D = 3, 2, 70, 32
    q, k, v = (t.detach() for t in make_qkv(B, H, 1, L_max, D, dtype=dtype, device=device, seed=1))
    lens = torch.tensor([67, 5, 1], device=device)
    got = attention_decode(q, k, v, lens, num_splits=4)
    for b, n in enumerate(lens.tolist()):
        args = (q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
        exact = attention_ref(*(t.float() for t in args))
        if dtype == torch.float32:
            assert_rel_close(f"decode row {b}", got[b:b + 1], exact, 1e-4)
        else:
            ref_err = (attention_ref(*args).float() - exact).abs().max().item()
            ours_err = (got[b:b + 1].float() - exact).abs().max().item()
            assert ours_err <= 2 * ref_err + 1e-3, f"row {b}: err {ours_err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize("on", ["here", pytest.param("cuda", marks=pytest.mark.gpu)])  # gpu-check runs -m gpu
@pytest.mark.parametrize("cache_dtype,new_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                    (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_cache_append_equals_torch_indexing(cache_dtype, new_dtype, on, device):
    """The one-kernel decode write against KVCache's torch indexing: new keys/values as views of a
    fused qkv (not contiguous), rows at different slots, rows past n and other slots untouched."""
    device = device if on == "here" else on
    rows, H, L_max, D, n = 4, 2, 10, 16, 3
    ours, ref = (KVCache(rows, H, L_max, D, cache_dtype, device, CacheStep(), append)
                 for append in (cache_append, None))
    g = torch.Generator().manual_seed(5)
    for c in (ours, ref):
        c.k.copy_(torch.randn(c.k.shape, generator=g.manual_seed(5)))
        c.v.copy_(torch.randn(c.v.shape, generator=g.manual_seed(6)))
    qkv = torch.randn(n, 1, 3, H, D, generator=g).to(device=device, dtype=new_dtype)
    k, v = (qkv[:, :, i].transpose(1, 2) for i in (1, 2))  # (n, H, 1, D) views: rows 3 H D apart
    lengths = torch.tensor([7, 0, 9], device=device)
    for c in (ours, ref):
        c.step.decode(lengths, L_max)
        c.update(k, v)
    assert torch.equal(ours.k, ref.k) and torch.equal(ours.v, ref.v)
    assert ours.k[1, :, 0].float().allclose(k[1, :, 0].float().to(cache_dtype).float())
    before = ours.k.clone(), ours.v.clone()  # slots past the cache (or negative) write nothing
    cache_append(ours.k, ours.v, k, v, torch.tensor([L_max, -1, L_max + 7], device=device))
    assert torch.equal(ours.k, before[0]) and torch.equal(ours.v, before[1]), "a slot outside the cache wrote"
    with pytest.raises(ValueError, match="slots must be"):
        cache_append(ours.k, ours.v, k, v, lengths[:2])
    with pytest.raises(ValueError, match="do not take new keys"):
        cache_append(ours.k, ours.v[:, :1], k, v, lengths)
    for bad in (k[:, :, 0], torch.cat([k, k], dim=2), k[..., :12]):  # 3-D, two new keys a row, D=12
        with pytest.raises(ValueError, match="new keys must be"):
            cache_append(ours.k, ours.v, bad, bad, lengths)


def test_decode_bad_input_is_rejected(device):
    q, k = torch.randn(1, 2, 1, 16, device=device), torch.randn(1, 2, 8, 16, device=device)
    with pytest.raises(ValueError, match="cache_len must be in"):
        attention_decode(q, k, k, 9)
    with pytest.raises(ValueError, match="one query"):
        attention_decode(k, k, k, 4)
    with pytest.raises(ValueError, match="cache_len tensor"):
        attention_decode(q, k, k, torch.tensor([1.0, 2.0], device=device))


# ------------------------------------------------------------------------- GPT-2 scale

@pytest.mark.parametrize("size,dtype", scale_params())
def test_attention_decode_at_gpt2_scale(size, dtype, device):
    """Flash-decoding for a batch of 16 x 12 heads against 1024-slot caches of different lengths
    (the CUDA-graph path's length tensor) and one common length: within 2x of the reference."""
    dev = scale_device(size, device)
    B, H, L, D = (16, 12, 1024, 64) if size == "gpt2" else (2, 1, 40, 32)
    q, k, v = (t.detach() for t in fused_qkv(B, H, L, D, dtype, dev, seed=25))
    q = q[:, :, :1]  # (B, H, 1, D)
    lens = torch.randint(1, L + 1, (B,), device=dev, generator=torch.Generator(dev).manual_seed(26))
    lens[0] = L
    for cache_len in (lens, int(lens[1])):
        got = attention_decode(q, k, v, cache_len)
        for b in range(B):
            n = int(lens[b]) if isinstance(cache_len, torch.Tensor) else cache_len
            args = (q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n])
            assert_each_within_2x([f"decode row {b} of {n}"], [got[b:b + 1]], [attention_ref(*args)],
                                  [attention_ref(*(t.double() for t in args))], dtype)
