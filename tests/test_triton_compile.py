"""Ahead-of-time compile of the Triton kernels for sm_90, so the real compiler checks them on CPU.

Triton's CPU interpreter (what the other kernel tests run under here) accepts code that the
real compiler rejects: loop-carried variables that change type, tl.dot shapes it cannot tile,
tiles that do not fit shared memory or make ptxas fail. This file compiles a representative
set of kernel variants through Triton's full pipeline down to a cubin for an H100
(`triton.compile` with a GPUTarget needs ptxas, bundled with Triton, but no GPU), with the
block sizes and warps the launchers pick on a GPU.

tests/conftest.py sets TRITON_INTERPRET=1 on CPU machines, which turns @triton.jit functions
into interpreter objects, so the compiling runs in a subprocess without it: this file run as a
script, `python tests/test_triton_compile.py GROUP`, prints one line per variant and exits 1
if any failed (77 when ptxas is missing).
"""
import os
import subprocess
import sys
import time
import traceback

import pytest

GROUPS = ("attention", "layer_norm", "gelu", "cross_entropy")
NO_PTXAS = 77  # the subprocess's exit code when Triton cannot find ptxas
GPT2_WIDTH, GPT2_VOCAB = 768, 50257  # GPT-2 124M: emb_dim (layer_norm), vocab (cross_entropy)
DTYPES = ("bf16", "fp32")


# ------------------------------------------------------------------ the subprocess side

