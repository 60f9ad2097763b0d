"""gptfast.sampling: the fused top-k sampler (gptfast._C) against torch.topk / softmax, and
the pure-PyTorch reference path. CPU here; the CUDA kernel's tests are marked gpu."""
import functools
import math
import warnings

import pytest
import torch

from gptfast import cpu_linear, sampling
from gptfast.sampling import reference_sample_top_k, sample_top_k

# only the op's own tests need the built extension; the reference path and the checks always run
needs_c = pytest.mark.skipif(not sampling.has_kernel("cpu"), reason=(
    f"gptfast._C did not load ({sampling._C_ERROR})" if sampling._C_ERROR else "gptfast._C has no CPU kernel"))
op = torch.ops.gptfast.sample_top_k if sampling._C_ERROR is None else None
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def cuda_test(fn):
    """A test of the CUDA kernel: skipped (with the reason) without a GPU; on a GPU it fails
    if gptfast._C lacks the kernel rather than testing the reference fallback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        assert sampling.has_kernel("cuda"), "gptfast._C was built without its CUDA kernel (see setup.py's output)"
        return fn(*args, **kwargs)
    return needs_c(pytest.mark.gpu(wrapper))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value (categories with expected < 5 pooled), via the regularized
    upper incomplete gamma: P(X > stat) for X ~ chi2(df) = Q(df / 2, stat / 2)."""
    counts, probs = counts.double(), probs.double()
    expected = probs * counts.sum()
    small = expected < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(expected) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


def nucleus_mask(logits, k, temperature, top_p):
    """(B, V) bool: the tokens the op may return (top-k, then the top-p prefix)."""
    V = logits.shape[-1]
    vals, idx = torch.sort(logits.float(), dim=-1, descending=True, stable=True)  # ties: lowest ids kept
    vals, idx = vals[:, :min(k, V)], idx[:, :min(k, V)]
    p = torch.softmax(vals / temperature, dim=-1)
    keep = (p.cumsum(-1) - p) < top_p * (1 + 1e-5)  # rounding slack only widens the set
    return torch.zeros(logits.shape, dtype=torch.bool).scatter_(-1, idx, keep)


M64 = 2**64 - 1


def _mix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def row_uniform(seed: int, offset: int, row: int) -> float:
    """Python port of csrc/sampling_common.h's per-row uniform (splitmix64, 24 bits)."""
    return (_mix64(_mix64(_mix64(seed & M64) ^ (offset & M64)) ^ row) >> 40) / 2**24


def predicted_ids(logits, k, temperature, top_p, seed, offset, tol=1e-4):
    """The op's documented draw (csrc/sampling_common.h) evaluated in float64: (ids (B,),
    robust (B,) bool). A row is robust when u lies more than tol (+ the mass of tokens whose
    top-p membership is within tol of flipping) from every cumulative boundary: there any
    fp32 summation order (CPU sequential, CUDA block-parallel, ~1e-5 off) must give this id."""
    x = logits.float()  # (B, V)
    B, V = x.shape
    kk = min(k or V, V)
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :kk]  # (B, kk) kept order
    xs = x.gather(1, order)
    z = (xs - xs[:, :1]) * torch.tensor(1 / temperature, dtype=torch.float32)  # fp32, as both kernels
    w = z.double().exp()  # (B, kk)
    flip = torch.zeros(B, dtype=torch.float64)
    if top_p is not None and top_p < 1:  # token j kept iff the mass before it < top_p * total
        before, total = w.cumsum(-1) - w, w.sum(-1, keepdim=True)
        need = float(torch.tensor(top_p, dtype=torch.float32)) * total
        flip = torch.where((before - need).abs() <= tol * total, w, 0.0).sum(-1) / total.squeeze(-1)
        w = torch.where(before < need, w, 0.0)
    ids, perm = order.sort(-1)  # the draw walks kept tokens in increasing id order
    w = w.gather(1, perm)
    cdf = w.cumsum(-1) / w.sum(-1, keepdim=True)  # (B, kk)
    u = torch.tensor([row_uniform(seed, offset, r) for r in range(B)], dtype=torch.float64)[:, None]
    pos = (cdf <= u).sum(-1, keepdim=True).clamp(max=kk - 1)  # first id whose cdf exceeds u
    gap = (cdf - u).abs().min(-1).values
    return ids.gather(1, pos).squeeze(1), gap > tol + flip


