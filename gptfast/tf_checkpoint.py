"""Read an OpenAI GPT-2 TensorFlow checkpoint without importing TensorFlow into this process.

Importing `tensorflow` and then `triton` in one process aborts it (LLVM: "Option
'bitcode-mdindex-threshold' registered more than once"). So TensorFlow only ever runs in a
child process: this file, run as a script, opens the checkpoint with TensorFlow's reader and
writes each variable to its own .npy file; the parent memory-maps them. The child holds one
variable at a time, so even the 1558M model needs little memory.

This file must stay importable without gptfast or torch: the child runs it by path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

INDEX = "index.json"  # {variable name: .npy file name}
TF_MISSING = ("reading an OpenAI TensorFlow checkpoint needs TensorFlow, which is not installed; "
              "run `pip install gptfast[tf]` (or `pip install tensorflow-cpu`), or load a Hugging Face "
              "GPT-2 directory (model.safetensors) instead")


def read_tf_checkpoint(ckpt_dir: str | Path) -> dict[str, np.ndarray]:
    """Every variable of the checkpoint in `ckpt_dir`, as memory-mapped float arrays.

    Runs TensorFlow in a child process; the arrays live in a temporary directory (under
    $TMPDIR) that stays valid while they are referenced (the files are unlinked at once on
    POSIX, so nothing is left behind)."""
    ckpt_dir = Path(ckpt_dir)
    with tempfile.TemporaryDirectory(prefix="gptfast-tf-") as out:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")  # TF stays quiet, off the GPU
        proc = subprocess.run([sys.executable, __file__, str(ckpt_dir), out],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
            raise RuntimeError(lines[-1] if lines else f"reading {ckpt_dir} failed (exit {proc.returncode})")
        index = json.loads((Path(out) / INDEX).read_text())
        # mmap keeps the data readable after the directory is removed (POSIX unlink semantics);
        # on Windows, removal would fail, so read into memory there.
        mode = "r" if os.name == "posix" else None
        return {name: np.load(Path(out) / fname, mmap_mode=mode) for name, fname in index.items()}


def _dump(ckpt_dir: str, out: str) -> None:
    """Child side: TensorFlow's checkpoint reader -> one .npy file per variable."""
    try:
        import tensorflow as tf
    except ImportError:
        sys.exit(TF_MISSING)
    path = tf.train.latest_checkpoint(ckpt_dir)
    if path is None and Path(ckpt_dir, "model.ckpt.index").is_file():  # no 'checkpoint' file: OpenAI's name
        path = str(Path(ckpt_dir, "model.ckpt"))
    if path is None:
        sys.exit(f"{ckpt_dir}: no TensorFlow checkpoint (model.ckpt.index is missing)")
    try:
        reader = tf.train.load_checkpoint(path)
        names = [name for name, _ in tf.train.list_variables(path)]
    except Exception as e:  # truncated or corrupt files: one line, naming the checkpoint
        sys.exit(f"{path}: cannot read the TensorFlow checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})")
    index = {}
    for i, name in enumerate(names):
        fname = f"{i}.npy"
        np.save(Path(out) / fname, np.asarray(reader.get_tensor(name)))
        index[name] = fname
    (Path(out) / INDEX).write_text(json.dumps(index))


if __name__ == "__main__":
    _dump(sys.argv[1], sys.argv[2])
