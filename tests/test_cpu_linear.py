"""gptfast.cpu_linear: the CPU decode matmul (gptfast._C's `linear`, every kernel path this CPU
has) against plain PyTorch on the same dequantised weights, on odd shapes; the quantisers'
error bounds; bad input."""
import pytest
import torch
import torch.nn.functional as F

from gptfast import cpu_linear as cl

from kernel_checks import assert_within_2x

needs_c = pytest.mark.skipif(not cl.has_kernel(), reason="gptfast._C was not built with its CPU linear kernel")
U32 = 2.0**-24  # fp32 unit roundoff
FORMATS = ["float32", "bfloat16", "float16", "int8", "int4-g32", "int4-g64", "int4-g128"]
needs_avx2 = pytest.mark.skipif("avx2" not in cl.kernel_paths(), reason="this CPU (or build) lacks AVX2 + FMA + F16C")
needs_avx512 = pytest.mark.skipif("avx512" not in cl.kernel_paths(),
                                  reason="this CPU (or build) lacks AVX-512 F/BW + VNNI (or AVX2 + FMA + F16C)")
needs_amx = pytest.mark.skipif("amx" not in cl.kernel_paths(),
                               reason="this CPU (or build, or OS) lacks AMX-INT8 (or the avx512 path's features)")
# every path the kernel has; one this CPU cannot run is skipped with the reason
VECTOR_PATHS = [pytest.param("amx", marks=needs_amx), pytest.param("avx512", marks=needs_avx512),
                pytest.param("avx2", marks=needs_avx2)]
PATHS = [*VECTOR_PATHS, "portable"]


def check_fp32(y, x, w_deq, bias, x_rounded=False):
    """y against x @ w_deq^T + bias in fp64. Bound: a dot product of K terms summed in fp32 in
    any order, |err| <= (K + 4) u sum_k |x_k w_k| (+ u |bias|; Higham's gamma_K, with room for
    the scale products); `x_rounded` (int8/int4: x rounded to int16 per row, |dx| <= s_x / 2
    with s_x = max |x_row| / 32767) adds s_x / 2 sum_k |w_k|."""
    K = x.shape[1]
    exact = x.double() @ w_deq.double().t() + (0 if bias is None else bias.double())
    mag = x.double().abs() @ w_deq.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = (K + 4) * U32 * mag
    if x_rounded:
        bound = bound + (x.double().abs().amax(1, keepdim=True) / 32767 / 2) * w_deq.double().abs().sum(1)
    ratio = (y.double() - exact).abs() / (bound + 1e-30)
    worst = divmod(int(ratio.argmax()), y.shape[1])
    assert ratio.max() <= 1, f"error {ratio.max():.2f} x the fp32 dot-product bound at (row, col) {worst}"


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M, K, N", [(1, 771, 129), (3, 40, 7), (5, 768, 33), (16, 200, 1), (2, 7, 5)])
def test_linear_matches_pytorch(path, fmt, M, K, N):
    # K odd or not a multiple of 8/16 (the vector tails), N odd (the row tiles' tails), M = 5:
    # a block of 4 x rows and a single one; int4 with K % group != 0: padded groups
    gen = torch.Generator().manual_seed(M * 1000 + K + N)
    w, x = torch.randn(N, K, generator=gen) * 0.1, torch.randn(M, K, generator=gen)
    bias = torch.randn(N, generator=gen) if N % 2 else None
    weight, scale, group = cl.quantize(w, fmt)
    y = cl.linear(x, weight, scale, bias, group, path)
    assert y.shape == (M, N) and y.dtype == torch.float32
    check_fp32(y, x, cl.dequantize(weight, scale, group, K), bias, x_rounded=fmt.startswith("int"))


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_independent_of_batch(path, fmt):
    # a row's result is bitwise the same alone or anywhere in a batch (batched greedy decoding
    # must equal single-request decoding): M = 16 covers every tile height and remainder
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(23, 136, generator=gen) * 0.1, torch.randn(16, 136, generator=gen)
    weight, scale, group = cl.quantize(w, fmt)
    batch = cl.linear(x, weight, scale, None, group, path)
    for m in (0, 1, 2, 3, 4, 14, 15):
        assert torch.equal(cl.linear(x[m:m + 1], weight, scale, None, group, path)[0], batch[m]), f"row {m}"
    assert torch.equal(cl.linear(x[3:8], weight, scale, None, group, path), batch[3:8])


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("fmt", ["int8", "int4-g32"])
def test_integer_formats_non_finite_and_extreme_rows(path, fmt):
    # x is rounded per row from its largest magnitude, found with any inf or NaN in one pass over
    # the bit patterns: a row holding +inf, -inf or NaN gives NaN outputs (as fp32 arithmetic
    # would) and leaves the other rows alone; rows of zeros and of -0.0 give zeros
    gen = torch.Generator().manual_seed(7)
    w, x = torch.randn(24, 40, generator=gen) * 0.1, torch.randn(6, 40, generator=gen)
    x[1, 3], x[2, 5], x[3, 0], x[4], x[5] = float("inf"), float("-inf"), float("nan"), 0.0, -0.0
    weight, scale, group = cl.quantize(w, fmt)
    y = cl.linear(x, weight, scale, None, group, path)
    assert y[1:4].isnan().all(), "a row with inf or NaN did not give NaN outputs"
    assert (y[4:] == 0).all(), "a row of zeros did not give zeros"
    finite = [0, 4, 5]
    assert torch.isfinite(y[finite]).all(), f"non-finite outputs in rows {finite}"
    check_fp32(y[finite], x[finite], cl.dequantize(weight, scale, group, 40), None, x_rounded=True)


