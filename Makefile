# Two commands on a fresh clone: `make demo` (train on The Verdict, then generate) and
# `make test`. Each sets up .venv first when it is missing or setup.py changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch==2.13.0 is the local CPU wheel here; a machine whose python already has a CUDA
# torch (GPU machines) keeps it: the venv sees system site-packages.
TORCH  ?= torch==2.13.0
RUN    ?= runs/demo

.PHONY: demo test bench gpu gpu-check gpu-bench gpu-suite setup clean

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[test,tf,serve]"
	@$(PY) -c "from gptfast import sampling as s; print('gptfast._C sample_top_k kernels: CPU', \
	    s.has_kernel('cpu'), '| CUDA', s.has_kernel('cuda'), '(setup.py says why when CUDA is skipped: pip install -v)')"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m gptfast.cli train --preset mini --epochs 20 --batch-size 4 --lr 1e-3 --eval-freq 10 --out $(RUN)
	$(PY) -m gptfast.cli generate --checkpoint $(RUN)/checkpoint.pt --prompt "Every effort moves you" --max-new-tokens 40 --temperature 0.8 --top-k 40 --seed 123

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) benchmarks/report.py

# GPU runs download nothing: they use .venv when `make setup` made one, else python3, which must
# hold a CUDA torch and the test dependencies (GPU images usually do; override with GPU_PY=).
GPU_PY ?= $(if $(wildcard $(PY)),$(PY),python3)

# The GPU truth in short slots (benchmarks/gpu_run.py: stages in order, each with its own
# time limit; `--dry-run` lists them). gpu-check: correctness, <= 4 min on an H200 with the
# build; gpu-bench: the headline numbers, the tuning sweep and the profiles, <= 5 min (plus the
# build stage, 70 s at most, where the package is missing).
# Results: one folder per run under $GPTFAST_RESULTS (default benchmarks/results/).
gpu-check:
	$(GPU_PY) benchmarks/gpu_run.py check

gpu-bench:
	$(GPU_PY) benchmarks/gpu_run.py bench

# The whole suite on the GPU, without the interpreter (<= 7 min: a device call of its own).
gpu-suite:
	$(GPU_PY) benchmarks/gpu_run.py suite

# The long way (at most 11 min of stage limits, more than one device call): gpu-check (_C rebuilt
# with its CUDA kernel: a missing toolkit fails here instead of warning), then the whole suite
# without Triton's interpreter (which runs the gpu-marked tests again), then report.py's summary.
gpu:
	$(GPU_PY) benchmarks/gpu_run.py check suite
	$(GPU_PY) benchmarks/report.py
