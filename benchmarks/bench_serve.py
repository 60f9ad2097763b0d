"""Serving: `gptfast serve` with continuous batching vs the same server forced to one request at
a time (--max-batch 1), side by side in one run, at 1, 4, 16 and 64 concurrent clients, and
the HTTP overhead at one client vs the in-process Generator. GPT-2 124M, random init (the same
weights everywhere; speed does not depend on them), the server's default dtype, greedy.

    python benchmarks/bench_serve.py [--clients 1 4 16 64] [--seconds 15] [--warmup 5] [--turns 3]
                                     [--requests 40] [--rounds 24] [--device cpu]

The load generator (asyncio + httpx, localhost only) runs each client as a loop of streamed
requests over a fixed mix of prompt and output lengths. After --warmup seconds of that load (not
counted: every client's first prompt arrives at once, a burst the steady load never has) one
window opens, and closes after --seconds or when the --requests-th request in it finishes,
whichever comes first. The two servers take --turns turns each at each level, in the order
ABBA... (this shared host's speed drifts by tens of percent over minutes: short alternating
windows see the same drift, one long window each did not), and each server's windows are
summed. Reported: aggregate generated tokens/s (the tokens received in the windows over their
length: every client busy throughout; requests still running when a window closes are dropped,
not drained, since a drain is time at fewer clients than the level names), p50/p99 time to first
token (of the first tokens that come in a window or after it) and inter-token latency (gaps
between a request's streamed chunks in it). The HTTP overhead: decode time per token of one
request at a time streamed over HTTP against the in-process Generator, the median ratio of
each request's time to the in-process time of the same request earlier in its round, in
interleaved rounds, through the standard library's http.client, httpx's sync client (the `openai`
package's default) and its asyncio client (the load generator's): the client's own CPU comes off
the two cores the decode step is using, least with http.client's blocking reads (~0.15 ms a
token here), most with asyncio. Correctness first: both servers' greedy text equals
the in-process Generator's, alone and with 4 concurrent clients.
Results to benchmarks/results/serve_<device>_<dtype>.md with device, date, commit and load average.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from contextlib import aclosing
from pathlib import Path

import httpx
import torch

from gptfast import GPTConfig, GPTModel
from gptfast.backends import resolve_device
from gptfast.checkpoint import save_checkpoint
from gptfast.config import check_number
from gptfast.engine import PREFILL_CHUNK
from gptfast.generate import Generator, checked_type

from common import ComputeProbe, commit_id, device_name, load_average, save_report  # noqa: E402  (benchmarks/ is on sys.path)

PROMPT_LENGTHS = (8, 32, 96)  # tokens; request i of client c takes mix entry (c + i) % 3
OUTPUT_LENGTHS = (32, 64, 96)
NO_WINDOW = {"start": float("-inf"), "end": float("inf")}  # one_request's window outside a load window
DEADLINE = 600  # seconds a request (or a load, beyond its window) may take before the run fails


def workload(client: int, i: int) -> tuple[list[int], int]:
    """The fixed mix: (prompt token ids, max_tokens) of request i of client `client`."""
    k = (client + i) % len(PROMPT_LENGTHS)
    g = torch.Generator().manual_seed(1000 * client + i)
    return torch.randint(0, 50000, (PROMPT_LENGTHS[k],), generator=g).tolist(), OUTPUT_LENGTHS[k]


class ServerProcess:
    def __init__(self, checkpoint, device, dtype, max_batch, max_queue, prefill_chunk):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gptfast.cli", "serve", "--checkpoint", str(checkpoint), "--device", str(device),
             "--dtype", dtype,
             "--port", str(self.port), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
             "--prefill-chunk", str(prefill_chunk),
             "--model-name", "gpt2", "--log-level", "warning"])

    def wait_up(self, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server on port {self.port} exited with {self.proc.returncode}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit(f"server on port {self.port} did not start in {timeout} s")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def new_stats():
    return {"ttft": [], "itl": [], "per_token": [], "tokens": 0, "done": 0}


def add_stats(total, s):
    """The sums of two windows' stats (total None: s)."""
    return s if total is None else {k: total[k] + s[k] for k in s}


def sse_split(buffer: bytes) -> tuple[list[dict], bytes]:
    """The JSON events complete in `buffer` (raw bytes split at the blank lines: the load
    generator shares the server's two cores, and httpx's line iterator cost ~0.57 ms of CPU per
    separately arriving event here, this ~0.44), and the bytes after them."""
    *events, rest = buffer.split(b"\n\n")
    return [json.loads(e[6:]) for e in events if e.startswith(b"data: {")], rest


