"""Text generation: the classic `generate` (now with a KV cache) and `Generator`, the engine
for repeated use: static KV cache sized to the context, prefill in one forward, one-token
decode steps (one CUDA-graph replay each on GPU), batching, streaming, stop strings.

Sliding context: once a row's window is full, each further token recomputes the last
`context_size` tokens without the cache — exactly the classic behaviour, so greedy output
always equals the no-cache reference.
"""
from __future__ import annotations

import argparse
import codecs
import math
import numbers
import operator
import os
import time
import warnings

import torch

from .backends import resolve_device
from .evaluation import eval_mode
from .kv_cache import make_caches
from .quant import DTYPES, inference_copy
from .sampling import sample_top_k
from .tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer


# Type checks too: a float budget or a string setting is a one-line error, never truncated
# silently nor a TypeError deep in the decode loop.
def check_max_new_tokens(n):
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {n!r}")


def check_temperature(t):
    if not isinstance(t, numbers.Real) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")


def check_top_k(k):
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):  # int: as sample_top_k
        raise ValueError(f"top_k must be a positive integer or None, got {k!r}")


def check_top_p(p):
    if p is not None and not (isinstance(p, numbers.Real) and 0 < p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {p!r}")


def check_eos_id(eos_id, vocab_size):
    """An eos id the model cannot produce would silently never stop generation."""
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int)
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be a token id in [0, {vocab_size}) or None, got {eos_id!r}")


def check_sampling(temperature=0.0, top_k=None, top_p=None):
    """One-line ValueErrors for sampling settings out of range."""
    check_temperature(temperature)
    check_top_k(top_k)
    check_top_p(top_p)


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from logits (B, V): argmax at temperature 0, else sampled."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return sample_top_k(logits.float(), top_k, temperature, top_p=top_p, generator=generator)


