"""Pretrained weights (gptfast.weights), with transformers as the peer: random GPT-2s saved by
transformers load to the same logits, save_hf goes back, and the same weights written as an
OpenAI TensorFlow checkpoint load too. TensorFlow only ever runs in child processes here:
importing it before triton would abort this process."""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from gptfast import GPTConfig, GPTModel
from gptfast import weights
from gptfast.checkpoint import save_checkpoint
from gptfast.tokenizer import get_tokenizer
from gptfast.weights import convert, evaluate_text_loss, load_gpt2, save_hf

transformers = pytest.importorskip("transformers", reason="transformers (a test dependency) is the peer here")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

HAS_TF = importlib.util.find_spec("tensorflow") is not None
needs_tf = pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed (pip install gptfast[tf])")

CONFIGS = {  # vocab, odd context lengths, head_dim 16 / 24 / 64
    "d16-ctx37": dict(vocab_size=101, n_positions=37, n_embd=64, n_head=4, n_layer=2),
    "d24-ctx23": dict(vocab_size=50, n_positions=23, n_embd=72, n_head=3, n_layer=3),
    "d64-ctx64": dict(vocab_size=64, n_positions=64, n_embd=128, n_head=2, n_layer=1),
}
ATOL = 1e-5


def random_hf(name, seed=0, **overrides):
    """A GPT2LMHeadModel with every weight randomised (LayerNorms too, so a swapped g/b shows)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(**{**CONFIGS.get(name, {}), **overrides}, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, attn_implementation="eager")
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def tokens(n_positions, vocab, seed=1):
    return torch.randint(0, vocab, (2, n_positions), generator=torch.Generator().manual_seed(seed))


def assert_close(ours, theirs, what, atol=ATOL):
    err = (ours - theirs).abs().max().item()
    assert err <= atol, f"{what}: worst logit mismatch {err:.3g} > {atol}"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{config name: (HF model, its save_pretrained directory, input ids)}."""
    out = {}
    for name, kw in CONFIGS.items():
        model, path = random_hf(name), tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        assert (path / "model.safetensors").is_file()
        out[name] = (model, path, tokens(kw["n_positions"], kw["vocab_size"]))
    return out


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("name", CONFIGS)
def test_hf_safetensors_same_logits(hf_dirs, name, backend):
    hf, path, idx = hf_dirs[name]
    model = load_gpt2(path, backend=backend)
    c = hf.config
    assert (model.cfg.emb_dim, model.cfg.n_heads, model.cfg.n_layers, model.cfg.context_length,
            model.cfg.vocab_size) == (c.n_embd, c.n_head, c.n_layer, c.n_positions, c.vocab_size)
    assert model.cfg.qkv_bias and model.cfg.tie_weights
    assert model.out_head.weight is model.tok_emb.weight
    assert_close(our_logits(model, idx), hf_logits(hf, idx), f"{name} on {backend}")


def test_hf_triton_backend_same_logits(hf_dirs, device):
    hf, path, idx = hf_dirs["d16-ctx37"]  # one tiny config: the interpreter is slow
    model = load_gpt2(path, backend="triton").to(device)  # the kernels run on CUDA, or interpreted on CPU
    assert model.active_backend == "triton", f"fell back from triton on {device}"
    ours = our_logits(model, idx[:1, :16].to(device)).cpu()
    assert_close(ours, hf_logits(hf, idx[:1, :16]), "triton backend")


def test_pytorch_bin_and_untied_copy_of_head(tmp_path):
    """pytorch_model.bin (weights_only load) holding lm_head.weight equal to wte: still tied."""
    hf = random_hf("d24-ctx23", seed=3)
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_gpt2(tmp_path, backend="reference")
    assert model.cfg.tie_weights
    idx = tokens(23, 50)
    assert_close(our_logits(model, idx), hf_logits(hf, idx), "pytorch_model.bin")


def test_bare_hub_layout_file_sized_from_tensors(hf_dirs, tmp_path):
    """The Hub's GPT-2 files: no "transformer." prefix, causal-mask buffers, and here no config."""
    from safetensors.torch import load_file, save_file

    hf, path, idx = hf_dirs["d64-ctx64"]  # heads of 64, as in every GPT-2 size
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    bare = tmp_path / "weights.safetensors"
    save_file(tensors, bare, metadata={"format": "pt"})
    model = load_gpt2(bare, backend="reference")
    assert (model.cfg.n_heads, model.cfg.n_layers) == (2, 1)
    assert_close(our_logits(model, idx), hf_logits(hf, idx), "bare file")


