"""gptfast.quant: the inference layers against nn.Linear with error bounds that follow from the
quantisation, and whole quantised models against the fp32 model and against the same
quantised weights run in plain PyTorch."""
import copy

import pytest
import torch

from gptfast import cpu_linear
from gptfast.generate import Generator
from gptfast.quant import (DTYPES, FloatLinear, Int4Linear, Int8Linear, KernelLinear, inference_copy,
                           int8_supported)

from kernel_checks import assert_close, assert_within_2x
from test_cpu_linear import check_fp32
from generation_checks import first_diff, tiny, varied

U32 = 2.0**-24  # fp32 unit roundoff


def weight_error_bound(layer) -> torch.Tensor:
    """max |w - w_stored| per weight (out, in), from the format alone: int8 s/2 per row; int4
    s/2 per group plus the fp16 rounding of s and m; floats: the dtype's unit roundoff |w|."""
    if isinstance(layer, Int8Linear):
        return (layer.scale / 2)[:, None].expand(-1, layer.in_features)
    if isinstance(layer, Int4Linear):
        s, m = (t.float().repeat_interleave(layer.group, 1)[:, :layer.in_features] for t in layer.scale.unbind(-1))
        return s / 2 + (m.abs() + 15 * s) * 2.0**-11
    return layer.dequantized().abs() * {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
                                        torch.float32: 0.0}[layer.weight.dtype]


@pytest.mark.parametrize("make", [Int8Linear, Int4Linear, lambda l: Int4Linear(l, 128),
                                  lambda l: FloatLinear(l, torch.bfloat16), lambda l: FloatLinear(l, torch.float16)],
                         ids=["int8", "int4-g32", "int4-g128", "bf16", "fp16"])
def test_layer_error_bound(make):
    # |y_q - y| <= sum_k |x_k| e_k (e: the weight's stored error bound) + fp32 summation
    # ((K + 2) u sum |x w|); the bound must also be reached in part, or it tests nothing
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 96)
    x = torch.randn(5, 200)
    q = make(lin)
    with torch.no_grad():
        y, yq = lin(x), q(x)
        bound = x.abs() @ weight_error_bound(q).t() + 202 * U32 * (x.abs() @ lin.weight.abs().t() + lin.bias.abs())
    ratio = (yq - y).abs() / bound  # (5, 96)
    worst = divmod(int(ratio.argmax()), 96)
    assert ratio.max() <= 1, f"error {ratio.max():.3f} x the stated bound at {worst}"
    assert ratio.max() > 0.02, f"the bound tests nothing here (error at most {ratio.max():.3f} x bound)"


class RoundedInputLinear(torch.nn.Linear):
    """nn.Linear whose input is first rounded as gptfast's int8/int4 kernel rounds it."""

    def forward(self, x):
        return super().forward(cpu_linear.round_x(x))


def fake_quant_copy(model, dtype, head=None):
    """The quantised model's arithmetic in plain fp32 PyTorch: each linear weight replaced by
    the fp32 value its inference layer stores (int8/int4: the input rounded to int16 steps as
    the kernel does), the reference backend everywhere."""
    ref = copy.deepcopy(model)
    ref.backend = "reference"
    stored = [m for m in inference_copy(model, dtype, "cpu", head=head).modules() if isinstance(m, KernelLinear)]
    linears = [m for m in ref.modules() if isinstance(m, torch.nn.Linear)]
    assert len(stored) == len(linears)
    for lin, q in zip(linears, stored):  # both in module order: qkv, out_proj, up, down, ..., head
        lin.weight = torch.nn.Parameter(q.dequantized(), requires_grad=False)
        if q.weight.dtype in (torch.int8, torch.uint8):
            lin.__class__ = RoundedInputLinear
    return ref


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "float32"])
def test_quantised_model_cpu(dtype):
    """(1) float formats compute what their stored weights imply: logits equal the
    fake-quantised fp32 model's to fp32 rounding (int8/int4 round each layer's input to int16
    steps, a discontinuity that turns last-bit differences upstream into whole steps: their
    layers are checked one by one in test_cpu_linear.py and test_layer_error_bound); (2)
    against the fp32 model, the 2x rule with the fake-quantised model as the low-precision
    reference (its error is the quantisation's own) + 1e-3 of the logit scale; (3) greedy
    tokens equal the fake-quantised model's, and for int8 and the floats also fp32's."""
    model = tiny(vocab=1000, ctx=64, emb=64, heads=4, layers=2, init="torch")
    engine = Generator(model, dtype=dtype)
    ref = fake_quant_copy(model, dtype)
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        truth, ours, low = model(idx), engine.model(idx), ref(idx)
    if dtype in ("bfloat16", "float16"):
        assert_close(ours, low, 1e-5, f"{dtype} logits vs its fake-quantised fp32 model")
    assert_within_2x(ours, low, truth, f"{dtype} logits", atol=1e-3 * truth.abs().max().item())
    ids = engine.generate_ids([[1, 2, 3]], 20)[0]
    varied(ids)
    expected = Generator(ref, dtype=None).generate_ids([[1, 2, 3]], 20)[0]
    assert ids == expected, f"{dtype}: greedy tokens differ from its fake-quantised model at {first_diff(ids, expected)}"
    if not dtype.startswith("int4"):
        fp32 = Generator(model, dtype="float32").generate_ids([[1, 2, 3]], 20)[0]
        assert ids == fp32, f"{dtype}: greedy tokens differ from fp32 at {first_diff(ids, fp32)}"
    assert model.trf_blocks[0].att.qkv.weight.dtype == torch.float32  # the caller's model is untouched


