"""Build of gptfast: the Python package, the Triton kernels (as gptfast.kernels) and the
compiled extension gptfast._C (C++ always; CUDA when a toolkit and a CUDA torch exist).

Install with `pip install --no-build-isolation -e .` (build isolation would fetch a second torch).
"""
from setuptools import setup

setup(
    name="gptfast",
    version="0.1.0",
    description="A GPT-2 engine with fused Triton kernels and a C++/CUDA top-k sampler",
    packages=["gptfast", "gptfast.kernels"],
    package_dir={"gptfast": "gptfast", "gptfast.kernels": "kernels"},
    package_data={"gptfast": ["assets/*"]},
    python_requires=">=3.10",
    install_requires=["torch", "triton; platform_system == 'Linux'", "tiktoken", "numpy", "safetensors",
                      "tqdm", "matplotlib"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "transformers"],
        "tf": ["tensorflow-cpu; platform_machine == 'x86_64'", "tensorflow; platform_machine != 'x86_64'"],
    },
    entry_points={"console_scripts": ["gptfast=gptfast.cli:main"]},
)
