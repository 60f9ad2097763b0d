"""Generation engine: KV cache vs the classic no-cache `generate` (the reference), batching,
sampling, stop rules, streaming, reduced precision, bad input, CLI. Tiny random models."""
import copy
import gc

import pytest
import torch

from generation_checks import first_diff, reference_ids, reference_sampled_ids, tiny, varied
from gptfast import get_tokenizer
from gptfast.textout import TextOutput
from gptfast.generate import Generator, generate
from gptfast.quant import inference_copy
from kernel_checks import assert_within_2x


def static_engine(model, **kw):
    """A Generator decoding through the static step, the function a CUDA graph captures
    (batch padded to a fixed size, whole-buffer cache, device indices), run eagerly: on CPU
    the capture is refused with a warning (checked here) and the same step runs eagerly."""
    engine = Generator(model, dtype=None, **kw)
    engine.engine.runner.static = True
    return engine


def make_engine(model, static):
    return static_engine(model) if static else Generator(model, dtype=None)


@pytest.fixture(scope="module")
def text_model():
    """Full GPT-2 vocabulary, so the tokenizer can decode its output."""
    return tiny(vocab=50257, ctx=64, emb=32, layers=1, init="torch")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("cfg", [dict(), dict(qkv_bias=False, heads=2),
                                 dict(ctx=40, emb=48, heads=3, layers=3, init="torch", pad_vocab=True)])
def test_cache_greedy_equals_no_cache(backend, cfg):
    # 120 tokens from 5-token prompts overflow the context, so the sliding window is covered too
    model = tiny(backend=backend, **cfg)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(1))
    ref = generate(model, idx, 120, model.cfg.context_length, use_cache=False)
    out = generate(model, idx, 120, model.cfg.context_length)
    assert out.shape == ref.shape == (2, 125)
    for row in ref[:, 5:].tolist():
        varied(row)
    bad = (out != ref).nonzero()
    assert bad.numel() == 0, f"first mismatch at {bad[0].tolist()}: {out[tuple(bad[0])]} vs {ref[tuple(bad[0])]}"


def test_context_size_smaller_than_model_context():
    model = tiny()
    idx = torch.tensor([[3, 1, 4, 1, 5, 9]])
    ref = generate(model, idx, 30, 8, use_cache=False)
    out = generate(model, idx, 30, 8)
    assert torch.equal(out, ref), first_diff(out[0].tolist(), ref[0].tolist())


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_batched_equals_one_at_a_time(static):
    model = tiny(ctx=32)
    engine = make_engine(model, static)
    prompts = [[7], [1, 2, 3, 4, 5], list(range(10, 40))]  # the last fills the context almost at once
    budgets = [20, 35, 12]
    solo = [reference_ids(model, p, n) for p, n in zip(prompts, budgets)]
    varied(sum(solo, []), 20)
    batched = engine.generate_ids(prompts, budgets)
    for i, (a, b) in enumerate(zip(batched, solo)):
        assert a == b, f"prompt {i}: first mismatch at token {first_diff(a, b)}"
    # each row stops at its own eos: pick a token row 1 produces at step 6 as eos
    eos = solo[1][6]
    solo_eos = [reference_ids(model, p, n, eos_id=eos) for p, n in zip(prompts, budgets)]
    batched_eos = engine.generate_ids(prompts, budgets, eos_id=eos)
    assert batched_eos == solo_eos
    assert len(batched_eos[1]) == solo[1].index(eos) and eos not in batched_eos[1]


def test_prompt_of_context_size_and_longer():
    model = tiny(ctx=16)
    engine = Generator(model, dtype=None)
    for length in (16, 23):
        prompt = [(5 * i + 3) % 211 for i in range(length)]
        assert engine.generate_ids([prompt], 10) == [reference_ids(model, prompt, 10)], length


