"""The "triton" backend: a tiny GPT on it matches the reference backend, and it degrades cleanly."""
import sys

import pytest
import torch

import gptfast.kernels as kernels
from gptfast.backends import get_backend, reference_attention
from gptfast.config import GPTConfig
from gptfast.model import GPTModel
from kernel_checks import assert_close, assert_within_2x


def _tiny_model(**overrides):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0,
                    **overrides)
    return GPTModel(cfg, backend="reference")


def _loss_and_grads(model, backend, idx, targets):
    model.backend = backend
    model.zero_grad(set_to_none=True)
    loss = model.loss(idx, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False, "tie_weights": False}])
def test_tiny_gpt_triton_matches_reference_loss_and_every_gradient(overrides, device):
    model = _tiny_model(**overrides).to(device)
    assert isinstance(get_backend("triton", device), kernels.TritonBackend)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (2, 16), generator=g).to(device)
    targets = torch.randint(0, 97, (2, 16), generator=g).to(device)
    targets[0, :5] = -100  # masked prompt tokens, as in instruction fine-tuning
    ref_loss, ref_grads = _loss_and_grads(model, "reference", idx, targets)
    loss, grads = _loss_and_grads(model, "triton", idx, targets)
    assert_close(loss, ref_loss, 1e-5, "loss")
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-4, f"grad {name}")


@pytest.mark.parametrize("size", ["tiny", pytest.param("gpt2", marks=pytest.mark.gpu)])
def test_training_step_triton_vs_torch_under_bf16_autocast(size, device):
    """One training step's loss and gradients in mixed precision as the trainer runs it (bf16
    matmuls and an fp32 residual stream meet in add_layer_norm / bias_gelu / linear_cross_entropy):
    the triton backend's error against the fp32 truth is at most twice the torch backend's under
    the same autocast (+ a small atol). "gpt2": GPT-2 124M on 4 x 1024 tokens (make gpu-check)."""
    if size == "gpt2":
        device, B, T = "cuda", 4, 1024
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.from_preset("gpt2-small", drop_rate=0.0), backend="reference").to(device)
    else:
        B, T, model = 2, 16, _tiny_model().to(device)
    g = torch.Generator().manual_seed(7)
    idx, targets = (torch.randint(0, model.cfg.vocab_size, (B, T), generator=g).to(device) for _ in range(2))
    truth_loss, truth = _loss_and_grads(model, "reference", idx, targets)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        low_loss, low = _loss_and_grads(model, "torch", idx, targets)
        loss, grads = _loss_and_grads(model, "triton", idx, targets)
    assert loss.dtype == torch.float32
    assert_within_2x(loss, low_loss, truth_loss, "loss under autocast", atol=1e-4)
    for name in truth:
        assert grads[name].dtype == torch.float32, f"grad {name} has dtype {grads[name].dtype}"
        atol = 1e-3 * truth[name].abs().max().item()  # 1/8 of a bf16 ulp at the gradient's scale
        assert_within_2x(grads[name], low[name], truth[name], f"grad {name} under autocast", atol=atol)


def test_tiny_gpt_float64_falls_back_to_torch_ops(device):
    """The kernels take fp32/fp16/bf16 only: a float64 model on "triton" runs the torch ops."""
    model = _tiny_model().to(device, torch.float64).eval()
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(8)).to(device)
    ref_loss, ref_grads = _loss_and_grads(model, "torch", idx, idx)
    loss, grads = _loss_and_grads(model, "triton", idx, idx)
    assert_close(loss, ref_loss, 1e-6, "loss")  # cross_entropy computes in fp32
    assert grads["tok_emb.weight"].dtype == torch.float64
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], 1e-12, f"float64 grad {name}")
    with torch.no_grad():
        model.backend = "torch"
        ref = model(idx)
        model.backend = "triton"
        assert_close(model(idx), ref, 1e-12, "float64 logits")


def test_tiny_gpt_one_training_step_matches_reference(device):
    """One SGD step on each backend from the same start: same parameters, same next loss.
    (Not Adam: it blows float noise in near-zero gradients up to full-size steps.)"""
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 97, (2, 16), generator=g).to(device)
    targets = torch.randint(0, 97, (2, 16), generator=g).to(device)
    after = {}
    for backend in ("reference", "triton"):
        model = _tiny_model().to(device)
        model.backend = backend
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.loss(idx, targets).backward()
        opt.step()
        with torch.no_grad():
            after[backend] = (model.loss(idx, targets), dict(model.named_parameters()))
    assert_close(after["triton"][0], after["reference"][0], 1e-5, "loss after one step")
    for name, p in after["reference"][1].items():
        assert_close(after["triton"][1][name].detach(), p.detach(), 1e-5, f"{name} after one step")


def test_attention_prefill_and_decode_match_reference(device):
    """T < S (queries are the last T positions) and T = 1 decoding against a cache."""
    backend = get_backend("triton", device)
    g = torch.Generator().manual_seed(6)
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(device) for _ in range(2))
    for T in (3, 1):
        q = torch.randn(2, 2, T, 16, generator=g).to(device)
        with torch.no_grad():
            assert_close(backend.attention(q, k, v), reference_attention(q, k, v), 1e-4, f"T={T}, S=9")


def test_tiny_gpt_triton_logits_match_reference(device):
    model = _tiny_model().to(device).eval()
    idx = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = model(idx)
        model.backend = "triton"
        ours = model(idx)
    assert_close(ours, ref, 1e-5, "logits")


def test_linear_gelu_matches_torch_backend(device):
    backend, torch_backend = get_backend("triton", device), get_backend("torch", device)
    g = torch.Generator().manual_seed(3)
    x, w, b = (torch.randn(*s, generator=g).to(device) for s in ((3, 5, 8), (12, 8), (12,)))
    assert_close(backend.linear_gelu(x, w, b), torch_backend.linear_gelu(x, w, b), 1e-5, "with bias")
    assert_close(backend.linear_gelu(x, w, None), torch_backend.linear_gelu(x, w, None), 1e-5, "no bias")


def test_missing_attention_kernel_falls_back_to_torch_with_a_warning(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "gptfast.kernels.attention", None)  # import now fails
    if hasattr(kernels, "attention"):
        monkeypatch.delattr(kernels, "attention")
    with pytest.warns(RuntimeWarning, match="attention is unavailable"):
        backend = kernels.TritonBackend()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(device) for _ in range(3))
    assert_close(backend.attention(q, k, v), reference_attention(q, k, v), 1e-5, "attention")
    x = torch.randn(2, 16, generator=g).to(device)
    assert_close(backend.layer_norm(x, torch.ones(16, device=device), torch.zeros(16, device=device)),
                 torch.nn.functional.layer_norm(x, (16,)), 1e-5, "layer_norm still on Triton")


def test_attention_past_the_grid_limit_goes_to_torch(device):
    """B * H over the kernels' grid limit (65535): torch's attention, and no decode kernel."""
    backend = get_backend("triton", device)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(65536, 1, n, 16, generator=g).to(device) for n in (1, 3, 3))
    assert backend.decode_kernel(q) is None
    assert_close(backend.attention(q, k, v), reference_attention(q, k, v), 1e-5, "attention")
    assert backend.decode_kernel(q[:2]) is not None
