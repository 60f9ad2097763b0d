"""The fused CPU decode step (gptfast.cpu_decode, csrc/decode_cpu.cpp) against its reference,
the model's own forward through the KV cache (gptfast.runner's eager step), with rows at
different lengths, in every weight format; the engine with and without it; which models it
refuses; its input errors."""
import copy

import pytest
import torch

from gptfast import cpu_decode, cpu_linear
from gptfast.engine import Engine
from gptfast.lora import apply_lora
from gptfast.quant import inference_copy
from gptfast.runner import Runner
from gptfast.sampling import SamplingParams

from generation_checks import ids_of, tiny, varied
from kernel_checks import assert_close, assert_within_2x

pytestmark = pytest.mark.skipif(not cpu_decode.has_kernel(), reason="gptfast._C was not built with its CPU decode step")

CPU = torch.device("cpu")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # three rows at three lengths
SLOTS = 24  # the cache's slots: fewer than the models' context (40), so its stride is not pos_emb's


def prefilled(model, fused: bool, kv=torch.float16, prompts=PROMPTS) -> Runner:
    """A runner with `prompts` prefilled into rows 0, 1, ... (call under inference_mode); its KV
    cache in `kv` (float16: what the engine keeps under the fused step), the same for both paths."""
    runner = Runner(model, SLOTS, max(4, len(prompts)), CPU, static=False, fused=fused, kv_dtype=kv)
    assert (runner.fused is not None) == fused
    runner.reserve(model, len(prompts))
    for row, prompt in enumerate(prompts):
        runner.prefill(model, [row], [prompt])
    return runner


def run_steps(model, fused: bool, tokens, runner=None, kv=torch.float16):
    """Decode steps feeding tokens[s] at step s after PROMPTS: (the logits of each step, the runner)."""
    out, lengths = [], [len(p) for p in PROMPTS]
    with torch.inference_mode():
        runner = runner or prefilled(model, fused, kv)
        for step_tokens in tokens:
            logits, _ = runner.decode(model, step_tokens, lengths)
            out.append(logits.clone())
            lengths = [n + 1 for n in lengths]
    return out, runner


def greedy_tokens(model, steps):
    """The eager step's greedy tokens, fed to both paths (teacher forcing: one wrong logit
    cannot change what the later steps are compared on)."""
    tokens, lengths, last = [], [len(p) for p in PROMPTS], [5, 6, 7]
    with torch.inference_mode():
        runner = prefilled(model, False)
        for _ in range(steps):
            tokens.append(last)
            _, ids = runner.decode(model, last, lengths)
            last, lengths = ids.tolist(), [n + 1 for n in lengths]
    return tokens


def assert_steps_close(fused, eager, rtol, what):
    for step, (a, b) in enumerate(zip(fused, eager)):
        assert_close(a, b, rtol, name=f"{what} logits of step {step}")


# integer formats round x to int16 steps of max|x| / 32767 (gptfast.cpu_linear.round_x): an input
# that differs in its last fp32 bit can land one step over, which moves an output by about 2^-15 of
# its scale, and a few such flips add up over the layers: 2e-4 is ~6.5 steps (7e-5 seen)
FORMATS = {None: 1e-5, "float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5, "int8": 2e-4, "int4": 2e-4,
           "int4-g64": 2e-4, "int4-g128": 2e-4}