@needs_c
@pytest.mark.parametrize("path", VECTOR_PATHS)
@pytest.mark.parametrize("M, K, N", [(8, 16, 16), (13, 15, 17), (16, 768, 50), (33, 1031, 5), (9, 1, 3),
                                     (9, 1031, 40), (12, 3072, 36), (11, 769, 20), (10, 768, 300),
                                     (5, 770, 33), (7, 64, 48), (20, 768, 50), (24, 1031, 17),
                                     (4, 48, 7), (4, 3072, 9), (4, 4100, 6), (4, 15, 3), (3, 1031, 40), (3, 768, 300),
                                     (10, 4100, 6), (10, 33000, 33)])
@pytest.mark.parametrize("packed", [False, True], ids=["packing", "prepacked"])
def test_int8_many_rows_equal_portable(path, M, K, N, packed, two_threads):
    # 4 x rows run the row-dot tile of 3 weight rows by 4 x rows in assembly: an odd step of 16
    # inputs (48), int32 lanes added up past one 2048-input chunk (3072; 4100: two and a tail of 4),
    # no whole step (15), rows past the last 3 (7, 9 -> 1 row tiles).
    # int8 from 5 x rows on runs the packed tiles (16 weight rows transposed into pairs of inputs):
    # integer sums are exact on every path, so y is bitwise the portable path's. K odd (the last
    # input alone; after whole 16-row blocks: 1031), K = 1 (no pair), K past one 512-input int32
    # chunk, N not a multiple of 16, tiles of 4 and 6 x rows with rows of zeros past M (13: 6 + 4 + 4,
    # 11: 6 + 6, 5: 6, 7: 4 + 4), 2 threads (taking chunks of weight rows in turn: 300 rows at K = 768 are 4 chunks
    # of 96; 36, 40: a last 16-row block cut short). Prepacked (pack_int8's copy passed in): the
    # packed tiles from 3 x rows on, read from the copy instead of packing each block. The avx512
    # path's VNNI tiles take 16 x rows, then 4, 8 or 12 with rows of zeros (13: 16; 33: 16 + 16 + 4;
    # 20: 16 + 4; 24: 16 + 8; 5, 7: 8; 3: 4), from x's pairs interleaved once per call. The amx path's
    # tiles from 10 x rows on (fewer: the avx512 path's): 16 x rows a tile (33: three, the last of one
    # row), 32 or 16 weight rows (N = 50: 32 + a last tile of 16 cut short, copied; 17, 20, 6: one
    # tile, copied), inputs in steps of 64 (1031, 769, 4100: one more step from the last inputs
    # padded with zeros; 15: only that), int32 sums added up in int64 every 32768 inputs (33000: two
    # chunks and a tail).
    gen = torch.Generator().manual_seed(M * K + N)
    weight = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
    scale, x = torch.rand(N, generator=gen) + 0.5, torch.randn(M, K, generator=gen)
    copy = cl.pack_int8(weight) if packed else None
    y = torch.ops.gptfast.linear(x, weight, scale, None, 0, path, packed=copy)
    ref = cl.linear(x, weight, scale, None, 0, "portable")
    assert torch.equal(y, ref), f"worst difference {(y - ref).abs().max()}"