def assert_ids_predicted(logits, k, temperature, top_p, seed, offset, **ids_by_backend):
    want, robust = predicted_ids(logits, k, temperature, top_p, seed, offset)
    assert robust.sum() >= len(robust) // 5, "too few robust rows: the check would have no power"
    for who, ids in ids_by_backend.items():
        wrong = ((ids.cpu() != want) & robust).nonzero().flatten()
        assert not len(wrong), (f"{who}: rows {wrong.tolist()[:8]} drew {ids.cpu()[wrong].tolist()[:8]}, "
                                f"u selects {want[wrong].tolist()[:8]}")


def draws(logits_row, n, **kw):
    """n draws from one row: the row repeated n times, each row its own uniform."""
    return sample_top_k(logits_row.expand(n, -1).contiguous(), **kw)


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 7, 64, 300, 5000])
def test_topk_values_equal_torch_topk(dtype, k):
    g = torch.Generator().manual_seed(k)
    for logits in (torch.randn(3, 1000, generator=g), torch.randint(-3, 3, (3, 1000), generator=g).float()):
        logits = logits.to(dtype)  # the second has many ties at the k-th value
        ids, values, indices = sample_top_k(logits, k, 0.8, seed=1, return_topk=True)
        ref = torch.topk(logits, min(k, 1000), dim=-1)
        assert torch.equal(values, ref.values), (values - ref.values).abs().max()
        assert torch.equal(logits.gather(1, indices), values)  # indices equal up to ties
        assert all(len(set(r.tolist())) == r.numel() for r in indices)
        # ties keep the lowest ids: exactly a stable descending sort
        assert torch.equal(indices, torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k])
        assert ((ids[:, None] == indices).any(-1)).all()


@needs_c
@pytest.mark.parametrize("B", [1, 2, 17, 64, 256])
def test_ids_inside_topk_and_nucleus(B):
    g = torch.Generator().manual_seed(B)
    logits = torch.randn(B, 4000, generator=g) * 3
    for k, top_p in [(1, None), (5, None), (50, None), (50, 0.5), (4000, 0.3), (None, 0.9)]:
        for seed in range(3):
            ids = sample_top_k(logits, k, 1.0, top_p=top_p, seed=seed)
            allowed = nucleus_mask(logits, k or 4000, 1.0, top_p or 1.0)
            assert ids.shape == (B,) and ids.dtype == torch.int64
            bad = ~allowed.gather(1, ids[:, None]).squeeze(1)
            assert not bad.any(), f"k={k} top_p={top_p}: rows {bad.nonzero().flatten().tolist()} left the set"


@needs_c
def test_full_vocab_batch_in_topk():
    logits = torch.randn(8, 50257, generator=torch.Generator().manual_seed(0))
    ids = sample_top_k(logits, 50, 1.0, seed=3)
    assert (ids[:, None] == torch.topk(logits, 50).indices).any(-1).all()


@needs_c
@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_argmax(dtype):
    g = torch.Generator().manual_seed(1)
    for logits in (torch.randn(16, 999, generator=g), torch.randint(0, 3, (16, 999), generator=g).float()):
        logits = logits.to(dtype)
        want = torch.argmax(logits, dim=-1)  # first maximum on ties
        assert torch.equal(sample_top_k(logits, 50, 0.0, seed=1), want)
        assert torch.equal(sample_top_k(logits, 1, 1.5, seed=1), want)
        assert torch.equal(sample_top_k(logits, None, 0, top_p=0.1), want)
        assert torch.equal(sample_top_k(logits, 50, 1e-40, seed=1), want)  # 1/T overflows fp32


