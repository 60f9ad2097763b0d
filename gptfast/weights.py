"""Pretrained GPT-2: download OpenAI's checkpoints, load them (or Hugging Face's) into a
GPTModel, convert once to gptfast's own memory-mapped format, export back to Hugging Face;
the `download-gpt2`, `convert` and `eval-gpt2` commands.

`load_gpt2` reads OpenAI's TensorFlow checkpoint directory, a Hugging Face GPT-2 directory or
file, or gptfast's converted directory, each detected from the files themselves; reading the
formats and mapping them to gptfast's state dict is gptfast.gpt2_formats (`read_pretrained`).
"""
from __future__ import annotations

import http.client
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backends import BACKENDS, resolve_device
from .checkpoint import build_model
from .data import VERDICT, read_text
from .evaluation import evaluate_text_loss
from .files import atomic_dir
from .gpt2_formats import WEIGHTS_FILE, read_pretrained
from .model import GPTModel
from .quant import FLOAT_DTYPES

SIZES = ("124M", "355M", "774M", "1558M")
GPT2_FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
              "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
PRIMARY_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models/{size}/{file}"
BACKUP_URL = "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2/{size}/{file}"
DEFAULT_MODELS_DIR = "models"  # the same default as generate/finetune --models-dir
CONVERTED_SUFFIX = "-gptfast"  # `gptfast convert models/124M` writes models/124M-gptfast


# ---------------------------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------------------------

def download_gpt2(size: str, models_dir: str | Path = DEFAULT_MODELS_DIR, timeout: float = 60.0) -> Path:
    """Fetch OpenAI's GPT-2 `size` into models_dir/size and return that directory.

    Files already there are kept; a `.part` file left by an interrupted run is resumed with an
    HTTP Range request; every file is checked against the server's Content-Length. Each file
    comes from OpenAI's bucket, or from the backup mirror when that fails."""
    _check_size(size)
    target = Path(models_dir) / size
    target.mkdir(parents=True, exist_ok=True)
    for name in GPT2_FILES:
        if (target / name).is_file():
            continue
        errors = []
        for template in (PRIMARY_URL, BACKUP_URL):
            url = template.format(size=size, file=name)
            try:
                _fetch(url, target / name, timeout)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, short reads
                errors.append(f"{url} ({e})")
        else:
            raise RuntimeError(
                f"could not download GPT-2 {size} file {name!r}: " + "; ".join(errors) +
                f". Place the files by hand: download {', '.join(GPT2_FILES)} from "
                f"{PRIMARY_URL.format(size=size, file='<file>')} into {target}/, then run again")
    return target


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download `url` to `dest` via dest.part, resuming it; rename only once complete."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        part.unlink()  # 416: the range starts past the end (a stale .part); start over
        return _fetch(url, dest, timeout)
    with resp:
        if have and resp.status != 206:  # the server ignored the range: start over
            have = 0
        if resp.status == 206:  # Content-Range: bytes START-END/TOTAL
            total = int(resp.headers["Content-Range"].rsplit("/", 1)[1])
        else:
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"{dest.parent.name}/{dest.name}") as bar:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got != total:  # the .part stays: the next run resumes it
        raise OSError(f"incomplete download: {got} of {total} bytes")
    part.replace(dest)


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose from {', '.join(SIZES)}")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_gpt2(path_or_size: str | Path, models_dir: str | Path | None = None, backend: str = "auto",
              dtype: torch.dtype | str | None = None, device=None) -> GPTModel:
    """A GPTModel (eval mode) from pretrained GPT-2 weights.

    `path_or_size`: "124M"/"355M"/"774M"/"1558M" (looked up in `models_dir`, default
    ./models: the converted models_dir/SIZE-gptfast first, else OpenAI's models_dir/SIZE), or
    a path to any format in gptfast.gpt2_formats' docstring. `dtype` (e.g. torch.bfloat16 or
    "bfloat16") casts the weights; `device` moves the model there."""
    path = resolve_gpt2_path(path_or_size, models_dir)
    cfg, state = read_pretrained(path)
    return build_model(cfg, state, backend=backend, dtype=dtype, device=device, source=str(path))