@pytest.mark.parametrize("kv", [torch.float16, torch.float32], ids=["kv16", "kv32"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[str(f) for f in FORMATS])
def test_fused_step_equals_model_forward(fmt, kv):
    model = inference_copy(tiny(ctx=40, emb=64, layers=3, pad_vocab=True), fmt, CPU)
    tokens = greedy_tokens(model, 12)
    fused, fr = run_steps(model, True, tokens, kv=kv)
    eager, er = run_steps(model, False, tokens, kv=kv)
    assert_steps_close(fused, eager, FORMATS[fmt], fmt)
    # the keys and values written; a float16 cache: each path rounds its own fp32 key, and keys that
    # differ in their last fp32 bits can round one float16 step (2^-11 of the value) apart
    rtol = max(FORMATS[fmt], 2.0**-10 if kv == torch.float16 else 0)
    for layer, (fc, ec) in enumerate(zip(fr.caches, er.caches)):
        assert fc.k.dtype == kv
        assert_close(fc.k.float(), ec.k.float(), rtol, name=f"layer {layer} keys")
        assert_close(fc.v.float(), ec.v.float(), rtol, name=f"layer {layer} values")


@pytest.mark.parametrize("fmt", [None, "int8"], ids=["fp32", "int8"])
def test_many_rows_equal_each_row_alone(fmt, two_threads):
    # 10 rows at 10 lengths in one step, 2 threads (beyond 8 rows the step splits its norms, GELU
    # and the rounding of x over the threads, and int8 runs the packed tiles): each row's logits
    # and the eager step's, and bitwise the same row decoded alone (batched greedy decoding =
    # single-request decoding)
    model = inference_copy(tiny(ctx=40, emb=64, layers=3, pad_vocab=True), fmt, CPU)
    prompts = [[(7 * r + i) % 50 + 1 for i in range(r + 1)] for r in range(10)]
    tokens = [(3 * r) % 50 for r in range(10)]

    def step(fused, rows):
        with torch.inference_mode():
            runner = prefilled(model, fused, prompts=[prompts[r] for r in rows])
            return runner.decode(model, [tokens[r] for r in rows], [len(prompts[r]) for r in rows])[0]

    batch = step(True, range(10))
    assert_close(batch, step(False, range(10)), FORMATS[fmt], name=f"{fmt} 10-row step")
    for r in range(10):
        assert torch.equal(step(True, [r])[0], batch[r]), f"row {r}: alone differs from in the batch"


@pytest.mark.parametrize("kv", [torch.float16, torch.float32], ids=["kv16", "kv32"])
@pytest.mark.parametrize("fmt", [None, "int8"], ids=["fp32", "int8"])
def test_prompts_in_the_decoding_step(fmt, kv, two_threads):
    # one call: PROMPTS' rows decode a token each while two new prompts (rows 3 and 4, 6 and 9
    # tokens) are prefilled beside them. The decoding rows' logits are bitwise those of a step
    # without the prompts; each prompt's last logits and its keys are bitwise those of it prefilled
    # alone by the fused step, and close to the model's own forward (the eager prefill). A float16
    # cache: the fused prompt attends to its earlier tokens' keys as the cache holds them, rounded
    # to float16 (2^-11 of each value), where the eager prefill attends to them in fp32
    model = inference_copy(tiny(ctx=40, emb=64, layers=3, pad_vocab=True), fmt, CPU)
    new = [[(5 * i + 3) % 50 for i in range(6)], [(11 * i + 1) % 50 for i in range(9)]]
    dec = [5, 6, 7]
    rtol = max(FORMATS[fmt], 2.0**-10 if kv == torch.float16 else 0)
    with torch.inference_mode():
        mixed = prefilled(model, True, kv, prompts=PROMPTS + [[1], [1]])
        out = mixed.fused_step([0, 1, 2, 3, 4], [[t] for t in dec] + new, [len(p) for p in PROMPTS] + [0, 0],
                               list(range(5)))
        alone = prefilled(model, True, kv)
        decoded = alone.decode(model, dec, [len(p) for p in PROMPTS])[0]
        assert torch.equal(out[:3], decoded), "the decoding rows changed with prompts beside them"
        for i, prompt in enumerate(new):
            one = prefilled(model, True, kv, prompts=[[1]])
            assert torch.equal(one.fused_step([0], [prompt], [0], [0])[0], out[3 + i]), f"prompt {i}: alone differs"
            halves = prefilled(model, True, kv, prompts=[[1]])  # a run that starts past position 0
            assert halves.fused_step([0], [prompt[:4]], [0], []).shape == (0, model.cfg.vocab_size)  # no logits
            second = halves.fused_step([0], [prompt[4:]], [4], [0])[0]
            assert torch.equal(second, out[3 + i]), f"prompt {i} in two calls"
            eager = prefilled(model, False, kv, prompts=[prompt])
            assert_close(out[3 + i], eager.prefill(model, [0], [prompt])[0], rtol, name=f"{fmt} prompt {i}")
            for layer, (mc, oc, ec) in enumerate(zip(mixed.caches, one.caches, eager.caches)):
                T = len(prompt)
                assert torch.equal(mc.k[3 + i, :, :T], oc.k[0, :, :T]), f"prompt {i}, layer {layer}: keys differ"
                assert_close(mc.v[3 + i, :, :T].float(), ec.v[0, :, :T].float(), rtol,
                             name=f"prompt {i} layer {layer} values")


@pytest.mark.parametrize("emb,heads", [(48, 4), (136, 2), (160, 2)], ids=["head12", "head68", "head80"])
@pytest.mark.parametrize("kv", [torch.float16, torch.float32], ids=["kv16", "kv32"])
def test_fp32_step_within_2x_of_torch_against_fp64(kv, emb, heads):
    # plain nn.Linear layers, no qkv bias, tied head; head sizes 12 and 68 (not multiples of the
    # vector loops' 8 lanes), 68 and 80 (a block of 64 values held in registers, then the tail or
    # one more 8): the fused fp32 step's error against an fp64 model (fp64 cache) is at most 2x the
    # eager fp32 step's with the same cache dtype (plus a tiny atol)
    model = tiny(ctx=40, emb=emb, heads=heads, layers=3, qkv_bias=False, tie_weights=True)
    tokens = greedy_tokens(model, 8)
    truth, _ = run_steps(copy.deepcopy(model).double(), False, tokens, kv=torch.float64)
    fused, _ = run_steps(model, True, tokens, kv=kv)
    eager, _ = run_steps(model, False, tokens, kv=kv)
    for step, (a, low, t) in enumerate(zip(fused, eager, truth)):
        assert_within_2x(a.double(), low.double(), t, name=f"step {step}", atol=1e-6 * t.abs().max().item())


def test_float16_cache_portable_path(monkeypatch):
    # GPTFAST_CPU_KERNEL=portable: the float16 cache through plain C++ (c10::Half conversions)
    # instead of F16C, against the eager step on the same cache
    model = tiny(ctx=40, emb=48, heads=4, layers=2)
    tokens = greedy_tokens(model, 6)
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", "portable")
    assert_steps_close(run_steps(model, True, tokens)[0], run_steps(model, False, tokens)[0], 1e-5, "portable")


@pytest.mark.parametrize("fmt", [None, "int8"], ids=["fp32", "int8"])
def test_weights_updated_in_place_are_seen(fmt):
    model = inference_copy(tiny(ctx=40, emb=64, layers=2), fmt, CPU)
    tokens = greedy_tokens(model, 3)
    with torch.inference_mode():
        fr, er = prefilled(model, True), prefilled(model, False)
        weight = model.trf_blocks[0].att.qkv.weight
        weight.copy_(torch.flip(weight, [0]))  # in place, after the step was built
    assert_steps_close(run_steps(model, True, tokens, fr)[0], run_steps(model, False, tokens, er)[0],
                       FORMATS[fmt], "after the update")


def _short_head_operand(model, cut):
    """One step with the head's operands changed by cut(fused); the error it raises."""
    with torch.inference_mode():
        runner = prefilled(model, True)
        cut(runner.fused)
        with pytest.raises(RuntimeError) as e:
            one_step(runner, [3], [0])
    return str(e.value)


def test_short_head_scale_is_a_one_line_error():
    model = inference_copy(tiny(ctx=40), "int8", CPU)
    cut = lambda f: setattr(f, "linears", f.linears[:-2] + [f.linears[-2][:10], f.linears[-1]])  # noqa: E731
    message = _short_head_operand(model, cut)
    assert f"the head's scale has 10 rows; its {model.cfg.vocab_size} are needed" in message, message


@pytest.mark.parametrize("path, packs", [("avx2", True), ("avx512", True), ("amx", True), ("portable", False)])
def test_int8_weights_kept_packed_only_for_the_paths_that_read_them(path, packs, monkeypatch):
    # a second copy of every int8 weight is memory the portable path would never read (amx reads
    # it below its tiles' rows, through the avx512 path)
    if path not in cpu_linear.kernel_paths():
        pytest.skip(f"this CPU (or build) has no {path} path")
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", path)
    fused = cpu_decode.FusedDecode.for_model(inference_copy(tiny(ctx=40), "int8", CPU))
    assert [p is not None for p in fused.packed] == [packs] * len(fused.packed)


@pytest.mark.skipif("avx2" not in cpu_linear.kernel_paths(),
                    reason="no avx2 path here: int8 weights are not kept packed")
def test_short_head_packed_copy_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", "avx2")  # a path that reads the packed copies (amx does not)
    model = inference_copy(tiny(ctx=40), "int8", CPU)
    message = _short_head_operand(model, lambda f: setattr(f, "packed", f.packed[:-1] + [f.packed[-1][:1]]))
    blocks = cpu_linear.pack_int8(torch.zeros(model.cfg.vocab_size, 2, dtype=torch.int8)).shape[0]
    assert f"the head's packed copy has 1 rows; its {blocks} are needed" in message, message


def test_a_nan_key_poisons_only_its_row():
    model = tiny(ctx=40, emb=64, layers=2)
    with torch.inference_mode():
        runners = [prefilled(model, fused) for fused in (True, False)]
        for r in runners:
            r.caches[0].k[1, :, 0] = float("nan")  # row 1's first key in layer 0
    (fused,), _ = run_steps(model, True, [[5, 6, 7]], runners[0])
    (eager,), _ = run_steps(model, False, [[5, 6, 7]], runners[1])
    assert fused[1].isnan().all() and eager[1].isnan().all()
    assert_close(fused[[0, 2]], eager[[0, 2]], 1e-5, name="the other rows")


def test_engine_with_and_without_the_fused_step():
    # greedy requests of different lengths, some sliding past a context of 16, batched together:
    # the same ids with the fused step as with the model's forward
    model = tiny(ctx=16)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7, 9, 3], [2, 7]]
    results = []
    for fused in (True, False):
        engine = Engine(model, max_batch=4, fused_cpu_step=fused, kv_dtype=torch.float16)
        assert (engine.runner.fused is not None) == fused
        results.append(ids_of(engine.submit(prompts, [20, 6, 14, 3], SamplingParams())))
        engine.close()
    varied(results[0][0])
    assert results[0] == results[1]


