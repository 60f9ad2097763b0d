"""Sliding windows, the prepared token files, and bad text input."""
import numpy as np
import pytest
import torch

from gptfast.data import TokenFileLoader, create_dataloader, prepare, read_text, VERDICT
from gptfast.tokenizer import get_tokenizer


def test_sliding_windows_are_shifted_by_one():
    text = read_text(VERDICT)
    ids = torch.tensor(get_tokenizer().encode(text))
    dl = create_dataloader(text, batch_size=1, max_length=4, stride=3, shuffle=False)
    for i, (x, y) in enumerate(dl):
        if i == 5:
            break
        assert torch.equal(x[0], ids[3 * i:3 * i + 4])
        assert torch.equal(y[0], ids[3 * i + 1:3 * i + 5])
    # the classic count: windows start every `stride` tokens while a full target fits
    assert len(dl.dataset) == len(range(0, len(ids) - 4, 3))


def test_text_shorter_than_one_window():
    with pytest.raises(ValueError, match=r"has 4 tokens; .* needs at least 257"):
        create_dataloader("Every effort moves you", max_length=256)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_text(tmp_path / "latin1.txt")


def test_prepare_matches_direct_encoding(tmp_path):
    text = read_text(VERDICT)
    counts = prepare([VERDICT], tmp_path, val_fraction=0.1, chunk_chars=997)  # many chunk boundaries
    tokens = np.concatenate([np.fromfile(tmp_path / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert tokens.tolist() == get_tokenizer().encode(text) + [50256]
    assert counts == {"train": len(tokens) - len(tokens) // 10, "val": len(tokens) // 10}
    loader = TokenFileLoader(tmp_path / "train.bin", batch_size=3, context_length=16, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (3, 16) and torch.equal(x[:, 1:], y[:, :-1])