def _argmax_cases():
    """(name, logits) rows that try argmax's edges: ties in and across the 8-lane blocks and the
    tail, NaN (first in a block, in the tail, several), infinities, a row of -inf, odd widths."""
    g = torch.Generator().manual_seed(5)
    yield "random", torch.randn(16, 50257, generator=g)
    yield "few values (ties)", torch.randint(0, 3, (16, 999), generator=g).float()
    for V in (1, 7, 8, 9, 23):
        yield f"width {V}", torch.randn(3, V, generator=g)
    rows = torch.randn(8, 37, generator=g)
    rows[0, [3, 11, 35]] = 9.0  # a tie: the first wins
    rows[1, 34] = 9.0  # the largest in the tail
    rows[2, 12] = float("nan")
    rows[3, [30, 5]] = float("nan")
    rows[4, 35] = float("nan")  # only in the tail
    rows[5] = float("-inf")
    rows[6, [2, 20]] = float("inf")
    rows[7, 0] = 9.0
    yield "edges", rows
    yield "bfloat16 (torch's argmax)", torch.randn(4, 100, generator=g).bfloat16()
    yield "strided (torch's argmax)", torch.randn(100, 4, generator=g).t()


needs_argmax = pytest.mark.skipif(not sampling._ARGMAX_OP, reason="gptfast._C was built without argmax_rows: "
                                  "argmax_ids would be torch's own argmax (rebuild)")


@needs_argmax
def test_argmax_ids_with_an_unknown_kernel_path_names_the_setting(monkeypatch):
    # argmax_rows reads GPTFAST_CPU_KERNEL too: its error names the setting, not the linear op
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", "avx9000")
    with pytest.raises(RuntimeError, match=r"^gptfast: unknown CPU kernel path 'avx9000' \(GPTFAST_CPU_KERNEL"):
        sampling.argmax_ids(torch.randn(2, 100))


@needs_argmax
@pytest.mark.parametrize("path", ["amx", "avx512", "avx2", "portable"])
def test_argmax_ids_equal_torch_argmax(path, monkeypatch):
    if path not in cpu_linear.kernel_paths():
        pytest.skip(f"this CPU (or build) has no {path} path")
    monkeypatch.setenv("GPTFAST_CPU_KERNEL", path)
    for name, logits in _argmax_cases():
        ids, want = sampling.argmax_ids(logits), torch.argmax(logits, dim=-1)
        bad = (ids != want).nonzero().flatten().tolist()
        assert not bad and ids.dtype == torch.long, \
            f"{name}: rows {bad} gave {ids[bad].tolist()}, not {want[bad].tolist()}"


