"""Reading pretrained GPT-2 files: every format `gptfast.weights.load_gpt2` accepts is put in one
canonical layout, Hugging Face's names without the "transformer." prefix and Conv1D weights as
(in, out), and one mapping (`_to_gptfast`) then builds gptfast's state dict and config.

- OpenAI's TensorFlow checkpoint directory (hparams.json + model.ckpt.*): read by TensorFlow in
  a child process (gptfast.tf_checkpoint: TensorFlow and Triton in one process abort it);
- a Hugging Face GPT-2 directory or file (model.safetensors, or pytorch_model.bin loaded with
  weights_only=True), sized by its config.json or, without one, by its tensors;
- gptfast's converted directory (config.json with a "gptfast" entry + model.safetensors),
  memory-mapped.
Sizes from any config file are checked (positive integers, heads dividing the width) before use.
The way back out (save_gptfast, save_hf, to_hf_state_dict) is in gptfast.weights.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from .checkpoint import config_of
from .config import GPTConfig

WEIGHTS_FILE = "model.safetensors"
HF_NAMES = dict(vocab="vocab_size", ctx="n_positions", emb="n_embd", heads="n_head", layers="n_layer")
OPENAI_NAMES = dict(vocab="n_vocab", ctx="n_ctx", emb="n_embd", heads="n_head", layers="n_layer")
HF_BUFFERS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers, not weights


def read_pretrained(path: Path) -> tuple[GPTConfig, dict]:
    """(config, gptfast state dict) from any supported format at `path`."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    config = _read_json(directory / "config.json") if (directory / "config.json").is_file() else None
    if config is not None and "gptfast" in config:
        weights = path if path.is_file() else path / WEIGHTS_FILE
        return config_of({"config": config["gptfast"]}, directory / "config.json"), _read_safetensors(weights)
    if path.is_dir() and (path / "hparams.json").is_file():
        return _read_openai_tf(path)
    return _read_hf(path, config)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object of settings, got a {type(obj).__name__}")
    return obj


def _check_hparams(hp: dict, names: dict, where) -> dict:
    """Sizes read from a config file: positive integers (not "128", not 0), checked before use.
    `names`: our key -> the file's key, for the message."""
    for key, value in hp.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {names[key]} must be a positive integer, got {value!r}")
    if hp["emb"] % hp["heads"]:
        raise ValueError(f"{where}: {names['emb']}={hp['emb']} is not divisible by {names['heads']}={hp['heads']}")
    return hp


def _read_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path))  # memory-mapped
    except Exception as e:  # SafetensorError: truncated/corrupt header or data
        raise ValueError(f"{path}: cannot read the safetensors file ({e}); it may be truncated, "
                         "download or convert it again") from None