def classic_sample_next(logits, temperature=0.0, top_k=None):
    """The classic code's sampling, op for op, so that a seed gives its tokens: top-k keeps every
    token tied with the k-th logit, then logits / temperature, softmax, and one torch.multinomial
    draw from torch's global RNG (even when one token is left); greedy is argmax."""
    if top_k is not None:
        top_logits, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = torch.where(logits < top_logits[:, -1:], torch.tensor(float("-inf")).to(logits.device), logits)
    if temperature > 0.0:
        probs = torch.softmax(logits / temperature, dim=-1)
        return torch.multinomial(probs, num_samples=1).squeeze(-1)
    return torch.argmax(logits, dim=-1)


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             top_p=None, use_cache=True, generator=None):
    """The classic `generate`: token ids (B, T) -> (B, T + new). Each step conditions on the last
    `context_size` tokens; a row stops at `eos_id` (not appended; with B > 1 finished rows are
    filled with eos_id until every row is done).

    Greedy decoding uses a KV cache (`use_cache=False`: the classic recompute-every-step path).
    Sampling with neither `generator` nor `top_p` is the classic code exactly (classic_sample_next
    on torch's global RNG, every step recomputed as there, since cached logits can differ in the
    last bit): after torch.manual_seed(123) it gives the classic code's tokens. With a
    `generator` (or `top_p`), sampling is the fused sampler with the cache: its own random
    stream, exactly k tokens kept at ties, much faster."""
    check_max_new_tokens(max_new_tokens)
    check_sampling(temperature, top_k, top_p)
    check_eos_id(eos_id, model.cfg.vocab_size)
    if not isinstance(context_size, int) or not 1 <= context_size <= model.cfg.context_length:
        raise ValueError(f"context_size must be an integer in [1, {model.cfg.context_length}] (the model's "
                         f"context), got {context_size!r}")
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0 or idx.is_floating_point():
        got = f"shape {tuple(idx.shape)}, {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a non-empty (batch, tokens) tensor of token ids, got {got}")
    classic = temperature > 0 and generator is None and top_p is None
    if use_cache and not classic:
        engine = Generator(model, dtype=None, device=idx.device, context_size=context_size)
        new = engine.generate_ids(idx.tolist(), max_new_tokens, temperature, top_k, top_p, eos_id,
                                  generator=generator)
        width = max(map(len, new))
        new = [row + [eos_id] * (width - len(row)) for row in new]
        return torch.cat([idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).view(len(new), width)], 1)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V)
        nxt = classic_sample_next(logits, temperature, top_k) if classic else \
            sample_next(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        idx = torch.cat((idx, nxt[:, None].to(idx.dtype)), dim=1)
    return idx


class _Request:
    """One prompt's output: token ids, text decoded incrementally (incomplete UTF-8 bytes are
    held back until the token that completes them), and its stopping rules."""

    def __init__(self, tokenizer, max_new_tokens, eos_id, stop):
        self.tokenizer, self.max_new, self.eos_id, self.stop = tokenizer, int(max_new_tokens), eos_id, stop
        self.ids, self.text, self.emitted = [], "", 0
        self.done = self.max_new == 0
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int):
        if token == self.eos_id:
            return self._finish()
        self.ids.append(token)
        if self.tokenizer is not None:
            start = len(self.text)
            self.text += self.utf8.decode(self.tokenizer.decode_single_token_bytes(token))
            hits = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i >= 0]
            if hits:  # cut at the earliest stop string, which is not part of the output
                self.text = self.text[: min(hits)]
                return self._finish(flush=False)
        if len(self.ids) >= self.max_new:
            self._finish()

    def _finish(self, flush=True):
        if flush and self.tokenizer is not None:
            self.text += self.utf8.decode(b"", final=True)
        self.done = True

    def new_text(self) -> str:
        """Text not yet streamed; a tail that could begin a stop string waits for the next token."""
        hold = 0 if self.done else max((len(s) - 1 for s in self.stop), default=0)
        end = max(self.emitted, len(self.text) - hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece


class Generator:
    """Repeated generation with one model: `generate` (text or batches of text), `generate_ids`,
    `stream`. `dtype`: "auto" (bfloat16 on CUDA; float16 on CPU, where torch's fp16 matrix-vector
    kernel beat int8 weight-only and bf16 — benchmarks/results/generate_cpu.md), "float32",
    "bfloat16", "float16", "int8" (weight-only), or None to use the model as it is.
    A converted copy is made when needed; the caller's model is never modified (each forward
    runs in eval mode; its train/eval mode is restored at once)."""

    def __init__(self, model, tokenizer=None, dtype="auto", device=None, context_size=None, cuda_graph=True):
        device = resolve_device(device) if device is not None else model.tok_emb.weight.device
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float16"  # CPU: fastest measured, see benchmarks/
        elif dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
        self.dtype, self.device = dtype, device
        self.model = inference_copy(model, dtype, device)
        self.cfg = model.cfg
        self.context_size = self.cfg.context_length if context_size is None else int(context_size)
        if not 0 < self.context_size <= self.cfg.context_length:
            raise ValueError(f"context_size must be in [1, {self.cfg.context_length}] (the model's context), "
                             f"got {context_size}")
        self._tokenizer = tokenizer
        self.cuda_graph = cuda_graph and device.type == "cuda"  # decided here: graphs record CUDA work only
        self.static_step = self.cuda_graph  # decode through the step a graph captures (tests set it on CPU)
        self._buffers = self._owner = None
        self.stats = {}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer()
        return self._tokenizer

    # ---- public API -------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                 stop=None, seed=None):
        """Completion text for a prompt (str), or a list of completions for a list of prompts.
        `max_new_tokens` may be a list (one per prompt); `stop`: a string or list of strings."""
        requests = list(self._run(prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed,
                                  stream=False))[-1]
        texts = [r.text for r in requests]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
               stop=None, seed=None):
        """Yield the completion of one prompt as text pieces, as tokens are produced."""
        if not isinstance(prompt, str):
            raise ValueError("stream() takes one prompt string; use generate() for batches")
        for (request,) in self._run(prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed,
                                    stream=True):
            piece = request.new_text()
            if piece:
                yield piece

    def generate_ids(self, prompts, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                     seed=None, generator=None):
        """New token ids (eos excluded) for each prompt in a list of token-id lists."""
        check_sampling(temperature, top_k, top_p)
        check_eos_id(eos_id, self.cfg.vocab_size)
        rows = self._check_ids(prompts)
        requests = [_Request(None, n, eos_id, []) for n in self._per_row(max_new_tokens, len(rows))]
        self._drain(self._steps(rows, requests, temperature, top_k, top_p, generator or self._rng(seed)))
        return [r.ids for r in requests]

    # ---- request handling ---------------------------------------------------------------
    def _run(self, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed, stream):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        check_sampling(temperature, top_k, top_p)
        check_eos_id(eos_id, self.cfg.vocab_size)
        ids = self._check_ids([self.tokenizer.encode(p, allowed_special={EOT_TOKEN}) for p in prompts])
        requests = [_Request(self.tokenizer, n, eos_id, stop) for n in self._per_row(max_new_tokens, len(ids))]
        steps = self._steps(ids, requests, temperature, top_k, top_p, self._rng(seed))
        if stream:
            for _ in steps:
                yield requests
        else:
            self._drain(steps)
        yield requests  # final: streaming flushes text held back for stop strings

    @staticmethod
    def _drain(steps):
        for _ in steps:
            pass

    @staticmethod
    def _per_row(max_new_tokens, n):
        if isinstance(max_new_tokens, (list, tuple)):
            if len(max_new_tokens) != n:
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts")
            budgets = list(max_new_tokens)
        else:
            budgets = [max_new_tokens] * n
        for b in budgets:
            check_max_new_tokens(b)
        return budgets

    def _check_ids(self, prompts):
        try:  # operator.index: ints (or integer tensors), never a float silently truncated
            rows = [list(map(operator.index, p)) for p in prompts]
        except TypeError:
            raise ValueError("prompts must be a list of lists of integer token ids") from None
        if not rows:
            raise ValueError("no prompts given")
        for i, row in enumerate(rows):
            if not row:
                raise ValueError(f"prompt {i} is empty; give at least one token")
            bad = [t for t in row if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return rows

    def _rng(self, seed):
        return None if seed is None else torch.Generator(self.device).manual_seed(int(seed))

    # ---- the engine ---------------------------------------------------------------------
    @torch.inference_mode()
    def _steps(self, rows, requests, temperature, top_k, top_p, generator):
        """Decode until every request is done; yields after each token (for streaming)."""
        if not all(r.done for r in requests):
            yield from self._loop(rows, requests, temperature, top_k, top_p, generator)

    def _loop(self, rows, requests, temperature, top_k, top_p, generator):
        """One call's decode. Its state is local: `windows` (each row's token ids in the current
        context), `slots` (cache slots filled, the same for every row: prompts are left-padded)
        and `pos` (B, 1), each row's next position. The engine keeps only the static buffers."""
        run = self._owner = object()  # the buffers now hold this call's cache
        self.stats = {}
        t0 = time.perf_counter()
        windows = [row[-self.context_size:] for row in rows]
        buf = self._buffers_for(len(windows))
        logits, slots, pos = self._prefill(buf, windows)
        n_tokens, n_first, ttft = 0, 0, None
        while True:
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
            for request, window, token in zip(requests, windows, nxt.tolist()):
                if not request.done:
                    request.push(token)
                    n_tokens += 1
                window.append(token)
            if ttft is None:
                ttft, n_first = time.perf_counter() - t0, n_tokens
            yield
            if all(r.done for r in requests):
                break
            if self._owner is not run:
                raise RuntimeError("this stream was paused while another generate/stream call on the same "
                                   "Generator reused its KV cache; start the stream again")
            if slots == self.context_size:  # window full: slide it, recompute without the cache
                windows = [w[-self.context_size:] for w in windows]
                logits, slots, pos = self._prefill(buf, windows)
            else:
                logits = self._decode_step(buf, nxt.view(-1, 1), slots, pos)
                slots, pos = slots + 1, pos + 1
        total = time.perf_counter() - t0
        self.stats = dict(time_to_first_token_s=ttft, total_s=total, new_tokens=n_tokens,
                          tokens_per_s=n_tokens / total,
                          decode_tokens_per_s=(n_tokens - n_first) / (total - ttft) if n_tokens > n_first else 0.0)

    def _logits(self, h):
        """Logits (B, vocab) of the last position's hidden state only."""
        return self.model.out_head(h[:, -1])[..., : self.cfg.vocab_size].float()

    def _buffers_for(self, batch):
        """The static buffers for this batch size; those of another size are dropped (with
        their graphs), which bounds memory to one batch size's cache."""
        if self._buffers is None or self._buffers.batch != batch:
            self._buffers = None  # free the old cache before allocating the new one
            self._buffers = _Buffers(self.model, batch, self.context_size, self.device)
        return self._buffers

    def _prefill(self, buf, windows):
        """Run the (left-padded) windows through the model in one forward, refilling the cache.
        Returns the last logits (B, V), the slots filled and each row's next position (B, 1)."""
        B, T = len(windows), max(map(len, windows))
        idx = torch.zeros(B, T, dtype=torch.long)
        valid = torch.zeros(B, T, dtype=torch.bool)
        for i, w in enumerate(windows):
            idx[i, T - len(w):] = torch.tensor(w)
            valid[i, T - len(w):] = True
        # positions count real tokens only: a row padded by p starts at position 0 in slot p
        positions = (valid.cumsum(1) - 1).clamp(min=0)  # (B, T)
        padded = not bool(valid.all())
        buf.set_static(False)
        valid_dev = valid.to(self.device) if padded else None  # one copy for every layer's cache
        for c in buf.caches:
            c.reset(valid_dev)
        # eval mode around each forward, never across a yield: a paused stream must neither leave
        # the caller's model in eval nor switch it back during another call
        with eval_mode(self.model):
            h = self.model.hidden_states(idx.to(self.device), buf.caches,
                                         positions=positions.to(self.device) if padded else None)
            logits = self._logits(h)
        return logits, T, positions[:, -1:].to(self.device) + 1

    def _decode_step(self, buf, idx, slot, pos):
        """Logits (B, V) after one token per row, idx (B, 1) at positions pos (B, 1), written
        to cache slot `slot`. Eager: attends over the filled prefix. CUDA: the static step
        (whole-buffer cache, device write index) replayed from a graph."""
        if not self.static_step:
            buf.set_static(False)
            with eval_mode(self.model):
                return self._logits(self.model.hidden_states(idx, buf.caches, positions=pos))
        buf.set_static(True)
        buf.write_pos.fill_(slot)  # in place: the graph reads this tensor
        if not self.cuda_graph:  # the static step itself, without a graph
            with self._eval():
                return self._static_step(buf, idx, pos)
        # what the captured ops depend on: padded rows take the masked path, not the decode
        # kernel; the model's op modules may be switched between calls (it can be the caller's)
        key = (buf.caches[0].padded, self.model.active_backend)
        graph = buf.graphs.get(key)
        with eval_mode(self.model):  # the graph is captured (and replayed) with dropout off
            if graph is None:
                graph = buf.graphs[key] = self._capture(buf, pos)
            if graph is False:  # capture failed once: run the same static step eagerly
                return self._static_step(buf, idx, pos)
            return graph.replay(idx, pos)

    def _static_step(self, buf, idx, pos):
        """The step a CUDA graph captures: fixed shapes, every index a device tensor."""
        return self._logits(self.model.hidden_states(idx, buf.caches, positions=pos))

    def _capture(self, buf, pos):
        """A `_Graph` of the static step for buf's batch size, or False (with a warning) when
        this model's ops cannot be captured. Warm-up runs write junk K/V at slot write_pos;
        the replay (or the eager fallback) that follows overwrites that slot."""
        if self.device.type != "cuda":  # a capture of CPU work records nothing: replays would be stale
            raise RuntimeError(f"CUDA graphs need a model on a CUDA device; this Generator's is on {self.device} "
                               "(construct it there, or set cuda_graph=False)")
        idx_buf = torch.zeros(buf.batch, 1, dtype=torch.long, device=self.device)
        pos_buf = pos.clone()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (Triton compiles, allocator) off the graph
                for _ in range(2):
                    self._static_step(buf, idx_buf, pos_buf)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = self._static_step(buf, idx_buf, pos_buf)
            return _Graph(g, idx_buf, pos_buf, out)
        except Exception as e:  # a backend op that cannot be captured: stay correct, just slower
            warnings.warn(f"CUDA graph capture failed ({type(e).__name__}: {e}); decoding without graphs",
                          RuntimeWarning, stacklevel=2)
            return False


class _Buffers:
    """Static decode buffers for one batch size: every layer's KV cache, the (1,) device tensor
    with the slot a static step writes (shared by all layers), and the CUDA graphs captured
    over exactly these tensors (keyed by padding and the model's backend), so no graph outlives them."""

    def __init__(self, model, batch, context_size, device):
        self.batch = batch
        self.write_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.caches = make_caches(model, batch, context_size, model.tok_emb.weight.dtype, device, self.write_pos)
        self.graphs = {}

    def set_static(self, static: bool):
        for c in self.caches:
            c.static = static


class _Graph:
    """A captured static step: its input buffers are refreshed in place, then it is replayed."""

    def __init__(self, graph, idx, pos, out):
        self.graph, self.idx, self.pos, self.out = graph, idx, pos, out

    def replay(self, idx, pos):
        self.idx.copy_(idx)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.out.clone()  # the next replay overwrites out


# ---- CLI -------------------------------------------------------------------------------------
def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a checkpoint or GPT-2 weights",
                              description="Generate text with a KV cache (greedy, temperature, top-k, top-p).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file written by `gptfast train`")
    src.add_argument("--gpt2", metavar="SIZE", help="GPT-2 weights: 124M, 355M, 774M, 1558M or a path (gptfast.weights)")
    p.add_argument("--models-dir", default="models", help="where GPT-2 weights are stored (with --gpt2)")
    p.add_argument("--prompt", default="Every effort moves you", help="prompt text")
    p.add_argument("--batch-file", help="file with one prompt per line, generated as one batch")
    p.add_argument("--max-new-tokens", type=_arg(int, check_max_new_tokens), default=50,
                   help="tokens to generate per prompt (>= 0)")
    p.add_argument("--temperature", type=_arg(float, check_temperature), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=_arg(int, check_top_k), default=None,
                   help="sample among the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=_arg(float, check_top_p), default=None,
                   help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="weights: auto = bfloat16 on CUDA, float16 on CPU; int8 = weight-only int8 linears")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "torch", "triton"),
                   help="compute backend (auto: triton on CUDA, else torch)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; None = cuda when available")
    p.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s")
    p.set_defaults(func=run_cli)


