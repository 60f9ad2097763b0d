"""Ahead-of-time compile of the Triton kernels for sm_90 as the JIT would build them on a GPU,
so the real compiler checks them on CPU and reports what each kernel costs.

Triton's CPU interpreter (what the other kernel tests run under here) accepts code that the
real compiler rejects: loop-carried variables that change type, tl.dot shapes it cannot tile,
tiles that do not fit shared memory or make ptxas fail. This file runs the real launchers at
GPT-2 124M shapes (batch 16 x 1024, 12 heads of 64, width 768, vocab 50257) on CPU tensors
with every kernel launch recorded instead of run, specialises each recorded launch exactly as
Triton's JIT does (16-aligned pointers and integers divisible by 16 get the divisibility hint
that lets loads vectorise; integers equal to 1 become constants), and compiles it through
Triton's full pipeline to an sm_90 cubin (`triton.compile` with a GPUTarget needs the ptxas
bundled with Triton, but no GPU). Each kernel prints its registers, spills (ptxas -v),
shared memory and the widths of its global loads in the PTX.

tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines, which turns @triton.jit functions
into interpreter objects, so the compiling runs in a subprocess without it: this file run as a
script, `python tests/test_triton_compile.py GROUP`, prints one line per kernel and exits 1
if any failed (77 when ptxas is missing). Works with Triton 3.6 (GPU machines) and 3.9.
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import time
import traceback

import pytest

GROUPS = ("attention", "attention_decode", "layer_norm", "gelu", "cross_entropy")
NO_PTXAS = 77  # the subprocess's exit code when Triton cannot find ptxas
B, T, H, D, WIDTH, VOCAB = 16, 1024, 12, 64, 768, 50257  # GPT-2 124M training shapes
PADDED_VOCAB = 50304  # GPTConfig(pad_vocab=True)'s head
SMS = 132  # an H100/H200: what the launchers size split counts for
SEED = 12345  # dropout seed: an int the JIT specialises like most random seeds (not divisible by 16)
LINE = re.compile(r"^ok   (?P<name>[^\s\[]+(?:\[[^\]]*\])?) .*?regs=(?P<regs>\d+) spills=(?P<st>\d+)/(?P<ld>\d+)B .*?"
                  r"ld\.global v4=(?P<v4>\d+) v2=(?P<v2>\d+) scalar=(?P<scalar>\d+)", re.M)


# ------------------------------------------------------------------ the subprocess side

def _attention_configs():
    """(dtype, head_dim, heads, dropout ps) at GPT-2 shapes; fp16 takes bf16's launch configs and
    compiles to the same registers: left out."""
    import torch

    return [(dtype, head_dim, H * D // head_dim, drops)
            for dtype, head_dim, drops in ((torch.bfloat16, D, (0.0, 0.1)), (torch.float32, D, (0.0, 0.1)),
                                           (torch.bfloat16, 128, (0.0,)), (torch.float32, 128, (0.0,)))]


def _attention_launches(record):
    import torch

    from gptfast.kernels import _attention_common, attention as A

    _attention_common._check_device = lambda name, t: None  # CPU tensors stand in for CUDA ones: nothing runs
    for dtype, head_dim, heads, drops in _attention_configs():
        qkv = torch.empty(B, T, 3, heads, head_dim, dtype=dtype)  # the model's fused projection
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D), strided views as in the model
        do = torch.empty(B, heads, T, head_dim, dtype=dtype)
        dt = str(dtype).removeprefix("torch.")
        for p in drops:
            with record(f"{dt} D={head_dim}{' dropout' if p else ''}"):
                o, lse = A._forward(q, k, v, True, p, SEED)
                A._backward(do, q, k, v, o, lse, True, p, SEED)
    with record("mask"):
        A.attention_dropout_mask(SEED, 2, 64, 64, 0.1)


def _attention_decode_launches(record):
    import torch

    from gptfast.kernels import _attention_common
    from gptfast.kernels.attention_decode import attention_decode

    _attention_common._check_device = lambda name, t: None  # CPU tensors stand in for CUDA ones: nothing runs
    for dtype, head_dim, heads, _ in _attention_configs():
        with record(f"{str(dtype).removeprefix('torch.')} D={head_dim}"):  # batch 1, a 1024-slot cache
            q1 = torch.empty(1, heads, 1, head_dim, dtype=dtype)
            kc, vc = (torch.empty(1, heads, T, head_dim, dtype=dtype) for _ in range(2))
            splits = max(1, min(T // 64, -(-4 * SMS // heads)))  # attention_decode's choice on a GPU
            attention_decode(q1, kc, vc, 700, num_splits=splits)  # eager: an int length
            attention_decode(q1, kc, vc, torch.tensor([700]), num_splits=splits)  # CUDA graph: a tensor


def _layer_norm_launches(record):
    import torch

    from gptfast.kernels.layer_norm import add_layer_norm, layer_norm

    for dtype in (torch.bfloat16, torch.float32):
        x, res, dy = (torch.empty(B * T, WIDTH, dtype=dtype) for _ in range(3))
        scale, shift = (torch.empty(WIDTH, dtype=dtype, requires_grad=True) for _ in range(2))
        with record(f"{str(dtype).removeprefix('torch.')} N={WIDTH}"):
            y = layer_norm(x.requires_grad_(), scale, shift)
            torch.autograd.grad(y, (x, scale, shift), dy)
            s, y = add_layer_norm(x, res.requires_grad_(), scale, shift)
            torch.autograd.grad((s, y), (x, res, scale, shift), (dy, dy))


def _gelu_launches(record):
    import torch

    from gptfast.kernels.gelu import bias_gelu, gelu

    for dtype in (torch.bfloat16, torch.float32):
        x, dy = (torch.empty(B * T // 2, 4 * WIDTH, dtype=dtype) for _ in range(2))  # feed-forward hidden
        bias = torch.empty(4 * WIDTH, dtype=dtype, requires_grad=True)
        with record(f"{str(dtype).removeprefix('torch.')} N={4 * WIDTH}"):
            torch.autograd.grad(gelu(x.requires_grad_()), x, dy)
            torch.autograd.grad(bias_gelu(x, bias), (x, bias), dy)


def _cross_entropy_launches(record):
    import torch

    from gptfast.kernels.cross_entropy import cross_entropy, linear_cross_entropy

    rows = 64  # GPT-2's row layout; the row count changes no specialisation
    targets = torch.randint(0, VOCAB, (rows,))
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        dt = str(dtype).removeprefix("torch.")
        for width in (VOCAB, PADDED_VOCAB):  # a plain head's logits; a padded head's (pad_vocab) sliced
            full = torch.randn(rows, width, dtype=dtype, requires_grad=True)
            with record(f"{dt} V={VOCAB}{' padded rows' if width > VOCAB else ''}"):
                cross_entropy(full[:, :VOCAB], targets).backward()
                with torch.no_grad():
                    cross_entropy(full[:, :VOCAB], targets)
        hidden = torch.randn(rows, WIDTH, dtype=dtype, requires_grad=True)
        weight = torch.randn(VOCAB, WIDTH, dtype=dtype, requires_grad=True)
        with record(f"{dt} linear V={VOCAB}"):
            linear_cross_entropy(hidden, weight, targets).backward()


def _broken_launches(record):
    """A kernel the interpreter runs (it sums correctly under TRITON_INTERPRET=1) but the compiler
    rejects: `acc` starts as an int and becomes a float in the loop. Proves that a compile error
    is reported as a failure."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _broken_sum(X, OUT, N, BLOCK: tl.constexpr):
        acc = 0
        for start in range(0, N, BLOCK):
            acc += tl.sum(tl.load(X + start + tl.arange(0, BLOCK)).to(tl.float32), 0)
        tl.store(OUT, acc)

    with record(""):
        _broken_sum[(1,)](torch.empty(256), torch.empty(1), 256, BLOCK=128)


