"""The fused CPU decode step (gptfast.cpu_decode, csrc/decode_cpu.cpp) against its reference,
the model's own forward through the KV cache (gptfast.runner's eager step), with rows at
different lengths, in every weight format; which models it refuses; its input errors."""
import copy

import pytest
import torch

from gptfast import cpu_decode
from gptfast.engine import Engine
from gptfast.lora import apply_lora
from gptfast.quant import inference_copy
from gptfast.runner import Runner

from generation_checks import tiny
from kernel_checks import assert_close, assert_within_2x

pytestmark = pytest.mark.skipif(not cpu_decode.has_kernel(), reason="gptfast._C was not built with its CPU decode step")

CPU = torch.device("cpu")
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # three rows at three lengths


def run_steps(model, fused: bool, steps: int, tokens=None):
    """Prefill PROMPTS into rows 0..2, then `steps` decode steps feeding tokens[s] at step s:
    (the logits of each step, the runner)."""
    runner = Runner(model, model.cfg.context_length, 4, CPU, static=False, fused=fused)
    assert (runner.fused is not None) == fused
    out = []
    with torch.inference_mode():
        runner.reserve(model, len(PROMPTS))
        for row, prompt in enumerate(PROMPTS):
            runner.prefill(model, [row], [prompt])
        lengths = [len(p) for p in PROMPTS]
        for s in range(steps):
            logits, _ = runner.decode(model, tokens[s], lengths)
            out.append(logits.clone())
            lengths = [n + 1 for n in lengths]
    return out, runner


def greedy_tokens(model, steps):
    """The eager step's greedy tokens, fed to both paths (teacher forcing: one wrong logit
    cannot change what the later steps are compared on)."""
    runner = Runner(model, model.cfg.context_length, 4, CPU, static=False, fused=False)
    tokens, lengths, last = [], [len(p) for p in PROMPTS], [5, 6, 7]
    with torch.inference_mode():
        runner.reserve(model, len(PROMPTS))
        for row, prompt in enumerate(PROMPTS):
            runner.prefill(model, [row], [prompt])
        for _ in range(steps):
            tokens.append(last)
            logits, ids = runner.decode(model, last, lengths)
            last, lengths = ids.tolist(), [n + 1 for n in lengths]
    return tokens


# integer formats round x to int16 steps (gptfast.cpu_linear.round_x): an input that differs in
# its last fp32 bit can land one step over, so they get a looser (still small) bound
FORMATS = {None: 1e-5, "float32": 1e-5, "bfloat16": 1e-5, "float16": 1e-5, "int8": 1e-3, "int4": 1e-3,
           "int4-g128": 1e-3}


@pytest.mark.parametrize("fmt", FORMATS, ids=[str(f) for f in FORMATS])
def test_fused_step_equals_model_forward(fmt):
    model = inference_copy(tiny(ctx=40, emb=64, layers=3, pad_vocab=True), fmt, CPU)
    tokens = greedy_tokens(model, 12)
    fused, fr = run_steps(model, True, 12, tokens)
    eager, er = run_steps(model, False, 12, tokens)
    for step, (a, b) in enumerate(zip(fused, eager)):
        assert_close(a, b, FORMATS[fmt], name=f"{fmt} logits of step {step}")
    for layer, (fc, ec) in enumerate(zip(fr.caches, er.caches)):  # the keys and values written
        assert_close(fc.k, ec.k, FORMATS[fmt], name=f"layer {layer} keys")
        assert_close(fc.v, ec.v, FORMATS[fmt], name=f"layer {layer} values")


def test_fp32_step_within_2x_of_torch_against_fp64():
    # plain nn.Linear layers, no qkv bias, tied head: the fused fp32 step's error against an
    # fp64 model is at most 2x the eager fp32 step's (plus a tiny atol)
    model = tiny(ctx=40, emb=64, layers=3, qkv_bias=False, tie_weights=True)
    tokens = greedy_tokens(model, 8)
    truth, _ = run_steps(copy.deepcopy(model).double(), False, 8, tokens)
    fused, _ = run_steps(model, True, 8, tokens)
    eager, _ = run_steps(model, False, 8, tokens)
    for step, (a, low, t) in enumerate(zip(fused, eager, truth)):
        assert_within_2x(a.double(), low.double(), t, name=f"step {step}", atol=1e-6 * t.abs().max().item())


def test_refuses_what_it_does_not_run():
    model = tiny()
    assert cpu_decode.FusedDecode.for_model(model) is not None
    assert cpu_decode.FusedDecode.for_model(tiny(backend="reference")) is None  # runs the reference modules
    assert cpu_decode.FusedDecode.for_model(copy.deepcopy(model).train()) is None  # dropout
    assert cpu_decode.FusedDecode.for_model(copy.deepcopy(model).to(torch.bfloat16)) is None  # not fp32
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=2, alpha=4)
    assert cpu_decode.FusedDecode.for_model(lora) is None  # a layer type it does not know


def test_engine_decides_once():
    # the engine's runner holds the fused step for a plain model, and none for a LoRA one
    model = tiny()
    lora = copy.deepcopy(model)
    apply_lora(lora, rank=2, alpha=4)
    engine = Engine(lora, max_batch=2)
    assert engine.runner.fused is None
    assert Engine(model, max_batch=2).runner.fused is not None


def test_bad_rows_are_one_line_errors():
    model = tiny(ctx=16)
    runner = Runner(model, 16, 2, CPU, static=False, fused=True)
    with torch.inference_mode():
        runner.reserve(model, 1)
        runner.prefill(model, [0], [[1, 2]])
        with pytest.raises(RuntimeError, match="token id 500 of row 0 is outside the vocabulary"):
            runner.fused(torch.tensor([500]), torch.tensor([2]), runner.caches)
        with pytest.raises(RuntimeError, match="row 0 has length 16; the cache and the context hold 16"):
            runner.fused(torch.tensor([3]), torch.tensor([16]), runner.caches)


def test_bad_operands_are_one_line_errors():
    model = tiny(ctx=16)
    runner = Runner(model, 16, 2, CPU, static=False, fused=True)
    fused = runner.fused
    with torch.inference_mode():
        runner.reserve(model, 1)
        fused.linears = [None] + fused.linears[1:]  # the first layer's weight left out
        with pytest.raises(RuntimeError, match="linear 0 has no weight"):
            fused(torch.tensor([3]), torch.tensor([0]), runner.caches)
        fused.linears, fused.groups = fused.linears[:-3], fused.groups[:-1]  # the head left out
        with pytest.raises(RuntimeError, match="operands for 2 layers need"):
            fused(torch.tensor([3]), torch.tensor([0]), runner.caches)