async def sse_events(response):
    """The JSON events of a server-sent event stream, each with the time its bytes came in."""
    pending = b""
    async for data in response.aiter_raw():
        now = time.perf_counter()
        events, pending = sse_split(pending + data)
        for e in events:
            yield e, now


def request_body(prompt, max_tokens):
    """A streamed greedy completion request, its usage chunk included."""
    return {"model": "gpt2", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}


async def one_request(http, url, prompt, max_tokens, stats, window):
    """Stream one greedy request: its time to first token, the gaps between its chunks, its
    decode time per token, as far as they fall after window["start"]; the tokens received before
    window["end"] count even when the window closes first (the request is then dropped: the
    server sees the disconnect). A request whose first token came before the start counts its
    chunks in the window (a chunk of several tokens as one), as one cut off at the end does."""
    start, first, last, text, chunks = time.perf_counter(), None, None, [], 0
    async with http.stream("POST", url + "/v1/completions", json=request_body(prompt, max_tokens)) as r, aclosing(sse_events(r)) as events:
        r.raise_for_status()
        async for event, now in events:
            has_text = bool(event["choices"] and event["choices"][0]["text"])
            counted = now >= window["start"]
            if has_text and last is None and counted:  # a latency: kept even when it comes after
                stats["ttft"].append(now - start)  # the window (else the longest waits would go uncounted)
            if now > window["end"]:
                return None  # the window closed: its tokens so far count, the request does not
            if has_text:
                text.append(event["choices"][0]["text"])
                if last is None:
                    first = now
                elif counted:
                    stats["itl"].append(now - last)
                last, chunks = now, chunks + 1
                stats["tokens"] += counted
            if event.get("usage") and first is not None and first >= window["start"]:
                n = event["usage"]["completion_tokens"]  # exact (a chunk can hold more than one token)
                stats["tokens"] += n - chunks
                if n > 1:
                    stats["per_token"].append((last - first) / (n - 1))
    stats["done"] += time.perf_counter() >= window["start"]
    return "".join(text)


async def load(url, clients, seconds, max_requests, warmup):
    """`clients` concurrent loops of requests; after `warmup` seconds one window: `seconds` long,
    or closed when the `max_requests`-th request in it finishes."""
    stats = new_stats()
    start = time.perf_counter() + warmup
    window = {"start": start, "end": start + seconds}

    async def client(c):
        i = 0
        while time.perf_counter() < window["end"]:
            await one_request(http, url, *workload(c, i), stats, window)
            if stats["done"] >= max_requests:
                window["end"] = min(window["end"], time.perf_counter())
            i += 1
    async with async_client(clients) as http:
        await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(clients))), warmup + seconds + DEADLINE)
    stats["seconds"] = window["end"] - start
    return stats


def async_client(clients):
    """The load generator's client: no per-read timeout (httpx arms and cancels a timer for every
    read, an event per token: at 16 clients 1.08-1.20x the tokens/s without, in two alternating
    pairs, the client's CPU coming off the cores the server uses); the callers set one deadline
    for the whole load instead."""
    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients + 4))


async def concurrently(url, jobs):
    """Greedy texts of `jobs` (prompt, max_tokens) sent at once."""
    async with async_client(len(jobs)) as http:
        requests = (one_request(http, url, p, n, new_stats(), NO_WINDOW) for p, n in jobs)
        return await asyncio.wait_for(asyncio.gather(*requests), DEADLINE)


def check_outputs(gen, servers):
    """Both servers' greedy text equals the in-process Generator's, alone and with 4 clients at once."""
    jobs = [workload(c, 0) for c in range(4)]
    want = [gen.tokenizer.decode(ids) for ids in gen.generate_ids([p for p, _ in jobs], [n for _, n in jobs])]
    for label, server in servers.items():
        alone = [asyncio.run(concurrently(server.url, [job]))[0] for job in jobs]
        assert alone == want, f"{label} server: a greedy answer differs from the in-process Generator's"
        assert asyncio.run(concurrently(server.url, jobs)) == want, f"{label} server: 4 clients at once differ"
    print("correctness: both servers' greedy answers equal the in-process Generator's, alone and 4 at once")


OVERHEAD_CLIENTS = ("http.client", "httpx", "httpx asyncio")