def resolve_gpt2_path(path_or_size: str | Path, models_dir: str | Path | None = None) -> Path:
    """The files behind a size name or a path; errors say how to get them."""
    name = str(path_or_size)
    if name in SIZES:
        root = Path(models_dir or DEFAULT_MODELS_DIR)
        converted, openai = root / (name + CONVERTED_SUFFIX), root / name
        # a converted folder without config.json is incomplete (an older version's interrupted
        # convert, or a copy), used only when nothing else is there (the loader says what is wrong)
        if (converted / "config.json").is_file() or (converted.exists() and not openai.exists()):
            return converted
        if openai.exists():
            return openai
        raise FileNotFoundError(f"GPT-2 {name} is not in {root}/: run `gptfast download-gpt2 {name} "
                                f"--models-dir {root}` (or place OpenAI's files in {root / name}/)")
    path = Path(path_or_size)
    if not path.exists():
        if re.fullmatch(r"\d+M", name):
            _check_size(name)
        raise FileNotFoundError(f"{path} does not exist (expected a GPT-2 size {', '.join(SIZES)}, "
                                "an OpenAI checkpoint directory, a Hugging Face directory or file, "
                                "or a `gptfast convert` directory)")
    return path

# ---------------------------------------------------------------------------------------------
# Saving: gptfast's format and Hugging Face's
# ---------------------------------------------------------------------------------------------