def test_refuses_what_it_does_not_run(monkeypatch):
    model = tiny()  # untied head: taken
    assert cpu_decode.FusedDecode.for_model(model) is not None
    assert cpu_decode.FusedDecode.for_model(tiny(qkv_bias=False)) is not None
    assert cpu_decode.FusedDecode.for_model(inference_copy(model, "int8", CPU)).max_rows == \
        cpu_linear.MAX_KERNEL_ROWS[torch.int8]
    assert cpu_decode.FusedDecode.for_model(tiny(backend="reference")) is None  # runs the reference modules
    assert cpu_decode.FusedDecode.for_model(copy.deepcopy(model).train()) is None  # dropout
    assert cpu_decode.FusedDecode.for_model(copy.deepcopy(model).to(torch.bfloat16)) is None  # not fp32
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=2, alpha=4)
    assert cpu_decode.FusedDecode.for_model(lora) is None  # a layer type it does not know
    hooked = copy.deepcopy(model)
    hooked.trf_blocks[1].register_forward_hook(lambda *args: None)
    assert cpu_decode.FusedDecode.for_model(hooked) is None  # a hook would not run
    swapped = copy.deepcopy(model)
    swapped.trf_blocks[0].att = torch.nn.Identity()
    assert cpu_decode.FusedDecode.for_model(swapped) is None
    strided = copy.deepcopy(model)
    strided.tok_emb.weight = torch.nn.Parameter(strided.tok_emb.weight.detach().t().contiguous().t())
    assert cpu_decode.FusedDecode.for_model(strided) is None
    monkeypatch.setattr(cpu_decode, "_HAS_OP", False)
    assert cpu_decode.FusedDecode.for_model(model) is None