@needs_argmax
def test_argmax_op_traces():
    # schema and fake kernel agree (what torch.compile relies on), and a compiled graph keeps it
    torch.library.opcheck(torch.ops.gptfast.argmax_rows.default, (torch.randn(3, 10),),
                          test_utils=("test_schema", "test_faketensor"))
    x = torch.randn(4, 50)
    assert torch.equal(torch.compile(lambda v: sampling.argmax_ids(v * 2), fullgraph=True)(x), (x * 2).argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_greedy_is_argmax(dtype):
    g = torch.Generator().manual_seed(1)
    for logits in (torch.randn(16, 999, generator=g), torch.randint(0, 3, (16, 999), generator=g).float()):
        logits = logits.to(dtype)
        assert torch.equal(reference_sample_top_k(logits, 1, 1.5), torch.argmax(logits, dim=-1))
        assert torch.equal(reference_sample_top_k(logits, 50, 0.0), torch.argmax(logits, dim=-1))


def _logits_row(V=40, seed=0):
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("sampler", [pytest.param("op", marks=needs_c), "reference",
                                     pytest.param("cuda", marks=[needs_c, pytest.mark.gpu])])
@pytest.mark.parametrize("V,k,T,top_p", [(40, 10, 0.7, None), (40, None, 1.3, None), (40, 10**6, 0.9, None),
                                          (40, 12, 1.0, 0.8), (300, 100, 2.0, None)])  # k > 64: histogram select
def test_chi_square_matches_softmax(V, k, T, top_p, sampler):
    row, n = _logits_row(V), 20_000
    vals, idx = torch.topk(row, min(k or V, V))
    p = torch.softmax(vals.double() / T, -1)
    if top_p is not None:
        p = torch.where(p.cumsum(-1) - p < top_p, p, 0)
        p = p / p.sum()
    probs = torch.zeros(V, dtype=torch.float64).scatter_(0, idx, p)
    if sampler == "cuda":
        assert sampling.has_kernel("cuda"), "gptfast._C was built without its CUDA kernel"
    if sampler != "reference":
        ids = draws(row.to("cuda" if sampler == "cuda" else "cpu"), n, k=k, temperature=T, top_p=top_p, seed=2024).cpu()
    else:
        ids = reference_sample_top_k(row.expand(n, -1), k, T, top_p, torch.Generator().manual_seed(7))
    counts = torch.bincount(ids, minlength=V).double()
    assert counts[probs == 0].sum() == 0, f"{sampler}: sampled a filtered token"
    pval = chi2_pvalue(counts[probs > 0], probs[probs > 0])
    assert pval > 1e-3, f"{sampler}: chi-square p={pval:.2e}, counts {counts.tolist()}"
    # the test has power: a different temperature is rejected
    wrong = torch.softmax(vals.double() / (2 * T), -1)
    wrong = torch.zeros(V, dtype=torch.float64).scatter_(0, idx, wrong)
    if top_p is None:
        assert chi2_pvalue(counts[probs > 0], wrong[probs > 0] / wrong[probs > 0].sum()) < 1e-6


@needs_c
def test_same_seed_same_ids_and_offsets_differ():
    logits = torch.randn(64, 3000, generator=torch.Generator().manual_seed(5))
    a = sample_top_k(logits, 100, 1.0, seed=42)
    assert torch.equal(a, sample_top_k(logits, 100, 1.0, seed=42))
    assert torch.equal(a, sample_top_k(logits, 100, 1.0, seed=torch.tensor([42, 0])))
    assert not torch.equal(a, sample_top_k(logits, 100, 1.0, seed=(42, 1)))
    assert not torch.equal(a, sample_top_k(logits, 100, 1.0, seed=43))
    torch.manual_seed(0)
    b = sample_top_k(logits, 100, 1.0)
    torch.manual_seed(0)
    assert torch.equal(b, sample_top_k(logits, 100, 1.0))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(sample_top_k(logits, 100, 1.0, generator=g1), sample_top_k(logits, 100, 1.0, generator=g2))


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,top_p", [(1000, None), (None, None), (50, 0.6), (None, 0.9)])
def test_ids_follow_the_documented_draw(dtype, k, top_p):
    """Same u, same id: the CPU op against the documented draw in float64 (also the check the
    CUDA test applies), wherever fp32 rounding cannot move the id."""
    logits = (torch.randn(64, 50257, generator=torch.Generator().manual_seed(4)) * 2).to(dtype)
    logits[4:8, ::3] = -math.inf
    ids = sample_top_k(logits, k, 0.8, top_p=top_p, seed=(11, 3))
    assert_ids_predicted(logits, k, 0.8, top_p, 11, 3, cpu=ids)


@pytest.mark.parametrize("sampler", [pytest.param(sample_top_k, marks=needs_c), reference_sample_top_k],
                         ids=["op", "reference"])
def test_neg_inf_logits_never_sampled(sampler):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 500, generator=g)
    logits[:, ::2] = -math.inf
    logits[:, 1:5] = -math.inf  # rows keep 248 finite tokens; k may exceed that
    for k in (10, 400, None):
        ids = sampler(logits, k, 2.0)
        assert torch.isfinite(logits.gather(1, ids[:, None])).all(), f"k={k}: sampled a -inf token"


