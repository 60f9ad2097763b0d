"""feed_forward benchmark: a decode step's feed-forward products at GPT-2 124M shapes (1 and 4
rows, 768 -> 3072 with bias + GELU, 3072 -> 768 with bias, bf16): cuBLAS followed by the
bias+GELU kernel (what the feed-forward runs for many rows) vs gptfast's gemv, each replayed in
a CUDA graph over weight copies past twice the L2, as a decode step streams its weights
(kernels/feed_forward.py's replay_ms, the timing `linear_rows` chooses by).

    python benchmarks/bench_feed_forward.py   (same as: pytest benchmarks/bench_feed_forward.py --benchmark-only)

GB/s counts the weight bytes read; "native" is the cuBLAS path.
"""
import sys

import pytest
import torch

from gptfast.kernels.feed_forward import cublas_linear, gemv, linear_rows_ref, replay_ms
from kernel_bench import DTYPE, WIDTH, assert_within_2x, requires_cuda, run

pytestmark = requires_cuda
SHAPES = {"up+gelu": (WIDTH, 4 * WIDTH, True), "down": (4 * WIDTH, WIDTH, False)}  # K, N, GELU
IMPLS = {"native": cublas_linear, "triton": gemv}


def _operands(rows, K, N):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, K, device="cuda", generator=g, dtype=DTYPE)
    w = torch.randn(N, K, device="cuda", generator=g, dtype=DTYPE) / K**0.5
    return x, w, 0.1 * torch.randn(N, device="cuda", generator=g, dtype=DTYPE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rows", [1, 4])
def test_feed_forward(benchmark, rows, shape, impl):
    K, N, gelu = SHAPES[shape]
    x, w, b = _operands(rows, K, N)
    truth = linear_rows_ref(x.float(), w.float(), b.float(), gelu)  # correctness first
    assert_within_2x(IMPLS[impl](x, w, b, gelu), linear_rows_ref(x, w, b, gelu), truth, f"{impl} {shape}")
    ms = replay_ms(IMPLS[impl], x, w, b, gelu)
    run(benchmark, op=f"feed_forward {shape} x{rows}", impl=impl, pass_="fwd", fn=lambda: IMPLS[impl](x, w, b, gelu),
        ms=ms, nbytes=w.numel() * w.element_size(), note="CUDA graph, weights from memory")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "--benchmark-only", "-q", *sys.argv[1:]]))