def test_float32_cpu_copy():
    # fp32 weights on the kernel only reorder sums
    model = tiny(vocab=1000, ctx=64, emb=64, heads=4, layers=2, init="torch")
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(Generator(model, dtype="float32").model(idx), model(idx), 1e-5, "fp32 logits")


def test_head_kept_in_higher_precision():
    # head="float32": every block int4, the output head fp32; closer to the fp32 logits than
    # the all-int4 model, and exactly the matching fake-quantised model
    model = tiny(vocab=1000, ctx=64, emb=64, heads=4, layers=2, init="torch")
    copy_ = inference_copy(model, "int4", "cpu", head="float32")
    assert isinstance(copy_.out_head, FloatLinear) and copy_.out_head.weight.dtype == torch.float32
    assert isinstance(copy_.trf_blocks[0].att.qkv, Int4Linear)
    idx = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        truth = model(idx)
        err_head32 = (copy_(idx) - truth).abs().max()
        err_all4 = (inference_copy(model, "int4", "cpu")(idx) - truth).abs().max()
    assert err_head32 < err_all4, f"fp32 head error {err_head32:.3g} >= all-int4 error {err_all4:.3g}"


@pytest.mark.parametrize("make", [Int8Linear, Int4Linear, lambda l: FloatLinear(l, torch.bfloat16)],
                         ids=["int8", "int4", "bf16"])
def test_layer_without_kernel(make, monkeypatch):
    # no gptfast._C: the same layer computes through PyTorch (cpu_linear.reference_linear)
    torch.manual_seed(4)
    q, x = make(torch.nn.Linear(96, 40)), torch.randn(3, 96)
    with torch.no_grad():
        fast = q(x)
        monkeypatch.setattr(cpu_linear, "_HAS_OP", False)
        check_fp32(q(x), cpu_linear.round_x(x) if q.weight.dtype in (torch.int8, torch.uint8) else x,
                   q.dequantized(), q.bias)
        check_fp32(fast, x, q.dequantized(), q.bias, x_rounded=q.weight.dtype in (torch.int8, torch.uint8))


def test_long_prefill_takes_the_gemm_path():
    # more rows than MAX_KERNEL_ROWS allows int8: dequantised weights through F.linear, the same function
    lin = torch.nn.Linear(64, 24)
    q = Int8Linear(lin)
    x = torch.randn(cpu_linear.MAX_KERNEL_ROWS[torch.int8] + 3, 64)
    with torch.no_grad():
        assert_close(q(x), torch.cat([q(x[:4]), q(x[4:])]), 1e-5, "int8 rows above and below the kernel limit")


@pytest.mark.parametrize("dtype, head, message", [
    ("int5", None, "unknown dtype 'int5'"),
    ("int8", "int3", "unknown head 'int3'"),
    ("int4", None, "int4 weights run on CPU only"),
    ("bfloat16", "float32", "head= .* is a CPU option"),
])
def test_bad_options(dtype, head, message):
    with pytest.raises(ValueError, match=message):
        inference_copy(tiny(), dtype, "meta", head=head)


def test_int8_unsupported_is_one_line_error(monkeypatch):
    # a device without torch's int8 matmul (CPU always has gptfast's): refused up front
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    assert int8_supported("cpu") and not int8_supported("meta")
    with pytest.raises(ValueError, match="dtype 'int8' needs torch._weight_int8pack_mm on meta"):
        inference_copy(tiny(), "int8", "meta")


def test_auto_dtype_on_cpu(monkeypatch):
    # "auto" on CPU: int8 runs on gptfast's kernel; without the kernel every small format would
    # dequantise per call, so it stays float32 (and a converted copy's layers say which)
    model = tiny()
    monkeypatch.setattr(cpu_linear, "has_kernel", lambda: True)
    gen = Generator(model)
    assert gen.dtype == "int8" and isinstance(gen.model.out_head, Int8Linear)
    monkeypatch.setattr(cpu_linear, "has_kernel", lambda: False)
    gen = Generator(model)
    assert gen.dtype == "float32" and gen.model.trf_blocks[0].att.qkv.weight.dtype == torch.float32