def _write_model_dir(out_dir: str | Path, tensors: dict, config: dict) -> Path:
    """model.safetensors and config.json, written into a new folder that then takes out_dir's
    place (gptfast.files.atomic_dir): a failed save (a full disk) leaves a previous model intact."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir) as new:
        # clone: safetensors refuses views and shared storage; "pt" is what transformers expects
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(new / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        (new / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out_dir)


def plain_state_dict(model: GPTModel, what: str) -> tuple[dict, bool]:
    """(The model's GPT-2 state dict with LoRA adapters merged, whether its head is still tied
    to the embedding: an adapter on out_head unties it). Anything else that differs from a
    plain GPTModel of its config (e.g. a classifier head) is an error naming the tensor."""
    if any(".lora_" in k for k in model.state_dict()):
        from .lora import merged_state_dict

        state = merged_state_dict(model)
    else:
        state = model.state_dict()
    with torch.device("meta"):
        expected = GPTModel(model.cfg).state_dict()
    for name in sorted(set(state) | set(expected)):
        got = tuple(state[name].shape) if name in state else None
        want = tuple(expected[name].shape) if name in expected else None
        if got != want:
            raise ValueError(f"{what}: the model's {name} is {got or 'missing'} where a GPT-2 language model has "
                             f"{want or 'nothing'} (a replaced head, e.g. a classifier, cannot be exported)")
    return state, model.cfg.tie_weights and torch.equal(state["out_head.weight"], state["tok_emb.weight"])


def save_gptfast(model: GPTModel, out_dir: str | Path, dtype=None) -> Path:
    """gptfast's own format: config.json {"gptfast": config} + model.safetensors in gptfast's
    layout (a tied head is stored once). `load_gpt2(out_dir)` memory-maps it back."""
    state, tied = plain_state_dict(model, "save_gptfast")
    if tied:
        state.pop("out_head.weight")
    if dtype is not None:
        state = {k: v.to(FLOAT_DTYPES[dtype] if isinstance(dtype, str) else dtype) for k, v in state.items()}
    return _write_model_dir(out_dir, state, {"gptfast": dict(model.cfg.to_dict(), tie_weights=tied)})


def to_hf_state_dict(model: GPTModel, what: str = "to_hf_state_dict") -> tuple[dict, dict]:
    """(GPT2LMHeadModel state dict, its config.json as a dict) holding `model`'s weights.

    LoRA adapters are merged in (the model itself is left as it is). Padded vocabulary rows
    are cut off; a model without qkv bias gets zero biases (the same function); an untied head
    is lm_head.weight with tie_word_embeddings false (a tied one is left out, as transformers
    saves it). `what` names the caller in errors."""
    cfg, (state, tied) = model.cfg, plain_state_dict(model, what)
    V, C = cfg.vocab_size, cfg.emb_dim
    t = {"transformer.wte.weight": state["tok_emb.weight"][:V], "transformer.wpe.weight": state["pos_emb.weight"]}
    convs = {"attn.c_attn": "att.qkv", "attn.c_proj": "att.out_proj", "mlp.c_fc": "ff.layers.0", "mlp.c_proj": "ff.layers.2"}
    for i in range(cfg.n_layers):
        theirs, ours = f"transformer.h.{i}.", f"trf_blocks.{i}."
        for ln, norm in (("ln_1", "norm1"), ("ln_2", "norm2")):
            t[theirs + ln + ".weight"] = state[ours + norm + ".scale"]
            t[theirs + ln + ".bias"] = state[ours + norm + ".shift"]
        for conv, mine in convs.items():
            weight = state[ours + mine + ".weight"]
            t[theirs + conv + ".weight"] = weight.t()  # (in, out): Conv1D
            bias = state.get(ours + mine + ".bias")
            t[theirs + conv + ".bias"] = bias if bias is not None else weight.new_zeros(weight.shape[0])
    t["transformer.ln_f.weight"] = state["final_norm.scale"]
    t["transformer.ln_f.bias"] = state["final_norm.shift"]
    if not tied:
        t["lm_head.weight"] = state["out_head.weight"][:V]
    config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": V,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": C,
        "n_head": cfg.n_heads, "n_layer": cfg.n_layers, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate, "initializer_range": 0.02, "scale_attn_weights": True,
        "tie_word_embeddings": tied, "bos_token_id": 50256, "eos_token_id": 50256,
    }
    return t, config


def save_hf(model: GPTModel, out_dir: str | Path) -> Path:
    """A directory transformers loads with GPT2LMHeadModel.from_pretrained(out_dir); the
    weights are to_hf_state_dict's."""
    return _write_model_dir(out_dir, *to_hf_state_dict(model, "save_hf"))


def load_any(path: str | Path, models_dir=None, backend: str = "auto", device=None, preset=None) -> GPTModel:
    """load_gpt2's formats, plus a torch file: a gptfast checkpoint or a classic state dict
    (sized by `preset` or by its tensors: gptfast.checkpoint.load_checkpoint)."""
    p = Path(path)
    if p.is_file() and p.suffix not in (".safetensors", ".bin"):
        from .checkpoint import load_model

        return load_model(p, backend=backend, device=device, preset=preset)
    return load_gpt2(path, models_dir, backend=backend, device=device)


def load_source(checkpoint=None, gpt2=None, models_dir=None, backend: str = "auto", device=None,
                preset=None) -> GPTModel:
    """The model of a command's `--checkpoint PATH` or `--gpt2 SIZE_OR_PATH`: a checkpoint is a
    path (a missing one is "does not exist", not a list of GPT-2 sizes); --gpt2 takes either."""
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
    return load_any(checkpoint if checkpoint is not None else gpt2, models_dir, backend, device, preset)


