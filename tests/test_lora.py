"""LoRA: a fresh adapter changes nothing, merge == unmerged, parameter counts, adapter files."""
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from gptfast.config import GPTConfig
from gptfast.lora import (LoRALinear, apply_lora, count_trainable, load_adapters, lora_layers, merge_lora,
                          merged_state_dict, save_adapters, unmerge_lora, unwrap_lora)
from gptfast.model import GPTModel


CFG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def _worst(a, b):
    return f"worst mismatch {(a - b).abs().max().item():.3g}"


@pytest.fixture
def base():
    torch.manual_seed(0)
    return GPTModel(CFG, backend="reference").eval()


@pytest.fixture
def idx():
    return torch.randint(0, CFG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))


def _randomise_adapters(model, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _hand_merged(base, lora_model):
    """The base model with W + (alpha/rank) B A written in by hand: the ground truth."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, m in lora_layers(lora_model).items():
            layer = ref.get_submodule(name)  # a new tensor: the head's weight is tied to tok_emb
            layer.weight = nn.Parameter(layer.weight + m.scaling * m.lora_B @ m.lora_A)
    return ref


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fresh_adapters_leave_outputs_unchanged(base, idx, backend):
    base.backend = backend
    wrapped = copy.deepcopy(base)
    names = apply_lora(wrapped, rank=4, alpha=8)
    assert len(names) == 4 * CFG.n_layers + 1  # qkv, out_proj, ff up, ff down per block + head
    with torch.no_grad():
        a, b = base(idx), wrapped(idx)
    assert torch.equal(a, b), _worst(a, b)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_adapted_model_matches_hand_merged_weights_and_merge_roundtrips(base, idx, backend):
    base.backend = backend
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8)
    _randomise_adapters(model)
    with torch.no_grad():
        expected = _hand_merged(base, model)(idx)
        unmerged = model(idx)
        assert (unmerged - base(idx)).abs().max() > 1e-3  # the adapters do something
        torch.testing.assert_close(unmerged, expected, atol=1e-5, rtol=1e-5)
        merge_lora(model)
        merged = model(idx)
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        for name, m in lora_layers(model).items():
            torch.testing.assert_close(m.linear.weight, base.get_submodule(name).weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(idx), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_lora_on_the_feed_forward_up_projection(base, idx, backend, monkeypatch):
    """The fused feed-forward (triton) runs a LoRA layer as a layer: its thin-matmul forward
    runs on ff.layers.0 under every backend, and the output is the hand-merged model's."""
    model = copy.deepcopy(base)
    assert apply_lora(model, rank=2, alpha=2, targets=["ff.layers.0"]) == [
        f"trf_blocks.{i}.ff.layers.0" for i in range(CFG.n_layers)]
    _randomise_adapters(model)
    model.backend = backend
    assert model.active_backend == backend, f"backend {backend} unavailable here"
    calls = []
    forward = LoRALinear.forward
    monkeypatch.setattr(LoRALinear, "forward", lambda self, x: calls.append(1) or forward(self, x))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), _hand_merged(base, model)(idx), atol=1e-5, rtol=1e-5)
    assert len(calls) == CFG.n_layers, "the adapter's own forward did not run on ff.layers.0"
    assert not hasattr(model.trf_blocks[0].ff.layers[0], "weight"), "no fake .weight"


def test_only_adapters_get_gradients(base, idx):
    model = copy.deepcopy(base).train()
    apply_lora(model, rank=4, alpha=4)
    _randomise_adapters(model)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert count_trainable(model) == sum(m.lora_A.numel() + m.lora_B.numel() for m in lora_layers(model).values())


def test_trainable_parameters_gpt2_124m_rank16_two_class_head():
    """Rank 16 on every linear layer of GPT-2 124M with a 2-class head, base frozen.
    Expected from the shapes: r * (in + out) per layer. (The classic code with separate
    query/key/value layers has 2,666,528; one fused qkv layer has fewer adapter rows.)"""
    cfg = GPTConfig.from_preset("gpt2-small")
    with torch.device("meta"):
        model = GPTModel(cfg)
        model.out_head = nn.Linear(cfg.emb_dim, 2)
    apply_lora(model, rank=16, alpha=16)
    r, C = 16, cfg.emb_dim
    per_block = r * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))  # qkv, out_proj, ff up, ff down
    expected = cfg.n_layers * per_block + r * (C + 2)
    assert count_trainable(model) == expected == 2_371_616