LAUNCHES = dict(attention=_attention_launches, attention_decode=_attention_decode_launches,
                layer_norm=_layer_norm_launches, gelu=_gelu_launches,
                cross_entropy=_cross_entropy_launches, broken=_broken_launches)


def _recorded(group):
    """[(label, fn, args, kwargs)]: every launch the group's launchers make, recorded, not run."""
    from triton.runtime.jit import JITFunction

    launches, label = [], [""]

    @contextlib.contextmanager
    def record(name):
        label[0] = name
        yield

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((label[0], self, args, kwargs))

    original, JITFunction.run = JITFunction.run, run
    try:
        LAUNCHES[group](record)
    finally:
        JITFunction.run = original
    return launches


def _specialize(fn, args, kwargs, backend):
    """(signature, constexprs, attrs, options) as the JIT derives them from these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(fn.params, bound.arguments.values())):
        if param.is_constexpr:
            signature[param.name], constexprs[(i,)] = "constexpr", value
            continue
        kind, key = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize, True)
        signature[param.name] = kind
        if kind == "constexpr":  # an integer equal to 1
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = backend.parse_attr(key)
    return signature, constexprs, attrs, dict(num_warps=options.get("num_warps", 4),
                                              num_stages=options.get("num_stages", 3))


def _resources(ptxas_log: str, ptx: str) -> str:
    """'regs=N spills=stores/loadsB' from ptxas -v, and the count of each global load width."""
    regs = re.search(r"Used (\d+) registers", ptxas_log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    loads = re.findall(r"ld\.global(?:\.\w+)*?(\.v[24])?\.[bfsu]\d+", ptx)
    widths = {w: sum(1 for x in loads if x == w) for w in (".v4", ".v2", "")}
    return (f"regs={regs.group(1) if regs else '?'} spills={spills.group(1) if spills else '?'}/"
            f"{spills.group(2) if spills else '?'}B ld.global v4={widths['.v4']} v2={widths['.v2']} "
            f"scalar={widths['']}")


def main(group: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    try:  # the sm_90 ptxas Triton would use (TRITON_PTXAS_PATH, else the bundled one)
        print(f"ptxas: {triton.knobs.nvidia.ptxas.path}; triton {triton.__version__}")
    except RuntimeError as e:
        print(f"ptxas not found: {e}")
        return NO_PTXAS
    target = GPUTarget("cuda", 90, 32)
    backend = triton.compiler.make_backend(target)
    failed, seen = [], set()
    for label, fn, args, kwargs in _recorded(group):
        signature, constexprs, attrs, options = _specialize(fn, args, kwargs, backend)
        key = (fn.__name__, str(signature), str(constexprs), str(attrs), str(options))
        if key in seen:
            continue
        seen.add(key)
        name = f"{fn.__name__}[{label}]" if label else fn.__name__
        hinted = ",".join(fn.arg_names[i] for (i,) in attrs if attrs[(i,)])
        consts = {fn.arg_names[i]: v for (i,), v in constexprs.items()}
        src = triton.compiler.ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
        t0, log = time.time(), io.StringIO()
        try:
            with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v's report
                kernel = triton.compile(src, target=target, options=options)
        except Exception:  # noqa: BLE001 - any compiler error is this variant's failure
            failed.append(name)
            print(f"FAIL {name} ({options}, constexprs={consts}):\n{traceback.format_exc()}")
            continue
        print(f"ok   {name} warps={options['num_warps']} stages={options['num_stages']} "
              f"{_resources(log.getvalue(), kernel.asm['ptx'])} shared={kernel.metadata.shared}B "
              f"{time.time() - t0:.1f}s | {consts} | 16-divisible: {hinted or '-'}", flush=True)
    if failed:
        print(f"{len(failed)} kernel(s) failed to compile for sm_90: {', '.join(failed)}")
    return 1 if failed else 0


# ----------------------------------------------------------------------- the pytest side

@pytest.fixture(scope="module")
def compile_group(tmp_path_factory):
    """group -> the finished subprocess that compiled it (each group compiled once per session)."""
    done = {}

    def run(group):
        if group not in done:
            done[group] = _compile(group, tmp_path_factory.mktemp(group))
        if done[group].returncode == NO_PTXAS:
            pytest.skip(f"Triton cannot find ptxas, so nothing can be compiled for sm_90: {done[group].stdout}")
        print(done[group].stdout)  # the resource table, shown with -s or on failure
        return done[group]
    return run


def _compile(group, tmp_path):
    """Run this file as a script for `group`, outside the interpreter, with an empty cache."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DUMP_PTXAS_LOG="1")
    return subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=900)


