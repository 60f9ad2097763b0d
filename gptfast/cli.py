"""The `gptfast` command line: one subcommand per workflow step, each with --help.

Each module in COMMANDS defines `add_parser(subparsers)`, which registers its subcommand
and sets `func` to the function that runs it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from importlib import metadata

# modules with subcommands, in the order of `gptfast --help`
COMMANDS = [
    "gptfast.data",      # prepare
    "gptfast.train",     # train
    "gptfast.generate",  # generate
    "gptfast.serve",     # serve
    "gptfast.finetune.classify",  # finetune-classifier, classify
    "gptfast.finetune.instruct",  # finetune-instruct
    "gptfast.weights",   # download-gpt2, convert, eval-gpt2
]


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "not installed"


def environment() -> dict[str, str]:
    """What `gptfast info` prints: versions, the device, and which fast paths run here.
    TensorFlow is looked up, never imported (importing it before triton would abort)."""
    import torch

    from . import cpu_decode, cpu_linear, sampling
    from .backends import resolve_device, triton_interpreting
    from .model import choose_backend, triton_modules

    device = resolve_device(None)
    _, why = triton_modules()
    if device.type != "cuda" and not triton_interpreting():
        why = why or "needs a CUDA GPU (or TRITON_INTERPRET=1 for the interpreter)"
    c_kernels = ", ".join(d for d in ("cpu", "cuda") if sampling.has_kernel(d)) or "none"
    return {
        "gptfast": _version("gptfast"),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "triton": _version("triton"),
        "tiktoken": _version("tiktoken"),
        "transformers": _version("transformers"),
        "tensorflow": _version("tensorflow", "tensorflow-cpu"),
        "device": (f"{device} {torch.cuda.get_device_name(device)}" if device.type == "cuda"
                   else f"cpu ({os.cpu_count()} cores), no CUDA GPU"),
        "backend auto": choose_backend("auto", device)[0],
        "triton kernels": "usable" if why is None else f"not used: {why}",
        "gptfast._C sample_top_k": f"kernels for {c_kernels}" + (f" ({sampling._C_ERROR})" if sampling._C_ERROR else ""),
        "gptfast._C CPU decode": (f"fused step, matmul paths {', '.join(cpu_linear.kernel_paths())}, "
                                  f"{torch.get_num_threads()} threads" if cpu_decode.has_kernel() else
                                  "not built: the model's forward, weights dequantised per call"),
    }


def _cmd_info(args) -> None:
    for key, value in environment().items():
        print(f"{key + ':':<25}{value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfast", description="GPT-2 from scratch, fast: tokenize, train, generate, load GPT-2, fine-tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    info = sub.add_parser("info", help="versions, device, and which fast paths (backend, kernels, _C) run here",
                          description="Print what a bug report needs: versions, the device, the backend "
                          "'auto' picks, whether the Triton kernels and gptfast._C's kernels are usable.")
    info.set_defaults(func=_cmd_info)
    return parser


# `gptfast serve`: libgomp's idle threads spin ~300,000 rounds (about a millisecond here) before
# they sleep, on the cores the server's event loop and its clients need between decode steps. At
# 10,000 they still bridge the gaps between a step's parallel regions: 16 streaming clients got
# 1.07-1.13x the tokens/s of the default (two alternating pairs), one client the same. libgomp
# reads it once, when torch loads it, so it is set before anything imports torch; a value already
# in the environment stays.
SERVE_SPINCOUNT = "10000"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"] and "torch" not in sys.modules:
        os.environ.setdefault("GOMP_SPINCOUNT", SERVE_SPINCOUNT)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as e:  # OSError: e.g. an output path that is a directory
        print(f"gptfast {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # e.g. 3: training diverged
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (train saves its checkpoint first)
        print(f"gptfast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
