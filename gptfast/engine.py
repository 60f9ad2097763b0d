"""Continuous batching: one loop owns the model, many callers share it.

`Engine.submit` queues a request (one or more prompts, as token ids) from any thread and
returns a `Handle`. The engine's loop thread (started on demand, gone when idle) runs steps:
at each step boundary it admits queued requests into free cache rows, then decodes one token
for every running sequence in one batch (rows at different lengths: gptfast.runner) and
prefills the new prompts, samples, and reports each request's new text. A finished sequence
frees its row at once, so short requests never wait for long ones. On CPU the prompts join the
decoding rows' fused call, at most `prefill_chunk` of their tokens a step (a long prompt takes
a few steps), so a new prompt never stalls the decoding sequences for more than that.

Each request keeps the semantics of running alone: its prompt is cut from the left to the
context, a window that fills up slides (the last `context_size` tokens are recomputed
without the cache, as the classic `generate` does), and its random draws depend only on its
own seed and how many it has made (one draw per token for the request's prompts together, row
= prompt index; a prompt prefilled before the others waits for them), never on what else is in
the batch. A failure is confined to the request it belongs to.
"""
from __future__ import annotations

import atexit
import contextlib
import copy
import heapq
import itertools
import numbers
import operator
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch

from .runner import Runner
from .sampling import SamplingParams, argmax_ids, sample, seed_tensor
from .textout import TextOutput


class QueueFull(RuntimeError):
    """The engine's queue holds max_queue prompts already; try again later."""


# Prompt tokens a fused CPU step takes beside its decoding rows: a GPT-2 124M step of 16 int8 rows
# takes ~40 ms and each prompt token ~1.3 ms more, so a waiting 96-token prompt adds at most
# ~80 ms to the decoding sequences' next token instead of ~130 (bench_serve.py: ITL p99).
PREFILL_CHUNK = 64


# ---- input checks (one place: the Generator, the classic generate and the server use them) ----
def check_count(name, n, optional=False):
    """n an int >= 1 (or None when optional)."""
    if optional and n is None:
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be an integer >= 1{' or None' if optional else ''}, got {n!r}")


def check_max_new_tokens(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")


def check_eos_id(eos_id, vocab_size):
    """An eos id the model cannot produce would silently never stop generation."""
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}) or None, got {eos_id!r}")


def check_context_size(context_size, model_context) -> int:
    if isinstance(context_size, bool) or not isinstance(context_size, int) or not 1 <= context_size <= model_context:
        raise ValueError(f"context_size must be an integer in [1, {model_context}] (the model's context), "
                         f"got {context_size!r}")
    return context_size


def check_prompt_ids(prompts, vocab_size) -> list[list[int]]:
    try:  # operator.index: ints (or integer tensors), never a float silently truncated
        rows = [list(map(operator.index, p)) for p in prompts]
    except TypeError:
        raise ValueError("prompts must be a list of lists of integer token ids") from None
    if not rows:
        raise ValueError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return rows


def per_row(max_new_tokens, n) -> list[int]:
    """One budget per prompt from an int or a list of them."""
    if isinstance(max_new_tokens, (list, tuple)):
        if len(max_new_tokens) != n:
            raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts")
        budgets = list(max_new_tokens)
    else:
        budgets = [max_new_tokens] * n
    for b in budgets:
        check_max_new_tokens(b)
    return budgets


@dataclass
class Update:
    """What a request hears after a step, per prompt: new text and ids, and once finished
    why ("stop", "length", "cancelled" or "error" with its message)."""
    index: int
    text: str
    ids: list
    tokens: int  # generated so far (usage)
    finish: str | None = None
    error: str | None = None


class Handle:
    """A submitted request. Updates (lists of `Update`) go to `sink`, called on the engine's
    thread, or without one are read with `updates()`; `cancel()` frees its rows at the next
    step boundary."""

    def __init__(self, prompt_tokens: list[int], sink=None):
        self.prompt_tokens = prompt_tokens
        self._queue = queue.SimpleQueue() if sink is None else None
        self.sink = self._queue.put if sink is None else sink
        self.cancelled = False

    def cancel(self):
        self.cancelled = True

    def updates(self):
        """Block for the updates of every step until each prompt is finished."""
        left = len(self.prompt_tokens)
        while left:
            batch = self._queue.get()
            left -= sum(u.finish is not None for u in batch)
            yield batch