@needs_c
@needs_avx2
@pytest.mark.parametrize("N, K", [(16, 8), (33, 7), (5, 1)])
def test_pack_int8_layout(N, K):
    # linear_cpu.h's layout: blocks of 16 weight rows, block b's [p][c][e] = q[16 b + c][2 p + e],
    # zeros past N and K
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=torch.Generator().manual_seed(N))
    blocks, pairs = -(-N // 16), -(-K // 2)
    padded = torch.zeros(blocks * 16, pairs * 2, dtype=torch.int8)
    padded[:N, :K] = q
    want = padded.view(blocks, 16, pairs, 2).permute(0, 2, 1, 3).reshape(blocks, pairs * 32)
    assert torch.equal(cl.pack_int8(q), want)


@needs_c
@needs_avx2
def test_bad_packed_weights():
    q, scale = cl.quantize_int8(torch.randn(20, 64))
    x, packed = torch.randn(6, 64), cl.pack_int8(q)
    with pytest.raises(RuntimeError, match=r"packed must be pack_int8\(weight\), contiguous int8 of shape \[2, 1024\]"):
        torch.ops.gptfast.linear(x, q, scale, None, 0, packed=packed[:1])
    with pytest.raises(RuntimeError, match="packed must be pack_int8"):
        torch.ops.gptfast.linear(x, q, scale, None, 0, packed=packed.view(torch.uint8))
    with pytest.raises(RuntimeError, match="packed is for int8 weights, not Float"):
        torch.ops.gptfast.linear(x, torch.randn(20, 64), None, None, 0, packed=packed)
    q4, sm = cl.quantize_int4(torch.randn(20, 64), 32)
    with pytest.raises(RuntimeError, match="packed is for int8 weights, not Byte"):  # (int4 had ignored it)
        torch.ops.gptfast.linear(x, q4, sm, None, 32, packed=packed)
    with pytest.raises(RuntimeError, match="weight must be a contiguous 2-D int8 tensor"):
        cl.pack_int8(q.float())


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M", [4, 8, 16])
def test_int8_many_rows_no_overflow(path, M):
    # the largest products (-128 x -32767, every input) over 3072 inputs: int32 lanes are widened to
    # int64 every 256 pairs (8 and 16 rows: packed tiles, VNNI's too) or 2048 inputs (4 rows on
    # avx2: row-dot tiles); the sum (1.29e10) must come back exactly (as fp32)
    K = 3072
    weight = torch.full((16, K), -128, dtype=torch.int8)
    x = torch.full((M, K), -1.0)  # rounds to -32767 per row
    y = cl.linear(x, weight, torch.ones(16), None, 0, path)
    expected = torch.tensor(128.0 * 32767 * K / 32767)  # x_scale = 1 / 32767
    assert torch.allclose(y, expected.expand(M, 16), rtol=1e-6), y[0, 0]


@needs_c
@pytest.mark.parametrize("path", PATHS)
def test_int8_long_rows_no_overflow(path):
    # xq = -1 everywhere but the first input: the amx path's low bytes at their largest (255) against
    # weights of -128 over 66,000 inputs sum past int32 (-2.15e9): its int32 sums are added up in
    # int64 every 32768 inputs, the other paths' sooner; the result is every path's exact sum
    M, K = 10, 66000  # (10: the amx path's tiles run)
    weight = torch.full((16, K), -128, dtype=torch.int8)
    x = torch.full((M, K), -1.0 / 32767)
    x[:, 0] = -1.0  # x_scale = 1 / 32767: the rest rounds to -1
    y = cl.linear(x, weight, torch.ones(16), None, 0, path)
    expected = torch.tensor(128.0 * (32767 + K - 1) / 32767)
    assert torch.allclose(y, expected.expand(M, 16), rtol=1e-6), y[0, 0]


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("M, N", [(4, 0), (0, 16)])
def test_empty_rows_or_outputs(path, M, N):
    # nothing to compute: an empty y of the right shape (N = 0 had divided by zero threads' shares
    # and killed the process)
    weight, x = torch.zeros(N, 8, dtype=torch.int8), torch.randn(M, 8)
    y = cl.linear(x, weight, torch.ones(N), None, 0, path)
    assert y.shape == (M, N) == cl.reference_linear(x, weight, torch.ones(N)).shape, y.shape


@needs_c
def test_leading_dimensions():
    # x (..., K) -> y (..., N), the same as the rows flattened
    gen = torch.Generator().manual_seed(8)
    weight, scale, group = cl.quantize(torch.randn(10, 64, generator=gen), "int4-g32")
    x = torch.randn(2, 3, 64, generator=gen)
    y = cl.linear(x, weight, scale, None, group)
    assert y.shape == (2, 3, 10) and torch.equal(y.view(6, 10), cl.linear(x.view(6, 64), weight, scale, None, group))
    assert cl.linear(x[0, 0], weight, scale, None, group).shape == (10,)


@needs_c
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_x(path, dtype):
    # x in bf16/fp16: computed in fp32, y rounded to x's dtype once; the 2x rule against
    # PyTorch's own linear in that dtype
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(65, 300, generator=gen) * 0.1, torch.randn(3, 300, generator=gen).to(dtype)
    weight, scale, group = cl.quantize(w, "int8")
    deq = cl.dequantize(weight, scale)
    y = cl.linear(x, weight, scale, None, group, path)
    assert y.dtype == dtype
    assert_within_2x(y, F.linear(x, deq.to(dtype)), x.float() @ deq.t(), "linear with low-precision x")


@needs_c
@pytest.mark.parametrize("fmt", FORMATS)
def test_paths_agree_and_env_forces_one(fmt, monkeypatch):
    # GPTFAST_CPU_KERNEL picks the path (bit-for-bit the path= result); an unknown name is an error
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(37, 96, generator=gen), torch.randn(4, 96, generator=gen)
    weight, scale, group = cl.quantize(w, fmt)
    for path in cl.kernel_paths():
        monkeypatch.setenv("GPTFAST_CPU_KERNEL", path)
        assert torch.equal(cl.linear(x, weight, scale, None, group), cl.linear(x, weight, scale, None, group, path))
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", "avx9000")
    with pytest.raises(RuntimeError, match="unknown CPU kernel path 'avx9000'.*; choose from .*portable"):
        cl.linear(x, weight, scale, None, group)


def test_int8_quantiser_bound():
    # symmetric per-row: |w - s q| <= s / 2 with s = max |w_row| / 127; the extremes are exact
    w = torch.randn(50, 77, generator=torch.Generator().manual_seed(1))
    q, s = cl.quantize_int8(w)
    err = (cl.dequantize(q, s) - w).abs()
    assert (err <= s[:, None] / 2 * (1 + 1e-6)).all(), f"int8 error {(err / s[:, None]).max():.3f} x s"
    assert q.abs().amax(1).eq(127).all()


@pytest.mark.parametrize("group", cl.INT4_GROUPS)
def test_int4_quantiser_bound(group):
    # asymmetric per group: |w - (s q + m)| <= s / 2 plus the fp16 rounding of s and m
    # (|m| 2^-11, and q <= 15 times s's rounding 15 s 2^-11)
    w = torch.randn(9, 200, generator=torch.Generator().manual_seed(group)) * 0.05
    packed, sm = cl.quantize_int4(w, group)
    assert packed.shape == (9, (200 + group - 1) // group * group // 2) and packed.dtype == torch.uint8
    s, m = (t.float().repeat_interleave(group, 1)[:, :200] for t in sm.unbind(-1))
    bound = s / 2 + (m.abs() + 15 * s) * 2.0**-11
    err = (cl.dequantize(packed, sm, group, 200) - w).abs()
    assert (err <= bound * (1 + 1e-6)).all(), f"int4 error {(err / bound).max():.3f} x the bound"
    q = cl.unpack_int4(packed)
    assert torch.equal(cl.pack_int4(q), packed) and int(q.max()) <= 15


def test_int4_bad_group():
    with pytest.raises(ValueError, match="int4 group size must be one of"):
        cl.quantize_int4(torch.randn(4, 64), 48)
    with pytest.raises(ValueError, match="int4 group size must be one of"):
        cl.quantize(torch.randn(4, 64), "int4-g48")
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        cl.quantize(torch.randn(4, 64), "int3")


@needs_c
@pytest.mark.parametrize("args, message", [
    (lambda x, w: (x[0, 0], w, None), "x must have at least 1 dimension"),
    (lambda x, w: (x.double(), w, None), "x must be float32, bfloat16 or float16"),
    (lambda x, w: (x, w[:, :-1].contiguous(), None), "x has 64 inputs but weight has 63"),
    (lambda x, w: (x, w.to(torch.int8), None), "int8 needs a contiguous float32 scale"),
    (lambda x, w: (x, w, torch.ones(8)), "takes no scale"),
    (lambda x, w: (x, w.t(), None), "weight must be a contiguous 2-D tensor"),
    (lambda x, w: (x, w.to(torch.int16), None), "unsupported weight dtype"),
])
def test_bad_input(args, message):
    x, w = torch.randn(2, 64), torch.randn(8, 64)
    with pytest.raises(RuntimeError, match=message):
        cl.linear(*args(x, w))


@needs_c
def test_bad_int4_input():
    x = torch.randn(2, 64)
    packed, sm = cl.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(RuntimeError, match="int4 group size must be a multiple of 32 up to 256"):
        cl.linear(x, packed, sm, None, 24)
    with pytest.raises(RuntimeError, match=r"need 64"):
        cl.linear(torch.randn(2, 100), packed, sm, None, 32)
    with pytest.raises(RuntimeError, match=r"float16 scale of shape \(8, 2, 2\)"):
        cl.linear(x, packed, sm.float(), None, 32)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        cl.linear(x, packed, sm, torch.ones(3), 32)


@needs_c
def test_opcheck():
    # schema, fake (meta) kernel and dispatcher registration agree (what torch.compile relies on)
    packed, sm = cl.quantize_int4(torch.randn(8, 64), 32)
    torch.library.opcheck(torch.ops.gptfast.linear.default, (torch.randn(3, 64), packed, sm, torch.randn(8), 32),
                          test_utils=("test_schema", "test_faketensor"))  # the AOT-dispatch checks take 30 s


@needs_c
@pytest.mark.parametrize("fmt", ["int8", "int4-g64"])
def test_reference_rounds_x_as_the_kernel(fmt):
    # the PyTorch reference (the fallback without _C) rounds x as the kernel does: the two
    # then differ by fp32 summation order only
    gen = torch.Generator().manual_seed(9)
    w, x = torch.randn(19, 200, generator=gen) * 0.1, torch.randn(3, 200, generator=gen)
    weight, scale, group = cl.quantize(w, fmt)
    rounded = cl.round_x(x)
    assert (rounded - x).abs().le(x.abs().amax(1, keepdim=True) / 32767 / 2 * (1 + 1e-6)).all()
    check_fp32(cl.linear(x, weight, scale, None, group), rounded, cl.dequantize(weight, scale, group, 200), None)


def test_reference_without_kernel(monkeypatch):
    # a build without _C (or a device it has no kernel for) computes the same in PyTorch
    monkeypatch.setattr(cl, "_HAS_OP", False)
    w, x = torch.randn(11, 48), torch.randn(2, 48)
    packed, sm = cl.quantize_int4(w, 32)
    check_fp32(cl.linear(x, packed, sm, None, 32), x, cl.dequantize(packed, sm, 32, 48), None, x_rounded=True)