def test_save_hf_round_trip(hf_dirs, tmp_path):
    hf, path, idx = hf_dirs["d24-ctx23"]
    save_hf(load_gpt2(path, backend="reference"), tmp_path)
    back = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert_close(hf_logits(back, idx), hf_logits(hf, idx), "save_hf -> transformers", atol=1e-6)


def test_save_hf_untied_no_qkv_bias_padded_vocab(tmp_path):
    """A model trained here (no qkv bias, untied head, padded vocab) exports faithfully."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=61, context_length=19, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0,
                    qkv_bias=False, tie_weights=False, pad_vocab=True)
    ours = GPTModel(cfg, backend="reference").eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_hf(ours, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    idx = tokens(19, 61)
    assert_close(hf_logits(hf, idx), our_logits(ours, idx), "untied export")
    back = load_gpt2(tmp_path, backend="reference")  # lm_head differs from wte: stays untied
    assert not back.cfg.tie_weights
    assert_close(our_logits(back, idx), our_logits(ours, idx), "untied re-import")


@pytest.mark.parametrize("targets", [["att.qkv", "ff"], None])  # None: every linear, the tied head too
def test_save_hf_merges_lora_and_rejects_a_classifier_head(hf_dirs, tmp_path, targets):
    from gptfast.lora import apply_lora

    hf, path, idx = hf_dirs["d24-ctx23"]
    model = load_gpt2(path, backend="reference")
    rank, alpha = 2, 4.0
    apply_lora(model, rank=rank, alpha=alpha, targets=targets)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    back = GPT2LMHeadModel.from_pretrained(save_hf(model, tmp_path / "hf"), attn_implementation="eager").eval()
    assert back.config.tie_word_embeddings == (targets is not None)
    assert (hf_logits(back, idx) - hf_logits(hf, idx)).abs().max() > 0.01, "the adapters were not exported"
    # expected: a plain copy whose adapted weights are merged by hand, W + (alpha / rank) B A
    plain = load_gpt2(path, backend="reference")
    adapted = {name: m for name, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted, "apply_lora wrapped nothing"
    for name, m in adapted.items():
        base = plain.get_submodule(name)
        base.weight = torch.nn.Parameter(base.weight + (alpha / rank) * m.lora_B.detach() @ m.lora_A.detach())
    assert_close(hf_logits(back, idx), our_logits(plain, idx), f"LoRA {targets} export")
    model.out_head = torch.nn.Linear(model.cfg.emb_dim, 2)
    with pytest.raises(ValueError, match=r"save_hf: the model's out_head\.\w+ is \(2.*cannot be exported"):
        save_hf(model, tmp_path / "classifier")


def test_convert_to_gptfast_format_and_from_checkpoint(hf_dirs, tmp_path):
    hf, path, idx = hf_dirs["d16-ctx37"]
    run_cli(["convert", str(path), "--out", str(tmp_path / "124M-gptfast")])
    out = tmp_path / "124M-gptfast"
    assert "gptfast" in json.loads((out / "config.json").read_text())
    fast = load_gpt2("124M", models_dir=tmp_path, backend="reference")  # a size finds its converted dir
    assert fast.out_head.weight is fast.tok_emb.weight
    assert_close(our_logits(fast, idx), hf_logits(hf, idx), "converted")
    # a gptfast training checkpoint -> default output beside it, then to Hugging Face
    ckpt = save_checkpoint(tmp_path / "run" / "checkpoint.pt", fast)
    out = convert(ckpt)
    assert out == tmp_path / "run" / "checkpoint-gptfast"
    assert_close(our_logits(load_gpt2(out, backend="reference"), idx), hf_logits(hf, idx), "from checkpoint")
    back = GPT2LMHeadModel.from_pretrained(convert(ckpt, to_hf=True), attn_implementation="eager").eval()
    assert_close(hf_logits(back, idx), hf_logits(hf, idx), "checkpoint -> HF")
    with pytest.raises(ValueError, match="already in gptfast's format"):
        convert(out, out)


def test_interrupted_save_keeps_the_previous_model(hf_dirs, tmp_path, monkeypatch):
    """A re-save that dies while writing the weights leaves the previous folder as it was (the
    new one is written aside and swapped in) and no temporary folder. A folder without
    config.json (an older version's interrupted save) is never taken as complete: a size name
    then prefers OpenAI's folder, and loading it is a one-line error."""
    import safetensors.torch

    model = load_gpt2(hf_dirs["d16-ctx37"][1], backend="reference")
    out = weights.save_gptfast(model, tmp_path / "124M-gptfast")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert weights.resolve_gpt2_path("124M", tmp_path) == out

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        weights.save_gptfast(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["124M-gptfast"], "a temporary folder was left"
    (out / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing") as e:
        load_gpt2(out)
    assert "\n" not in str(e.value)
    assert weights.resolve_gpt2_path("124M", tmp_path) == out  # nothing else there: the loader explains
    (tmp_path / "124M").mkdir()
    assert weights.resolve_gpt2_path("124M", tmp_path) == tmp_path / "124M"


def test_converted_model_trains_without_touching_the_file(hf_dirs, tmp_path):
    """Memory-mapped weights are copy-on-write: an optimizer step works, the file stays as it
    was, and the tied head stays one parameter."""
    _, path, idx = hf_dirs["d16-ctx37"]
    out = convert(path, tmp_path / "fast")
    before = (out / "model.safetensors").read_bytes()
    model = load_gpt2(out, backend="torch").train()
    snapshot = model.tok_emb.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.loss(idx[:, :-1], idx[:, 1:]).backward()
    opt.step()
    assert model.out_head.weight is model.tok_emb.weight
    assert not torch.equal(model.tok_emb.weight, snapshot), "the step did not change the weights"
    assert (out / "model.safetensors").read_bytes() == before


def run_cli(argv):
    parser = argparse.ArgumentParser()
    weights.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_evaluate_text_loss_matches_classic_windows(tmp_path, capsys):
    """Windows of 32 tokens every 24 over a 90/10 character split, against transformers' loss."""
    hf = random_hf("", seed=5, vocab_size=50257, n_positions=40, n_embd=32, n_head=2, n_layer=1)
    hf.save_pretrained(tmp_path)
    text = (weights.Path(weights.__file__).parent / "assets" / "the-verdict.txt").read_text()[:3000]
    ours = evaluate_text_loss(load_gpt2(tmp_path, backend="reference"), text, context_length=32, stride=24,
                              batch_size=4)  # 27 train windows: a short last batch
    split, tok, expected = int(0.9 * len(text)), get_tokenizer(), []
    for part in (text[:split], text[split:]):
        ids = tok.encode(part)
        losses = []
        for i in range(0, len(ids) - 32, 24):
            with torch.no_grad():
                logits = hf(torch.tensor([ids[i: i + 32]])).logits[0]
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[i + 1: i + 33])))
        expected.append(torch.stack(losses).mean().item())
    assert ours == pytest.approx(expected, abs=1e-5), f"ours {ours} vs transformers {expected}"
    run_cli(["eval-gpt2", str(tmp_path), "--context-length", "32", "--stride", "24", "--backend", "reference",
             "--text", str(_write(tmp_path / "t.txt", text))])
    printed = [float(x) for x in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert printed == pytest.approx(expected, abs=1e-4)


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# OpenAI's TensorFlow format
# ---------------------------------------------------------------------------------------------

# Writes OpenAI-style checkpoints (TF1 Saver: checkpoint, model.ckpt.{index,data,meta}) from an
# .npz of {variable name: array}, once per output directory, leaving out the named variables.
TF_WRITER = """
import json, os, sys
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
tf.compat.v1.disable_eager_execution()
arrays = dict(np.load(sys.argv[1]))
for out, leave_out in json.loads(sys.argv[2]).items():
    with tf.Graph().as_default():
        for name, value in arrays.items():
            if name not in leave_out:
                tf.compat.v1.Variable(value, name=name)
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            tf.compat.v1.train.Saver().save(sess, os.path.join(out, "model.ckpt"))
"""


def openai_variables(hf):
    """The HF model's weights under OpenAI's names and shapes (Conv1D weights as (1, in, out))."""
    sd = {k.removeprefix("transformer."): v.numpy() for k, v in hf.state_dict().items()}
    out = {"model/wte": sd["wte.weight"], "model/wpe": sd["wpe.weight"],
           "model/ln_f/g": sd["ln_f.weight"], "model/ln_f/b": sd["ln_f.bias"]}
    for i in range(hf.config.n_layer):
        for mod in ("ln_1", "ln_2", "attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj"):
            w, b = sd[f"h.{i}.{mod.replace('/', '.')}.weight"], sd[f"h.{i}.{mod.replace('/', '.')}.bias"]
            is_ln = mod.startswith("ln")
            out[f"model/h{i}/{mod}/{'g' if is_ln else 'w'}"] = w if is_ln else w[None]
            out[f"model/h{i}/{mod}/b"] = b
    return out


@pytest.fixture(scope="module")
def tf_dirs(tmp_path_factory):
    """One child process writes a full checkpoint and one missing model/h1/mlp/c_fc/w."""
    if not HAS_TF:
        pytest.skip("TensorFlow is not installed (pip install gptfast[tf])")
    hf = random_hf("d24-ctx23", seed=7)
    root = tmp_path_factory.mktemp("tf")
    np.savez(root / "vars.npz", **openai_variables(hf))
    dirs = {"full": root / "full", "missing": root / "missing"}
    c = hf.config
    for d in dirs.values():
        d.mkdir()
        (d / "hparams.json").write_text(json.dumps(dict(n_vocab=c.vocab_size, n_ctx=c.n_positions,
                                                        n_embd=c.n_embd, n_head=c.n_head, n_layer=c.n_layer)))
    plan = {str(dirs["full"]): [], str(dirs["missing"]): ["model/h1/mlp/c_fc/w"]}
    proc = subprocess.run([sys.executable, "-c", TF_WRITER, str(root / "vars.npz"), json.dumps(plan)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return hf, dirs


@needs_tf
def test_tf_checkpoint_same_logits(tf_dirs):
    hf, dirs = tf_dirs
    assert {"checkpoint", "model.ckpt.index", "model.ckpt.meta"} <= {p.name for p in dirs["full"].iterdir()}
    model = load_gpt2(dirs["full"], backend="reference")
    assert "tensorflow" not in sys.modules, "gptfast imported tensorflow into this process"
    idx = tokens(23, 50)
    assert_close(our_logits(model, idx), hf_logits(hf, idx), "OpenAI TF checkpoint")


@needs_tf
def test_tf_checkpoint_missing_variable(tf_dirs):
    with pytest.raises(ValueError, match="missing tensor model/h1/mlp/c_fc/w"):
        load_gpt2(tf_dirs[1]["missing"])


@needs_tf
def test_tf_checkpoint_then_triton_in_one_process(tf_dirs, tmp_path):
    """In a fresh process that has NOT imported triton first: load a TF checkpoint, then import
    triton and run a kernel and gptfast's triton backend. Importing tensorflow
    in-process would abort here (LLVM option clash)."""
    pytest.importorskip("triton", reason="triton is not installed")
    script = tmp_path / "tf_then_triton.py"  # a file: triton.jit needs the kernel's source
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        from gptfast.weights import load_gpt2
        model = load_gpt2({str(tf_dirs[1]["full"])!r}, backend="reference")
        assert "tensorflow" not in sys.modules
        import triton, triton.language as tl

        @triton.jit
        def add_one(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

        device = "cuda" if torch.cuda.is_available() else "cpu"
        x = torch.arange(5, dtype=torch.float32, device=device)
        add_one[(1,)](x, 5, BLOCK=8)
        assert x.tolist() == [1, 2, 3, 4, 5], x
        model = model.to(device)
        idx = torch.randint(0, 50, (1, 8), device=device)
        ref = model(idx)
        model.backend = "triton"
        assert model.active_backend == "triton" and type(model.final_norm).__name__ == "TritonLayerNorm"
        err = (model(idx) - ref).abs().max().item()
        assert err < 1e-4, err
        print("triton backend ok")
    """))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "triton backend ok" in proc.stdout, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


@needs_tf
def test_user_imported_tensorflow_first_falls_back_instead_of_aborting():
    """A user script that imports tensorflow before gptfast and asks for the triton backend gets
    the torch backend and a warning saying why, not an aborted process."""
    code = textwrap.dedent("""
        import sys, warnings, torch
        import tensorflow
        from gptfast import GPTConfig, GPTModel
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = GPTModel(GPTConfig.from_preset("tiny", n_layers=1), backend="triton").eval()
            model(torch.zeros(1, 4, dtype=torch.long))
        assert "triton" not in sys.modules
        assert any("import triton (or gptfast.kernels) before tensorflow" in str(w.message) for w in caught), caught
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "ok" in proc.stdout, f"exit {proc.returncode}: {proc.stderr[-2000:]}"


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_tensorflow_missing_is_a_clear_error(tmp_path, monkeypatch):
    """The reader's child process cannot import tensorflow (a stub raising ImportError first
    on its path): the error says how to install it."""
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('no tensorflow here')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(stub.parent), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "hparams.json").write_text(json.dumps(dict(n_vocab=5, n_ctx=4, n_embd=4, n_head=1, n_layer=1)))
    with pytest.raises(RuntimeError, match=re.escape("pip install gptfast[tf]")):
        load_gpt2(tmp_path)


def test_missing_files_and_unknown_size(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gpt2(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no GPT-2 weights found"):
        load_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="run `gptfast download-gpt2 124M"):
        load_gpt2("124M", models_dir=tmp_path)
    for call in (lambda: load_gpt2("400M", models_dir=tmp_path), lambda: weights.download_gpt2("400M", tmp_path)):
        with pytest.raises(ValueError, match="unknown GPT-2 size '400M'"):
            call()


@pytest.mark.parametrize("damage", ["wrong shape", "missing tensor"])
def test_wrong_or_missing_tensor_is_named(hf_dirs, tmp_path, damage):
    from safetensors.torch import load_file, save_file

    _, path, _ = hf_dirs["d16-ctx37"]
    tensors = load_file(path / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    if damage == "wrong shape":
        tensors[name] = torch.zeros(64, 64 * 2)
    else:
        del tensors[name]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    expected = "has shape (64, 128), expected (64, 192)" if damage == "wrong shape" else "missing tensor"
    with pytest.raises(ValueError, match=re.escape(expected)) as e:
        load_gpt2(tmp_path)
    assert name in str(e.value), e.value


def test_converted_format_wrong_shape_is_named(hf_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    out = convert(hf_dirs["d16-ctx37"][1], tmp_path / "fast")
    tensors = load_file(out / "model.safetensors")
    tensors["final_norm.scale"] = torch.ones(5)
    save_file(tensors, out / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape("tensor final_norm.scale has shape (5,), expected (64,)")):
        load_gpt2(out)


def test_truncated_safetensors(hf_dirs, tmp_path):
    _, path, _ = hf_dirs["d16-ctx37"]
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match="may be truncated"):
        load_gpt2(tmp_path)


def test_download_failure_names_urls_and_manual_steps(tmp_path, monkeypatch):
    """No network: both locations point at a closed local port, so the failure is immediate."""
    monkeypatch.setattr(weights, "PRIMARY_URL", "http://127.0.0.1:9/a/{size}/{file}")
    monkeypatch.setattr(weights, "BACKUP_URL", "http://127.0.0.1:9/b/{size}/{file}")
    with pytest.raises(RuntimeError) as e:
        weights.download_gpt2("124M", tmp_path, timeout=5)
    msg = str(e.value)
    for part in ("http://127.0.0.1:9/a/124M/checkpoint", "http://127.0.0.1:9/b/124M/checkpoint",
                 "by hand", str(tmp_path / "124M"), "model.ckpt.index"):
        assert part in msg, f"{part!r} not in: {msg}"


class _Mirror(BaseHTTPRequestHandler):
    """A local file server with HTTP Range support; /a/ (the "primary") lacks model.ckpt.meta
    and cuts encoder.json off halfway, so the download must resume it from /b/."""
    files: dict = {}
    ranges: list = []

    def do_GET(self):
        where, size, name = self.path.strip("/").split("/")
        data = self.files.get(name)
        if data is None or (where == "a" and name == "model.ckpt.meta"):
            return self.send_error(404)
        start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-")) if self.headers["Range"] else 0
        self.ranges.append((where, name, start))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = len(data) // 2 if (where, name) == ("a", "encoder.json") else len(data)
        self.wfile.write(data[start:cut])

    def log_message(self, *args):
        pass


def test_download_resumes_verifies_and_falls_back(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    _Mirror.files = {name: rng.bytes(2000 + 7 * i) for i, name in enumerate(weights.GPT2_FILES)}
    _Mirror.ranges = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(weights, "PRIMARY_URL", base + "/a/{size}/{file}")
    monkeypatch.setattr(weights, "BACKUP_URL", base + "/b/{size}/{file}")
    target = tmp_path / "124M"
    target.mkdir()
    (target / "vocab.bpe").write_bytes(b"kept")  # complete files are never fetched again
    (target / "model.ckpt.index.part").write_bytes(_Mirror.files["model.ckpt.index"][:300])
    try:
        assert weights.download_gpt2("124M", tmp_path, timeout=10) == target
    finally:
        server.shutdown()
    for name, data in _Mirror.files.items():
        assert (target / name).read_bytes() == (b"kept" if name == "vocab.bpe" else data), name
    assert not list(target.glob("*.part"))
    assert ("a", "model.ckpt.index", 300) in _Mirror.ranges  # resumed the leftover .part
    assert ("b", "encoder.json", len(_Mirror.files["encoder.json"]) // 2) in _Mirror.ranges  # primary cut it off: backup resumed it
    assert ("b", "model.ckpt.meta", 0) in _Mirror.ranges  # primary lacks it
    assert not any(name == "vocab.bpe" for _, name, _ in _Mirror.ranges)


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--train-ratio", "1.5"], r"--train-ratio must be in \(0, 1\), got 1.5"),
])
def test_eval_gpt2_option_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        run_cli(["eval-gpt2", "124M", "--models-dir", "/nonexistent", *argv])
