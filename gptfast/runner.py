"""The model side of the generation engine (gptfast.engine): a KV cache with one row per
sequence, the prefill of one row, and one decode step over rows [0, n) at different lengths.

Eager (CPU): a decode step runs the n rows over the keys filled so far, in one call of the fused
C++ step (gptfast.cpu_decode) where the model allows, else through the model's forward; the
fused step also takes prompts, alone or beside the decoding rows (fused_step). Static (CUDA): the
step has fixed shapes — the batch padded up to the next of a few sizes (1, 2, 4, ... up to
max_batch), the whole cache buffer, every index a device tensor — and is captured once per
size as a CUDA graph, the chosen token included (argmax, or the sampler with a device seed),
so a step costs one replay and the one host read of the ids. Padding rows decode token 0 at
slot 0 of rows that are free or about to be prefilled, which rewrites them anyway.
"""
from __future__ import annotations

import dataclasses
import itertools
import warnings

import torch

from .cpu_decode import FusedDecode
from .kv_cache import CacheStep, make_caches
from .sampling import SamplingParams, argmax_ids, sample


def batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes: powers of two below max_batch, then max_batch."""
    sizes, s = [], 1
    while s < max_batch:
        sizes.append(s)
        s *= 2
    return sizes + [max_batch]


def _cache_append(model, device):
    """How decode steps write the KV cache, chosen when the caches are made (Runner.reserve): one
    Triton kernel a layer under the triton backend on CUDA, else None: torch indexing, an arange
    and two index_put kernels a layer (93 of a bf16 GPT-2 token's 548 GPU-us on an H200). A
    backend switched later keeps it: the kernel is right under any backend."""
    if model.active_backend != "triton" or device.type != "cuda":
        return None
    from gptfast.kernels._attention_common import HEAD_DIMS
    from gptfast.kernels.attention_decode import cache_append
    return cache_append if model.cfg.head_dim in HEAD_DIMS else None


class Runner:
    def __init__(self, model, context_size: int, max_batch: int, device: torch.device, static: bool,
                 fused: bool = False, kv_dtype: torch.dtype | None = None):
        self.cfg, self.context_size, self.device = model.cfg, context_size, device
        self.sizes = batch_sizes(max_batch)
        self.static = static  # decode through the fixed-shape step (captured as a graph on CUDA)
        # eager steps in one C++ call (CPU), when asked for and the model has nothing it cannot run
        self.fused = FusedDecode.for_model(model) if fused and not static else None
        # the KV cache's dtype; by default float16 under the fused step, whose attention reads the
        # whole cache at every step (fp32: at the memory floor), else the model's
        if kv_dtype is not None and not (isinstance(kv_dtype, torch.dtype) and kv_dtype.is_floating_point):
            raise ValueError(f"kv_dtype must be a floating-point torch.dtype or None, got {kv_dtype!r}")
        if self.fused is not None and kv_dtype not in (None, torch.float32, torch.float16):
            raise ValueError(f"the fused CPU decode step keeps its KV cache in torch.float32 or torch.float16, "
                             f"got {kv_dtype}; pass fused_cpu_step=False for another dtype")
        self.kv_dtype = kv_dtype or (torch.float16 if self.fused is not None else model.tok_emb.weight.dtype)
        self.step = CacheStep()
        self.rows, self.caches = 0, []
        self.graphs, self.buffers = {}, {}
        self.pool = None  # one memory pool for every graph: they never run at once

    def reserve(self, model, rows: int):
        """Room for `rows` sequences: the cache grows to the next batch size, keeping its rows
        (graphs hold the old buffers' addresses, so they go)."""
        size = next(s for s in self.sizes if s >= rows)
        if size <= self.rows:
            return
        new = make_caches(model, size, self.context_size, self.kv_dtype, self.device, self.step,
                          _cache_append(model, self.device))
        for old, c in zip(self.caches, new):
            c.k[: self.rows], c.v[: self.rows] = old.k, old.v
        self.rows, self.caches, self.graphs, self.buffers = size, new, {}, {}

    def _forward(self, model, idx, positions=None):
        """Logits (B, vocab) of the last position."""
        h = model.hidden_states(idx, self.caches, positions=positions)
        return model.out_head(h[:, -1])[..., : self.cfg.vocab_size].float()

    def prefill(self, model, rows: list[int], windows: list[list[int]]) -> torch.Tensor:
        """Run sequences' windows (one length, at most context_size ids) into cache rows `rows`
        from slot 0: logits (B, V)."""
        self.step.prefill(torch.tensor(rows, device=self.device), len(windows[0]))
        return self._forward(model, torch.tensor(windows, device=self.device))

    def fused_step(self, rows: list[int], windows: list[list[int]], starts: list[int],
                   outputs: list[int]) -> torch.Tensor:
        """One call of the fused CPU step (self.fused) for sequences at any stage: windows[i] at
        positions starts[i], starts[i] + 1, ... of cache row rows[i] (a decoding sequence: its one
        pending token at its length; a prompt: all of it, or its next chunk). Logits
        (len(outputs), V) of the last token of windows[i] for i in outputs."""
        tokens = [t for w in windows for t in w]
        positions = [p for w, start in zip(windows, starts) for p in range(start, start + len(w))]
        row_of = [r for w, r in zip(windows, rows) for _ in w]
        last = list(itertools.accumulate(len(w) for w in windows))
        return self.fused(torch.tensor(tokens), torch.tensor(positions), torch.tensor(row_of),
                          torch.tensor([last[i] - 1 for i in outputs], dtype=torch.long), self.caches)

    def decode(self, model, tokens: list[int], lengths: list[int], params: SamplingParams | None = None,
               seed: torch.Tensor | None = None):
        """One token per row of rows [0, n): tokens[i] goes to slot lengths[i] of row i (its
        position). Returns logits (n, V) and ids (n,): argmax, or drawn under `params` with
        the (seed, offset) tensor `seed` — valid until the next decode (graph outputs)."""
        n = len(tokens)
        if not self.static:
            lengths_t = torch.tensor(lengths, device=self.device)
            if self.fused is not None and n <= self.fused.max_rows:
                rows = torch.arange(n)
                logits = self.fused(torch.tensor(tokens), lengths_t, rows, rows, self.caches)
            else:
                self.step.decode(lengths_t, max(lengths) + 1, lengths[0] if min(lengths) == max(lengths) else None)
                logits = self._forward(model, torch.tensor(tokens, device=self.device).view(n, 1),
                                       lengths_t.view(n, 1))
            return logits, (argmax_ids(logits) if params is None else sample(logits, params, seed))
        size = next(s for s in self.sizes if s >= n)
        buf = self.buffers.get(size)
        if buf is None:
            buf = self.buffers[size] = _StepBuffers(size, self.device)
        buf.fill(tokens, lengths, seed)
        key = (size, None if params is None else dataclasses.replace(params, seed=None), model.active_backend)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(model, buf, key[1])
        if graph is False:  # no graph here: the same fixed-shape step, run eagerly
            logits, ids = self._static_step(model, buf, key[1])
        else:
            graph.replay()
            logits, ids = graph.logits, graph.ids
        return logits[:n], ids[:n]

    def _static_step(self, model, buf, params):
        """The step a CUDA graph captures: fixed shapes, the whole cache, device indices."""
        self.step.decode(buf.pos.view(-1), self.context_size)
        logits = self._forward(model, buf.idx, buf.pos)
        return logits, (logits.argmax(-1) if params is None else sample(logits, params, buf.seed))

    def _capture(self, model, buf, params):
        """A captured `_Graph` of the static step, or False (with a warning) where there is none:
        a model not on CUDA, or ops that cannot be captured. Warm-up runs write the same K/V
        as the replay that follows."""
        if self.device.type != "cuda":
            warnings.warn(f"CUDA graphs need a model on CUDA, this one is on {self.device.type}; running the "
                          "fixed-shape decode step eagerly", RuntimeWarning, stacklevel=3)
            return False
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator) off the graph
                for _ in range(2):
                    self._static_step(model, buf, params)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.pool = self.pool or torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):  # outputs stay referenced: never reused
                logits, ids = self._static_step(model, buf, params)
            return _Graph(graph, logits, ids)
        except Exception as e:  # an op that cannot be captured: stay correct, just slower
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs",
                          RuntimeWarning, stacklevel=3)
            return False


class _StepBuffers:
    """The static step's inputs for one batch size, refilled in place (a graph reads them): ids,
    positions and the (seed, offset) pair, views of one device buffer that one copy fills."""

    def __init__(self, size: int, device):
        self.size = size
        self.inputs = torch.zeros(2 * size + 2, dtype=torch.long, device=device)
        self.idx = self.inputs[:size].view(size, 1)
        self.pos = self.inputs[size:2 * size].view(size, 1)
        self.seed = self.inputs[2 * size:]

    def fill(self, tokens, lengths, seed):
        pad = [0] * (self.size - len(tokens))  # padding rows: token 0 at slot 0
        host = torch.tensor(tokens + pad + lengths + pad)
        if seed is None:
            self.inputs[:2 * self.size].copy_(host, non_blocking=True)
        else:
            self.inputs.copy_(torch.cat([host, seed]), non_blocking=True)


class _Graph:
    def __init__(self, graph, logits, ids):
        self.graph, self.logits, self.ids = graph, logits, ids

    def replay(self):
        self.graph.replay()