def test_callers_training_mode_kept(text_model):
    # dtype=None decodes with the caller's own model: dropout must be off in every forward, and
    # a paused (or abandoned) stream must leave the model's train/eval mode alone
    model = copy.deepcopy(text_model).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5  # any forward in train mode changes the output
    engine = Generator(model, dtype=None)
    expected = Generator(text_model, dtype=None).generate("Hello", max_new_tokens=15)
    paused = engine.stream("Every effort moves you", max_new_tokens=15)
    next(paused)
    assert model.training, "train mode lost while a stream is paused"
    assert engine.generate("Hello", max_new_tokens=15) == expected
    del paused
    gc.collect()
    assert all(m.training for m in model.modules()), "the engine switched a module of the caller's model"


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_seeded_sampling_reproducible(static):
    model = tiny()
    kw = dict(temperature=1.5, top_k=50, top_p=0.9)
    engine = make_engine(model, static)  # static: the seed reaches the sampler through the step's buffers
    runs = {seed: engine.generate_ids([[1, 2, 3]], 60, seed=seed, **kw)[0] for seed in (7, 8, 9)}  # 60 > ctx: slides
    # the seed alone decides the text: an independent draw, another Generator, after other calls
    ref = reference_sampled_ids(model, [1, 2, 3], 60, 7, **kw)
    assert runs[7] == ref, f"seeded sample differs from the reference draw at token {first_diff(runs[7], ref)}"
    assert Generator(model, dtype=None).generate_ids([[1, 2, 3]], 60, seed=7, **kw)[0] == runs[7]
    assert engine.generate_ids([[1, 2, 3]], 60, seed=7, **kw)[0] == runs[7]
    # and it matters: 60 draws among ~dozens of candidates never coincide by chance
    assert len({tuple(r) for r in runs.values()}) == 3, "different seeds gave the same text"
    # top_k=1 leaves one candidate: sampling must equal greedy
    assert engine.generate_ids([[1, 2, 3]], 30, temperature=1.0, top_k=1, seed=3) == engine.generate_ids([[1, 2, 3]], 30)


