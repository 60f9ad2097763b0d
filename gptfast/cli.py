"""The `gptfast` command line: one subcommand per workflow step, each with --help.

Each module in COMMANDS defines `add_parser(subparsers)`, which registers its subcommand
and sets `func` to the function that runs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# modules with subcommands, in the order of `gptfast --help`
COMMANDS = [
    "gptfast.data",      # prepare
    "gptfast.train",     # train
    "gptfast.generate",  # generate
    "gptfast.finetune.classify",  # finetune-classifier, classify
    "gptfast.finetune.instruct",  # finetune-instruct
    "gptfast.weights",   # download-gpt2, convert, eval-gpt2
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptfast", description="GPT-2 from scratch, fast: tokenize, train, generate, load GPT-2, fine-tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (CLIError, ValueError, OSError, RuntimeError) as e:  # OSError: e.g. an output path that is a directory
        print(f"gptfast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m gptfast.cli`: run the imported module, so that the CLIError the subcommand
    # modules raise (gptfast.cli.CLIError) is the class `main` catches, not __main__'s copy
    from gptfast import cli
    sys.exit(cli.main())