def _kernels(stdout):
    return {m["name"]: {k: int(v) for k, v in m.groupdict().items() if k != "name"} for m in LINE.finditer(stdout)}


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_compile_for_sm90(group, compile_group):
    proc = compile_group(group)
    assert proc.returncode == 0, (f"{group} kernels fail to compile for sm_90 (exit {proc.returncode}):\n"
                                  f"{proc.stdout}\n{proc.stderr[-4000:]}")
    kernels = _kernels(proc.stdout)
    assert kernels, f"no {group} kernel was compiled:\n{proc.stdout}"
    # the launch configs are chosen from this build: none may spill registers at GPT-2 shapes
    spilled = [name for name, k in kernels.items() if k["st"] or k["ld"]]
    assert not spilled, f"{group}: kernels spill registers at GPT-2 shapes: {spilled}\n{proc.stdout}"


def test_cross_entropy_loads_vectorise_on_padded_rows(compile_group):
    """Rows of 50257 logits start unaligned (scalar 2-byte loads); padded rows (the fused
    linear-CE's own chunk buffer, or a pad_vocab head's logits) must compile to vector loads.
    (The linear-CE's launches specialise like the padded rows', so they print under that name.)"""
    proc = compile_group("cross_entropy")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    padded = {name: k for name, k in _kernels(proc.stdout).items()
              if name.startswith("_cross_entropy_fwd") and ("padded" in name or "linear" in name)}
    dtypes = {name.split("[")[1].split()[0] for name in padded}
    assert dtypes == {"bfloat16", "float32", "float16"}, f"padded-row loss kernels missing: {sorted(padded)}"
    scalar = [name for name, k in padded.items() if not (k["v4"] or k["v2"])]
    assert not scalar, f"loss kernels with only scalar global loads on padded rows: {scalar}\n{proc.stdout}"


def test_compile_error_is_reported(compile_group):
    proc = compile_group("broken")
    assert proc.returncode == 1 and "FAIL _broken_sum" in proc.stdout, (
        f"a kernel the compiler rejects was not reported (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert "CompilationError" in proc.stdout, f"the failure is not the compiler's error:\n{proc.stdout}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