@pytest.mark.parametrize("logits,kw,match", [
    (torch.tensor([[0.0, math.nan, 1.0]]), {}, "NaN"),
    (torch.tensor([[0.0, math.inf, 1.0]]), {}, r"\+inf"),
    (torch.full((1, 3), -math.inf), {}, "all -inf"),
    (torch.zeros(2, 5), {"k": 0}, "k must be"),
    (torch.zeros(2, 5), {"k": -3}, "k must be"),
    (torch.zeros(2, 5), {"temperature": -0.5}, "temperature"),
    (torch.zeros(2, 5), {"temperature": math.nan}, "temperature"),
    (torch.zeros(2, 5), {"top_p": 0.0}, "top_p"),
    (torch.zeros(2, 5), {"top_p": 1.5}, "top_p"),
    (torch.zeros(2, 5, dtype=torch.float64), {}, "float32, float16 or bfloat16"),
    (torch.zeros(2, 5, dtype=torch.int64), {}, "float32, float16 or bfloat16"),
    (torch.zeros(5), {}, "2-D"),
    (torch.zeros(1, 2, 5), {}, "2-D"),
    (torch.zeros(2, 5), {"seed": "x"}, "seed"),
    (torch.zeros(2, 5), {"seed": 1.5}, "seed"),
    (torch.zeros(2, 0), {}, "V >= 1"),
])
def test_bad_input_raises_clear_error(logits, kw, match):
    args = {"k": 3, "temperature": 1.0, **kw}
    with pytest.raises((ValueError, RuntimeError), match=match) as e:
        sample_top_k(logits, **args)
    assert "\n" not in str(e.value).strip()  # one line


@needs_c
@pytest.mark.parametrize("logits,k,temperature,top_p,seed,match", [
    (torch.zeros(1, 4), 2, 1.0, 0.0, [0, 0], "top_p must be in"),
    (torch.zeros(1, 4), 2, 1.0, math.nan, [0, 0], "top_p must be in"),
    (torch.zeros(1, 4), 2, 1.0, 1.0, [0], "seed must be an int64 tensor"),
    (torch.zeros(1, 4), 0, 1.0, 1.0, [0, 0], "k must be >= 1"),
    (torch.zeros(1, 4), 2, -1.0, 1.0, [0, 0], "temperature must be"),
    (torch.zeros(1, 4), 2, math.inf, 1.0, [0, 0], "temperature must be"),
    (torch.zeros(4), 2, 1.0, 1.0, [0, 0], "2-D"),
    (torch.zeros(1, 4, dtype=torch.int32), 2, 1.0, 1.0, [0, 0], "float32, float16 or bfloat16"),
    (torch.zeros(1, 0), 2, 1.0, 1.0, [0, 0], "V >= 1"),
    (torch.tensor([[0.0, math.nan]]), 2, 1.0, 1.0, [0, 0], "NaN"),
    (torch.full((1, 3), -math.inf), 2, 1.0, 1.0, [0, 0], "all -inf"),
])
def test_op_checks_its_own_arguments(logits, k, temperature, top_p, seed, match):
    """The raw op (no Python _validate in front) still fails with a one-line error."""
    with pytest.raises(RuntimeError, match=match) as e:
        op(logits, k, temperature, top_p, torch.tensor(seed), False)
    assert "\n" not in str(e.value).strip()


