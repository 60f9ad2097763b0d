"""Checkpoints: round trip, atomic writes, and every way a checkpoint can be wrong."""
import pytest
import torch

from gptfast import GPTConfig, GPTModel
from gptfast.checkpoint import load_checkpoint, load_model, save_checkpoint


def _model(**kw):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(vocab_size=120, context_length=16, emb_dim=32, n_heads=2, n_layers=2, **kw))


def test_round_trip_gives_identical_logits(tmp_path):
    model = _model().eval()
    path = save_checkpoint(tmp_path / "ck.pt", model, step=7)
    loaded = load_model(path)  # same backend as `model`: bit-identical
    idx = torch.randint(120, (2, 16))
    assert torch.equal(loaded(idx), model(idx))
    assert load_checkpoint(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind


def test_missing_and_truncated(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    path = save_checkpoint(tmp_path / "ck.pt", _model())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="truncated or corrupt"):
        load_model(path)


def test_checkpoint_of_another_config_names_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path / "ck.pt", _model())
    state = load_checkpoint(path)
    other = GPTModel(GPTConfig(vocab_size=120, context_length=16, emb_dim=48, n_heads=2, n_layers=2))
    from gptfast.checkpoint import load_state_dict_checked
    with pytest.raises(ValueError, match=r"tensor tok_emb.weight has shape \(120, 32\), expected \(120, 48\)"):
        load_state_dict_checked(other, state["model"])
    deeper = GPTModel(GPTConfig(vocab_size=120, context_length=16, emb_dim=32, n_heads=2, n_layers=3))
    with pytest.raises(ValueError, match="missing tensor trf_blocks.2"):
        load_state_dict_checked(deeper, state["model"])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    path = save_checkpoint(tmp_path / "ck.pt", model, step=1)
    before = path.read_bytes()

    def explode(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_classifier_checkpoint_is_named_as_one(tmp_path):
    from gptfast.finetune.classify import Classifier, make_classifier

    model = make_classifier(GPTModel(GPTConfig.from_preset("tiny", n_layers=1)), 2)
    path = Classifier(model, ["ham", "spam"], 16).save(tmp_path / "clf.pt")
    Classifier.load(path, "torch", "cpu")  # it is a fine classifier
    with pytest.raises(RuntimeError, match="is a classifier .* use it with `gptfast classify`"):
        load_model(path)