def _read_hf(path: Path, config: dict | None) -> tuple[GPTConfig, dict]:
    """A Hugging Face GPT-2 directory or weights file."""
    if path.is_dir():
        files = [path / WEIGHTS_FILE, path / "pytorch_model.bin"]
        found = [f for f in files if f.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no GPT-2 weights found (expected {WEIGHTS_FILE}, "
                                    "pytorch_model.bin, or OpenAI's hparams.json + model.ckpt.*)")
        if config is None:  # saves swap in whole folders: a folder without it is incomplete
            raise FileNotFoundError(f"{path}: config.json is missing (an interrupted save or convert?); "
                                    "write the model directory again")
        path = found[0]
    if path.suffix == ".safetensors":
        tensors = _read_safetensors(path)
    elif path.suffix == ".bin":
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)  # no mmap: old .bin files lack it
        except Exception as e:
            raise ValueError(f"{path}: cannot read the PyTorch weights ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None
    else:
        raise ValueError(f"{path}: unknown weights file type (expected .safetensors or .bin; a gptfast "
                         "training checkpoint loads with gptfast.checkpoint.load_model)")
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""
    source = {k.removeprefix(prefix): (k, v) for k, v in tensors.items() if not HF_BUFFERS.search(k)}
    hp = _hf_hparams(config, source, path)
    return _to_gptfast(source, hp, naming=lambda name: prefix + name if name != "lm_head.weight" else name,
                       where=str(path))


def _hf_hparams(config: dict | None, source: dict, where: Path) -> dict:
    """Sizes from config.json; without one, from the tensors (GPT-2 heads are 64 wide)."""
    if config is None:
        if "wte.weight" not in source or "wpe.weight" not in source:
            raise ValueError(f"{where}: no config.json beside it and no wte/wpe tensors to size it from")
        (V, C), (T, _) = source["wte.weight"][1].shape, source["wpe.weight"][1].shape
        layers = {int(m.group(1)) for k in source if (m := re.match(r"h\.(\d+)\.", k))}
        if C % 64:
            raise ValueError(f"{where}: no config.json beside it, and n_embd {C} is not a multiple of GPT-2's head "
                             "width 64 to count the heads by")
        return dict(vocab=V, ctx=T, emb=C, heads=C // 64, layers=len(layers))
    try:
        hp = dict(vocab=config["vocab_size"], ctx=config.get("n_positions", config.get("n_ctx")),
                  emb=config["n_embd"], heads=config["n_head"], layers=config["n_layer"])
    except KeyError as e:
        raise ValueError(f"{where.parent / 'config.json'}: no {e.args[0]} (not a GPT-2 config?)") from None
    _check_hparams(hp, HF_NAMES, where.parent / "config.json")
    checks = {  # GPT-2 features gptfast's model does not have
        "activation_function": (config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
                                "only GPT-2's tanh GELU (gelu_new) is supported"),
        "layer_norm_epsilon": (config.get("layer_norm_epsilon", 1e-5) == 1e-5, "only 1e-5 is supported"),
        "n_inner": (config.get("n_inner") in (None, 4 * hp["emb"]), "only 4 * n_embd is supported"),
        "scale_attn_by_inverse_layer_idx": (not config.get("scale_attn_by_inverse_layer_idx"), "not supported"),
        "model_type": (config.get("model_type", "gpt2") == "gpt2", "only gpt2 models load"),
    }
    for key, (ok, why) in checks.items():
        if not ok:
            raise ValueError(f"{where.parent / 'config.json'}: {key}={config.get(key)!r}: {why}")
    return hp


def _read_openai_tf(path: Path) -> tuple[GPTConfig, dict]:
    """OpenAI's TensorFlow checkpoint directory (TensorFlow runs in a child process)."""
    from .tf_checkpoint import read_tf_checkpoint

    hparams = _read_json(path / "hparams.json")
    try:
        hp = dict(vocab=hparams["n_vocab"], ctx=hparams["n_ctx"], emb=hparams["n_embd"],
                  heads=hparams["n_head"], layers=hparams["n_layer"])
    except KeyError as e:
        raise ValueError(f"{path / 'hparams.json'}: no {e.args[0]}") from None
    _check_hparams(hp, OPENAI_NAMES, path / "hparams.json")
    source = {}
    for name, array in read_tf_checkpoint(path).items():
        m = re.fullmatch(r"model/(?:h(\d+)/)?(.+)/([wbg])", name)
        if m is None:  # wte, wpe, or something foreign (reported by _to_gptfast)
            source[name.removeprefix("model/") + ".weight"] = (name, array)
            continue
        layer, module, kind = m.groups()
        if kind == "w" and array.ndim == 3 and array.shape[0] == 1:  # Conv1D stored as (1, in, out)
            array = array[0]
        canonical = f"{'' if layer is None else f'h.{layer}.'}{module.replace('/', '.')}.{'bias' if kind == 'b' else 'weight'}"
        source[canonical] = (name, array)
    return _to_gptfast(source, hp, naming=_openai_name, where=str(path))


def _openai_name(canonical: str) -> str:
    """h.1.mlp.c_fc.weight -> model/h1/mlp/c_fc/w (ln_*.weight -> .../g): for error messages."""
    parts = canonical.split(".")
    if parts[0] == "h":
        parts = [f"h{parts[1]}"] + parts[2:]
    module, kind = parts[:-1], parts[-1]
    if len(module) == 1 and module[0] in ("wte", "wpe"):
        return f"model/{module[0]}"
    letter = "b" if kind == "bias" else ("g" if module[-1].startswith("ln") else "w")
    return "model/" + "/".join(module + [letter])


def _to_gptfast(source: dict, hp: dict, naming, where: str) -> tuple[GPTConfig, dict]:
    """Canonical tensors {name: (original name, array)} -> (GPTConfig, gptfast state dict).

    Conv1D weights are (in, out); nn.Linear wants (out, in), hence the transposes. c_attn's
    columns are q|k|v, head-major within each, which is exactly the row order of our fused
    qkv, so its transpose *is* our qkv weight."""
    V, T, C, H, L = hp["vocab"], hp["ctx"], hp["emb"], hp["heads"], hp["layers"]  # checked by _check_hparams
    source = dict(source)

    def take(name, shape, transpose=False):
        if name not in source:
            raise ValueError(f"{where}: missing tensor {naming(name)}")
        original, value = source.pop(name)
        if tuple(value.shape) != shape:
            raise ValueError(f"{where}: tensor {original} has shape {tuple(value.shape)}, expected {shape}")
        tensor = torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value
        return tensor.t().contiguous() if transpose else tensor

    state = {"tok_emb.weight": take("wte.weight", (V, C)), "pos_emb.weight": take("wpe.weight", (T, C))}
    linears = {"att.qkv": ("attn.c_attn", C, 3 * C), "att.out_proj": ("attn.c_proj", C, C),
               "ff.layers.0": ("mlp.c_fc", C, 4 * C), "ff.layers.2": ("mlp.c_proj", 4 * C, C)}
    for i in range(L):
        ours, theirs = f"trf_blocks.{i}.", f"h.{i}."
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[ours + norm + ".scale"] = take(theirs + ln + ".weight", (C,))
            state[ours + norm + ".shift"] = take(theirs + ln + ".bias", (C,))
        for mine, (conv, n_in, n_out) in linears.items():
            state[ours + mine + ".weight"] = take(theirs + conv + ".weight", (n_in, n_out), transpose=True)
            state[ours + mine + ".bias"] = take(theirs + conv + ".bias", (n_out,))
    state["final_norm.scale"] = take("ln_f.weight", (C,))
    state["final_norm.shift"] = take("ln_f.bias", (C,))
    tied = True
    if "lm_head.weight" in source:  # usually omitted (tied); keep it only when it differs
        head = take("lm_head.weight", (V, C))
        tied = torch.equal(head, state["tok_emb.weight"])
        if not tied:
            state["out_head.weight"] = head
    if source:
        extra = sorted(orig for orig, _ in source.values())
        warnings.warn(f"{where}: ignoring {len(extra)} tensor(s) that are not GPT-2 weights: {', '.join(extra[:5])}",
                      RuntimeWarning, stacklevel=3)
    cfg = GPTConfig(vocab_size=V, context_length=T, emb_dim=C, n_heads=H, n_layers=L, drop_rate=0.0,
                    qkv_bias=True, tie_weights=tied)
    return cfg, state
