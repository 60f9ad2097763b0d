"""The GPU truth in short slots: `make gpu-check` (correctness, <= 4 min on an H200, build
included), `make gpu-bench` (the headline numbers, then the launch-configuration sweep and the
profiles the next work reads, <= 5 min) and `make gpu-suite` (the whole test suite on the GPU,
<= 7 min, a device call of its own), each a list of stages run in order, every stage a
subprocess with its own time limit.

    python benchmarks/gpu_run.py check            # build, info, kernel/sampler/generation/training checks
    python benchmarks/gpu_run.py bench            # attention, memory-bound ops, sampler, training step,
                                                  # decode; tune, profile-train, profile-decode
    python benchmarks/gpu_run.py check bench      # both, one results folder each
    python benchmarks/gpu_run.py suite            # every test, without Triton's interpreter
    python benchmarks/gpu_run.py check --dry-run  # list the stages, their limits and commands (any machine)
    python benchmarks/gpu_run.py bench --collect  # ... and collect each pytest stage's tests (any machine)
    python benchmarks/gpu_run.py check --only kernels --only sampler

bench and suite need the package installed with _C's CUDA kernel, which check's build stage does;
run without check where that is missing (a fresh machine), they run that stage first (its 70 s
come on top of their limits).

Results: one folder per command, $GPTFAST_RESULTS/gpu-<command>-<device>-<date>-<commit>/
(GPTFAST_RESULTS defaults to benchmarks/results), holding summary.md (a table of stages, then
each stage's tables and test results), summary.json (device, date, commit, torch/Triton/CUDA
versions, every stage's status, time and tables) and log.txt (everything the stages printed).
All three are rewritten after every stage, so a stage that hangs (killed at its limit, with
its child processes) or a machine that disappears still leaves the earlier stages' results.
Every stage runs even after another failed; the exit status is 1 if any stage did not pass.
Needs no network or TensorFlow: the GPU image's python3 with torch, pytest, pytest-xdist,
pytest-benchmark and transformers.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# issue 11: <= 4 and <= 5 minutes on an H200; the whole suite fits one device call beside them
CONTRACT_S = {"check": 240, "bench": 300, "suite": 420}
RESULTS_ENV = "GPTFAST_RESULTS"


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: float
    what: str
    argv: tuple[str, ...]
    env: dict = field(default_factory=dict)
    pytest: bool = False  # a pytest run: --collect checks its selection on any machine


def _pytest(py, *args) -> tuple[str, ...]:
    return (py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args)


def check_stages(py: str) -> list[Stage]:
    """Correctness on a real GPU: the GPU-marked tests (tests/conftest.py's `gpu` marker) of each area."""
    def gpu_tests(*args):
        return _pytest(py, "-m", "gpu", *args)
    return [
        Stage("build", 70, "gptfast._C rebuilt with its CUDA kernel (fails if nvcc or a CUDA torch is missing)",
              (py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."),
              env={"GPTFAST_CUDA": "1"}),
        Stage("info", 10, "gptfast info: versions, backend and kernels this machine gets", (py, "-m", "gptfast.cli", "info")),
        Stage("kernels", 60, "every Triton kernel vs its reference at GPT-2 shapes, fp32/fp16/bf16, forward and every "
              "gradient; attention T=4096 x head_dim 128, dropout over 16x12x1024; CE 16x1024x50257; linear-CE "
              "memory", gpu_tests("-n", "3", "tests/test_layer_norm.py", "tests/test_gelu.py", "tests/test_attention.py",
                                  "tests/test_attention_decode.py", "tests/test_cross_entropy.py",
                                  "tests/test_feed_forward.py"), pytest=True),
        # 52 tests, 36 of them a 256-row CPU draw each: over 25 s on one process (H200, 2026-11-30)
        Stage("sampler", 45, "CUDA sample_top_k vs the CPU op, CUDA-graph replay",
              gpu_tests("-n", "4", "tests/test_sampling.py"), pytest=True),
        Stage("generate", 30, "CUDA-graph decode == eager decode, 200 greedy tokens, batch 1 and left-padded 4",
              gpu_tests("tests/test_generate.py"), pytest=True),
        Stage("train", 25, "one GPT-2 124M training step, triton vs torch backend by the 2x rule",
              gpu_tests("tests/test_triton_backend.py"), pytest=True),
    ]


def bench_stages(py: str, scratch: str) -> list[Stage]:
    """The headline numbers, each suite cut to what fits its limit (see benchmarks/bench_*.py)."""
    def bench(*args):
        return _pytest(py, "--benchmark-only", *args)
    attention = [f"benchmarks/bench_attention.py::test_attention[{shape}-{impl}-fwd+bwd]"
                 for shape in ("T=1024", "T=4096") for impl in ("native", "triton")]
    return [
        Stage("attention", 20, "causal attention fwd+bwd, 16x1024 and 4x4096 tokens bf16: TFLOP/s vs SDPA-flash",
              bench(*attention), pytest=True),
        Stage("memory-bound", 35, "LayerNorm, GELU, CE, linear-CE, decode's feed-forward gemv vs PyTorch/cuBLAS: GB/s, "
              "% of a same-run copy, peak memory",
              bench("benchmarks/bench_layer_norm.py", "benchmarks/bench_gelu.py", "benchmarks/bench_cross_entropy.py",
                    "benchmarks/bench_feed_forward.py", "-k", "native or triton"), pytest=True),
        Stage("sampler", 15, "sample_top_k us at B=1 and B=64, k=50, vs the six-op path",
              (py, "benchmarks/bench_sampling.py", "--device", "cuda", "--batches", "1", "64", "--ks", "50")),
        Stage("train", 70, "GPT-2 124M training step, 16x1024 bf16: tokens/s, triton vs torch vs torch.compile",
              bench("benchmarks/bench_train.py", "-k", "torch-bf16 or triton-bf16"),
              env={"GPTFAST_BENCH_PRESET": "gpt2-small", "GPTFAST_BENCH_T": "1024", "GPTFAST_BENCH_B": "16"},
              pytest=True),
        Stage("decode", 35, "decode tokens/s, batch 1, 200 tokens: bf16 with CUDA graphs vs transformers",
              (py, "benchmarks/bench_generate.py", "--device", "cuda", "--new-tokens", "200", "--batches", "1",
               "--rounds", "2", "--engines", "transformers-fp32", "float32", "bfloat16", "--no-quality",
               "--out", scratch)),
        # where the time goes, for the next optimisation: launch configurations, top kernels
        Stage("tune", 60, "LayerNorm / GELU backward and cross-entropy launch configurations, each checked, then timed",
              (py, "benchmarks/tune_gpu.py")),
        Stage("profile-train", 40, "top kernels of a GPT-2 124M bf16 training step, triton backend",
              (py, "benchmarks/profile_gpu.py", "train", "--backends", "triton")),
        Stage("profile-decode", 25, "a batch-1 bf16 decode token: engine, runner and GPU time, kernels per token",
              (py, "benchmarks/profile_gpu.py", "decode")),
    ]


# ------------------------------------------------------------------------------- running

def stage_env(stage: Stage) -> dict:
    """The environment a stage runs in: this one, less what would change how its tests run (the
    interpreter: a GPU run compiles the kernels; an outer pytest-xdist's worker variables, which
    would make pytest-benchmark think it runs under xdist), plus the stage's own."""
    env = {k: v for k, v in os.environ.items()
           if k != "TRITON_INTERPRET" and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT_TEST"))}
    return {**env, **stage.env, "PYTHONUNBUFFERED": "1"}


def run_stage(stage: Stage, log, limit_s: float) -> dict:
    """Run one stage, its output copied live to stdout and to `log`; kill its whole process
    group at the limit. Returns its record (status ok / failed / timeout, seconds, output)."""
    start = time.monotonic()
    proc = subprocess.Popen(stage.argv, cwd=ROOT, env=stage_env(stage), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace", start_new_session=True)
    lines: list[str] = []

    def copy():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            log.write(line)
    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the stage and everything it started (pytest -n workers)
        except ProcessLookupError:  # it ended just now
            pass
        proc.wait()
        status = "timeout"
    reader.join(timeout=10)
    seconds = time.monotonic() - start
    return {"name": stage.name, "what": stage.what, "limit_s": limit_s, "status": status,
            "seconds": round(seconds, 1), "returncode": proc.returncode, "command": shlex.join(stage.argv),
            "output": "".join(lines)}


def run_stages(stages: list[Stage], folder: Path, meta: dict, limit_scale: float = 1.0) -> list[dict]:
    """Every stage in order; the results folder rewritten after each one."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    with open(folder / "log.txt", "a", buffering=1) as log:
        for stage in stages:
            header = f"\n===== stage {stage.name} (limit {stage.limit_s * limit_scale:.0f} s): {shlex.join(stage.argv)}\n"
            sys.stdout.write(header)
            log.write(header)
            record = run_stage(stage, log, stage.limit_s * limit_scale)
            if stage.pytest and "--benchmark-only" in stage.argv:
                record["tables"] = benchmark_tables(record["output"])
            records.append(record)
            line = f"===== stage {stage.name}: {record['status']} in {record['seconds']:.1f} s\n"
            sys.stdout.write(line)
            log.write(line)
            write_results(folder, meta, records)
    return records


def benchmark_tables(output: str) -> str:
    """The tables a pytest-benchmark stage printed (kernel rows, gptfast tables), as markdown."""
    from report import printed_tables
    kernel = re.search(r"^=+ kernel benchmarks .*?=+\n(.*?)(?=\n\s*\n|^=+ |\Z)", output, re.M | re.S)
    return ((kernel.group(1).strip() + "\n") if kernel else "") + printed_tables(output)


def _highlights(record: dict) -> str:
    """What summary.md shows of a stage: its tables, test results, and on failure its last lines."""
    out = record["output"].splitlines()
    tables = record.get("tables") or "\n".join(ln for ln in out if ln.startswith("|"))
    results = [ln for ln in out if re.match(r"(FAILED|ERROR|SKIPPED) |=* ?\d+ (passed|failed|error)", ln)]
    parts = [tables] if tables else []
    if results:
        parts.append("```\n" + "\n".join(results[-40:]) + "\n```")
    if record["status"] != "ok":
        parts.append("last lines:\n```\n" + "\n".join(out[-30:]) + "\n```")
    return "\n\n".join(parts) or "(no output)"


def write_results(folder: Path, meta: dict, records: list[dict]):
    passed = all(r["status"] == "ok" for r in records)
    summary = {**meta, "passed": passed, "total_s": round(sum(r["seconds"] for r in records), 1),
               "stages": [{k: v for k, v in r.items() if k != "output"} for r in records]}
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# gptfast gpu-{meta['command']}: {meta['device']}", "",
             *(f"- {k}: {meta[k]}" for k in ("date", "commit", "versions", "invocation")),
             f"- total: {summary['total_s']} s of stages (contract {CONTRACT_S[meta['command']]} s); "
             f"{'every stage passed' if passed else 'NOT every stage passed'}", "",
             "| stage | status | seconds | limit | what |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} | {r['what']} |"
              for r in records]
    for r in records:
        lines += ["", f"## {r['name']}: {r['status']} ({r['seconds']:.1f} s)", "", f"`{r['command']}`", "",
                  _highlights(r)]
    (folder / "summary.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------- main

def metadata(command: str) -> dict:
    import torch
    import triton
    from common import commit_id
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU {platform.machine()} (no CUDA)"
    return {"command": command, "device": device,
            "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "commit": commit_id(),
            "versions": f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
                        f"python {platform.python_version()}",
            "invocation": "python benchmarks/gpu_run.py " + " ".join(sys.argv[1:])}


def results_folder(meta: dict) -> Path:
    base = Path(os.environ.get(RESULTS_ENV) or HERE / "results")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", meta["device"].split(" (")[0]).strip("-").lower()
    stamp = meta["date"][:16].replace("-", "").replace(":", "").replace(" ", "-")
    return base / f"gpu-{meta['command']}-{slug}-{stamp}-{meta['commit']}"


def installed(py: str) -> bool:
    """Whether `py` imports this checkout's gptfast with its kernels and _C's CUDA kernel, as the
    bench stages need (a fresh GPU machine has neither until gpu-check's build stage ran)."""
    code = "import sys, gptfast.kernels, gptfast.sampling as s; sys.exit(0 if s.has_kernel('cuda') else 1)"
    try:
        return subprocess.run([py, "-c", code], cwd=ROOT, capture_output=True).returncode == 0
    except OSError:  # not an interpreter at all
        return False


def suite_stages(py: str) -> list[Stage]:
    """Every test on the GPU, without Triton's interpreter: each must pass with and without one."""
    return [Stage("tests", CONTRACT_S["suite"], "the whole suite on the GPU (gpu-marked tests included), 8 workers",
                  _pytest(py, "-n", "8", "tests"), pytest=True)]


def plan(commands: list[str], scratch: str, only: list[str] | None, build_if_missing: bool = True
         ) -> dict[str, list[Stage]]:
    """The stages each command runs here: with build_if_missing, bench and suite start with
    check's build stage when check does not run too and the package (or _C's CUDA kernel) is
    missing (asked once: a subprocess that imports torch)."""
    plans = {c: stages_for(c, scratch, only) for c in dict.fromkeys(commands)}
    if build_if_missing and "check" not in plans and not installed(sys.executable):
        first = next(iter(plans))  # one build serves the commands after it
        print(f"gpu-{first}: gptfast (or _C's CUDA kernel) is not installed here: gpu-check's build stage first")
        plans[first] = check_stages(sys.executable)[:1] + plans[first]
    return plans


def stages_for(command: str, scratch: str, only: list[str] | None) -> list[Stage]:
    stages = {"check": lambda: check_stages(sys.executable), "bench": lambda: bench_stages(sys.executable, scratch),
              "suite": lambda: suite_stages(sys.executable)}[command]()
    unknown = set(only or ()) - {s.name for s in stages}
    if unknown:
        raise SystemExit(f"gpu_run.py {command}: no stage {', '.join(sorted(unknown))}; stages: "
                         f"{', '.join(s.name for s in stages)}")
    return [s for s in stages if not only or s.name in only]


def collect(stage: Stage) -> tuple[int, str]:
    """(tests a pytest stage selects, pytest's last line), by collecting it in this process
    (no GPU needed; the next stage's collection reuses the imports)."""
    import contextlib
    import io

    import pytest
    argv = list(stage.argv[stage.argv.index("pytest") + 1:])
    if "-n" in argv:  # no xdist workers for a collection
        del argv[argv.index("-n"):argv.index("-n") + 2]
    out, cwd, env = io.StringIO(), os.getcwd(), dict(os.environ)
    try:
        os.chdir(ROOT)
        os.environ.clear()
        os.environ.update(stage_env(stage))
        with contextlib.redirect_stdout(out):
            code = pytest.main(argv + ["--collect-only"])
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    last = (out.getvalue().strip().splitlines() or ["(no output)"])[-1]
    found = re.match(r"(\d+)(?:/\d+)? tests? collected", last)
    return (int(found.group(1)) if found and code == 0 else 0), last


def list_stages(command: str, stages: list[Stage], with_collect: bool, limit_scale: float) -> bool:
    total = sum(s.limit_s for s in stages) * limit_scale
    print(f"gpu-{command}: {len(stages)} stages, limits sum to {total:.0f} s (contract {CONTRACT_S[command]} s)")
    ok = True
    for i, s in enumerate(stages, 1):
        print(f"  {i}. {s.name:<14} limit {s.limit_s * limit_scale:>4.0f} s  {s.what}\n"
              f"     $ {shlex.join(s.argv)}" + "".join(f"\n     env {k}={v}" for k, v in s.env.items()))
        if with_collect and s.pytest:
            n, last = collect(s)
            ok &= n > 0
            print(f"     collects {n} test(s){'' if n else ': NONE, ' + last}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("commands", nargs="+", choices=list(CONTRACT_S),
                    help="check (gpu-check), bench (gpu-bench), suite (gpu-suite)")
    ap.add_argument("--dry-run", action="store_true", help="list the stages, limits and commands; run nothing")
    ap.add_argument("--collect", action="store_true", help="--dry-run, and collect each pytest stage's tests")
    ap.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every stage's limit (slower GPUs)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))  # common, report
    if not 0 < args.limit_scale < math.inf:  # (NaN too: a NaN limit would never fire)
        ap.error(f"--limit-scale must be a finite number > 0, got {args.limit_scale}")
    with tempfile.TemporaryDirectory() as scratch:
        if args.dry_run or args.collect:
            plans = plan(args.commands, scratch, args.only, build_if_missing=False)
            listed = [list_stages(c, stages, args.collect, args.limit_scale) for c, stages in plans.items()]
            return 0 if all(listed) else 1
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("gpu_run.py: no CUDA GPU visible to torch (--dry-run lists the stages anywhere)")
        plans = plan(args.commands, scratch, args.only)
        failed = False
        for command, stages in plans.items():
            meta = metadata(command)
            folder = results_folder(meta)
            records = run_stages(stages, folder, meta, args.limit_scale)
            print(f"\ngpu-{command}: " + ", ".join(f"{r['name']} {r['status']} {r['seconds']:.0f}s" for r in records)
                  + f"\nwrote {folder}/summary.md, summary.json, log.txt")
            failed |= any(r["status"] != "ok" for r in records)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
