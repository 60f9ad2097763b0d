"""Book fidelity: the classic "build a GPT from scratch" code is the reference. Its config dict
builds its model (same parameters, same initialisation), its saved files load, and the classic
`generate` gives its tokens for its seed. The classic model and sampling loop are written out
here as the book has them."""
import warnings

import pytest
import torch
import torch.nn as nn

from gptfast import GPTConfig, GPTModel
from gptfast import cli, train
from gptfast.checkpoint import load_checkpoint, load_model, save_checkpoint
from gptfast.config import BOOK_CONFIG_124M, PRESETS
from gptfast.generate import generate


# ---- the classic code ---------------------------------------------------------------------------

class BookMHA(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))

    def forward(self, x):
        b, num_tokens, _ = x.shape
        split = lambda z: z.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        keys, queries, values = split(self.W_key(x)), split(self.W_query(x)), split(self.W_value(x))
        attn_scores = (queries @ keys.transpose(2, 3)).masked_fill(self.mask.bool()[:num_tokens, :num_tokens], -torch.inf)
        attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
        return self.out_proj((attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out))


class BookLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps, self.scale, self.shift = 1e-5, nn.Parameter(torch.ones(emb_dim)), nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class BookBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = BookMHA(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"],
                           cfg["qkv_bias"])
        self.ff = nn.Module()
        self.ff.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), BookGELU(),
                                       nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))
        self.norm1, self.norm2 = BookLayerNorm(cfg["emb_dim"]), BookLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff.layers(self.norm2(x)))


class BookGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[BookBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = BookLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(torch.arange(in_idx.shape[1], device=in_idx.device)))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def book_generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None):
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        if top_k is not None:
            top_logits, _ = torch.topk(logits, top_k)
            min_val = top_logits[:, -1]
            logits = torch.where(logits < min_val, torch.tensor(float("-inf")).to(logits.device), logits)
        if temperature > 0.0:
            logits = logits / temperature
            probs = torch.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
        else:
            idx_next = torch.argmax(logits, dim=-1, keepdim=True)
        if idx_next == eos_id:
            break
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


SMALL_BOOK = dict(BOOK_CONFIG_124M, vocab_size=300, context_length=32, emb_dim=128, n_heads=2, n_layers=2)


def book_model(seed=123, **cfg):
    torch.manual_seed(seed)
    return BookGPT({**SMALL_BOOK, **cfg}).eval()


# ---- the config dict builds the book's model ------------------------------------------------------

def test_book_config_dict_builds_the_book_model():
    cfg = GPTConfig.from_dict(BOOK_CONFIG_124M)
    assert not cfg.tie_weights and cfg.init == "torch" and not cfg.qkv_bias and cfg.drop_rate == 0.1
    with torch.device("meta"):
        assert GPTModel(cfg).num_parameters() == 163_009_536  # the book's count
        assert BookGPT(BOOK_CONFIG_124M).state_dict()["out_head.weight"].shape == (50257, 768)
    assert cfg.num_parameters() == 163_009_536
    assert PRESETS["book-124m"] == GPTConfig.from_dict(dict(BOOK_CONFIG_124M, context_length=256))


def test_same_seed_same_weights_and_logits_as_the_book():
    """torch.manual_seed then the constructor: the book's initialisation, draw for draw."""
    book = book_model(123)
    torch.manual_seed(123)
    ours = GPTModel(GPTConfig.from_dict(SMALL_BOOK), backend="reference").eval()
    fresh = GPTModel(GPTConfig.from_dict(SMALL_BOOK), backend="reference").eval()
    fresh.load_state_dict(book.state_dict())  # the classic layout, fused on load
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), f"{name} differs from the book's initialisation"
    idx = torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), rtol=1e-5, atol=1e-5)


def test_book_state_dict_never_loads_silently_into_a_tied_model(tmp_path):
    book = book_model()
    tied = GPTModel(GPTConfig.from_dict(dict(SMALL_BOOK, tie_weights=True)))
    head = tied.out_head.weight.detach().clone()
    with pytest.raises(ValueError, match="distinct tok_emb.weight and out_head.weight, but this model ties them"):
        tied.load_state_dict(book.state_dict())
    assert torch.equal(tied.out_head.weight, head)
    path = tmp_path / "lying.pt"
    torch.save({"config": dict(SMALL_BOOK, tie_weights=True), "model": book.state_dict()}, path)
    with pytest.raises(ValueError, match=f"{path}: the state dict has distinct"):
        load_model(path)


def test_gptmodel_of_a_dict_is_a_one_line_error():
    with pytest.raises(TypeError, match=r"GPTModel takes a GPTConfig, got dict; use GPTModel\(GPTConfig.from_dict"):
        GPTModel(BOOK_CONFIG_124M)


