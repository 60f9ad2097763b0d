"""The command line: every subcommand's --help renders, `gptfast info` reports what the
library itself decides (backend, Triton, gptfast._C kernels) on this machine, and `gptfast serve`
sets OpenMP's spin before torch loads it."""
import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch

from gptfast import GPTConfig, GPTModel, cli, cpu_decode, cpu_linear, sampling
from gptfast.backends import resolve_device, triton_interpreting


def subcommands():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_renders(command, capsys):
    # argparse formats help lazily: a stray '%' or a bad default only fails here
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(f"usage: gptfast {command}"), out[:200]


def test_info_reports_what_the_library_decides(capsys):
    assert cli.main(["info"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    report = {k.strip(): v.strip() for k, v in lines.items()}
    assert report["torch"].startswith(torch.__version__)
    assert report["tiktoken"] == importlib.metadata.version("tiktoken")
    model = GPTModel(GPTConfig.from_preset("tiny", n_layers=1), backend="auto").to(resolve_device(None))
    assert report["backend auto"] == model.active_backend
    built = [d for d in ("cpu", "cuda") if sampling.has_kernel(d)]
    assert report["gptfast._C sample_top_k"].startswith(f"kernels for {', '.join(built) or 'none'}")
    decode = report["gptfast._C CPU decode"]
    assert decode.startswith("fused step") == cpu_decode.has_kernel(), decode
    assert all(path in decode for path in cpu_linear.kernel_paths()), decode
    usable = torch.cuda.is_available() or triton_interpreting()
    assert report["triton kernels"].startswith("usable" if usable else "not used")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    import gptfast.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gptfast.data, "prepare", interrupted)
    assert cli.main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "gptfast prepare: interrupted\n"


@pytest.mark.parametrize("preset", [None, "123"])
def test_serve_sets_openmp_spin_before_torch_loads(preset):
    # libgomp reads GOMP_SPINCOUNT once, when torch loads it: `gptfast serve` sets it first (in a
    # fresh interpreter, as the command runs), and keeps a value the user gave
    script = ("import os, sys\nfrom gptfast import cli\nassert 'torch' not in sys.modules\n"
              "try:\n    cli.main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
              "print(os.environ.get('GOMP_SPINCOUNT'))")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if preset is not None:
        env["GOMP_SPINCOUNT"] = preset
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == (preset or cli.SERVE_SPINCOUNT)