def convert(src: str | Path, out: str | Path | None = None, to_hf: bool = False, models_dir=None,
            dtype: str | None = None) -> Path:
    """Any loadable source -> gptfast's format (default: beside it, named SRC-gptfast) or,
    with `to_hf`, a Hugging Face directory (default SRC-hf)."""
    if to_hf and dtype is not None:
        raise ValueError("--dtype applies to the gptfast format only (Hugging Face export keeps the model's dtype)")
    src_path = resolve_gpt2_path(src, models_dir)
    if out is None:
        base = src_path.with_name(src_path.name.removesuffix(CONVERTED_SUFFIX))
        out = base.with_name((base.stem if base.is_file() else base.name) + ("-hf" if to_hf else CONVERTED_SUFFIX))
    if Path(out).resolve() == src_path.resolve():
        raise ValueError(f"{src_path} is already in gptfast's format (converting would overwrite it)")
    model = load_any(src_path, backend="reference")
    return save_hf(model, out) if to_hf else save_gptfast(model, out, dtype)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def _cmd_download(args) -> None:
    print(f"GPT-2 {args.size} is in {download_gpt2(args.size, args.models_dir)}")


def _cmd_convert(args) -> None:
    out = convert(args.src, args.out, to_hf=args.to_hf, models_dir=args.models_dir, dtype=args.dtype)
    kind = "Hugging Face GPT-2" if args.to_hf else "gptfast"
    print(f"wrote the {kind} model to {out}")


def _cmd_eval(args) -> None:
    for name in ("context_length", "stride", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.train_ratio < 1:
        raise ValueError(f"--train-ratio must be in (0, 1), got {args.train_ratio}")
    model = load_any(args.model, args.models_dir, backend=args.backend, device=resolve_device(args.device))
    text = read_text(args.text or VERDICT)
    train, val = evaluate_text_loss(model, text, args.context_length, args.stride, args.train_ratio, args.batch_size)
    print(f"train loss {train:.4f}   val loss {val:.4f}")


def add_parser(subparsers) -> None:
    models_help = f"directory holding SIZE/ folders (default ./{DEFAULT_MODELS_DIR})"
    p = subparsers.add_parser("download-gpt2", help="download OpenAI's pretrained GPT-2 weights",
                              description="Download OpenAI's GPT-2 checkpoint (7 files) into MODELS_DIR/SIZE, "
                                          "resuming partial downloads and checking sizes.")
    p.add_argument("size", choices=SIZES, help="model size")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=models_help)
    p.set_defaults(func=_cmd_download)

    p = subparsers.add_parser("convert", help="convert GPT-2 weights to gptfast's fast format or to Hugging Face",
                              description="Convert an OpenAI TensorFlow checkpoint dir, a Hugging Face GPT-2 "
                                          "dir/file, a size name or a gptfast training checkpoint into gptfast's "
                                          "memory-mapped safetensors format (loads in seconds), or with --to-hf "
                                          "into a directory transformers loads.")
    p.add_argument("src", help="a size (124M, ...), a directory or a file")
    p.add_argument("--out", help="output directory (default: beside SRC, named SRC-gptfast or SRC-hf)")
    p.add_argument("--to-hf", action="store_true", help="write a Hugging Face GPT-2 directory instead")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, help="store the weights in this dtype (gptfast format only)")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=models_help)
    p.set_defaults(func=_cmd_convert)

    p = subparsers.add_parser("eval-gpt2", help="train/val loss of a model on a text (default The Verdict)",
                              description="Mean next-token loss on the text's first TRAIN_RATIO (train) and the "
                                          "rest (val). OpenAI's GPT-2 124M gives about 3.75 / 3.56 on The Verdict.")
    p.add_argument("model", help="a size (124M, ...), a model directory/file or a gptfast checkpoint")
    p.add_argument("--models-dir", default=DEFAULT_MODELS_DIR, help=models_help)
    p.add_argument("--text", help="UTF-8 text file (default: the bundled the-verdict.txt)")
    p.add_argument("--context-length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--stride", type=int, default=256, help="tokens between windows (default 256)")
    p.add_argument("--train-ratio", type=float, default=0.9, help="character split (default 0.9)")
    p.add_argument("--batch-size", type=int, default=8, help="at most this many windows per forward pass (default 8)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernel backend (default auto)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=_cmd_eval)
