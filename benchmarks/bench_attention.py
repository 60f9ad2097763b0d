"""attention benchmark: causal attention at GPT-2 124M shapes (12 heads x 64, bf16; 16 x 1024 and
4 x 4096 tokens): reference module vs SDPA's flash backend vs torch.compile of the reference vs
gptfast's Triton flash attention; forward, backward, forward+backward. Plus the decode kernel
(one new token against a KV cache of 1024) vs the reference and SDPA.

    python benchmarks/bench_attention.py          (same as: pytest benchmarks/bench_attention.py --benchmark-only)

Correctness is checked first at each shape (batch 1: the fp32 truth holds H x T x T): the
fused output and gradients within 2x of SDPA-bf16's error against the fp32 reference.
FLOPs: a causal forward is 2 matmuls of B*H*T*T*D multiply-adds, halved by the mask
(2 * B*H*T^2*D flops); the backward is 2.5x that (5 matmuls), as FlashAttention counts.
Decode GB/s counts reading the K and V caches.
"""
import sys

import pytest
import torch

from gptfast.backends import reference_attention
from gptfast.kernels.attention import attention, attention_decode
from kernel_bench import PASSES, assert_within_2x, compiled, pass_fn, requires_cuda, run

pytestmark = requires_cuda
SHAPES = {"T=1024": (16, 12, 1024, 64), "T=4096": (4, 12, 4096, 64)}  # (B, H, T, D)
DECODE = {"B=1": (1, 12, 1024, 64), "B=16": (16, 12, 1024, 64)}  # (B, H, cache length, D)


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


IMPLS = {"reference": reference_attention, "native": sdpa_flash, "compile": reference_attention,
         "triton": attention}


def make_inputs(B, H, T, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    return [t.requires_grad_() for t in (q, k, v)], do


def flops(pass_, B, H, T, D):
    fwd = 2.0 * B * H * T * T * D
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[pass_]


def decode_fns(B, H, L, D):
    (q, k, v), _ = make_inputs(B, H, L, D, seed=3)
    q, k, v = q.detach()[:, :, :1], k.detach(), v.detach()  # (B, H, 1, D) against (B, H, L, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"reference": lambda: reference_attention(q, k, v), "native": lambda: sdpa(q, k, v),
            "triton": lambda: attention_decode(q, k, v, L),
            "triton-flash-T=1": lambda: attention(q, k, v)}


@pytest.fixture(scope="module")
def checked():
    """Fused bf16 output and grads vs the fp32 reference: error <= 2x SDPA-bf16's + 1e-3; decode too."""
    for B, H, T, D in SHAPES.values():
        (q, k, v), do = make_inputs(1, H, T, D, seed=1)
        q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
        outs = {}
        for name, fn, args, g in (("triton", attention, (q, k, v), do), ("sdpa", sdpa_flash, (q, k, v), do),
                                  ("truth", reference_attention, (q32, k32, v32), do.float())):
            out = fn(*args)
            outs[name] = [out.detach(), *torch.autograd.grad(out, args, g)]
        for what, ours, low, truth in zip(("out", "dq", "dk", "dv"), outs["triton"], outs["sdpa"], outs["truth"]):
            assert_within_2x(ours, low, truth, f"attention T={T} {what}", atol=1e-3)
        del outs

        lens = torch.tensor([T, 17], device="cuda")  # per-row cache lengths
        qd, kc, vc = (t.detach() for t in make_inputs(2, H, T, D, seed=2)[0])
        got = attention_decode(qd[:, :, :1], kc, vc, lens)
        for b, n in enumerate(lens.tolist()):
            args = (qd[b:b + 1, :, :1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n])
            truth = reference_attention(*(t.float() for t in args))
            assert_within_2x(got[b:b + 1], reference_attention(*args), truth, f"decode cache_len {n}", atol=1e-3)
    torch.cuda.empty_cache()
    return True


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
def test_attention(benchmark, checked, shape, impl, pass_):
    fn = compiled(IMPLS[impl]) if impl == "compile" else IMPLS[impl]
    qkv, do = make_inputs(*SHAPES[shape])
    run(benchmark, op=f"attention {shape}", impl=impl, pass_=pass_, fn=pass_fn(fn, qkv, (do,), pass_),
        flops=flops(pass_, *SHAPES[shape]))
    del qkv, do
    torch.cuda.empty_cache()


@pytest.mark.parametrize("impl", ["reference", "native", "triton", "triton-flash-T=1"])
@pytest.mark.parametrize("shape", DECODE)
def test_attention_decode(benchmark, checked, shape, impl):
    B, H, L, D = DECODE[shape]
    run(benchmark, op=f"attention_decode {shape} L={L}", impl=impl, pass_="fwd", fn=decode_fns(B, H, L, D)[impl],
        nbytes=2 * B * H * L * D * torch.bfloat16.itemsize)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
