"""Benchmarks collect as bench_*.py (`pytest benchmarks --benchmark-only`) and end with one table."""
import sys

import pytest

try:  # triton before anything that may pull in tensorflow (the reverse order aborts)
    import triton  # noqa: F401
except ImportError:
    pass

import kernel_bench  # noqa: E402  (this folder is on sys.path: conftest's rootdir insertion)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_terminal_summary(terminalreporter):
    if kernel_bench.RESULTS:
        terminalreporter.write_sep("=", "kernel benchmarks (median ms, CUDA events)")
        terminalreporter.write_line(kernel_bench.table(kernel_bench.RESULTS))
    train = sys.modules.get("bench_train")
    if train is not None and train.RESULTS:
        terminalreporter.write_sep("=", "gptfast table: training step (median of the rounds)")
        terminalreporter.write_line(train.table())