def test_engine_decides_once():
    model = tiny()
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=2, alpha=4)
    assert Engine(lora, max_batch=2).runner.fused is None
    assert Engine(model, max_batch=2).runner.fused is not None


def test_bad_kv_dtype_is_a_one_line_error():
    model = tiny()
    with pytest.raises(ValueError, match="kv_dtype must be a floating-point torch.dtype or None, got 'float16'"):
        Engine(model, max_batch=2, kv_dtype="float16")
    with pytest.raises(ValueError, match="kv_dtype must be a floating-point torch.dtype or None, got torch.int8"):
        Engine(model, max_batch=2, kv_dtype=torch.int8)
    with pytest.raises(ValueError, match="keeps its KV cache in torch.float32 or torch.float16, got torch.bfloat16"):
        Engine(model, max_batch=2, kv_dtype=torch.bfloat16)
    assert Engine(model, max_batch=2, kv_dtype=torch.bfloat16, fused_cpu_step=False).runner.kv_dtype == torch.bfloat16


def one_step(runner, tokens, positions, rows=None, outputs=None, caches=None):
    """A call of the fused step with lists (rows: 0, 1, ...; outputs: every token by default)."""
    rows = list(range(len(tokens))) if rows is None else rows
    outputs = list(range(len(tokens))) if outputs is None else outputs
    t = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return runner.fused(t(tokens), t(positions), t(rows), t(outputs), runner.caches if caches is None else caches)


