"""The bundled GPT-2 tokenizer against the published ids and against tiktoken itself."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptfast.data import VERDICT
from gptfast.tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text


@pytest.mark.parametrize("text, ids", [
    ("Every effort moves you", [6109, 3626, 6100, 345]),
    ("Hello, I am", [15496, 11, 314, 716]),
    ("Akwirw ier", [33901, 86, 343, 86, 220, 959]),
])
def test_published_ids(text, ids):
    assert get_tokenizer().encode(text) == ids
    assert text_to_token_ids(text).tolist() == [ids]


def test_verdict_token_count_and_eot():
    tok = get_tokenizer()
    assert len(tok.encode(VERDICT.read_text(encoding="utf-8"))) == 5145
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.n_vocab == 50257


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip(text):
    ids = text_to_token_ids(text)
    assert token_ids_to_text(ids) == text


def test_out_of_vocab_ids_are_an_error():
    with pytest.raises(ValueError, match="token id 50257 is outside"):
        token_ids_to_text(torch.tensor([[1, 50257]]))


def test_hash_is_checked(tmp_path, monkeypatch):
    import gptfast.tokenizer as t
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(t.RANKS_FILE.read_bytes()[:-10])
    monkeypatch.setattr(t, "RANKS_FILE", bad)
    t.get_tokenizer.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="does not match"):
            t.get_tokenizer()
    finally:
        t.get_tokenizer.cache_clear()