async def per_token(gen, url, rounds):
    """Decode time per token at one client, streamed over HTTP against the in-process Generator:
    for each client, the median over the requests of the ratio of its time to the in-process
    time of the same request earlier in the round (pairs: this host's speed drifts by tens of
    percent over minutes, and medians of two separate lists had spread from -2% to +20% between
    runs of the same code), with the quartiles of those ratios. Three clients, lightest first (their CPU comes off
    the two cores the decode step is using): the standard library's http.client (blocking reads,
    ~0.15 ms a token here), httpx's sync client (the `openai` package's default, ~0.26) and its
    asyncio client (the load generator's, the most). The same requests in interleaved rounds, each
    client kept open as a tool keeps its own, each first in turn."""
    times = {name: [] for name in ("in-process", *OVERHEAD_CLIENTS)}
    address = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=DEADLINE)
    with httpx.Client(timeout=DEADLINE) as sync_http:
        async with async_client(1) as async_http:
            for r in range(rounds):
                for i in range(len(PROMPT_LENGTHS)):
                    prompt, n = workload(0, i)
                    gen.generate_ids([prompt], n)
                    times["in-process"].append(1 / gen.stats["decode_tokens_per_s"])
                    for k in range(len(OVERHEAD_CLIENTS)):
                        client = OVERHEAD_CLIENTS[(r + i + k) % len(OVERHEAD_CLIENTS)]
                        if client == "http.client":
                            t, tokens = stdlib_decode_time(conn, prompt, n)
                        elif client == "httpx":
                            t, tokens = httpx_decode_time(sync_http, url, prompt, n)
                        else:
                            t, tokens = await asyncio_decode_time(async_http, url, prompt, n)
                        if tokens != n:  # (the server stops at an end-of-text token, the Generator here does not)
                            raise RuntimeError(f"{client}: {tokens} of {n} tokens came back: the pair would compare "
                                               "different requests")
                        times[client].append(t)
    conn.close()
    inproc = times.pop("in-process")
    ratios = {name: [t / base for t, base in zip(t_http, inproc, strict=True)] for name, t_http in times.items()}
    return statistics.median(inproc), {name: statistics.quantiles(r, n=4, method="inclusive")
                                       for name, r in ratios.items()}


def stdlib_decode_time(conn, prompt, max_tokens):
    conn.request("POST", "/v1/completions", json.dumps(request_body(prompt, max_tokens)),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"the server answered {r.status}: {r.read()[:200]!r}")
    return decode_time(iter(lambda: r.read1(65536), b""))


def httpx_decode_time(http, url, prompt, max_tokens):
    with http.stream("POST", url + "/v1/completions", json=request_body(prompt, max_tokens)) as r:
        r.raise_for_status()
        return decode_time(r.iter_raw())


async def asyncio_decode_time(http, url, prompt, max_tokens):
    """(decode time per token, tokens) of one request through the load generator's own reader."""
    stats = new_stats()
    await asyncio.wait_for(one_request(http, url, prompt, max_tokens, stats, NO_WINDOW), DEADLINE)
    return (stats["per_token"] or [None])[0], stats["tokens"]


def decode_time(reads):
    """(decode time per token, tokens) of one streamed request, from its raw reads (a blocking
    client's): the time between its first and last text chunks over its tokens after the first."""
    first = last = tokens = None
    pending = b""
    for data in reads:
        now = time.perf_counter()
        events, pending = sse_split(pending + data)
        for e in events:
            if e["choices"] and e["choices"][0]["text"]:
                first, last = first or now, now
            tokens = e["usage"]["completion_tokens"] if e.get("usage") else tokens
    return (last - first) / (tokens - 1), tokens


def pct(values, q):
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else float("nan")


def row(clients, label, s, base=None):
    tps = s["tokens"] / s["seconds"]
    ms = lambda v: f"{1000 * v:.0f}"  # noqa: E731
    ratio = f"{tps / base:.2f}x" if base else "1.00x"
    return (f"| {clients} | {label} | {tps:.1f} | {ratio} | {ms(pct(s['ttft'], 50))} | {ms(pct(s['ttft'], 99))} "
            f"| {ms(pct(s['itl'], 50))} | {ms(pct(s['itl'], 99))} | {s['done']} | {s['seconds']:.0f} |")


