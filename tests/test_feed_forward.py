"""The triton backend's feed-forward (gptfast.kernels.feed_forward): the gemv kernel of a decode
step's few rows against the reference, and linear_rows' choice between it and cuBLAS. On CPU
the kernel runs in Triton's interpreter (conftest), so the shapes are small."""
import pytest
import torch

from gptfast.kernels import feed_forward
from gptfast.kernels.feed_forward import gemv, linear_rows, linear_rows_ref
from kernel_checks import assert_close, assert_within_2x


def _operands(M, K, N, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) / K**0.5, torch.randn(N, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (x, w, b)]


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 48, 5), (3, 64, 37), (4, 100, 64)])  # K, N off the block sizes too
def test_gemv_fp32_matches_reference(M, K, N, gelu, device):
    x, w, b = _operands(M, K, N, torch.float32, device)
    for bias in (b, None):
        assert_close(gemv(x, w, bias, gelu), linear_rows_ref(x, w, bias, gelu), 1e-5, f"gemv M={M} gelu={gelu}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_low_precision_within_2x_of_torch(dtype, device):
    x, w, b = _operands(2, 96, 40, dtype, device, seed=1)
    for gelu in (False, True):
        truth = linear_rows_ref(x.float(), w.float(), b.float(), gelu)
        assert_within_2x(gemv(x, w, b, gelu), linear_rows_ref(x, w, b, gelu), truth, f"gemv {dtype} gelu={gelu}")


@pytest.mark.parametrize("ours_faster", [True, False])
def test_linear_rows_takes_the_recorded_choice(ours_faster, device, monkeypatch):
    """Each shape's path is the one recorded as faster: the kernel, or cuBLAS then the bias+GELU
    kernel (each replaced here by a stand-in that names itself)."""
    x, w, b = _operands(1, 64, 48, torch.bfloat16, device, seed=2)
    monkeypatch.setattr(feed_forward, "_FASTER", {feed_forward._key(x, w, b, True): ours_faster})
    monkeypatch.setattr(feed_forward, "_launch_gemv", lambda *args: "gemv")
    monkeypatch.setattr(feed_forward, "cublas_linear", lambda *args: "cublas")
    assert linear_rows(x, w, b, gelu=True) == ("gemv" if ours_faster else "cublas")
    with pytest.raises(ValueError, match="gemv: x"):  # a bad input is an error before any choice
        linear_rows(x.t(), w, b)
    with pytest.raises(ValueError, match="gemv: x"):
        gemv(x, w, b.double())
    if x.device.type == "cpu":  # a shape with no recorded choice would be timed: CUDA only
        with pytest.raises(ValueError, match="timing one needs CUDA; x is on cpu"):
            linear_rows(x, w, b, gelu=False)


@pytest.mark.gpu
def test_linear_rows_times_once_and_the_decode_feed_forward_agrees(monkeypatch):
    """On a GPU: the first call for a shape records a choice (timed in CUDA graphs, once), and
    the feed-forward of one row (inference) equals the many-rows path within the 2x rule."""
    from gptfast.config import GPTConfig
    from gptfast.kernels.feed_forward import FusedFeedForward
    from gptfast.model import FeedForward
    torch.manual_seed(0)
    ff = FeedForward(GPTConfig.from_preset("gpt2-small")).cuda()
    ff.__class__ = FusedFeedForward
    x = torch.randn(1, 1, 768, device="cuda")
    monkeypatch.setattr(feed_forward, "_FASTER", {})
    timed, faster = [], feed_forward._faster
    monkeypatch.setattr(feed_forward, "_faster", lambda *a: timed.append(a[0].shape) or faster(*a))
    with torch.inference_mode():
        truth = ff.layers(x)  # the reference layers in fp32
        ff.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        ours, ref = ff(xb), ff.layers(xb)  # one row: linear_rows; the reference layers in bf16
        ff(xb)  # again: the choices are recorded, nothing is timed twice
    assert len(timed) == len(feed_forward._FASTER) == 2, f"timed {timed}, recorded {feed_forward._FASTER}"
    assert_within_2x(ours, ref, truth, "decode feed-forward")