@needs_c
def test_fake_impl_and_compile():
    args = (torch.randn(4, 300), 20, 0.9, 0.95, torch.tensor([3, 4]), True)
    torch.library.opcheck(op, args)
    logits, seed = args[0], torch.tensor([3, 0])
    fn = torch.compile(lambda x, s: sample_top_k(x, 20, 0.9, top_p=0.95, seed=s, return_topk=True),
                       backend="aot_eager", fullgraph=True)  # fullgraph: no graph break in the API
    for offset in range(3):  # the seed tensor advanced in place, as a CUDA-graph caller would
        seed[1] = offset
        for a, b in zip(fn(logits, seed), sample_top_k(logits, 20, 0.9, top_p=0.95, seed=(3, offset), return_topk=True)):
            assert torch.equal(a, b)


def test_fallback_warns_once_and_samples(monkeypatch):
    monkeypatch.setattr(sampling, "has_kernel", lambda device_type: False)
    monkeypatch.setattr(sampling, "_warned", set())
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = sample_top_k(logits, 20, 1.0, seed=5)
        b = sample_top_k(logits, 20, 1.0, seed=5)
    assert sum("reference path" in str(w.message) for w in caught) == 1
    assert torch.equal(a, b)
    assert (a[:, None] == torch.topk(logits, 20).indices).any(-1).all()
    with pytest.raises(ValueError, match="NaN"):
        sample_top_k(torch.full((1, 3), math.nan), 2, 1.0)


@cuda_test
@pytest.mark.parametrize("V", [50257, 100003])  # an fp32 row of 100003 does not fit shared memory
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,top_p", [(1, None), (50, None), (1000, None), (50, 0.6), (None, None), (None, 0.9)])
def test_cuda_matches_cpu(dtype, k, top_p, V):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(256, V, generator=g) * 2).to(dtype)
    logits[:4, 7:20] = logits[:4, 6:7]  # ties, also at the max
    logits[4:8, ::3] = -math.inf
    padded = torch.zeros(256, V + 5, dtype=dtype, device="cuda")
    padded[:, :V] = logits.cuda()
    on_gpu = padded[:, :V]  # (B, V) non-contiguous
    kw = {"top_p": top_p, "seed": (11, 3)}
    cpu = sample_top_k(logits, k, 0.8, return_topk=True, **kw)
    gpu = [t.cpu() for t in sample_top_k(on_gpu, k, 0.8, return_topk=True, **kw)]
    assert gpu[0].dtype == torch.int64 and gpu[0].shape == (256,)
    for name, a, b in zip(("values", "indices"), cpu[1:], gpu[1:]):  # exactly, ties broken alike
        assert torch.equal(a, b), f"top-k {name} differ in rows {(a != b).any(-1).nonzero().flatten().tolist()[:8]}"
    assert torch.equal(gpu[0], sample_top_k(on_gpu, k, 0.8, **kw).cpu()), "ids depend on return_topk"
    # same u per row: both give the id u selects wherever fp32 summation order cannot move it
    assert_ids_predicted(logits, k, 0.8, top_p, 11, 3, cpu=cpu[0], cuda=gpu[0])
    allowed = nucleus_mask(logits, k or V, 0.8, top_p or 1.0)
    assert allowed.gather(1, gpu[0][:, None]).all(), "a CUDA id left the top-k / nucleus"


