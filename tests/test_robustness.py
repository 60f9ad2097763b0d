"""Bad input and injected faults (issue 13): one-line errors instead of tracebacks, absurd sizes
refused before allocating, a full disk that damages nothing, orphaned temporaries cleaned,
permissions as a plain open() gives them."""
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gptfast import GPTConfig, GPTModel
from gptfast import cli, model as model_module, weights
from gptfast.checkpoint import atomic_save, load_checkpoint, load_model, save_checkpoint
from gptfast.data import TokenFileLoader, prepare, read_text
from gptfast.files import atomic_file, remove_orphaned_temporaries

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(vocab_size=120, context_length=16, emb_dim=32, n_heads=2, n_layers=2)


def small(**kw):
    torch.manual_seed(0)
    return GPTModel(GPTConfig(**{**SMALL, **kw}))


def run(argv, capsys):
    """(exit status, stderr) of the CLI; the error must be one line."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [l for l in err.splitlines() if "Warning" not in l]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- 13.5: tracebacks -> one-line errors ---------------------------------------------------

def test_zero_byte_checkpoint_is_one_line_everywhere(tmp_path, capsys):
    empty = tmp_path / "empty.pt"
    empty.touch()
    with pytest.raises(RuntimeError, match=r"empty \(0 bytes\)"):
        load_checkpoint(empty)
    for argv in (["generate", "--checkpoint", str(empty)],
                 ["convert", str(empty), "--out", str(tmp_path / "out")],
                 ["classify", "--classifier", str(empty), "some text"],
                 ["finetune-classifier", "--checkpoint", str(empty), "--out", str(tmp_path / "c.pt")],
                 ["train", "--preset", "tiny", "--resume", str(empty), "--out", str(tmp_path / "run")]):
        assert_one_line_error(*run(argv, capsys), str(empty), "empty")


def test_folder_given_as_a_file_says_so(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    for call in (lambda: load_checkpoint(folder), lambda: read_text(folder),
                 lambda: TokenFileLoader(folder, 1, 4), lambda: prepare([folder], tmp_path / "p")):
        with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
            call()
    for argv in (["train", "--preset", "tiny", "--data", str(folder), "--out", str(tmp_path / "r")],
                 ["train", "--preset", "tiny", "--resume", str(folder), "--out", str(tmp_path / "r")]):
        assert_one_line_error(*run(argv, capsys), "is a folder")


@pytest.mark.parametrize("config, message", [
    ([1, 2], "must be a dict of GPTConfig fields, got list"),
    (5, "must be a dict of GPTConfig fields, got int"),
    (dict(SMALL, emb_dim="128"), "emb_dim must be a positive integer, got '128'"),
    (dict(SMALL, n_heads=2.0), "n_heads must be a positive integer, got 2.0"),
    (dict(SMALL, qkv_bias="yes"), "qkv_bias must be true or false"),
    (dict(SMALL, drop_rate=None), "drop_rate must be a number in [0, 1)"),
])
def test_bad_checkpoint_config_is_one_line(tmp_path, config, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        GPTConfig.from_dict(config)
    path = tmp_path / "ck.pt"
    torch.save({"config": config, "model": small().state_dict()}, path)
    with pytest.raises(ValueError, match=f"{path}: bad model config"):
        load_model(path)


def test_model_entry_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "ck.pt"
    for model_entry, message in ((torch.zeros(3), "'model' must be a state dict"),
                                 ({"tok_emb.weight": 3}, "model entry 'tok_emb.weight' is a int, not a tensor")):
        torch.save({"config": GPTConfig(**SMALL).to_dict(), "model": model_entry}, path)
        with pytest.raises(ValueError, match=message):
            load_model(path)
    torch.save([1, 2], path)
    with pytest.raises(RuntimeError, match=r"neither a gptfast checkpoint .* \(it holds a list\)"):
        load_model(path)


@pytest.mark.parametrize("change, message", [
    (dict(n_head=0), "n_head must be a positive integer, got 0"),
    (dict(n_embd="64"), "n_embd must be a positive integer, got '64'"),
    (dict(n_head=3), "n_embd=64 is not divisible by n_head=3"),
])
def test_bad_hugging_face_config(tmp_path, change, message):
    from safetensors.torch import save_file

    save_file({"wte.weight": torch.zeros(10, 64)}, tmp_path / "model.safetensors")
    config = dict(model_type="gpt2", vocab_size=10, n_positions=8, n_embd=64, n_head=2, n_layer=1)
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=f"config.json: {message}"):
        weights.load_gpt2(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json: expected a JSON object of settings, got a list"):
        weights.load_gpt2(tmp_path)


DISK_FULL = """
import resource, signal, sys, torch
from gptfast import GPTConfig, GPTModel
from gptfast.checkpoint import save_checkpoint
from gptfast.weights import save_gptfast
torch.manual_seed(0)
model = GPTModel(GPTConfig(vocab_size=120, context_length=16, emb_dim=32, n_heads=2, n_layers=2))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) like one on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
try:
    save_checkpoint(sys.argv[1], model) if sys.argv[2] == "checkpoint" else save_gptfast(model, sys.argv[1])