def test_classic_generate_seeded_with_cache():
    # the same generator state gives the same tokens with and without the cache
    model = tiny()
    idx = torch.tensor([[4, 2]])
    a, b = (generate(model, idx, 60, 48, temperature=1.0, top_k=20, use_cache=c,
                     generator=torch.Generator().manual_seed(5)) for c in (True, False))
    assert torch.equal(a, b), first_diff(a[0].tolist(), b[0].tolist())
    other = generate(model, idx, 60, 48, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(a, other), "the generator's seed had no effect"


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_consecutive_calls_share_no_state(static):
    """One engine across calls with different batch sizes, prompt lengths and padding (the
    static buffers are re-made or refilled, never read stale) equals the no-cache reference."""
    model = tiny(ctx=32)
    engine = make_engine(model, static)
    calls = [([[7], [1, 2, 3, 4, 5], list(range(10, 30))], [20, 35, 12]),  # B=3, padded, sliding
             ([[3, 1, 4], [1, 5, 9], [2, 6, 5]], [15, 15, 15]),  # B=3 again (same buffers), no padding
             ([[9, 8, 7, 6]], [40]),  # B=1
             ([[2] * 12, [8]], [25, 5]),  # B=2, row 1 padded over slots 0-10
             ([[5], [6, 7]], [20, 20])]  # B=2, short prompts: slots 2-10 must not stay marked as padding
    for c, (prompts, budgets) in enumerate(calls):
        out = engine.generate_ids(prompts, budgets)
        for i, (p, n) in enumerate(zip(prompts, budgets)):
            ref = reference_ids(model, p, n)
            varied(ref, min(n, 12) // 2)
            assert out[i] == ref, f"call {c}, prompt {i}: first mismatch at token {first_diff(out[i], ref)}"
    if static:  # the capture was refused (no GPU here) and the static step ran instead
        graphs = engine.engine.runner.graphs
        assert graphs and all(g is False for g in graphs.values())


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_interrupted_stream_then_generate(text_model, static):
    # a paused stream keeps its own cache rows: calls made meanwhile neither disturb it nor see it
    engine = make_engine(text_model, static)
    fresh = make_engine(text_model, static)
    paused = engine.stream("Every effort moves you", max_new_tokens=30)
    head = [next(paused) for _ in range(3)]
    prompts = ["Hello", "I HAD always thought Jack Gisburn rather a cheap genius"]
    assert engine.generate(prompts, max_new_tokens=20) == fresh.generate(prompts, max_new_tokens=20)
    full = "".join(head) + "".join(paused)
    assert full == fresh.generate("Every effort moves you", max_new_tokens=30)
    assert "".join(engine.stream("Every effort moves you", max_new_tokens=30)) == full


def test_stop_strings_and_eos(text_model):
    engine = Generator(text_model, dtype=None)
    full = engine.generate("Every effort moves you", max_new_tokens=40)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    assert engine.generate("Every effort moves you", max_new_tokens=40, stop=[stop]) == full[: full.find(stop)]
    streamed = "".join(engine.stream("Every effort moves you", max_new_tokens=40, stop=stop))
    assert streamed == full[: full.find(stop)]
    ids = engine.generate_ids([get_tokenizer().encode("Every effort moves you")], 40)[0]
    eos = ids[10]
    cut = engine.generate("Every effort moves you", max_new_tokens=40, eos_id=eos)
    assert cut == get_tokenizer().decode(ids[: ids.index(eos)])
    # per-request budgets and a batch of texts
    out = engine.generate(["Hello", "Every effort moves you"], max_new_tokens=[3, 5])
    assert out[1] == get_tokenizer().decode(ids[:5])
    assert len(get_tokenizer().encode(out[0])) <= 3


def test_stream_utf8_split_across_tokens():
    # "é€😀" as one token per byte: most pieces are incomplete UTF-8 and must be held back
    tok = get_tokenizer()
    text = "h\u00e9llo \u20ac \U0001F600!"
    ids = [tok.encode_single_token(bytes([b])) for b in text.encode()]
    request = TextOutput(tok, len(ids), None, [])
    pieces = []
    for t in ids:
        request.push(t)
        pieces.append(request.new_text())
    assert "".join(pieces) == text == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)
    assert pieces[1] == "" and pieces[2] == "\u00e9"  # 'é' appears once its second byte arrives


def test_stream_concat_equals_decode(text_model):
    # a model made to emit only byte tokens of multi-byte characters (valid and broken sequences)
    tok = get_tokenizer()
    chosen = [tok.encode_single_token(bytes([b])) for b in "\u00e9\u20ac\U0001F600a ".encode()]
    model = copy.deepcopy(text_model)
    with torch.no_grad():
        model.final_norm.scale[0], model.final_norm.shift[0] = 0.0, 50.0  # hidden dim 0 is constant 50
        model.out_head.weight[:, 0] = -1.0
        model.out_head.weight[chosen, 0] = 1.0  # chosen tokens' logits ~ +50, the rest ~ -50
    engine = Generator(model, dtype=None)
    kw = dict(max_new_tokens=60, temperature=1.0, seed=11)
    pieces = list(engine.stream("Hi", **kw))
    ids = engine.generate_ids([tok.encode("Hi")], **kw)[0]
    assert set(ids) <= set(chosen) and len(ids) == 60
    assert "".join(pieces) == tok.decode(ids) == engine.generate("Hi", **kw)
    assert len(pieces) > 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer >= 0"),  # never truncated silently
    (dict(temperature="1"), "temperature must be a finite number >= 0"),
    (dict(top_k=2.5), "top_k must be a positive integer"),
    (dict(top_p="0.5"), "top_p must be in"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be a positive"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(max_new_tokens=[1, 2]), "max_new_tokens has 2 entries for 1 prompts"),
])
def test_bad_sampling_settings(kwargs, message):
    model = tiny()
    engine = Generator(model, dtype=None)
    with pytest.raises(ValueError, match=message):
        engine.generate_ids([[1, 2]], **{"max_new_tokens": 3, **kwargs})
    if not isinstance(kwargs.get("max_new_tokens"), list):
        with pytest.raises(ValueError, match=message):
            generate(model, torch.tensor([[1, 2]]), **{"max_new_tokens": 3, "context_size": 48, **kwargs})


