"""Run the pytest-benchmark suites (benchmarks/bench_*.py) and write one markdown report,
benchmarks/results/<device>-<date>-<commit>.md, with device, date, commit and versions.

    python benchmarks/report.py                      # every suite
    python benchmarks/report.py --suites bench_gelu.py bench_layer_norm.py

Runs anywhere: on a CPU-only machine the GPU suites skip (their reasons go into the report)
and the rest measure the CPU. A bench_*.py file that is not a pytest suite (no tests
collected) is run as a script and what it prints goes into the report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NO_TESTS = 5  # pytest's exit status when it collected nothing


def rows_from_json(path: Path) -> list[dict]:
    """The kernel measurements (extra_info rows with an "impl") of one pytest-benchmark JSON."""
    rows = []
    for b in json.loads(path.read_text())["benchmarks"]:
        info = dict(b.get("extra_info") or {})
        if "impl" in info:  # kernel rows; other suites print their own "gptfast table"
            rows.append(info)
    return rows


def printed_tables(stdout: str) -> str:
    """The "gptfast table: ..." sections a suite printed at its end (e.g. bench_train's), as markdown."""
    tables = re.findall(r"^=+ (gptfast table: .*?) =+\n(.*?)(?=\n\s*\n|^=+ |^-{5,}|\Z)", stdout, re.M | re.S)
    return "".join(f"\n\n{title}\n```\n{body.strip()}\n```" for title, body in tables)


def run_suite(suite: Path, extra: list[str]) -> tuple[str, list[dict]]:
    """(status line, rows) for one suite."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "pytest", str(suite), "--benchmark-only", "-q", "-rs", "-p", "no:cacheprovider",
               f"--benchmark-json={out}", *extra]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        rows = rows_from_json(out) if out.exists() else []
    if proc.returncode == NO_TESTS:  # a standalone script: run it, keep what it printed
        proc = subprocess.run([sys.executable, str(suite)], cwd=ROOT, capture_output=True, text=True)
        out = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-60:])
        status = "" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}):\n"
        return f"{status}```\n{out}\n```", []
    lines = proc.stdout.strip().splitlines() or ["(no output)"]
    extra = printed_tables(proc.stdout)
    skips = [ln for ln in lines if ln.startswith("SKIPPED")]
    tail = "\n".join(f"- {ln}" for ln in skips + [lines[-1]])
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        return f"FAILED (exit {proc.returncode}): {tail}{extra}", rows
    return tail + extra, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suites", nargs="*", help="bench_*.py files in benchmarks/ (default: all)")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="folder for the report")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-k 'fwd and triton'\"")
    args = ap.parse_args(argv)

    import torch
    from tqdm import tqdm

    from common import commit_id
    from kernel_bench import table
    names = args.suites or sorted(p.name for p in HERE.glob("bench_*.py"))
    suites = [HERE / n for n in names]
    missing = [str(s) for s in suites if not s.exists()]
    if missing:
        raise SystemExit(f"report.py: no such suite: {', '.join(missing)}")

    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (no CUDA: GPU suites skip)"
        print(f"no CUDA GPU here: suites that need one will skip and say so; {device}")
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = commit_id()
    import triton
    lines = [f"# gptfast benchmarks: {device}", "",
             f"- device: {device}", f"- date: {now:%Y-%m-%d %H:%M} UTC", f"- commit: {commit}",
             f"- torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda or 'none'}",
             f"- command: python benchmarks/report.py {' '.join(sys.argv[1:])}".rstrip(), ""]
    for suite in tqdm(suites, desc="suites", unit="suite"):
        status, rows = run_suite(suite, args.pytest_args.split())
        lines += [f"## {suite.name}", "", status, ""]
        if rows:
            lines += [table(rows), ""]

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device.split(" (")[0]).strip("-").lower()
    path = args.out / f"{slug}-{now:%Y%m%d}-{commit}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