@cuda_test
@pytest.mark.parametrize("k,top_p", [(1, None), (50, None), (1000, 0.5), (None, None), (None, 0.3)])
def test_cuda_equals_cpu_exactly_on_unit_weights(k, top_p):
    """Logits in {+0, -0, -inf}: every weight is exactly 1 or 0, every sum an exact integer, so
    CPU and CUDA must agree on every row (ties at the k-th value, signed zeros equal, masked
    tokens, top-p ties)."""
    g = torch.Generator().manual_seed(1)
    masked = torch.rand(256, 50257, generator=g) < torch.linspace(0, 0.9995, 256)[:, None]
    logits = torch.zeros(256, 50257).masked_fill(torch.rand(256, 50257, generator=g) < 0.5, -0.0)
    logits = logits.masked_fill(masked, -math.inf)
    logits[:, -1] = 0  # no row is all -inf
    for dtype in DTYPES:
        x = logits.to(dtype)
        cpu = sample_top_k(x, k, 0.8, top_p=top_p, seed=(7, 1), return_topk=True)
        gpu = sample_top_k(x.cuda(), k, 0.8, top_p=top_p, seed=(7, 1), return_topk=True)
        for name, a, b in zip(("ids", "values", "indices"), cpu, gpu):
            assert torch.equal(a, b.cpu()), f"{dtype} {name}: rows {(a != b.cpu()).reshape(256, -1).any(-1).nonzero().flatten().tolist()[:8]}"


@cuda_test
def test_cuda_kernel_flags_bad_rows():
    """The op alone (the eager Python check skipped, as in a CUDA graph): a NaN, +inf or all
    -inf row draws id -1; the other rows are untouched."""
    logits = torch.randn(4, 50257, device="cuda")
    logits[1, 100], logits[2, 50256], logits[3] = math.nan, math.inf, -math.inf
    for k, T in [(50, 1.0), (1, 1.0), (50, 0.0)]:
        ids = op(logits, k, T, 1.0, torch.tensor([1, 0]), False)[0].cpu()
        assert ids[1:].tolist() == [-1, -1, -1], (k, T, ids.tolist())
        assert ids[0] in torch.topk(logits[0].cpu(), k).indices


@cuda_test
def test_cuda_runs_on_the_current_stream():
    logits = torch.randn(64, 50257, device="cuda")
    want = sample_top_k(logits, 50, 1.0, seed=2, return_topk=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # the input below exists only after this on `side`
        got = sample_top_k(logits.clone(), 50, 1.0, seed=2, return_topk=True)
    side.synchronize()
    for a, b in zip(want, got):
        assert torch.equal(a, b)


@cuda_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs to check the device guard on cuda:1")
def test_cuda_second_device():
    logits = torch.randn(8, 50257)
    want = sample_top_k(logits.cuda(0), 50, 1.0, seed=3, return_topk=True)
    got = sample_top_k(logits.to("cuda:1"), 50, 1.0, seed=3, return_topk=True)
    assert all(t.device == torch.device("cuda:1") for t in got)
    for a, b in zip(want, got):
        assert torch.equal(a.cpu(), b.cpu())


@cuda_test
@pytest.mark.parametrize("return_topk,top_p", [(False, None), (True, 0.9)])
def test_cuda_graph_with_seed_tensor(return_topk, top_p):
    logits = torch.randn(8, 50257, device="cuda")
    seed = torch.tensor([5, 0], device="cuda")
    run = lambda s: sample_top_k(logits, 50, 1.0, top_p=top_p, seed=s, return_topk=return_topk)  # noqa: E731
    run(seed)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = run(seed)
    for offset in range(3):
        seed[1] = offset
        graph.replay()
        for a, b in zip(static if return_topk else (static,), run((5, offset)) if return_topk else (run((5, offset)),)):
            assert torch.equal(a, b)


@cuda_test
def test_cuda_fake_impl_and_compile():
    logits, seed = torch.randn(4, 50257, device="cuda", dtype=torch.bfloat16), torch.tensor([3, 0], device="cuda")
    torch.library.opcheck(op, (logits, 20, 0.9, 0.95, seed, True))
    fn = torch.compile(lambda x, s: sample_top_k(x, 20, 0.9, top_p=0.95, seed=s, return_topk=True),
                       backend="aot_eager", fullgraph=True)
    for offset in range(3):
        seed[1] = offset
        for a, b in zip(fn(logits, seed), sample_top_k(logits, 20, 0.9, top_p=0.95, seed=(3, offset), return_topk=True)):
            assert torch.equal(a, b)