@pytest.mark.parametrize("tokens, positions, rows, outputs, message", [
    ([500], [2], [0], [0], "token id 500 of token 0 is outside the vocabulary"),
    ([3], [16], [0], [0], "token 0 has position 16; the cache and the context hold 16"),
    ([3], [2], [4], [0], "token 0 is for cache row 4; the cache has 4 rows"),
    ([3, 4], [2, 4], [1, 1], [1], "the tokens of cache row 1 must be one run of consecutive positions"),
    ([3, 4, 5], [2, 0, 3], [1, 0, 1], [2], "the tokens of cache row 1 must be one run"),
    ([3, 4], [2, 3], [1, 1], [2], "output 0 names token 2 of 2"),
    ([3, 4], [2, 3], [1], [1], "tokens, positions and rows must have one size"),
])
def test_bad_tokens_are_one_line_errors(tokens, positions, rows, outputs, message):
    model = tiny(ctx=16)
    with torch.inference_mode():
        runner = prefilled(model, True)
        with pytest.raises(RuntimeError, match=message):
            one_step(runner, tokens, positions, rows, outputs)


def test_bad_operands_are_one_line_errors():
    model = tiny(ctx=40)
    with torch.inference_mode():
        runner = prefilled(model, True)
        fused, step = runner.fused, lambda: one_step(runner, [3], [0])
        short = copy.copy(runner.caches[1])
        short.k = short.k[:, :, :10].contiguous()  # layer 1's cache with fewer slots
        with pytest.raises(RuntimeError, match="every cache must be contiguous, float32 or float16, of one dtype and shape"):
            one_step(runner, [3], [0], caches=[runner.caches[0], short])
        mixed = copy.copy(runner.caches[1])
        mixed.k = mixed.k.float()  # layer 1's keys in float32, the others float16
        with pytest.raises(RuntimeError, match="of one dtype and shape"):
            one_step(runner, [3], [0], caches=[runner.caches[0], mixed])
        linears = fused.linears
        fused.linears = linears[:3] + [linears[6], linears[7], linears[8]] + linears[6:]  # out_proj -> fc
        with pytest.raises(RuntimeError, match="linear 1 has 128 outputs, not 32"):
            step()
        fused.linears = [None] + linears[1:]  # the first layer's weight left out
        with pytest.raises(RuntimeError, match="linear 0 has no weight"):
            step()
        fused.linears = linears[:-3] + linears[3:6]  # out_proj's 32 rows as the head
        with pytest.raises(RuntimeError, match=f"the head has 32 outputs for {model.cfg.vocab_size} tokens"):
            step()
        fused.linears, fused.groups = linears[:-3], fused.groups[:-1]  # the head left out
        with pytest.raises(RuntimeError, match="operands for 2 layers need"):
            step()
