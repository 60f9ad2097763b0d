"""What every benchmark shares: the commit a result belongs to, the device's name, and peak memory.

Results files in benchmarks/results/ carry device, date and commit; these helpers give the
last two the same meaning everywhere.
"""
from __future__ import annotations

import os
import platform
import subprocess
import threading
import time
from pathlib import Path

import torch

from gptfast.cpu_linear import kernel_paths

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [6109, 3626, 6100, 345]  # "Every effort moves you": the decode benchmarks' prompt


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def commit_id(paths=()) -> str:
    """Short HEAD, marked -dirty when tracked files (or only `paths`, when given) differ from it;
    results files an earlier run rewrote (benchmarks/results/) do not count: they are not code."""
    paths = paths or (".", ":(exclude)benchmarks/results")
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", *paths)
    return (_git("rev-parse", "--short", "HEAD") or "nogit") + ("-dirty" if dirty else "")


def device_name(device) -> str:
    """The GPU's name, or the CPU's model, torch's threads and the gptfast kernel paths it runs
    (this project's CPU hosts differ from day to day: AVX2 only, or AVX-512 VNNI too)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    paths = ", ".join(kernel_paths()) or "none (no gptfast._C)"
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads, gptfast CPU paths {paths}"


def cpu_model() -> str:
    """/proc/cpuinfo's model name (Linux), else the platform's word for the processor."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} CPU"


class PeakMemory:
    """Peak memory a block adds, in MiB: CUDA's allocator peak, or on CPU the growth of this
    process's resident memory (sampled every 2 ms by a thread)."""

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class ReadFloor:
    """The device's practical read bandwidth: GB/s of `Tensor.max()` over fp32 data (it reads
    every byte once and computes almost nothing; on CPU torch's fp16 matrix-vector product reaches
    about the same). On CUDA the data is 2 GB, timed between syncs, so launch and sync stay small
    beside it. Call it between the timed engines' rounds: each call is one measurement, so it
    sees the same machine load they do."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.mbytes = 2048 if self.device.type == "cuda" else 256
        self.data = torch.rand(self.mbytes * 2**20 // 4, device=self.device)

    def __call__(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t = time.perf_counter()
        self.data.max()
        sync()
        return self.data.numel() * 4 / (time.perf_counter() - t) / 1e9


class ComputeProbe:
    """The host's arithmetic speed at the moment of the call: the int8 matmul of a batched decode
    step (gptfast::linear, 16 rows by a 768 x 768 weight: operands in cache, so almost no memory
    traffic), timed `calls` times in a row. On a shared host a core's speed swings with its
    neighbours' load: two copies of a fixed vpmaddwd loop, one per core, ran here at a median
    1.8x their best time one day and at their speed alone another. Batched decoding, bound by
    arithmetic, swings with it; batch-1 decoding, bound by reading the weights, hardly does (9%
    between the best and the median 1-row int8 matmul where 16 rows saw 46%). So their ratio
    measured on such a host is lower than on a quiet one; `summary` says how much of its
    arithmetic (and of its read bandwidth) a run had."""

    def __init__(self, calls=500):
        from gptfast import cpu_linear

        self.calls, self.linear, self.read = calls, cpu_linear.linear, ReadFloor()
        self.what = "int8 matmul" if cpu_linear.has_kernel() else "int8 matmul (PyTorch fallback: _C not built)"
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(16, 768, generator=g)
        self.q, self.scale = cpu_linear.quantize_int8(torch.randn(768, 768, generator=g))

    def __call__(self) -> tuple[float, float]:
        """(best, median) GMAC/s over the calls."""
        times = []
        for _ in range(self.calls):
            t = time.perf_counter()
            self.linear(self.x, self.q, self.scale, None, 0)
            times.append(time.perf_counter() - t)
        macs = self.x.numel() * self.q.shape[0]
        times.sort()
        return macs / times[0] / 1e9, macs / times[len(times) // 2] / 1e9

    def summary(self, when: str) -> str:
        """The probe's line, with the read bandwidth beside it (ReadFloor): a loaded engine's
        speed has moved by 15% over minutes where the arithmetic probe did not."""
        best, median = self()
        return (f"host {when}: a fixed 16-row {self.what} ran at a median {median:.0f} GMAC/s, "
                f"{100 * median / best:.0f}% of its best {best:.0f} ({self.calls} calls); reads at up to "
                f"{max(self.read() for _ in range(3)):.1f} GB/s (Tensor.max over 256 MB, best of 3)")


def interleaved(fns: dict, rounds: int) -> dict:
    """{name: [one value per round]}: every fn (no arguments, returns a measurement) runs once
    per round, the order rotated from round to round, so a change in machine load hits all
    of them alike instead of whichever ran during it."""
    names, out = list(fns), {name: [] for name in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            out[name].append(fns[name]())
    return out


def agreeing_prefix(ids, ref) -> int:
    """How many leading tokens of `ids` equal `ref`'s (the index of the first difference)."""
    n = min(len(ids), len(ref))
    return next((i for i in range(n) if ids[i] != ref[i]), n)


def load_average() -> str:
    """The 1/5/15-minute load averages (`uptime`), for the results file."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def save_report(lines: list[str], path, echo: bool = True) -> Path:
    """Print a results table (lines of markdown; not with echo=False: printed as they came) and
    write it to `path` (a results file)."""
    text = "\n".join(lines)
    if echo:
        print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"written to {path}")
    return path
