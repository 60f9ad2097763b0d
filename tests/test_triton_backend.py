"""The "triton" backend's modules: a tiny GPT on them matches the reference backend, each module
matches its reference, and they degrade cleanly."""
import sys

import pytest
import torch

import gptfast.kernels as kernels
import gptfast.kernels.attention as attention_module
from gptfast.backends import TorchCausalAttention
from gptfast.config import GPTConfig
from gptfast.kernels.attention import TritonCausalAttention, attention_ref
from gptfast.kernels.cross_entropy import LinearCrossEntropyLoss
from gptfast.kernels.feed_forward import FusedFeedForward
from gptfast.kernels.gelu import TritonGELU, bias_gelu_ref
from gptfast.kernels.layer_norm import TritonLayerNorm, layer_norm_ref
from gptfast.kv_cache import CacheStep, KVCache
from gptfast.model import GELU, CausalAttention, FeedForward, GPTModel, LayerNorm
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
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (2, 16), generator=g).to(device)
    targets = torch.randint(0, 97, (2, 16), generator=g).to(device)
    targets[0, :5] = -100  # masked prompt tokens, as in instruction fine-tuning
    ref_loss, ref_grads = _loss_and_grads(model, "reference", idx, targets)
    loss, grads = _loss_and_grads(model, "triton", idx, targets)
    assert model.active_backend == "triton"
    block = model.trf_blocks[0]
    assert [type(m) for m in (block.norm1, block.ff, block.att.attend, model.lm_loss)] == [
        TritonLayerNorm, FusedFeedForward, TritonCausalAttention, LinearCrossEntropyLoss]
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


def _core(cls, dropout_p=0.0):
    """An attention core module of class `cls` (the reference one, re-classed as set_backend does)."""
    core = CausalAttention(dropout_p)
    core.__class__ = cls
    return core.eval()


def test_attention_prefill_and_decode_match_reference(device):
    """T < S (queries are the last T positions) and T = 1 decoding, without a cache and against
    one: a prefill, then rows at different lengths decoding (eager span and the whole buffer)."""
    core = _core(TritonCausalAttention)
    g = torch.Generator().manual_seed(6)
    k, v = (torch.randn(2, 2, 9, 16, generator=g).to(device) for _ in range(2))
    for T in (3, 1):
        q = torch.randn(2, 2, T, 16, generator=g).to(device)
        with torch.no_grad():
            assert_close(core(q, k, v), attention_ref(q, k, v), 1e-4, f"T={T}, S=9")
    for span in (9, 12):
        step = CacheStep()
        cache = KVCache(2, 2, 12, 16, torch.float32, device, step)
        step.prefill(torch.tensor([0, 1], device=device), 8)
        q = torch.randn(2, 2, 8, 16, generator=g).to(device)
        with torch.no_grad():
            assert_close(core(q, *cache.update(k[:, :, :8], v[:, :, :8]), cache), attention_ref(q, k[:, :, :8],
                         v[:, :, :8]), 1e-4, "prefill")
            step.decode(torch.tensor([8, 5], device=device), span)  # row 1 at slot 5: it sees slots 0-5
            q = torch.randn(2, 2, 1, 16, generator=g).to(device)
            got = core(q, *cache.update(k[:, :, 8:], v[:, :, 8:]), cache)
        want_mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3], device=device)[:, None, None, :]
        want_k, want_v = k.clone(), v.clone()
        want_k[1, :, 5], want_v[1, :, 5] = k[1, :, 8], v[1, :, 8]  # row 1's new key went to slot 5
        assert_close(got, attention_ref(q, want_k, want_v, want_mask), 1e-4, f"decode over {span} slots")


def test_tiny_gpt_triton_logits_match_reference(device):
    model = _tiny_model().to(device).eval()
    idx = torch.randint(0, 97, (1, 11), generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = model(idx)
        model.backend = "triton"
        ours = model(idx)
    assert_close(ours, ref, 1e-5, "logits")


@pytest.mark.parametrize("bias", [True, False])
def test_fused_feed_forward_matches_torch(bias, device):
    cfg = GPTConfig(vocab_size=97, context_length=16, emb_dim=8, n_heads=2, n_layers=1)
    torch.manual_seed(3)
    ff = FeedForward(cfg).to(device)
    if not bias:
        ff.layers[0].bias = None
    x = torch.randn(3, 5, 8, device=device)
    want = ff(x)  # the reference classes
    ff.__class__, ff.layers[1].__class__ = FusedFeedForward, TritonGELU
    assert_close(ff(x), want, 1e-5, f"bias={bias}")


def test_missing_attention_kernel_falls_back_to_torch_with_a_warning(monkeypatch, device):
    monkeypatch.setitem(sys.modules, "gptfast.kernels.attention", None)  # import now fails
    if hasattr(kernels, "attention"):
        monkeypatch.delattr(kernels, "attention")
    with pytest.warns(RuntimeWarning, match="attention is unavailable"):
        modules = kernels.op_modules()
    assert modules["attention"] is TorchCausalAttention
    assert modules["layer_norm"] is TritonLayerNorm, "layer_norm still on Triton"
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g).to(device) for _ in range(3))
    assert_close(_core(modules["attention"])(q, k, v), attention_ref(q, k, v), 1e-5, "attention")


def test_attention_past_the_grid_limit_goes_to_torch(monkeypatch, device):
    """B * H over the kernels' grid limit (65535): torch's attention, never the kernel."""
    calls = []
    kernel = attention_module.attention
    monkeypatch.setattr(attention_module, "attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    core = _core(TritonCausalAttention)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(65536, 1, n, 16, generator=g).to(device) for n in (3, 3, 3))
    with torch.no_grad():
        assert_close(core(q, k, v), attention_ref(q, k, v), 1e-5, "attention")
        assert not calls, "the kernel ran past its grid limit"
        core(q[:2], k[:2], v[:2])
    assert calls, "the kernel did not run within its grid limit"


def test_reference_modules_equal_the_kernel_references():
    """The model's classic modules and the kernels' reference functions compute the same thing."""
    g = torch.Generator().manual_seed(9)
    x, res = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    norm = LayerNorm(16)
    with torch.no_grad():
        norm.scale.normal_(generator=g), norm.shift.normal_(generator=g)
    assert_close(norm(x), layer_norm_ref(x, norm.scale, norm.shift), 1e-6, "layer_norm")
    assert_close(GELU()(x), bias_gelu_ref(x), 1e-6, "gelu")
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (3, 7, 7))
    assert_close(_core(CausalAttention)(q, k, v), attention_ref(q, k, v), 1e-6, "attention")
