"""What `gptfast serve` reports at /metrics, in Prometheus' text format (version 0.0.4):
requests by status, queue depth, running sequences and batch occupancy, tokens and tokens/s,
time to first token, inter-token latency and step time histograms.

`ServerMetrics` is the engine's observer (gptfast.engine calls `step`, `token`, `finished`
on its thread) and the HTTP layer's counter; `render` may run on any thread.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last: above every bucket (+Inf only)
        self.sum = 0.0

    def observe(self, value: float):
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {total}')
        total += self.counts[-1]
        return out + [f'{name}_bucket{{le="+Inf"}} {total}', f"{name}_sum {self.sum:.6g}", f"{name}_count {total}"]


class ServerMetrics:
    """Counters and histograms of one server; `engine` gives the live gauges."""

    def __init__(self, engine, rate_window_s: float = 10.0):
        self.engine, self.window = engine, rate_window_s
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # by HTTP status
        self.reasons: dict[str, int] = {}  # prompts finished, by reason
        self.prompt_tokens = self.generated_tokens = 0
        self.ttft, self.itl = Histogram(LATENCY_BUCKETS), Histogram(LATENCY_BUCKETS)
        self.step_time = Histogram(LATENCY_BUCKETS)
        sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256]
        self.occupancy = Histogram([s for s in sizes if s < engine.max_batch] + [engine.max_batch])
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps

    # ---- the HTTP layer ----
    def request(self, status: int):
        with self._lock:
            self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def received(self, prompt_tokens: int):
        with self._lock:
            self.prompt_tokens += prompt_tokens

    # ---- the engine's observer (its thread) ----
    def step(self, n_tokens: int, seconds: float):
        now = time.monotonic()
        with self._lock:
            self.generated_tokens += n_tokens
            self.occupancy.observe(n_tokens)
            self.step_time.observe(seconds)
            self._recent.append((now, n_tokens))
            self._trim(now)

    def token(self, seconds: float, first: bool):
        with self._lock:
            (self.ttft if first else self.itl).observe(seconds)

    def finished(self, reason: str):
        with self._lock:
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def _trim(self, now):
        while self._recent and self._recent[0][0] < now - self.window:
            self._recent.popleft()

    def tokens_per_s(self) -> float:
        with self._lock:
            self._trim(time.monotonic())
            return sum(n for _, n in self._recent) / self.window

    def render(self) -> str:
        rate = self.tokens_per_s()
        with self._lock:
            lines = _family("gptfast_requests_total", "counter", "HTTP requests answered, by status code",
                            [f'gptfast_requests_total{{code="{c}"}} {n}' for c, n in sorted(self.requests.items())])
            lines += _family("gptfast_sequences_finished_total", "counter", "prompts finished, by reason",
                             [f'gptfast_sequences_finished_total{{reason="{r}"}} {n}'
                              for r, n in sorted(self.reasons.items())])
            lines += _scalar("gptfast_prompt_tokens_total", "counter", "prompt tokens received", self.prompt_tokens)
            lines += _scalar("gptfast_generated_tokens_total", "counter", "tokens generated", self.generated_tokens)
            lines += _scalar("gptfast_queue_depth", "gauge", "prompts waiting for a batch row", self.engine.waiting())
            lines += _scalar("gptfast_running_sequences", "gauge", "prompts in the running batch",
                             self.engine.running())
            lines += _scalar("gptfast_max_batch", "gauge", "batch rows (--max-batch)", self.engine.max_batch)
            lines += _scalar("gptfast_tokens_per_second", "gauge",
                             f"tokens generated per second over the last {self.window:g} s", round(rate, 3))
            for name, hist, what in (("gptfast_batch_occupancy", self.occupancy, "sequences advanced per step"),
                                     ("gptfast_time_to_first_token_seconds", self.ttft,
                                      "from a prompt's arrival to its first token"),
                                     ("gptfast_inter_token_latency_seconds", self.itl,
                                      "between consecutive tokens of a prompt"),
                                     ("gptfast_step_seconds", self.step_time, "one engine step")):
                lines += _family(name, "histogram", what, hist.lines(name))
        return "\n".join(lines) + "\n"


def _family(name, kind, help_text, samples):
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def _scalar(name, kind, help_text, value):
    return _family(name, kind, help_text, [f"{name} {value}"])
