"""Text generation: the classic `generate` and `Generator`, the API for repeated use (text or
token ids, batches, streaming, stop strings), both on the continuous-batching engine
(gptfast.engine: static KV cache, prefill in one forward, one-token decode steps, one
CUDA-graph replay each on GPU). A Generator is safe to share between threads: their calls
are requests to its engine, batched together.

Sliding context: once a row's window is full, each further token recomputes the last
`context_size` tokens without the cache — exactly the classic behaviour, so greedy output
always equals the no-cache reference.
"""
from __future__ import annotations

import argparse
import os
import threading
import time
import weakref

import torch

from .backends import resolve_device
from .engine import PREFILL_CHUNK, Engine, check_context_size, check_eos_id, check_max_new_tokens
from .quant import DTYPES, SHORT_DTYPES, auto_dtype, inference_copy
from .sampling import SamplingParams, check_temperature, check_top_k, check_top_p, sample_top_k
from .tokenizer import EOT_ID, EOT_TOKEN, get_tokenizer


def sample_next(logits, params: SamplingParams, generator=None):
    """Next token ids (B,) from logits (B, V): argmax when greedy, else one draw from `generator`."""
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample_top_k(logits.float(), params.top_k, params.temperature, params.top_p, generator=generator)


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def _engine_for(model, device, context_size) -> Engine:
    """`generate`'s engine for `model`, kept between calls (its cache rows and CUDA graphs) and
    made again when what it was built on changes: device, context, backend, or parameters
    replaced or moved (their storage). Dropped with the model (a weak key; the engine holds
    only the parameters)."""
    key = (str(device), context_size, model.active_backend, tuple(p.data_ptr() for p in model.parameters()))
    with _ENGINES_LOCK:
        entry = _ENGINES.get(model)
        if entry is None or entry[0] != key:
            entry = _ENGINES[model] = (key, Engine(inference_copy(model, None, device), context_size, max_batch=64))
        return entry[1]


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

    Greedy decoding runs on the engine kept for `model` (gptfast.engine, a KV cache;
    `use_cache=False`: the classic recompute-every-step path). Sampling with neither `generator`
    nor `top_p` is the classic code exactly (classic_sample_next on torch's global RNG, every
    step recomputed as there, since cached logits can differ in the last bit): after
    torch.manual_seed(123) it gives the classic code's tokens. With a `generator` (or `top_p`),
    sampling is the fused sampler on the engine: one draw from `generator` (None: torch's
    default RNG) per step on both paths, exactly k tokens kept at ties, much faster."""
    params = SamplingParams(temperature, top_k, top_p)
    check_max_new_tokens(max_new_tokens)
    check_eos_id(eos_id, model.cfg.vocab_size)
    check_context_size(context_size, model.cfg.context_length)
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0 or idx.is_floating_point():
        got = f"shape {tuple(idx.shape)}, {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"idx must be a non-empty (batch, tokens) tensor of token ids, got {got}")
    classic = temperature > 0 and generator is None and top_p is None
    if use_cache and not classic:
        engine = _engine_for(model, idx.device, context_size)
        handle = engine.submit(idx.tolist(), max_new_tokens, params, eos_id=eos_id, generator=generator,
                               draw_each_step=True)
        new = _collect(handle)[0]
        width = max(map(len, new))
        new = [row + [eos_id] * (width - len(row)) for row in new]
        return torch.cat([idx, torch.tensor(new, dtype=idx.dtype, device=idx.device).view(len(new), width)], 1)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(idx[:, -context_size:])[:, -1, :]  # (B, V)
        nxt = classic_sample_next(logits, temperature, top_k) if classic else sample_next(logits, params, generator)
        if eos_id is not None:
            nxt = nxt.masked_fill(done, eos_id)
            done |= nxt == eos_id
            if bool(done.all()):
                break
        idx = torch.cat((idx, nxt[:, None].to(idx.dtype)), dim=1)
    return idx


def _collect(handle, stats=None):
    """Every prompt's new ids and text from a request's updates (a failure is raised); with
    `stats`, fills in its timings. Abandoned (an exception, Ctrl-C), the request is cancelled."""
    n = len(handle.prompt_tokens)
    ids, texts, tokens = [[] for _ in range(n)], [""] * n, [0] * n
    clock = _Clock()
    try:
        for batch in handle.updates():
            for u in batch:
                if u.error is not None:
                    raise RuntimeError(f"generation failed: {u.error}")
                ids[u.index] += u.ids
                texts[u.index] += u.text
                tokens[u.index] = u.tokens
            clock.tick(sum(tokens))
    finally:
        handle.cancel()  # a no-op once every prompt is done
    if stats is not None:
        stats.clear()
        stats.update(clock.stats())
    return ids, texts


class _Clock:
    """Time to first token and throughput of one call, as its updates arrive."""

    def __init__(self):
        self.start, self.first, self.n_first, self.n = time.perf_counter(), None, 0, 0

    def tick(self, n_tokens):
        self.n = n_tokens
        if self.first is None and n_tokens:
            self.first, self.n_first = time.perf_counter() - self.start, n_tokens

    def stats(self):
        total = time.perf_counter() - self.start
        decode = (self.n - self.n_first) / (total - self.first) if self.n > self.n_first else 0.0
        return dict(time_to_first_token_s=self.first, total_s=total, new_tokens=self.n,
                    tokens_per_s=self.n / total, decode_tokens_per_s=decode)


class Generator:
    """Repeated generation with one model: `generate` (text or batches of text), `generate_ids`,
    `stream`; safe to call from several threads at once (their requests share one batch).
    `dtype`: "auto" (`gptfast.quant.auto_dtype`: bfloat16 on CUDA, int8 on CPU), "float32",
    "bfloat16", "float16", "int8", "int4", "int4-g64", "int4-g128" (weight-only), or None to
    use the model as it is.
    A converted copy is made when needed; the caller's model is never modified, nor switched
    to eval mode (the engine runs its own eval-mode module tree over the same weights).
    `max_batch`: prompts decoded together (more wait for a free row); `max_queue`: prompts
    allowed to wait (None: any number; else the engine raises QueueFull); `prefill_chunk`: on CPU,
    the most prompt tokens one step takes beside the decoding rows (gptfast.engine.Engine)."""

    def __init__(self, model, tokenizer=None, dtype="auto", device=None, context_size=None, cuda_graph=True,
                 max_batch=64, max_queue=None, prefill_chunk=PREFILL_CHUNK):
        device = resolve_device(device) if device is not None else model.tok_emb.weight.device
        if dtype == "auto":
            dtype = auto_dtype(device)
        elif dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(DTYPES)}")
        self.dtype, self.device = dtype, device
        self.cfg = model.cfg
        ctx = self.cfg.context_length
        self.context_size = ctx if context_size is None else check_context_size(context_size, ctx)
        self.model = inference_copy(model, dtype, device)
        self.engine = Engine(self.model, self.context_size, max_batch, max_queue, cuda_graph,
                             prefill_chunk=prefill_chunk)
        self._tokenizer = tokenizer
        self.stats = {}  # timings of the last finished call

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer()
        return self._tokenizer

    def generate(self, prompt, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                 stop=None, seed=None):
        """Completion text for a prompt (str), or a list of completions for a list of prompts.
        `max_new_tokens` may be a list (one per prompt); `stop`: a string or list of strings."""
        texts = _collect(self._submit_text(prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed),
                         self.stats)[1]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(self, prompt: str, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
               stop=None, seed=None):
        """Yield the completion of one prompt as text pieces, as tokens are produced (the engine
        keeps generating while the consumer pauses; closing the stream cancels it)."""
        if not isinstance(prompt, str):
            raise ValueError("stream() takes one prompt string; use generate() for batches")
        handle = self._submit_text(prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed)
        clock = _Clock()
        try:
            for batch in handle.updates():
                (u,) = batch
                if u.error is not None:
                    raise RuntimeError(f"generation failed: {u.error}")
                clock.tick(u.tokens)
                if u.text:
                    yield u.text
        finally:
            handle.cancel()
        self.stats = clock.stats()

    def generate_ids(self, prompts, max_new_tokens=50, temperature=0.0, top_k=None, top_p=None, eos_id=None,
                     seed=None, generator=None):
        """New token ids (eos excluded) for each prompt in a list of token-id lists; `generator`
        (instead of `seed`): one draw from it per step, as the classic `generate`."""
        params = SamplingParams(temperature, top_k, top_p, seed)
        handle = self.engine.submit(prompts, max_new_tokens, params, eos_id=eos_id, generator=generator,
                                    draw_each_step=generator is not None)
        return _collect(handle, self.stats)[0]

    def _submit_text(self, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, stop, seed):
        params = SamplingParams(temperature, top_k, top_p, seed)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
        stop = [stop] if isinstance(stop, str) else stop or []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        ids = [self.tokenizer.encode(p, allowed_special={EOT_TOKEN}) for p in prompts]
        return self.engine.submit(ids, max_new_tokens, params, eos_id=eos_id, stop=stop, tokenizer=self.tokenizer)


# ---- CLI -------------------------------------------------------------------------------------
def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="generate text from a checkpoint or GPT-2 weights",
                              description="Generate text with a KV cache (greedy, temperature, top-k, top-p).",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_source(p)
    p.add_argument("--prompt", default="Every effort moves you", help="prompt text")
    p.add_argument("--batch-file", help="file with one prompt per line, generated as one batch")
    p.add_argument("--max-new-tokens", type=checked_type(int, check_max_new_tokens), default=50,
                   help="tokens to generate per prompt (>= 0)")
    p.add_argument("--temperature", type=checked_type(float, check_temperature), default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=checked_type(int, check_top_k), default=None,
                   help="sample among the k most likely tokens (k >= 1)")
    p.add_argument("--top-p", type=checked_type(float, check_top_p), default=None,
                   help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text)")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--eos", action="store_true", help="stop at <|endoftext|>")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--verbose", action="store_true", help="print time to first token and tokens/s")
    p.set_defaults(func=run_cli)


def add_model_source(p):
    """The options that pick the model and how it runs (generate, serve)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file written by `gptfast train`")
    src.add_argument("--gpt2", metavar="SIZE", help="GPT-2 weights: 124M, 355M, 774M, 1558M or a path (gptfast.weights)")
    p.add_argument("--models-dir", default="models", help="where GPT-2 weights are stored (with --gpt2)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES), type=lambda s: SHORT_DTYPES.get(s, s),
                   help="weights: auto = bfloat16 on CUDA, int8 on CPU; int8 and int4 (groups of 32, 64 or "
                        "128 inputs) = weight-only linears; bf16, fp16, fp32 as train spells them also work")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "torch", "triton"),
                   help="compute backend (auto: triton on CUDA, else torch)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; None = cuda when available")


def load_model_source(args):
    """(model, device) from add_model_source's options."""
    from .weights import load_source  # a checkpoint, a GPT-2 size, or a GPT-2 directory/file
    device = resolve_device(args.device)
    return load_source(args.checkpoint, args.gpt2, args.models_dir, backend=args.backend, device=device), device


def checked_type(convert, check):
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
    model, device = load_model_source(args)
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
