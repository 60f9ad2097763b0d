"""The GPT model: published parameter counts, backends agreeing, the classic state-dict layout."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import gptfast.backends
import gptfast.model
from gptfast import GPTConfig, GPTModel
from gptfast.backends import TorchCausalAttention, TorchLayerNorm
from gptfast.model import CausalAttention, LayerNorm, choose_backend


def test_parameter_counts_match_the_classic_124m():
    with torch.device("meta"):  # shapes only: no memory, no init time
        classic = GPTModel(GPTConfig.from_preset("gpt2-small", qkv_bias=False, tie_weights=False))
        book = GPTModel(GPTConfig.from_preset("book-124m"))
    assert classic.num_parameters() == 163_009_536
    assert classic.num_parameters(exclude_head=True) == 124_412_160
    assert book.num_parameters() == 162_419_712


def test_unknown_preset_and_backend():
    with pytest.raises(ValueError, match="unknown preset 'gpt5'"):
        GPTConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        GPTModel(GPTConfig.from_preset("tiny"), backend="cuda")


def _random_cfg(seed):
    g = torch.Generator().manual_seed(seed)
    heads = [1, 2, 3, 4][torch.randint(4, (1,), generator=g).item()]
    return GPTConfig(vocab_size=97 + seed, context_length=40, emb_dim=heads * 8 * (1 + seed % 2),
                     n_heads=heads, n_layers=1 + seed % 3, qkv_bias=bool(seed % 2), tie_weights=seed % 3 == 0,
                     pad_vocab=seed % 2 == 0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [1, 7, 40])
def test_backends_agree_on_logits_and_gradients(seed, T):
    torch.manual_seed(seed)
    cfg = _random_cfg(seed)
    model = GPTModel(cfg, backend="reference").double()
    idx = torch.randint(cfg.vocab_size, (2, T))
    results = {}
    for backend in ("reference", "torch"):
        model.backend = backend
        model.zero_grad()
        logits = model(idx)
        loss = model.loss(idx, idx.roll(1, 1))
        loss.backward()
        results[backend] = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l_ref, loss_ref, g_ref), (l_t, loss_t, g_t) = results["reference"], results["torch"]
    assert logits.shape == (2, T, cfg.vocab_size)
    torch.testing.assert_close(l_t, l_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss_t, loss_ref, rtol=1e-9, atol=1e-9)
    for name in g_ref:
        torch.testing.assert_close(g_t[name], g_ref[name], rtol=1e-8, atol=1e-9, msg=lambda m: f"{name}: {m}")


def test_switching_backend_on_a_trained_model():
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("tiny", context_length=32, drop_rate=0.0)
    model = GPTModel(cfg, backend="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(cfg.vocab_size, (2, 32))
    for _ in range(3):
        opt.zero_grad()
        model.loss(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
    with torch.no_grad():
        a = model(idx)
        model.backend = "reference"
        b = model(idx)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


class ClassicMHA(nn.Module):
    """The classic from-scratch attention, to produce a state dict in its layout."""

    def __init__(self, d, heads, T, bias):
        super().__init__()
        self.W_query, self.W_key, self.W_value = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(d, d)
        self.heads = heads
        self.register_buffer("mask", torch.triu(torch.ones(T, T), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # (B, H, T, D)
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        s = (q @ k.transpose(2, 3)).masked_fill(self.mask.bool()[:t, :t], -torch.inf)
        w = torch.softmax(s / k.shape[-1] ** 0.5, dim=-1)
        return self.out_proj((w @ v).transpose(1, 2).reshape(b, t, d))


def test_classic_state_dict_loads_with_identical_logits():
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=300, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=False,
                    tie_weights=False, init="torch")
    ours = GPTModel(cfg, backend="reference").eval()
    classic_attn = [ClassicMHA(32, 4, 16, False) for _ in range(2)]
    sd = {k: v for k, v in ours.state_dict().items() if ".att." not in k}
    for i, m in enumerate(classic_attn):
        sd.update({f"trf_blocks.{i}.att.{k}": v for k, v in m.state_dict().items()})
    assert "trf_blocks.0.att.W_query.weight" in sd and "trf_blocks.0.att.mask" in sd
    fresh = GPTModel(cfg, backend="reference").eval()
    fresh.load_state_dict(sd)
    x = torch.randn(2, 16, 32)
    for i, m in enumerate(classic_attn):  # the fused projection computes what the classic one did
        torch.testing.assert_close(fresh.trf_blocks[i].att(x), m(x), rtol=1e-5, atol=1e-6)
    idx = torch.randint(300, (2, 16))
    with torch.no_grad():  # and the whole model equals one assembled from the classic pieces by hand
        h = fresh.drop_emb(fresh.tok_emb(idx) + fresh.pos_emb(torch.arange(16)))
        for blk, att in zip(fresh.trf_blocks, classic_attn):
            h = h + att(blk.norm1(h))
            h = h + blk.ff(blk.norm2(h))
        expected = fresh.out_head(fresh.final_norm(h))
        torch.testing.assert_close(fresh(idx), expected, rtol=1e-5, atol=1e-5)


def test_padded_vocab_never_changes_logits():
    torch.manual_seed(2)
    cfg = GPTConfig.from_preset("tiny", vocab_size=1000, pad_vocab=True, drop_rate=0.0)
    model = GPTModel(cfg, backend="torch")
    assert model.tok_emb.weight.shape[0] == 1024
    idx = torch.randint(1000, (1, 9))
    logits = model(idx)
    assert logits.shape[-1] == 1000
    torch.testing.assert_close(model.loss(idx, idx), torch.nn.functional.cross_entropy(logits[0], idx[0]))


def test_a_wrapped_head_never_sees_the_padding_rows():
    """A head that is not a plain Linear (LoRA, fine-tuning) goes through the logits' loss."""
    torch.manual_seed(3)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=1000, pad_vocab=True, drop_rate=0.0), backend="torch")
    model.out_head = nn.Sequential(model.out_head)
    idx = torch.randint(1000, (1, 9))
    logits = model(idx)
    assert logits.shape[-1] == 1000
    torch.testing.assert_close(model.loss(idx, idx), torch.nn.functional.cross_entropy(logits[0], idx[0]))


