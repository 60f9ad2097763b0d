"""Build of gptfast: the Python package, the Triton kernels (as gptfast.kernels) and the
compiled extension gptfast._C (C++ always; CUDA when a toolkit and a CUDA torch exist).

Install with `pip install --no-build-isolation -e .` (build isolation would fetch a second torch).
GPTFAST_CUDA=0 skips the CUDA kernels, GPTFAST_CUDA=1 requires them (fails if impossible);
unset, they are built when possible and skipped with a warning otherwise.
"""
import os
import platform
import re
import subprocess
import sys

from setuptools import setup


def _say(msg):
    print(f"gptfast setup: {msg}", file=sys.stderr)


def _check_build_tools():
    """An old setuptools installs a broken editable gptfast (measured with pip 23.2): through
    `setup.py develop` (setuptools < 64, or < 80 run by hand) gptfast.kernels is not importable,
    and without a bdist_wheel (setuptools < 70.1 and no `wheel`) pip stops on a cryptic error.
    Either is one line here, saying what to do."""
    import importlib.util

    import setuptools

    version = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    if "develop" in sys.argv and version < (80, 0):
        why = "installs gptfast through `setup.py develop`, which cannot map kernels/ to gptfast.kernels"
    elif version < (70, 1) and importlib.util.find_spec("wheel") is None and \
            {"dist_info", "bdist_wheel", "editable_wheel"} & set(sys.argv):
        why = "cannot build a wheel without the `wheel` package"
    else:
        return
    raise SystemExit(f"gptfast setup: setuptools {setuptools.__version__} {why}; run `python -m pip install -U pip "
                     "setuptools wheel`, then `pip install --no-build-isolation -e .` again")


def _cuda_skip_reason(torch, cpp_extension):
    """Why the CUDA kernels cannot be built here, or None when they can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        return f"{nvcc} does not run ({e})"
    found = re.search(r"release (\d+)\.", out)
    if found and found.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc is CUDA {found.group(1)}.x but torch was built with CUDA {torch.version.cuda}"
    return None


def _extensions():
    """(ext_modules, cmdclass) for gptfast._C."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("WARNING: torch is not importable, skipping gptfast._C (pure-PyTorch sampling is used)")
        return [], {}
    # linear_avx2.cpp, linear_avx512.cpp and linear_amx.cpp carry their own target attributes (built
    # with the default flags, run only where the CPU has the features); elsewhere they compile to nothing
    sources = ["csrc/register.cpp", "csrc/sampling.cpp", "csrc/linear_cpu.cpp", "csrc/linear_avx2.cpp",
               "csrc/linear_avx512.cpp", "csrc/linear_amx.cpp", "csrc/decode_cpu.cpp"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    cpu_paths = "amx (Linux, GCC 11+ or clang 12+) + avx512 + avx2 + portable" if x86 else "portable"
    # at::parallel_for splits work over torch's threads only in code compiled with OpenMP (its
    # header falls back to a serial loop otherwise): without -fopenmp every kernel ran on one core.
    # libgomp.so.1 is the runtime torch itself loads, so there is one thread pool.
    openmp = ["-fopenmp"] if platform.system() == "Linux" else []
    # -fno-trapping-math (clang's default): loops with a clamp or a division may then vectorise
    # (decode_cpu.cpp's GELU and softmax); nothing here reads the floating-point exception flags
    flags = {"cxx": ["-O3", "-fno-trapping-math", *openmp]}
    cpu_paths += ", OpenMP threads" if openmp else ", one thread (no OpenMP on this platform)"
    wanted = os.environ.get("GPTFAST_CUDA", "")
    reason = "GPTFAST_CUDA=0" if wanted == "0" else _cuda_skip_reason(torch, cpp_extension)
    if reason is None:
        ext = cpp_extension.CUDAExtension(
            "gptfast._C", sources + ["csrc/sampling_cuda.cu"],
            # no -std here: torch appends the standard its headers need (an explicit one
            # would clash with it: nvcc warns and takes the last)
            extra_compile_args={**flags, "nvcc": ["-O3"]}, extra_link_args=openmp)
        _say(f"building gptfast._C with the C++ (CPU; linear paths: {cpu_paths}) and CUDA kernels")
    else:
        if wanted == "1":
            raise SystemExit(f"gptfast setup: GPTFAST_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        ext = cpp_extension.CppExtension("gptfast._C", sources, extra_compile_args=flags, extra_link_args=openmp)
        _say(f"building gptfast._C with the C++ (CPU; linear paths: {cpu_paths}) kernels only; WARNING: CUDA kernels skipped: {reason}")
    return [ext], {"build_ext": cpp_extension.BuildExtension}


_check_build_tools()
ext_modules, cmdclass = _extensions()

setup(
    name="gptfast",
    version="0.1.0",
    description="A GPT-2 engine with fused Triton kernels and a C++/CUDA top-k sampler",
    packages=["gptfast", "gptfast.finetune", "gptfast.kernels"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels"},
    package_data={"gptfast": ["assets/*"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.10",
    install_requires=["torch", "triton; platform_system == 'Linux'", "tiktoken", "numpy", "safetensors",
                      "tqdm", "matplotlib"],
    extras_require={
        # benchmarks only: the CTranslate2 peer of benchmarks/bench_generate.py
        "bench": ["ctranslate2", "transformers"],
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers", "openai", "httpx"],
        # uvicorn's [standard]: uvloop and httptools, which uvicorn picks up by itself (asyncio and the
        # pure-Python h11 otherwise): ~0.1 ms less of the event loop's CPU per streamed token
        "serve": ["fastapi", "uvicorn[standard]"],
        "tf": ["tensorflow-cpu; platform_machine == 'x86_64'", "tensorflow; platform_machine != 'x86_64'"],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
)