class _Seq:
    """One prompt in flight: `index` is its row in its group's draws, `number` its place in the request."""

    def __init__(self, index, number, window, out):
        self.index, self.number, self.window, self.out = index, number, window, out
        self.group = self.slot = self.pending = None
        self.filled = 0  # cache slots holding this sequence's keys
        self.held = None  # logits of a prompt prefilled before the rest of its request's prompts
        self.last = None  # when its last token came (time to first token, inter-token gaps)


class _Group:
    """Prompts of one request sampled together (at most max_batch: a larger request is split)."""

    def __init__(self, handle, seqs, params, seeds, submitted):
        self.handle, self.seqs, self.params, self.seeds = handle, seqs, params, seeds
        self.submitted, self.step, self.seed = submitted, 0, None
        for s in seqs:
            s.group = self

    def running(self):
        return [s for s in self.seqs if not s.out.done]

    def draw_seed(self):
        """The seed of the request's next draw (one per step that samples it)."""
        self.seed = self.seeds(self.step)
        self.step += 1


def counter_seeds(seed: int, chunk: int = 0, chunks: int = 1):
    """Step -> the op's (seed, offset): offsets unique per chunk of a split request."""
    return lambda step: torch.tensor([(seed + 2**63) % 2**64 - 2**63, step * chunks + chunk])


def drawn_seeds(generator: torch.Generator | None):
    """Step -> a seed drawn from `generator` (None: torch's default), as sample_top_k does."""
    return lambda step: seed_tensor(None, generator)