def test_bad_prompts(text_model):
    engine = Generator(text_model, dtype=None)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate(["Hello", ""])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate_ids([[1], []])
    with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings"):
        engine.generate(None)
    with pytest.raises(ValueError, match="stop must be a non-empty string"):
        engine.generate("Hello", stop=5)
    for ids in ([[1.7]], [1, 2]):  # a float id, a flat list
        with pytest.raises(ValueError, match="integer token ids"):
            engine.generate_ids(ids)
    for bad in (text_model.cfg.vocab_size, -1, "x"):  # an eos the model never emits would never stop it
        with pytest.raises(ValueError, match=r"eos_id must be a token id in \[0, 50257\) or None"):
            engine.generate("Hello", eos_id=bad)
        with pytest.raises(ValueError, match="eos_id must be a token id"):
            generate(text_model, torch.tensor([[1, 2]]), 3, 64, eos_id=bad, use_cache=False)
    with pytest.raises(ValueError, match="tensor of token ids"):
        generate(text_model, torch.tensor([[1.0, 2.0]]), 3, 64, use_cache=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.generate_ids([[1, 50257]])
    with pytest.raises(ValueError, match="non-empty"):
        generate(text_model, torch.zeros(1, 0, dtype=torch.long), 3, 64)
    for bad in (0, -3, text_model.cfg.context_length + 1, 2.5):  # the classic generate, both paths
        for use_cache in (True, False):
            with pytest.raises(ValueError, match=r"context_size must be an integer in \[1, "):
                generate(text_model, torch.tensor([[1, 2]]), 3, bad, use_cache=use_cache)
    with pytest.raises(ValueError, match=r"context_size must be an integer in \[1, 64\]"):
        Generator(text_model, context_size=65)
    with pytest.raises(ValueError, match="unknown dtype"):
        Generator(text_model, dtype="int3")


def test_cli(tmp_path, capsys):
    from gptfast.checkpoint import save_checkpoint
    from gptfast.cli import main
    model = tiny(vocab=50257, ctx=32, emb=32, layers=1)
    path = save_checkpoint(tmp_path / "ck.pt", model)
    # on the CPU on every machine: the expected text comes from CPU references (a GPU's fp32 can
    # split a near tie of this tiny model's logits the other way)
    base = ["generate", "--checkpoint", str(path), "--device", "cpu", "--max-new-tokens", "12", "--dtype", "float32",
            "--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "3"]
    assert main(base + ["--prompt", "Every effort moves you", "--verbose"]) == 0
    plain = capsys.readouterr().out
    assert main(base + ["--prompt", "Every effort moves you", "--stream"]) == 0
    streamed = capsys.readouterr().out
    tok = get_tokenizer()  # seeded: the reference draw, independent of Generator
    expected = tok.decode(reference_sampled_ids(model, tok.encode("Every effort moves you"), 12, 3, 0.9, 40, 0.95))
    assert streamed == "Every effort moves you" + expected + "\n"
    assert plain.startswith(streamed) and "tokens/s" in plain[len(streamed):]
    # greedy output against the classic no-cache path, independent of Generator (--dtype spelt as train does)
    assert main(base[:8] + ["fp32", "--prompt", "Every effort moves you"]) == 0
    ref = tok.decode(reference_ids(model, tok.encode("Every effort moves you"), 12))
    assert capsys.readouterr().out == "Every effort moves you" + ref + "\n"
    # a batch file: every prompt's output equals its own no-cache greedy generation
    prompts = ["Hello", "Every effort moves you", "I HAD always thought Jack Gisburn rather a cheap genius"]
    batch = tmp_path / "prompts.txt"
    batch.write_text(f"{prompts[0]}\n\n{prompts[1]}\n{prompts[2]}\n")  # blank lines are skipped
    assert main(base[:9] + ["--batch-file", str(batch)]) == 0
    expected = "".join(f"=== {p}\n{p}{tok.decode(reference_ids(model, tok.encode(p), 12))}\n\n" for p in prompts)
    assert capsys.readouterr().out == expected
    assert main(base + ["--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err
    batch.write_bytes(b"Hello\n\xff\xfe\n")
    assert main(base[:9] + ["--batch-file", str(batch)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"gptfast generate: error: --batch-file {batch} is not UTF-8 "
                                                    "text (invalid start byte at byte 6)"]


@pytest.mark.parametrize("flag, value, message", [
    ("--top-p", "1.5", "top_p must be in (0, 1], got 1.5"),
    ("--top-p", "0", "top_p must be in (0, 1], got 0.0"),
    ("--max-new-tokens", "-1", "max_new_tokens must be an integer >= 0, got -1"),
    ("--temperature", "-1", "temperature must be a finite number >= 0 (0 = greedy), got -1.0"),
    ("--temperature", "nan", "temperature must be a finite number >= 0 (0 = greedy), got nan"),
    ("--top-k", "0", "top_k must be a positive integer or None, got 0"),
    ("--top-k", "2.5", "expected an integer, got '2.5'"),
])
def test_cli_bad_sampling_args(flag, value, message, capsys):
    from gptfast.cli import main
    with pytest.raises(SystemExit) as exit_:  # argparse rejects it before any model is loaded
        main(["generate", "--gpt2", "124M", flag, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"gptfast generate: error: argument {flag}: {message}"


def assert_same_greedy(model, prompt, got, want, label):
    """got == want token for token; a divergence is accepted only where the fp32 logits that
    chose want's token have a near tie (top-2 gap <= 1e-5 of their scale: engines that differ
    in summation order alone can split such a tie), and is printed."""
    i = first_diff(got, want)
    if i is None and len(got) == len(want):
        return
    assert i is not None, f"{label}: {len(got)} tokens vs {len(want)}"
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:i]], device=model.tok_emb.weight.device))[0, -1].float()
    top2 = logits.topk(2).values
    gap, scale = float(top2[0] - top2[1]), float(logits.abs().max())
    assert gap <= 1e-5 * scale, f"{label}: tokens differ at step {i} (top-2 gap {gap:.3g} of {scale:.3g}: no tie)"
    print(f"{label}: tokens diverge at step {i}, a near tie (top-2 gap {gap:.2e})")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_decode_equals_eager_decode(backend):
    """200 greedy tokens through CUDA-graph replays equal eager decoding (no graph, prefix-only
    cache) token for token: at batch 1 and in a batch of 4 prompts of different lengths (fp32)."""
    model = tiny(vocab=1000, ctx=256, emb=128, heads=4, layers=2, backend=backend, init="torch").cuda()
    prompts = [[7, 8, 9], [1], list(range(40, 52)), list(range(100, 130))]  # lengths 3, 1, 12, 30
    graphed = Generator(model, dtype="float32")
    eager = Generator(model, dtype="float32", cuda_graph=False)
    assert graphed.engine.runner.static and not eager.engine.runner.static
    for batch in ([prompts[0]], prompts):
        got, want = graphed.generate_ids(batch, 200), eager.generate_ids(batch, 200)
        graphs = graphed.engine.runner.graphs.values()
        assert any(g not in (None, False) for g in graphs), "no CUDA graph was captured"
        for i, (p, g, w) in enumerate(zip(batch, got, want)):
            varied(w)
            assert_same_greedy(model, p, g, w, f"{backend} batch {len(batch)} row {i}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_decode_equals_no_cache(backend):
    model = tiny(ctx=64, emb=64, layers=2, backend=backend, init="torch").cuda()
    prompts = [[7], [1, 2, 3, 4, 5], list(range(10, 30))]
    engine = Generator(model, dtype="float32")
    batched = engine.generate_ids(prompts, 100)  # overflows the context: graph decode, then sliding
    graphs = engine.engine.runner.graphs
    assert graphs and all(g is not False for g in graphs.values()), f"a CUDA graph capture failed: {graphs}"
    assert {key[2] for key in graphs} == {backend}
    for i, p in enumerate(prompts):  # alone: batch size 1
        solo = engine.generate_ids([p], 100)[0]
        ref = reference_ids(model, p, 100)
        varied(ref)
        assert solo == ref, f"prompt {i}: graph decode differs from no-cache at {first_diff(solo, ref)}"
        assert batched[i] == ref, f"prompt {i}: batched graph decode differs at {first_diff(batched[i], ref)}"
    again = engine.generate_ids(prompts, 100)  # back to batch 3: the graphs captured before
    assert again == batched, f"second batched call differs: {[first_diff(a, b) for a, b in zip(again, batched)]}"
    assert Generator(model).dtype == "bfloat16"  # the CUDA default
    _check_bf16_greedy(model, prompts[1], batched[1][:20])


def _check_bf16_greedy(model, prompt, fp32_ids):
    """bf16 may legitimately pick the other of two near-tied tokens, so no exact equality:
    (1) bf16 logits along the fp32 greedy sequence obey the 2x rule against the reference
    backend run in bf16; (2) bf16 greedy decode follows the fp32 tokens up to the first step
    whose fp32 top-2 gap is within twice the measured bf16 logit error (a near tie)."""
    engine = Generator(model, dtype="bfloat16")
    low = engine.generate_ids([prompt], len(fp32_ids))[0]
    seq = torch.tensor([prompt + fp32_ids], device="cuda")
    low_ref = inference_copy(model, "bfloat16", "cuda")
    low_ref.backend = "reference"
    with torch.no_grad():
        truth = model(seq)[0, len(prompt) - 1:-1].float()  # (N, V): logits that chose fp32_ids
        ours = engine.model(seq)[0, len(prompt) - 1:-1].float()
        ref = low_ref(seq)[0, len(prompt) - 1:-1].float()
    assert_within_2x(ours, ref, truth, "bf16 logits", atol=1e-2 * truth.abs().max().item())
    err = (ours - truth).abs().max(dim=-1).values  # (N,) per step
    top2 = truth.topk(2, dim=-1).values
    near_tie = (top2[:, 0] - top2[:, 1]) <= 2 * err
    i = first_diff(low, fp32_ids)
    if i is not None:
        first_tie = int(near_tie.nonzero()[0]) if near_tie.any() else len(fp32_ids)
        assert i >= first_tie, (f"bf16 greedy differs from fp32 at step {i}, before any near tie "
                                f"(first at {first_tie}; gap {float(top2[i, 0] - top2[i, 1]):.3g}, "
                                f"bf16 error {float(err[i]):.3g})")


def test_generator_shared_by_threads(text_model):
    """Issue 13.2: one Generator called from several threads at once (generate, stream,
    generate_ids; greedy and seeded sampling) gives every call what it gives alone."""
    from concurrent.futures import ThreadPoolExecutor
    engine = Generator(text_model, dtype=None)
    texts = ["Every effort moves you", "Hello", "I HAD always thought Jack Gisburn", "The", "cheap genius"]
    calls = [(kind, texts[i % 5], 4 + 5 * (i % 4), dict(temperature=1.2, top_k=40, seed=i) if i % 3 == 0 else {})
             for i, kind in enumerate(["generate", "stream", "ids"] * 8)]
    tok = get_tokenizer()

    def run(call):
        kind, text, n, kw = call
        if kind == "generate":
            return engine.generate(text, max_new_tokens=n, **kw)
        if kind == "stream":
            return "".join(engine.stream(text, max_new_tokens=n, **kw))
        return engine.generate_ids([tok.encode(text)], n, **kw)[0]

    alone = [run(c) for c in calls]
    varied([t for a in alone if isinstance(a, list) for t in a], 12)
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(run, calls))
    wrong = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    assert not wrong, f"{len(wrong)} of {len(calls)} concurrent calls differ from the same call alone, e.g. {calls[wrong[0]]}"
