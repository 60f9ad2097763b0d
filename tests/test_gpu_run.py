"""benchmarks/gpu_run.py (`make gpu-check`, `make gpu-bench`) on any machine: the stage plans fit
their contracts, and the runner, given stand-in stages (one passes, one fails, one hangs with a
child process), runs every stage in order, kills the hung one with its child at its limit, and
has the results folder complete after each stage. The GPU checks themselves are the gpu-marked
tests beside each op; their small-shape twins run in this suite."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_run  # noqa: E402

STAGES = {"check": ["build", "info", "kernels", "sampler", "generate", "train"],  # issue 11's order
          "bench": ["attention", "memory-bound", "sampler", "train", "decode",
                    "tune", "profile-train", "profile-decode"],
          "suite": ["tests"]}


def test_dry_run_lists_every_stage_and_the_limits_fit_the_contract(capsys):
    assert gpu_run.main(["check", "bench", "suite", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for command, names in STAGES.items():
        stages = gpu_run.stages_for(command, "/tmp", None)
        assert [s.name for s in stages] == names
        total = sum(s.limit_s for s in stages)
        assert total <= gpu_run.CONTRACT_S[command], f"gpu-{command}: limits sum to {total} s"
        assert f"gpu-{command}: {len(names)} stages, limits sum to {total:.0f} s" in out
        for i, s in enumerate(stages, 1):
            assert f"{i}. {s.name:<14} limit {s.limit_s:>4.0f} s" in out
    check = gpu_run.stages_for("check", "/tmp", None)
    assert check[0].env == {"GPTFAST_CUDA": "1"}, "the build must fail when the CUDA kernel cannot be built"
    assert all(s.argv[3:7] == ("-q", "-rs", "-p", "no:cacheprovider") and "gpu" in s.argv for s in check if s.pytest)


def test_only_names_a_stage(capsys):
    assert gpu_run.main(["bench", "--only", "decode", "--dry-run"]) == 0
    assert "1. decode" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="gpu_run.py check: no stage decode; stages: build, info"):
        gpu_run.main(["check", "--only", "decode", "--dry-run"])


def test_bench_and_suite_build_first_where_the_package_is_missing(monkeypatch):
    """gpu-bench or gpu-suite alone on a fresh machine run gpu-check's build stage first (once, for
    the first command: the build serves the next); with check in the same run, or the package
    installed, they do not."""
    monkeypatch.setattr(gpu_run, "installed", lambda py: False)
    plans = gpu_run.plan(["bench", "suite"], "/tmp", None)
    assert [p[0].name for p in plans.values()] == ["build", "tests"]
    assert plans["bench"][1:] == gpu_run.stages_for("bench", "/tmp", None)
    assert gpu_run.plan(["check", "bench"], "/tmp", None)["bench"][0].name == "attention"
    monkeypatch.setattr(gpu_run, "installed", lambda py: True)
    assert gpu_run.plan(["suite"], "/tmp", None)["suite"][0].name == "tests"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine may have the CUDA kernel built")
def test_installed_needs_the_cuda_kernel():
    assert not gpu_run.installed(sys.executable)  # no CUDA kernel here
    assert not gpu_run.installed(os.devnull)  # not an interpreter
    assert gpu_run.installed("/bin/true"), "a command that exits 0 is a yes"  # (the answer is its exit code)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the real stages")
def test_a_real_run_needs_a_gpu():
    with pytest.raises(SystemExit, match="no CUDA GPU visible to torch"):
        gpu_run.main(["check"])


HANG = """
import json, pathlib, subprocess, sys, time
folder, pid_file = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
pid_file.write_text(str(child.pid))
print("written so far:", [s["name"] for s in json.loads((folder / "summary.json").read_text())["stages"]], flush=True)
time.sleep(120)
"""


def _gone(pid, wait_s=5.0):
    """Whether process pid has ended (and been reaped) within wait_s."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_runner_kills_a_hung_stage_with_its_child_and_keeps_going(tmp_path):
    py, folder, pid_file = sys.executable, tmp_path / "results", tmp_path / "child.pid"
    stages = [
        gpu_run.Stage("table", 30, "prints a table", (py, "-c", "print('| x | y |'); print('3 passed in 0.1s')")),
        gpu_run.Stage("fails", 30, "exits 3", (py, "-c", "import sys; print('boom'); sys.exit(3)")),
        gpu_run.Stage("hangs", 3, "sleeps past its limit", (py, "-c", HANG, str(folder), str(pid_file))),
        gpu_run.Stage("after", 30, "still runs", (py, "-c", "print('after the hang')")),
    ]
    meta = {"command": "check", "device": "stand-in", "date": "2026-01-01 00:00 UTC", "commit": "abc1234",
            "versions": "torch x", "invocation": "test"}
    start = time.monotonic()
    records = gpu_run.run_stages(stages, folder, meta)
    assert time.monotonic() - start < 25, "the hung stage was not stopped at its limit"
    assert [r["status"] for r in records] == ["ok", "failed", "timeout", "ok"]
    assert records[1]["returncode"] == 3 and 3 <= records[2]["seconds"] < 15
    assert "written so far: ['table', 'fails']" in records[2]["output"], "results not written before the next stage"
    assert _gone(int(pid_file.read_text())), "the hung stage's child process survived"

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["passed"] is False and summary["commit"] == "abc1234"
    assert [(s["name"], s["status"]) for s in summary["stages"]] == [(r["name"], r["status"]) for r in records]
    md = (folder / "summary.md").read_text()
    assert "| hangs | timeout |" in md and "| x | y |" in md and "3 passed in 0.1s" in md and "boom" in md
    log = (folder / "log.txt").read_text()
    assert "boom" in log and "after the hang" in log and "===== stage hangs: timeout" in log


@pytest.mark.slow
def test_every_pytest_bench_stage_selects_tests():
    """The bench stages pick tests by node id and -k: a renamed test would select nothing."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_run.py"), "bench", "--collect"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = [int(line.split()[1]) for line in proc.stdout.splitlines() if line.strip().startswith("collects")]
    assert len(counts) == sum(s.pytest for s in gpu_run.stages_for("bench", "/tmp", None)) and min(counts) > 0


def test_sampler_bench_stage_runs_its_arguments_on_cpu(capsys):
    """The sampler stage's own arguments, on the CPU (the same measuring code as on CUDA)."""
    bench_sampling = pytest.importorskip("bench_sampling")
    if not bench_sampling.sampling.has_kernel("cpu"):
        pytest.skip(f"gptfast._C is not built here: {bench_sampling.sampling._C_ERROR}")
    (stage,) = gpu_run.stages_for("bench", "/tmp", ["sampler"])
    args = [a if a != "cuda" else "cpu" for a in stage.argv[2:]]
    assert bench_sampling.main(args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| cpu |")]
    assert [line.split("|")[2:4] for line in rows] == [[" 1 ", " 50 "], [" 64 ", " 50 "]], rows