def private_model(model):
    """A module tree of the engine's own, in eval mode, sharing `model`'s parameters and
    buffers: its thread never flips the caller's train/eval mode (nor runs dropout while the
    caller trains), and weights updated in place are seen."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, shared).eval()


_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all():
    """At exit, stop every loop first: a thread killed inside a torch op aborts the process."""
    for engine in list(_ENGINES):
        engine.close(timeout=1.0)


class Engine:
    """The continuous-batching loop over one model (run as `private_model(model)`).
    `max_batch` sequences run at once (the cache grows to it on demand); `max_queue` bounds the
    prompts waiting (None: no bound); `cuda_graph` decodes through captured graphs on CUDA,
    `fused_cpu_step` through one C++ call per step on CPU (gptfast.cpu_decode) where it can;
    `kv_dtype` is the KV cache's dtype (None: float16 under the fused step, else the model's).
    `prefill_chunk`: under the fused step, the most prompt tokens a step takes beside the
    decoding rows (None: every waiting prompt whole).
    `observer`, when given, hears about steps, tokens and finished requests (gptfast.serve)."""

    def __init__(self, model, context_size: int | None = None, max_batch: int = 32, max_queue: int | None = None,
                 cuda_graph: bool = True, observer=None, fused_cpu_step: bool = True,
                 kv_dtype: torch.dtype | None = None, prefill_chunk: int | None = PREFILL_CHUNK):
        check_count("max_batch", max_batch)
        check_count("max_queue", max_queue, optional=True)
        check_count("prefill_chunk", prefill_chunk, optional=True)
        self.model = private_model(model)
        self.cfg = model.cfg
        self.device = model.tok_emb.weight.device
        ctx = self.cfg.context_length
        self.context_size = ctx if context_size is None else check_context_size(context_size, ctx)
        self.max_batch, self.max_queue, self.observer = max_batch, max_queue, observer
        self.prefill_chunk = prefill_chunk
        self.runner = Runner(self.model, self.context_size, max_batch, self.device,
                             static=cuda_graph and self.device.type == "cuda",
                             fused=fused_cpu_step and self.device.type == "cpu", kv_dtype=kv_dtype)
        self._lock = threading.Lock()
        self._queue: deque[_Group] = deque()
        self._waiting = 0  # prompts in the queue
        self._live: list[_Group] = []
        self._free = list(range(max_batch))  # a heap: the lowest free row first keeps batches short
        self._thread = None
        self._closed = False
        _ENGINES.add(self)

    # ---- callers' side (any thread) ---------------------------------------------------------
    def submit(self, prompts, max_new_tokens, params: SamplingParams, *, eos_id=None, stop=(), tokenizer=None,
               generator=None, draw_each_step=False, sink=None) -> Handle:
        """Queue one request: `prompts` (lists of token ids) with one budget each (an int or a
        list); text is decoded (and `stop` strings apply) when a tokenizer is given. Draws use
        params.seed, else a seed drawn now from `generator` (None: torch's default), or with
        `draw_each_step` one seed per step from it (the classic `generate`'s stream)."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        rows = check_prompt_ids(prompts, self.cfg.vocab_size)
        budgets = per_row(max_new_tokens, len(rows))
        check_eos_id(eos_id, self.cfg.vocab_size)
        handle = Handle([len(r) for r in rows], sink)
        if params.seed is not None and (generator is not None or draw_each_step):
            raise ValueError("give a seed or a generator, not both")
        seed = params.seed
        if seed is None and not draw_each_step and not params.greedy:  # torch.manual_seed governs it
            seed = int(seed_tensor(None, generator)[0])
        # greedy prompts need nothing from each other: each joins the batch on its own; sampled
        # ones share one draw per token, so they run together (a request over max_batch in chunks)
        size = 1 if params.greedy else self.max_batch
        chunks = [range(i, min(i + size, len(rows))) for i in range(0, len(rows), size)]
        now = time.perf_counter()
        groups = [_Group(handle, [_Seq(i - c.start, i, rows[i][-self.context_size:],
                                       TextOutput(tokenizer, budgets[i], eos_id, list(stop))) for i in c],
                         params, counter_seeds(seed, n, len(chunks)) if seed is not None else drawn_seeds(generator), now)
                  for n, c in enumerate(chunks)]
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is shut down")
            if self.max_queue is not None and self._waiting + len(rows) > self.max_queue:
                raise QueueFull(f"{self._waiting} prompts are waiting (max_queue {self.max_queue})")
            self._queue.extend(groups)
            self._waiting += len(rows)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gptfast-engine", daemon=True)
                self._thread.start()
        return handle

    def waiting(self) -> int:
        """Prompts queued, not yet in the batch."""
        return self._waiting

    def running(self) -> int:
        return sum(len(g.running()) for g in self._live)

    def close(self, timeout: float = 5.0):
        """Refuse new requests, cancel the ones in flight, and wait for the loop to stop."""
        with self._lock:
            self._closed = True
            for g in [*self._queue, *self._live]:
                g.handle.cancel()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    # ---- the loop (its own thread) ------------------------------------------------------------
    def _loop(self):
        device = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with torch.inference_mode(), device:
            while True:
                with self._lock:
                    admitted, dropped = self._admit()
                    idle = not self._live and not admitted
                    if idle:
                        self._thread = None  # a later submit starts a new loop
                    self._live.extend(admitted)  # live at once: a failure below reaches them too
                for g in dropped:  # cancelled while queued
                    self._emit(g, [self._finish(s, "cancelled") for s in g.seqs])
                if idle:
                    break
                try:
                    self._step(admitted)
                except Exception as e:  # nothing to blame one request for: fail this batch, keep serving
                    for g in list(self._live):
                        self._fail(g, e)

    def _admit(self):
        """Queued requests that fit into free rows now, in order (under the lock)."""
        admitted, dropped = [], []
        while self._queue:
            g = self._queue[0]
            if g.handle.cancelled:
                dropped.append(self._queue.popleft())
                self._waiting -= len(g.seqs)
                continue
            need = len(g.running())
            if need > len(self._free):
                break
            self._queue.popleft()
            self._waiting -= len(g.seqs)
            for s in g.running():
                s.slot = heapq.heappop(self._free)
            admitted.append(g)
        return admitted, dropped

    def _step(self, admitted):
        model = self.model
        for g in admitted:  # prompts with nothing to generate finish at once
            done = [self._update(s) for s in g.seqs if s.out.done]
            if done:
                self._emit(g, done)
        for g in list(self._live):
            if g.handle.cancelled:
                self._release(g, [self._finish(s, "cancelled") for s in g.running()])
            elif not g.running():
                self._release(g, [])
        if not self._live:
            return
        self.runner.reserve(model, 1 + max(s.slot for g in self._live for s in g.running()))
        start = time.perf_counter()
        logits, parts = self._forward(model)
        self._sample(logits, parts)
        self._deliver(parts, start)

    def _forward(self, model):
        """Run the decoding sequences one token further and the prompts' next tokens into the
        cache (all of them; on CPU at most a chunk): (logits (V,) by sequence whose next token
        is due now, and [(ids, sequences they decide)] for the ids the decode step chose already)."""
        ctx = self.context_size
        seqs = [s for g in self._live for s in g.running()]
        for s in seqs:  # a full window slides: recompute it without the cache (one held has no new token)
            if s.pending is not None and ctx <= s.filled < len(s.window):
                s.window, s.filled = s.window[-ctx:], 0
        dec = [s for s in seqs if s.pending is not None and s.filled == len(s.window) - 1]
        decoding = set(dec)
        # prompts new or partly prefilled, then slid windows (a sliding sequence comes back at
        # each of its tokens: first, it would take every chunk); not those held for their request
        waiting = [s for s in seqs if s not in decoding and s.filled < len(s.window)]
        prompts = [s for s in waiting if s.pending is None] + [s for s in waiting if s.pending is not None]
        logits, parts = {}, []
        if self.runner.fused is not None and prompts:  # the prompts join the decoding rows' calls
            self._fused(model, dec, prompts, logits)
            return self._whole_requests(logits), parts
        if dec:
            group = None if prompts else self._fused_group(dec)
            if group is not None:
                group.draw_seed()
            n = 1 + max(s.slot for s in dec)
            tokens, lengths, owner = [0] * n, [0] * n, [None] * n
            for s in dec:
                tokens[s.slot], lengths[s.slot] = s.pending, s.filled
                owner[s.slot] = s if s.group.params.greedy or s.group is group else None
                s.filled += 1
            out, ids = self.runner.decode(model, tokens, lengths, *((group.params, group.seed) if group else ()))
            logits.update((s, out[s.slot]) for s in dec)
            parts.append((ids, owner))
        self._prefill(model, prompts, logits)  # whole prompts (no fused step), after the decode's padding rows
        return logits, parts

    def _fused(self, model, dec, prompts, logits):
        """Decoding sequences and prompts through the fused CPU step: the decoding ones with at
        most `prefill_chunk` prompt tokens (and at most max_rows, the rows up to which the step's
        matmuls beat torch's), in `prompts`' order (a prompt's logits once its last token is in),
        in calls of at most max_rows tokens; without a chunk, a prompt longer than max_rows is
        prefilled by the model's forward. A failed call fails the requests in it."""
        limit, budget = self.runner.fused.max_rows, self.prefill_chunk
        budget = budget if budget is None else min(budget, limit)
        pieces, whole = [(s, [s.pending], s.filled) for s in dec], []
        for s in prompts:
            take = len(s.window) - s.filled
            if budget is not None:
                take = min(take, budget)
                budget -= take
            elif take > limit:
                whole.append(s)
                continue
            if take:
                pieces.append((s, s.window[s.filled: s.filled + take], s.filled))
        calls, size = [[]], 0
        for piece in pieces:
            if size + len(piece[1]) > limit:
                calls.append([])
                size = 0
            calls[-1].append(piece)
            size += len(piece[1])
        for call in calls:
            call = [p for p in call if not p[0].out.done]
            ends = [i for i, (s, w, start) in enumerate(call) if start + len(w) == len(s.window)]
            out = self._failing_alone([s for s, _, _ in call], lambda: self.runner.fused_step(
                [s.slot for s, _, _ in call], [w for _, w, _ in call], [p for _, _, p in call], ends))
            if out is None:
                continue
            for s, window, start in call:
                s.filled = start + len(window)
            logits.update((call[i][0], row) for i, row in zip(ends, out))
        self._prefill(model, whole, logits)

    @staticmethod
    def _whole_requests(logits):
        """`logits` less the sequences whose request still has prompts being prefilled (held until
        the last is in, so a request's prompts draw together, as when they are prefilled in one
        step), plus the held ones of requests whose last prompt is now in."""
        groups = {id(s.group): s.group for s in logits}.values()
        for g in groups:
            if any(s.filled < len(s.window) for s in g.running()):
                for s in g.running():
                    if s in logits:
                        s.held = logits.pop(s)
            else:
                for s in g.running():
                    if s.held is not None:
                        logits[s], s.held = s.held, None
        return logits

    def _prefill(self, model, seqs, logits):
        """Prefill windows of equal length together; a failed forward fails the requests in it."""
        by_length = {}
        for s in seqs:
            by_length.setdefault(len(s.window), []).append(s)
        for same in by_length.values():
            for i in range(0, len(same), self.max_batch):
                chunk = [s for s in same[i: i + self.max_batch] if not s.out.done]
                out = self._failing_alone(chunk, lambda: self.runner.prefill(
                    model, [s.slot for s in chunk], [s.window for s in chunk]))
                for s, row in zip(chunk, out if out is not None else []):
                    logits[s], s.filled = row, len(s.window)

    def _failing_alone(self, seqs, forward):
        """forward()'s logits for `seqs`; if it raises, their requests fail (the others go on) and
        there are none (None)."""
        if not seqs:
            return []
        try:
            return forward()
        except Exception as e:
            for g in {id(s.group): s.group for s in seqs}.values():
                self._fail(g, e)
            return None

    @staticmethod
    def _fused_group(dec):
        """The one sampled request whose draw can run inside the decode step: alone in it,
        no prefill this step, its prompt i in row i (the sampler's row)."""
        groups = {id(s.group): s.group for s in dec}
        if len(groups) != 1:
            return None
        (g,) = groups.values()
        return None if g.params.greedy or any(s.slot != s.index for s in g.running()) else g

    def _sample(self, logits, parts):
        """Ids for the sequences the decode step did not decide: argmax for greedy ones, and
        one draw per sampled request over its prompts (row i = prompt i)."""
        decided = {s for _, owners in parts for s in owners if s is not None}
        rest = [s for s in logits if s not in decided and not s.out.done]
        greedy = [s for s in rest if s.group.params.greedy]
        if greedy:
            parts.append((argmax_ids(torch.stack([logits[s] for s in greedy])), greedy))
        for g in {id(s.group): s.group for s in rest if not s.group.params.greedy}.values():
            filler = next(logits[s] for s in g.seqs if s in logits)  # rows of finished prompts: unused
            g.draw_seed()
            try:
                ids = sample(torch.stack([logits.get(s, filler) for s in g.seqs]), g.params, g.seed)
            except Exception as e:
                self._fail(g, e)
                continue
            parts.append((ids, [s if s in logits else None for s in g.seqs]))

    def _deliver(self, parts, start):
        """Read every chosen id back at once (the step's one host sync), push each to its
        prompt's output, and tell each request what it got."""
        if len(parts) > 1:
            ids = torch.cat([t.view(-1) for t, _ in parts]).tolist()
        else:  # one group decoding (the usual step): no cat kernel before the read
            ids = parts[0][0].view(-1).tolist() if parts else []
        owners = [s for _, o in parts for s in o]
        now = time.perf_counter()
        touched = {}
        for s, token in zip(owners, ids):
            if s is None or s.out.done:  # padding rows, prompts of failed requests
                continue
            try:
                if token < 0:
                    raise RuntimeError("the logits held NaN or +inf (the sampler returned no token)")
                s.out.push(token)
            except Exception as e:  # e.g. its stop-string handling: only this request fails
                self._fail(s.group, e)
                continue
            s.window.append(token)
            s.pending = token
            if self.observer is not None:
                self.observer.token(now - (s.group.submitted if s.last is None else s.last), first=s.last is None)
            s.last = now
            touched.setdefault(id(s.group), (s.group, []))[1].append(s)
        if self.observer is not None:
            self.observer.step(sum(len(seqs) for _, seqs in touched.values()), now - start)
        for g, seqs in touched.values():
            if g not in self._live:  # failed above, and told so
                continue
            self._release(g, [self._finish(s, s.out.finish) if s.out.done else self._update(s) for s in seqs])

    # ---- bookkeeping ---------------------------------------------------------------------------
    def _update(self, s) -> Update:
        text = s.out.new_text() if s.out.tokenizer is not None else ""
        return Update(s.number, text, s.out.new_ids(), s.out.n_tokens, s.out.finish)

    def _finish(self, s, reason, error=None) -> Update:
        """Finish `s` (if it is not already) and give its row back."""
        if s.out.finish is None or reason in ("cancelled", "error"):
            s.out.finish = reason
        if s.slot is not None:
            with self._lock:
                heapq.heappush(self._free, s.slot)
            s.slot = None
        update = self._update(s)
        update.error = error
        if self.observer is not None:
            self.observer.finished(reason)
        return update

    def _emit(self, g, updates):
        try:
            g.handle.sink(updates)
        except Exception:  # the listener is gone (a closed event loop...): stop its work
            g.handle.cancel()

    def _release(self, g, updates):
        """Send `updates`; a request with nothing left running leaves the batch."""
        if updates:
            self._emit(g, updates)
        if not g.running() and g in self._live:
            self._live.remove(g)

    def _fail(self, g, error):
        msg = f"{type(error).__name__}: {error}"
        self._release(g, [self._finish(s, "error", msg) for s in g.running()])
