"""Compile csrc/*.cu with nvcc for sm_80 and sm_90, so a CUDA syntax or type error fails CI
even on machines without a GPU (the kernels themselves are tested in test_sampling.py, gpu)."""
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

CSRC = Path(__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")
SOURCES = sorted(CSRC.glob("*.cu"))


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH: CUDA sources not compiled on this machine")
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    cmd = [NVCC, "-c", "--std=c++17", "--threads", "0", *COMMON_NVCC_FLAGS,  # the flags setup.py's build gets
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           # torch 2.13's headers use C++20 bit-field initializers; harmless warnings under C++17
           "-diag-suppress", "3306", "-Xcompiler", "-Wno-c++20-extensions",
           *(f"-I{p}" for p in include_paths()), str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source.name}:\n{proc.stderr[-4000:]}"
    assert (tmp_path / f"{source.stem}.o").stat().st_size > 0


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files under {CSRC}"