def test_auto_backend_on_cpu_is_torch():
    assert choose_backend("auto", torch.device("cpu"))[0] == "torch"
    model = GPTModel(GPTConfig.from_preset("tiny", n_layers=1), backend="auto")
    assert (model.backend, model.active_backend) == ("auto", "torch")
    assert type(model.trf_blocks[0].att.attend) is TorchCausalAttention


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0+git9844da95", "2.4.0rc1", True), ("3.6.0", "2.3.5", False),
    ("3.7.0", "2.4.6", False), ("3.10.0", "2.4.0", False), ("3.7rc1", "2.4.6", False)])
def test_triton_falls_back_where_its_interpreter_cannot_run(monkeypatch, triton_version, numpy_version, broken):
    """Triton before 3.7 with NumPy 2.4 fails every kernel with a row loop in its interpreter
    (triton-lang/triton#9171): "triton" on CPU then runs as "torch" and says why."""
    triton = pytest.importorskip("triton", reason="the check reads Triton's version")
    import numpy
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    name, _, why = choose_backend("triton", torch.device("cpu"))
    assert (name, why is not None) == (("torch", True) if broken else ("triton", False))
    if broken:
        assert "triton-lang/triton#9171" in why and "numpy<2.4" in why


def test_switching_backend_keeps_parameters_state_dict_and_outputs():
    """set_backend only changes the op modules' classes: the very same Parameter objects, the
    same state-dict keys and values, and the same logits (within float tolerance)."""
    torch.manual_seed(4)
    model = GPTModel(GPTConfig.from_preset("tiny", n_layers=2, drop_rate=0.0), backend="reference").eval()
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    idx = torch.randint(model.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(idx)
        model.set_backend("torch")
        assert type(model.final_norm) is TorchLayerNorm
        assert all(p is params[n] for n, p in model.named_parameters())
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(model(idx), ref, rtol=1e-5, atol=1e-5)
        model.backend = "reference"  # the property calls set_backend
        assert type(model.final_norm) is LayerNorm and type(model.trf_blocks[1].att.attend) is CausalAttention
        torch.testing.assert_close(model(idx), ref, rtol=0, atol=0)


def test_backend_is_decided_again_when_the_model_moves(monkeypatch):
    """triton asked for where it cannot run falls back to torch, with one warning once it runs
    there; moving the model (here: where the interpreter is allowed) decides again."""
    monkeypatch.setattr(gptfast.model, "triton_interpreting", lambda: False)
    monkeypatch.setattr(gptfast.backends, "_warned", set())  # warned once per process: start afresh
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # built where it falls back: no warning until it runs there
        model = GPTModel(GPTConfig.from_preset("tiny", n_layers=1), backend="triton").eval()
    assert (model.backend, model.active_backend) == ("triton", "torch")
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="backend 'triton' needs a CUDA tensor") as caught:
        model(idx)
        model.set_backend("triton")
        model(idx)
    assert len([w for w in caught if "needs a CUDA" in str(w.message)]) == 1, "one warning, not one per call"
    monkeypatch.setattr(gptfast.model, "triton_interpreting", lambda: True)
    monkeypatch.setattr(gptfast.model, "interpreter_problem", lambda: None)  # whatever Triton/NumPy are here
    model.to("cpu")
    assert model.active_backend == "triton"
    assert type(model.final_norm).__name__ == "TritonLayerNorm"


def test_token_ids_outside_the_vocabulary_are_a_clear_error():
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 100\); got 0..100"):
        model(torch.tensor([[0, 100]]))
    with pytest.raises(ValueError, match="got -1..5"):
        model(torch.tensor([[-1, 5]]))


def test_prompt_longer_than_context_is_a_clear_error():
    model = GPTModel(GPTConfig.from_preset("tiny", context_length=8))
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.slow
def test_untrained_book_124m_loss_on_the_verdict():
    """The classic seed-123 check: initial train/val loss about 10.99 (ln 50257 = 10.82)."""
    from gptfast.data import read_text, VERDICT
    from gptfast.train import calc_loss_loader, split_text_batches
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("book-124m"), backend="torch")
    train, val = split_text_batches(read_text(VERDICT), 256, 256, 2, seed=123)
    train_loss = calc_loss_loader(train, model, torch.device("cpu"))
    val_loss = calc_loss_loader(val, model, torch.device("cpu"))
    assert abs(train_loss - 10.99) < 0.05 and abs(val_loss - 10.99) < 0.05, (train_loss, val_loss)
    assert math.log(50257) < train_loss
