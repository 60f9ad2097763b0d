"""attention_decode benchmark: one new token per sequence against a KV cache of 1024 slots at
GPT-2 124M shapes (12 heads x 64, bf16), batch 1 and 16: reference vs SDPA vs gptfast's Triton
flash-decoding (and flash attention run with T=1, the kernel decoding would use without it).

    python benchmarks/bench_attention_decode.py   (same as: pytest benchmarks/bench_attention_decode.py --benchmark-only)

Correctness is checked first: per-row cache lengths (the CUDA-graph path) within 2x of the
reference-in-bf16's error against the fp32 reference. GB/s counts reading the K and V caches.
"""
import sys

import pytest
import torch

from bench_attention import make_inputs
from gptfast.kernels.attention import attention, attention_ref
from gptfast.kernels.attention_decode import attention_decode
from kernel_bench import assert_within_2x, requires_cuda, run

pytestmark = requires_cuda
DECODE = {"B=1": (1, 12, 1024, 64), "B=16": (16, 12, 1024, 64)}  # (B, H, cache length, D)


def decode_fns(B, H, L, D):
    (q, k, v), _ = make_inputs(B, H, L, D, seed=3)
    q, k, v = q.detach()[:, :, :1], k.detach(), v.detach()  # (B, H, 1, D) against (B, H, L, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"reference": lambda: attention_ref(q, k, v), "native": lambda: sdpa(q, k, v),
            "triton": lambda: attention_decode(q, k, v, L),
            "triton-flash-T=1": lambda: attention(q, k, v)}


@pytest.fixture(scope="module")
def checked():
    """Per-row cache lengths (a full cache of 1024 or 4096 slots, and 17) against the fp32
    reference: error <= 2x bf16's + 1e-3."""
    for T in (1024, 4096):
        lens = torch.tensor([T, 17], device="cuda")
        qd, kc, vc = (t.detach() for t in make_inputs(2, 12, T, 64, seed=2)[0])
        got = attention_decode(qd[:, :, :1], kc, vc, lens)
        for b, n in enumerate(lens.tolist()):
            args = (qd[b:b + 1, :, :1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n])
            truth = attention_ref(*(t.float() for t in args))
            assert_within_2x(got[b:b + 1], attention_ref(*args), truth, f"decode cache_len {n}", atol=1e-3)
    torch.cuda.empty_cache()
    return True


@pytest.mark.parametrize("impl", ["reference", "native", "triton", "triton-flash-T=1"])
@pytest.mark.parametrize("shape", DECODE)
def test_attention_decode(benchmark, checked, shape, impl):
    B, H, L, D = DECODE[shape]
    run(benchmark, op=f"attention_decode {shape} L={L}", impl=impl, pass_="fwd", fn=decode_fns(B, H, L, D)[impl],
        nbytes=2 * B * H * L * D * torch.bfloat16.itemsize)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