def _full_signature(fn, types, constexprs):
    """Triton type of every argument of `fn`: constexprs by name, the rest from `types`
    (pointers and floats), i32 for anything not listed (sizes, strides, seeds)."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}


def _attention_variants():
    import torch

    from gptfast.kernels import attention as A

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}
    cases = [(dt, 64, drop) for dt in DTYPES for drop in (False, True)] + [("bf16", 128, False)]
    for dt, D, drop in cases:
        ptr = "*" + dt
        types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, DO=ptr, DQ=ptr, DK=ptr, DV=ptr, LSE="*fp32", DELTA="*fp32",
                     qk_scale="fp32", sm_scale="fp32", p_drop="fp32")
        prec = A._precision(torch_dtype[dt])
        fwd, dkdv, dq = A._blocks(D, torch_dtype[dt])
        common = dict(HEAD_DIM=D, CAUSAL=True, DROPOUT=drop, PREC=prec)
        tag = f"{dt} D={D}"
        for fn, (bm, bn, warps, stages) in ((A._attn_fwd, fwd), (A._attn_bwd_dkdv, dkdv), (A._attn_bwd_dq, dq)):
            yield (f"{tag} causal{' dropout' if drop else ''}", fn, types, dict(common, BLOCK_M=bm, BLOCK_N=bn),
                   warps, stages)
        if drop:  # the rest has no causal/dropout variants
            continue
        # BLOCK_M=64, BLOCK_N=64 and 4 warps: what _backward and attention_decode launch with
        yield tag, A._attn_bwd_delta, types, dict(HEAD_DIM=D, BLOCK_M=64), 4, 3
        for per_row in (False, True):
            split_types = dict(types, LENS="*i32" if per_row else ptr, PART_ACC="*fp32", PART_M="*fp32",
                               PART_L="*fp32")
            yield (f"{tag} per_row={per_row}", A._decode_split, split_types,
                   dict(HEAD_DIM=D, BLOCK_N=64, PER_ROW=per_row), 4, 3)
        combine_types = dict(PART_ACC="*fp32", PART_M="*fp32", PART_L="*fp32", O=ptr)
        yield tag, A._decode_combine, combine_types, dict(HEAD_DIM=D, BLOCK_S=8, PREC=prec), 4, 3
    yield "", A._dropout_mask_kernel, dict(MASK="*i8", p_drop="fp32"), dict(BLOCK=32), 4, 3


def _layer_norm_variants():
    from gptfast.kernels.layer_norm import _launch_config, _layer_norm_bwd, _layer_norm_fwd

    block, warps = _launch_config(GPT2_WIDTH)
    for dt in DTYPES:
        ptr = "*" + dt
        types = dict(X=ptr, RES=ptr, SUM=ptr, Y=ptr, W=ptr, B=ptr, DY=ptr, DSUM=ptr, DX=ptr, MEAN="*fp32",
                     RSTD="*fp32", DW_PART="*fp32", DB_PART="*fp32", eps="fp32")
        for res in (False, True):
            tag = f"{dt} N={GPT2_WIDTH}{' residual' if res else ''}"
            yield tag, _layer_norm_fwd, types, dict(HAS_RES=res, BLOCK_N=block), warps, 3
            yield tag, _layer_norm_bwd, types, dict(HAS_DSUM=res, BLOCK_N=block), warps, 3


def _gelu_variants():
    from gptfast.kernels.gelu import NUM_WARPS, _bias_gelu_bwd, _bias_gelu_fwd, _tiles

    _, _, block_m, block_n = _tiles(8 * 1024, 4 * GPT2_WIDTH)  # the feed-forward hidden layer
    for dt in DTYPES:
        ptr = "*" + dt
        types = dict(X=ptr, BIAS=ptr, Y=ptr, DY=ptr, DX=ptr, DBIAS_PART="*fp32")
        for bias in (False, True):
            consts = dict(HAS_BIAS=bias, BLOCK_M=block_m, BLOCK_N=block_n)
            tag = f"{dt} N={4 * GPT2_WIDTH}{' bias' if bias else ''}"
            for fn in (_bias_gelu_fwd, _bias_gelu_bwd):
                yield tag, fn, types, consts, NUM_WARPS, 3


def _cross_entropy_variants():
    from gptfast.kernels.cross_entropy import _block_v, _cross_entropy_fwd, _scale_grad

    block, warps = _block_v(GPT2_VOCAB)
    for dt in DTYPES + ("fp16",):  # fp16: gradient times a constant, divided in backward
        divide = dt != "fp16"
        types = dict(LOGITS="*" + dt, GRAD="*" + dt, TARGETS="*i64", LOSS="*fp32", N_VALID="*i64", mult="fp32",
                     G="*" + dt, GRAD_OUT="*fp32", inv_mult="fp32")
        for write_grad in (False, True):
            yield (f"{dt} V={GPT2_VOCAB}{' write_grad' if write_grad else ''}", _cross_entropy_fwd, types,
                   dict(WRITE_GRAD=write_grad, DIVIDE=divide, BLOCK_V=block), warps, 3)
        yield dt, _scale_grad, types, dict(DIVIDE=not divide, BLOCK=4096), 8, 3  # as _scale launches it


def _broken_variants():
    """A kernel the interpreter runs (it sums correctly under TRITON_INTERPRET=1) but the compiler
    rejects: `acc` starts as an int and becomes a float in the loop. Proves that a compile error
    is reported as a failure."""
    import triton
    import triton.language as tl

    @triton.jit
    def _broken_sum(X, OUT, N, BLOCK: tl.constexpr):
        acc = 0
        for start in range(0, N, BLOCK):
            acc += tl.sum(tl.load(X + start + tl.arange(0, BLOCK)).to(tl.float32), 0)
        tl.store(OUT, acc)

    yield "", _broken_sum, dict(X="*fp32", OUT="*fp32"), dict(BLOCK=128), 4, 3


VARIANTS = dict(attention=_attention_variants, layer_norm=_layer_norm_variants, gelu=_gelu_variants,
                cross_entropy=_cross_entropy_variants, broken=_broken_variants)


def main(group: str) -> int:
    import triton
    from triton.backends.compiler import GPUTarget

    try:  # the sm_90 ptxas Triton would use (TRITON_PTXAS_PATH, else the bundled one)
        print(f"ptxas: {triton.knobs.nvidia.ptxas.path}")
    except RuntimeError as e:
        print(f"ptxas not found: {e}")
        return NO_PTXAS
    target = GPUTarget("cuda", 90, 32)
    failed = []
    for tag, fn, types, consts, warps, stages in VARIANTS[group]():
        name = f"{fn.__name__}[{tag}]" if tag else fn.__name__
        src = triton.compiler.ASTSource(fn, _full_signature(fn, types, consts), constexprs=consts)
        t0 = time.time()
        try:
            kernel = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        except Exception:  # noqa: BLE001 - any compiler error is this variant's failure
            failed.append(name)
            print(f"FAIL {name} (warps={warps}, stages={stages}, constexprs={consts}):\n{traceback.format_exc()}")
            continue
        print(f"ok   {name} warps={warps} stages={stages} {time.time() - t0:.1f}s "
              f"shared={kernel.metadata.shared}B", flush=True)
    if failed:
        print(f"{len(failed)} variant(s) failed to compile for sm_90: {', '.join(failed)}")
    return 1 if failed else 0


# ----------------------------------------------------------------------- the pytest side

def _compile_group(group, tmp_path):
    """Run this file as a script for `group`, outside the interpreter, with an empty cache."""
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, __file__, group], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == NO_PTXAS:
        pytest.skip(f"Triton cannot find ptxas, so nothing can be compiled for sm_90: {proc.stdout.strip()}")
    return proc


@pytest.mark.parametrize("group", GROUPS)
def test_kernels_compile_for_sm90(group, tmp_path):
    proc = _compile_group(group, tmp_path)
    assert proc.returncode == 0, (f"{group} kernels fail to compile for sm_90 (exit {proc.returncode}):\n"
                                  f"{proc.stdout}\n{proc.stderr[-4000:]}")
    assert "ok   " in proc.stdout, f"no {group} kernel was compiled:\n{proc.stdout}"


def test_compile_error_is_reported(tmp_path):
    proc = _compile_group("broken", tmp_path)
    assert proc.returncode == 1 and "FAIL _broken_sum" in proc.stdout, (
        f"a kernel the compiler rejects was not reported (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert "CompilationError" in proc.stdout, f"the failure is not the compiler's error:\n{proc.stdout}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