def test_adapters_save_and_reload(base, idx, tmp_path):
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8, exclude=["out_head"])
    _randomise_adapters(model)
    path = save_adapters(model, tmp_path / "a.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:  # adapters only, not the base weights
        assert all(k.endswith(("lora_A", "lora_B")) for k in f.keys())
    fresh = copy.deepcopy(base)
    load_adapters(fresh, path)  # wraps the same layers, then loads
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx), model(idx), atol=0, rtol=0)
    other = copy.deepcopy(base)
    apply_lora(other, rank=2, alpha=2, exclude=["out_head"])
    with pytest.raises(ValueError, match="shape"):
        load_adapters(other, path)


def test_failed_adapter_save_keeps_the_old_file_and_leaves_no_temporary(base, tmp_path, monkeypatch):
    model = copy.deepcopy(base)
    apply_lora(model, rank=2, alpha=2)
    path = save_adapters(model, tmp_path / "a.safetensors")
    before = path.read_bytes()
    _randomise_adapters(model)

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_merged_state_dict_and_unwrap_give_a_plain_model(base, idx):
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=4)
    _randomise_adapters(model)
    with torch.no_grad():
        want = model(idx)
        # the adapted head is no longer the embedding, so the plain model is untied
        plain = GPTModel(dataclasses.replace(CFG, tie_weights=False), backend="reference").eval()
        plain.load_state_dict(merged_state_dict(model))
        torch.testing.assert_close(plain(idx), want, atol=1e-5, rtol=1e-5)
        unwrap_lora(model)
        assert not lora_layers(model) and type(model.out_head) is nn.Linear
        torch.testing.assert_close(model(idx), want, atol=1e-5, rtol=1e-5)


def test_merging_a_tied_head_leaves_the_embedding_alone(base):
    model = copy.deepcopy(base)
    emb = model.tok_emb.weight.detach().clone()
    apply_lora(model, rank=2, alpha=2, targets=["out_head"])
    _randomise_adapters(model)
    merge_lora(model)
    assert torch.equal(model.tok_emb.weight, emb)


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), rank=0, alpha=1)
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(GPTModel(CFG), rank=2, alpha=2, targets=["nonexistent"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_adapter_gradients_match_the_reference_backend(base, idx, backend, device):
    """Adapters through each backend's modules (triton runs in its interpreter on CPU, on the GPU
    where there is one) get the reference backend's loss and gradients."""
    model = copy.deepcopy(base)
    apply_lora(model, rank=4, alpha=8)
    _randomise_adapters(model)
    idx = idx.to(device)
    results = {}
    for name in ("reference", backend):
        m = copy.deepcopy(model).to(device)
        m.backend = name
        assert m.active_backend == name, f"backend {name} unavailable on {device}; got {m.active_backend}"
        loss = m.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        results[name] = loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    (ref_loss, ref_grads), (loss, grads) = results["reference"], results[backend]
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_wrapping_twice_and_bad_adapter_files_are_clear_errors(base, tmp_path):
    apply_lora(base, rank=2, alpha=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(base, rank=2, alpha=2)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors is not a readable safetensors file"):
        load_adapters(GPTModel(CFG), junk)
    # adapters of another model: one short line, and the model is left unwrapped
    path = save_adapters(base, tmp_path / "a.safetensors")
    for other, message in ((dataclasses.replace(CFG, n_layers=1), r"trf_blocks\.1\.att\.qkv, which is not a linear"),
                           (dataclasses.replace(CFG, emb_dim=64), r"qkv\.lora_A has shape \(2, 32\), the model expects \(2, 64\)")):
        model = GPTModel(other)
        with pytest.raises(ValueError, match=message) as e:
            load_adapters(model, path)
        assert len(str(e.value)) < 200 and not lora_layers(model), str(e.value)