# ---- the book's saved files load ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["state_dict", "training checkpoint"])
def test_book_pth_loads_with_and_without_a_preset(tmp_path, layout, monkeypatch, capsys):
    book = book_model()
    path = tmp_path / "model.pth"
    opt = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)
    torch.save(book.state_dict() if layout == "state_dict" else
               {"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    idx = torch.randint(300, (1, 20), generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match="no config: read from its tensors as 2 layers, emb_dim 128, 2 heads"):
        inferred = load_model(path, backend="reference")
    monkeypatch.setitem(PRESETS, "book-small", GPTConfig.from_dict(SMALL_BOOK))
    named = load_model(path, backend="reference", preset="book-small")
    with torch.no_grad():
        for model in (inferred, named):
            assert model.cfg == GPTConfig.from_dict(SMALL_BOOK)
            torch.testing.assert_close(model(idx), book(idx), rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(PRESETS, "book-other", GPTConfig.from_dict(dict(SMALL_BOOK, n_layers=3)))
    with pytest.raises(ValueError, match="has n_layers=3 but the weights hold 2 layers"):
        load_model(path, preset="book-other")
    from gptfast import cli
    assert cli.main(["generate", "--checkpoint", str(path), "--prompt", "!", "--max-new-tokens", "3",
                     "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.startswith("!")


@pytest.mark.parametrize("layout", ["state_dict", "training checkpoint", "best.pt"])
def test_train_resume_from_weights_only_starts_from_them(tmp_path, layout, monkeypatch, capsys):
    """`train --resume model.pth --preset ...` with a file of weights only: training starts from
    those weights at step 0 with a fresh optimizer state, and one line says so."""
    book_cfg = dict(SMALL_BOOK, vocab_size=50257, emb_dim=64)  # the tokenizer's vocabulary: it trains on text
    monkeypatch.setitem(PRESETS, "book-small", GPTConfig.from_dict(book_cfg))
    book, path = book_model(**book_cfg), tmp_path / "model.pth"
    reference = GPTModel(GPTConfig.from_dict(book_cfg))
    reference.load_state_dict(book.state_dict())  # the book's tensors in our layout
    if layout == "best.pt":
        save_checkpoint(path, reference, step=7, val_loss=1.0)
    else:
        opt = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)
        torch.save(book.state_dict() if layout == "state_dict" else
                   {"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()}, path)
    started, real_fit = {}, train.Trainer.fit

    def fit(self):
        started.update(step=self.step, optimizer_state=len(self.optimizer.state),
                       weights={k: v.clone() for k, v in self.model.state_dict().items()})
        return real_fit(self)
    monkeypatch.setattr(train.Trainer, "fit", fit)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # sized by the preset, not guessed from the tensors
        code = cli.main(["train", "--preset", "book-small", "--resume", str(path), "--out", str(out),
                         "--max-steps", "2", "--eval-freq", "1", "--eval-iter", "1", "--sample-tokens", "0"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    said = [line for line in printed.out.splitlines() if "holds weights only" in line]
    assert len(said) == 1 and said[0].startswith(f"{path} holds weights only: training starts from its weights "
                                                 "at step 0 with a fresh optimizer state"), printed.out
    assert ("optimizer_state_dict is not used" in said[0]) == (layout == "training checkpoint")
    assert started["step"] == 0 and started["optimizer_state"] == 0
    for name, tensor in reference.state_dict().items():
        assert torch.equal(started["weights"][name], tensor), f"{name} is not the file's"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


# ---- the classic generate gives the book's tokens -------------------------------------------------

class Ties(nn.Module):
    """The model with logits rounded to steps of 0.5: many tokens tie at the k-th value."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, idx):
        return torch.round(self.model(idx) * 2) / 2


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_classic_generate_reproduces_the_book_token_for_token(ties):
    torch.manual_seed(0)
    base = GPTModel(GPTConfig.from_dict(dict(SMALL_BOOK, context_length=24, drop_rate=0.0))).eval()
    model = Ties(base) if ties else base
    idx = torch.tensor([[5, 17, 42]])
    settings = [(1.0, 3), (0.7, 300), (0.0, None)] if ties else [(1.0, None), (1.4, 25), (2.0, 1), (0.0, 25)]
    for seed in (123, 7):
        for temperature, top_k in settings:
            torch.manual_seed(seed)
            want = book_generate(model, idx, 25, 24, temperature, top_k)  # 3 + 25 > 24: the window slides
            after_book = torch.rand(())
            torch.manual_seed(seed)
            got = generate(model, idx, 25, 24, temperature, top_k, use_cache=not ties or temperature > 0)
            assert got.tolist() == want.tolist(), f"seed {seed}, temperature {temperature}, top_k {top_k}"
            assert torch.rand(()) == after_book, "the global RNG advanced differently from the book's"
    eos = want[0, 5].item()  # a token the greedy run produces: both stop there, without it
    torch.manual_seed(3)
    want = book_generate(model, idx, 25, 24, 1.0, 5, eos_id=eos)
    torch.manual_seed(3)
    assert generate(model, idx, 25, 24, 1.0, 5, eos_id=eos).tolist() == want.tolist()
