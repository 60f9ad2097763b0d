"""Test set-up: Triton's interpreter on CPU-only machines, and a safe import order."""
import os

import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be set
# before any kernel is defined, so it goes here, ahead of every gptfast import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist: share the cores between workers. Two workers x two OpenMP threads on a
# 2-core machine oversubscribe, and OpenMP's spin-waiting makes that many times slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for the subprocesses tests start
    torch.set_num_threads(threads)

try:  # triton before tensorflow: the reverse order aborts the process (LLVM option clash)
    import triton  # noqa: F401
except ImportError:
    pass

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def two_threads():
    """torch's CPU threads at 2 for one test (xdist workers run with 1 each): the C++ kernels'
    splits over threads only run with more than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