except OSError as e:
    print(e)
    sys.exit(2)
"""


@pytest.mark.parametrize("kind", ["checkpoint", "convert"])
def test_full_disk_is_one_line_and_keeps_the_previous_file(tmp_path, kind):
    """13.5 + 13.7: a write that runs out of space names the path, and what was there before
    (a checkpoint, a converted folder with its config.json) is intact."""
    target = tmp_path / ("ck.pt" if kind == "checkpoint" else "124M-gptfast")
    tiny = small(n_layers=1, emb_dim=8, vocab_size=20, n_heads=1)
    save_checkpoint(target, tiny) if kind == "checkpoint" else weights.save_gptfast(tiny, target)
    before = {p.name: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())}
    proc = subprocess.run([sys.executable, "-c", DISK_FULL, str(target), kind], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert line.startswith(f"disk full / cannot write {target}") and "\n" not in line, line
    after = {p.name: p.read_bytes() for p in ([target] if target.is_file() else target.iterdir())}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name], "a temporary was left"
    model = load_model(target) if kind == "checkpoint" else weights.load_gpt2(target)
    assert model.cfg.emb_dim == 8


# ---- 13.6: absurd sizes are refused before anything is allocated -------------------------

@pytest.fixture
def no_blocks(monkeypatch):
    """Call it to fail the test as soon as a transformer block is built (on any device)."""
    def refuse(*a, **k):
        raise AssertionError("a transformer block was built before the config was checked")
    return lambda: monkeypatch.setattr(model_module.TransformerBlock, "__init__", refuse)


def test_huge_config_in_a_checkpoint_is_refused_before_building(tmp_path, no_blocks):
    state = small().state_dict()
    no_blocks()
    for n_layers, message in ((10**6, "makes a model of .* GiB, more than the .* GiB of memory"),
                              (2 * 10**4, "has n_layers=20000 but the weights hold 2 layers")):
        path = tmp_path / f"ck{n_layers}.pt"
        torch.save({"config": dict(GPTConfig(**SMALL).to_dict(), n_layers=n_layers, emb_dim=32 if n_layers < 10**6
                                   else 4096, n_heads=2), "model": state}, path)
        with pytest.raises(ValueError, match=message):
            load_model(path)


def test_huge_config_json_is_refused_before_building(tmp_path, no_blocks):
    from safetensors.torch import save_file

    no_blocks()
    save_file({"tok_emb.weight": torch.zeros(120, 32)}, tmp_path / "model.safetensors")
    cfg = dict(GPTConfig(**SMALL).to_dict(), n_layers=10**6, emb_dim=4096)
    (tmp_path / "config.json").write_text(json.dumps({"gptfast": cfg}))
    with pytest.raises(ValueError, match="more than the .* GiB of memory"):
        weights.load_gpt2(tmp_path)


# ---- 13.8 / 13.9: temporaries and permissions ------------------------------------------------

def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_orphaned_temporaries_are_removed_on_the_next_save_and_load(tmp_path):
    import socket

    host = socket.gethostname()
    path = tmp_path / "checkpoint.pt"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def orphans():
            names = {f"checkpoint.pt.abcd1234.{_dead_pid()}-{host}.tmp",  # killed mid-save
                     "checkpoint.pt.x8k2_q0a.tmp"}  # an older version's mkstemp name
            for n in names:
                (tmp_path / n).write_bytes(b"half")
            return names
        others = {f"checkpoint.pt.ffff0000.{live.pid}-{host}.tmp",  # another process saving right now
                  "checkpoint.pt.notes.txt", "other.pt.x8k2_q0a.tmp"}
        for n in others:
            (tmp_path / n).write_bytes(b"keep")
        orphans()
        save_checkpoint(path, small())  # a save cleans up
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others | {"checkpoint.pt"})
        orphans()
        load_checkpoint(path)  # and so does a load (train --resume)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others | {"checkpoint.pt"})
    finally:
        live.kill()
        live.wait()


def test_prepare_cleans_orphans_and_refuses_empty_files(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Every effort moves you. " * 20)
    out = tmp_path / "tokens"
    out.mkdir()
    orphan = out / f"train.bin.abcd1234.{_dead_pid()}-{__import__('socket').gethostname()}.tmp"
    orphan.write_bytes(b"half")
    prepare([text], out)
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]
    for content in ("", "  \n\t\n"):
        blank = tmp_path / "blank.txt"
        blank.write_text(content)
        with pytest.raises(ValueError, match=f"text file {blank} is empty"):
            prepare([text, blank], tmp_path / "never")
        with pytest.raises(ValueError, match="is empty"):  # train --data refuses it too
            read_text(blank)
    assert not (tmp_path / "never").exists() or not any((tmp_path / "never").iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_plain_open_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        with atomic_file(tmp_path / "atomic") as tmp:
            tmp.write_text("x")
        atomic_save({"a": 1}, tmp_path / "saved.pt")
        weights.save_gptfast(small(n_layers=1), tmp_path / "model")
        plain_mode = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
        os.mkdir(tmp_path / "plain_dir")
        dir_mode = stat.S_IMODE((tmp_path / "plain_dir").stat().st_mode)
    finally:
        os.umask(old)
    assert plain_mode == 0o666 & ~umask
    for path in (tmp_path / "atomic", tmp_path / "saved.pt", tmp_path / "model" / "config.json",
                 tmp_path / "model" / "model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == plain_mode, path
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == dir_mode
    # a replaced file keeps its own mode, as open(path, "w") would
    os.chmod(tmp_path / "atomic", 0o640)
    with atomic_file(tmp_path / "atomic") as tmp:
        tmp.write_text("y")
    assert stat.S_IMODE((tmp_path / "atomic").stat().st_mode) == 0o640


def test_convert_again_keeps_other_files_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "m"
    weights.save_gptfast(small(n_layers=1), out)
    (out / "README.md").write_text("mine")
    weights.save_gptfast(small(n_layers=2), out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (out / "README.md").read_text() == "mine"
    assert weights.load_gpt2(out).cfg.n_layers == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        weights.save_gptfast(small(n_layers=1), tmp_path / "file")
    assert remove_orphaned_temporaries(out) == []


# ---- --gpt2 takes a size or a path; --checkpoint a path -------------------------------------

def test_checkpoint_option_missing_file_and_gpt2_path(tmp_path, capsys):
    for argv in (["generate", "--checkpoint", str(tmp_path / "nope.pt")],
                 ["finetune-classifier", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "c.pt")]):
        code, err = run(argv, capsys)
        assert_one_line_error(code, err, f"checkpoint {tmp_path / 'nope.pt'} does not exist")
        assert "124M" not in err
    weights.save_gptfast(small(n_layers=1), tmp_path / "fast")
    from gptfast.finetune import add_model_args, load_base_model
    import argparse
    p = argparse.ArgumentParser()
    add_model_args(p)
    args = p.parse_args(["--gpt2", str(tmp_path / "fast"), "--device", "cpu"])
    assert load_base_model(args).cfg.n_layers == 1


# ---- LoRA: bad settings change nothing ------------------------------------------------------

@pytest.mark.parametrize("rank, alpha, message", [
    (0, 1.0, "rank must be an integer >= 1, got 0"), (1.7, 1.0, "got 1.7"), (True, 1.0, "got True"),
    (2, float("inf"), "alpha must be a finite number > 0, got inf"), (2, float("nan"), "got nan"), (2, 0, "got 0"),
])
def test_apply_lora_bad_settings_leave_the_model_as_it_was(rank, alpha, message):
    from gptfast.lora import apply_lora, lora_layers

    model = small()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        apply_lora(model, rank, alpha)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and all(before.values())
    assert not lora_layers(model)
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_lora(model, 2, 2.0, targets=["nothing"])
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_lora left the model frozen"


# ---- 13.12: an old pip/setuptools installs a working package or says what to do --------------

def _setup_function(name):
    """A function of setup.py, without running setup.py (which would build and install)."""
    import ast

    body = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8")).body
    kept = [n for n in body if isinstance(n, ast.Import) or isinstance(n, ast.FunctionDef) and n.name == name]
    namespace = {}
    exec(compile(ast.Module(kept, []), "setup.py", "exec"), namespace)
    return namespace[name]


@pytest.mark.parametrize("version, argv, has_wheel, message", [
    ("65.5.0", ["setup.py", "develop"], True, "cannot map kernels/ to gptfast.kernels"),  # pip 23.2's venv
    ("79.0.0", ["setup.py", "develop"], True, "cannot map kernels/ to gptfast.kernels"),  # develop by hand
    ("68.0.0", ["setup.py", "dist_info"], False, "cannot build a wheel without the `wheel` package"),
    ("80.9.0", ["setup.py", "develop"], False, None),
    ("70.1.0", ["setup.py", "editable_wheel"], False, None),
])
def test_old_build_tools_are_one_line_saying_what_to_do(monkeypatch, version, argv, has_wheel, message):
    """With pip 23.2's setuptools the editable install could not import gptfast.kernels/_C, silently."""
    import importlib.util
    import tomllib

    import setuptools

    build = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["build-system"]
    assert build["build-backend"] == "setuptools.build_meta"  # pip then builds an editable wheel (PEP 660)
    check = _setup_function("_check_build_tools")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(setuptools, "__version__", version)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (real_find_spec(name, *a) if name != "wheel" or has_wheel else None))
    if message is None:
        assert check() is None
        return
    with pytest.raises(SystemExit) as e:
        check()
    text = str(e.value)
    assert message in text and "pip install -U pip setuptools wheel" in text and "\n" not in text, text
