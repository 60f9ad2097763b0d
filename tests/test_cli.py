"""The command line: every subcommand's --help renders, and `gptfast info` reports what the
library itself decides (backend, Triton, gptfast._C kernels) on this machine."""
import importlib.metadata

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