def _arg(convert, check):
    """An argparse `type=`: the text converted, then checked; argparse prints the one-line
    error with the option's name ("argument --top-p: top_p must be in (0, 1], got 1.5")."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if convert is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    parse.__name__ = convert.__name__  # argparse names the type in some messages
    return parse


def _load(args):
    from .weights import load_source  # a checkpoint, a GPT-2 size, or a GPT-2 directory/file
    device = resolve_device(args.device)
    return load_source(args.checkpoint, args.gpt2, args.models_dir, backend=args.backend, device=device), device


def run_cli(args):
    if args.batch_file:
        if not os.path.isfile(args.batch_file):
            raise ValueError(f"--batch-file {args.batch_file} does not exist or is not a file")
        try:
            with open(args.batch_file, encoding="utf-8") as f:
                prompts = [line.rstrip("\n") for line in f if line.strip()]
        except UnicodeDecodeError as e:
            raise ValueError(f"--batch-file {args.batch_file} is not UTF-8 text ({e.reason} at byte {e.start})"
                             ) from None
        if not prompts:
            raise ValueError(f"--batch-file {args.batch_file} has no prompts")
    elif not args.prompt:
        raise ValueError("--prompt is empty; give some text to continue")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model, device = _load(args)
    engine = Generator(model, dtype=args.dtype, device=device)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, eos_id=EOT_ID if args.eos else None, stop=args.stop, seed=args.seed)
    if args.batch_file:
        for prompt, text in zip(prompts, engine.generate(prompts, **opts)):
            print(f"=== {prompt}\n{prompt}{text}\n")
    elif args.stream:
        print(args.prompt, end="", flush=True)
        for piece in engine.stream(args.prompt, **opts):
            print(piece, end="", flush=True)
        print()
    else:
        print(args.prompt + engine.generate(args.prompt, **opts))
    if args.verbose:
        s = engine.stats
        print(f"[{engine.dtype} on {device}] {s.get('new_tokens', 0)} tokens in {s.get('total_s', 0):.2f} s: "
              f"time to first token {1000 * (s.get('time_to_first_token_s') or 0):.1f} ms, "
              f"{s.get('tokens_per_s', 0):.1f} tokens/s", flush=True)
    return 0