def checked(flag, convert=int, op=">=", bound=1):
    """An argparse type: a finite number with `value op bound`, else a one-line error naming `flag`."""
    return checked_type(convert, functools.partial(check_number, flag, integer=convert is int, op=op, bound=bound))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=checked("--clients"), nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--seconds", type=checked("--seconds", float, ">", 0), default=15.0,
                    help="length of each measured window")
    ap.add_argument("--warmup", type=checked("--warmup", float, ">=", 0), default=5.0,
                    help="seconds of load before each window opens (0: the window opens with the first requests)")
    ap.add_argument("--requests", type=checked("--requests"), default=40,
                    help="or close a window after this many finished requests")
    ap.add_argument("--max-batch", type=checked("--max-batch"), default=32, help="the batching server's --max-batch")
    ap.add_argument("--prefill-chunk", type=checked("--prefill-chunk", bound=0), default=PREFILL_CHUNK,
                    help="the batching server's --prefill-chunk (0: every waiting prompt whole); the "
                         "one-at-a-time server prefills each prompt whole")
    ap.add_argument("--turns", type=checked("--turns"), default=3,
                    help="windows per server per level, the servers alternating (A B B A ...); the sums reported")
    ap.add_argument("--rounds", type=checked("--rounds"), default=24,
                    help="interleaved rounds of the HTTP-overhead check")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="the servers' and the in-process Generator's --dtype")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    args.clients = list(dict.fromkeys(args.clients))  # a level named twice runs once
    device = resolve_device(args.device)
    torch.manual_seed(123)
    model = GPTModel(GPTConfig.from_preset("gpt2-small"), backend="auto").eval()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = save_checkpoint(Path(tmp) / "gpt2-124m-random.pt", model)
        servers = {"batching": ServerProcess(checkpoint, device, args.dtype, args.max_batch, 256, args.prefill_chunk),
                   # its best: with no other rows to keep moving, a prompt in chunks only costs it
                   "one at a time": ServerProcess(checkpoint, device, args.dtype, 1, 256, 0)}
        try:
            for s in servers.values():
                s.wait_up()
            gen = Generator(model.to(device), dtype=args.dtype)  # the in-process engine, the servers' dtype
            check_outputs(gen, servers)
            overhead = asyncio.run(per_token(gen, servers["batching"].url, args.rounds))
            del gen
            probe = ComputeProbe() if device.type == "cpu" else None
            host = [probe.summary("before the load windows")] if probe else []
            results = {}
            for clients in args.clients:
                for turn in range(args.turns):  # the servers take turns: the same host drift around them
                    for label, server in list(servers.items())[::1 if turn % 2 == 0 else -1]:
                        s = asyncio.run(load(server.url, clients, args.seconds, args.requests, args.warmup))
                        print(f"{clients} clients, {label}: {s['tokens'] / s['seconds']:.1f} tokens/s, "
                              f"{s['done']} requests")
                        results[clients, label] = add_stats(results.get((clients, label)), s)
            host += [probe.summary("after them")] if probe else []
        finally:
            for s in servers.values():
                s.stop()
    report(args, device, results, overhead, host)


def report(args, device, results, overhead, host):
    lines = [f"# Serving, GPT-2 124M random init, `gptfast serve --dtype {args.dtype}`, greedy, streamed",
             f"device: {device.type} ({device_name(device)}), torch {torch.__version__}, "
             f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit_id()}",
             f"command: python benchmarks/bench_serve.py --clients {' '.join(map(str, args.clients))} "
             f"--seconds {args.seconds:g} --warmup {args.warmup:g} --requests {args.requests} "
             f"--max-batch {args.max_batch} --device {args.device} "
             f"--dtype {args.dtype} --prefill-chunk {args.prefill_chunk} --turns {args.turns} --rounds {args.rounds}",
             f"load average at the end: {load_average()} "
             f"(this machine: {os.cpu_count()} cores, shared)", *host,
             f"mix: prompts of {'/'.join(map(str, PROMPT_LENGTHS))} tokens with {'/'.join(map(str, OUTPUT_LENGTHS))} "
             f"new tokens, in turn; each window: after {args.warmup:g} s of the load, --seconds, or until the "
             f"--requests-th request in it finishes (the rest dropped, not drained); {args.turns} window(s) per "
             "server per level, the servers alternating, summed", "",
             "| clients | server | tokens/s | vs one at a time | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) "
             "| ITL p99 (ms) | requests done | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for clients in args.clients:
        base = results[clients, "one at a time"]
        base_tps = base["tokens"] / base["seconds"]
        lines.append(row(clients, "one at a time (--max-batch 1 --prefill-chunk 0)", base))
        lines.append(row(clients, f"continuous batching (--max-batch {args.max_batch})", results[clients, "batching"],
                         base_tps))
    inproc, quartiles = overhead
    more = lambda ratio: f"{100 * (ratio - 1):+.1f}%"  # noqa: E731
    lines += ["", f"HTTP overhead at 1 client: decode time per token {1000 * inproc:.2f} ms in-process (Generator, "
              "median); streamed over HTTP through " +
              ", ".join(f"{name} {more(q[1])} (quartiles {more(q[0])}, {more(q[2])})"
                        for name, q in quartiles.items()) +
              f" (each: the median, over {args.rounds} interleaved rounds of the mix's 3 requests, of its time / the "
              "same request's in-process time earlier in the round; the clients' own CPU comes off the two "
              "cores the decode step uses, least with http.client's blocking reads)"]
    save_report(lines, Path(args.out) / f"serve_{device.type}_{args.dtype}.md")


if __name__ == "__main__":
    main()
