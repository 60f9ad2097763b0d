"""The trainer: learning, exact resume (also after SIGKILL), Ctrl-C, divergence, outputs."""
import json
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from gptfast import GPTConfig, GPTModel
from gptfast.config import OptionError
from gptfast.checkpoint import load_checkpoint, load_model
from gptfast.data import VERDICT, read_text
from gptfast.train import Trainer, TrainConfig, TrainingDiverged, WindowBatches, make_optimizer, split_text_batches

SMALL = dict(context_length=32, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)  # dropout on: RNG matters


def make_trainer(out, text=None, model_kw=SMALL, **train_kw):
    train_kw = {"epochs": 1, "batch_size": 2, "eval_freq": 3, "eval_iter": 2, "sample_tokens": 0, **train_kw}
    cfg = TrainConfig(**train_kw)
    torch.manual_seed(cfg.seed)
    model = GPTModel(GPTConfig.from_preset("tiny", **model_kw), backend="torch")  # model_kw overrides
    T = model.cfg.context_length
    train, val = split_text_batches(text or read_text(VERDICT), T, T, cfg.batch_size, cfg.seed)
    return Trainer(model, train, val, cfg, out, device="cpu", log=lambda *a: None)


def test_resume_after_interrupt_repeats_the_same_losses(tmp_path):
    full = make_trainer(tmp_path / "a", max_steps=8).fit()["step_loss"]

    first = make_trainer(tmp_path / "b", max_steps=8)
    real_step = first.train_step

    def step_then_interrupt():
        if first.step == 4:
            raise KeyboardInterrupt
        return real_step()
    first.train_step = step_then_interrupt
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert load_checkpoint(first.checkpoint_path)["step"] == 4  # Ctrl-C saved before exiting

    second = make_trainer(tmp_path / "b", max_steps=8)
    second.resume(first.checkpoint_path)
    assert second.fit()["step_loss"] == full


def _cli_train(out, *extra):
    return [sys.executable, "-m", "gptfast.cli", "train", "--preset", "tiny", "--context-length", "32",
            "--out", str(out), "--sample-tokens", "0", "--eval-freq", "3", "--eval-iter", "1",
            *extra]


def _wait_for(predicate, proc, what, limit=240):
    start = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}: {proc.stdout.read()}")
        if time.monotonic() - start > limit:
            proc.kill()
            raise AssertionError(f"no {what} after {limit} s")
        time.sleep(0.2)


def _checkpoint_step(path):
    try:
        return load_checkpoint(path)["step"] if path.exists() else 0
    except RuntimeError:
        return 0


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_checkpoint(tmp_path):
    ck = tmp_path / "run" / "checkpoint.pt"
    proc = subprocess.Popen(_cli_train(tmp_path / "run", "--save-every", "1", "--max-steps", "12"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: _checkpoint_step(ck) >= 2, proc, "a checkpoint at step 2")
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    killed_at = load_checkpoint(ck)["step"]  # the atomic write means the file is always whole
    assert 2 <= killed_at < 12
    resumed = subprocess.run(_cli_train(tmp_path / "run", "--save-every", "1", "--max-steps", "12",
                                        "--resume", str(ck)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {ck} at step {killed_at}" in resumed.stdout
    # the same run, uninterrupted and in this process, gives the same per-step losses
    full = make_trainer(tmp_path / "ref", model_kw=dict(context_length=32), max_steps=12, eval_freq=3,
                        eval_iter=1, epochs=10).fit()["step_loss"]
    torch.testing.assert_close(torch.tensor(load_checkpoint(ck)["history"]["step_loss"]), torch.tensor(full),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(tmp_path):
    ck = tmp_path / "run" / "checkpoint.pt"
    # a run far too long to end on its own before the signal, however the machine is loaded
    proc = subprocess.Popen(_cli_train(tmp_path / "run", "--save-every", "1000000", "--max-steps", "1000000",
                                       "--epochs", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(metrics.exists, proc, "the first evaluation")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "checkpoint saved" in out
    assert 1 <= load_checkpoint(ck)["step"] < 1000000


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, save_every=2)
    real_step = trainer.train_step

    def poison_after_two():
        if trainer.step == 2:
            with torch.no_grad():
                trainer.model.tok_emb.weight[0].fill_(float("nan"))
                trainer.model.tok_emb.weight[1:].fill_(float("inf"))
        return real_step()
    trainer.train_step = poison_after_two
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        trainer.fit()
    model = load_model(trainer.checkpoint_path)
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_outputs_metrics_plot_and_schedule(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, warmup_steps=2, lr=1e-3, min_lr=1e-4)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3, 6]
    assert all(r["tokens_seen"] == r["step"] * 2 * 32 for r in records)
    assert all(abs(r["val_ppl"] - torch.tensor(r["val_loss"]).exp().item()) < 1e-3 * r["val_ppl"] for r in records)
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    lrs = [r["lr"] for r in records]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # warm-up done, cosine at its floor


def test_grad_accumulation_equals_a_bigger_batch(tmp_path):
    """Two micro-batches of 2 == one batch of 4 with the same rows (no dropout, no clipping).
    Adam's update hides a gradient's scale, so its first moment (0.1 x gradient) is compared."""
    no_drop = dict(SMALL, drop_rate=0.0)
    a = make_trainer(tmp_path / "a", model_kw=no_drop, batch_size=4, max_steps=1, grad_clip=None)
    b = make_trainer(tmp_path / "b", model_kw=no_drop, batch_size=2, grad_accum=2, max_steps=1, grad_clip=None)
    a.train_batches = WindowBatches(a.train_batches.dataset, 4, a.cfg.seed, shuffle=False)
    b.train_batches = WindowBatches(a.train_batches.dataset, 2, a.cfg.seed, shuffle=False)
    assert a.train_step().item() == pytest.approx(b.train_step().item(), rel=1e-5)  # the mean loss, not the sum
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters()):
        ma, mb = a.optimizer.state[pa]["exp_avg"], b.optimizer.state[pb]["exp_avg"]
        torch.testing.assert_close(ma, mb, rtol=1e-4, atol=1e-9, msg=lambda m: f"{name} gradient: {m}")
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_text_too_short_for_a_window(tmp_path):
    with pytest.raises(ValueError, match="validation split: text has .* tokens; one window of context 32"):
        make_trainer(tmp_path, text="Every effort moves you. " * 40)


@pytest.mark.slow
def test_short_run_on_the_verdict_learns_it(tmp_path):
    """The first 5,000 characters of The Verdict, memorised: training loss from ~10.8 to below 1.0."""
    trainer = make_trainer(tmp_path, text=read_text(VERDICT)[:5000], epochs=25, batch_size=4, lr=1e-3,
                           min_lr=1e-4, warmup_steps=10, eval_freq=1000,
                           model_kw=dict(GPTConfig.from_preset("mini").to_dict(), context_length=64, drop_rate=0.0))
    losses = trainer.fit()["step_loss"]
    (train_loss,) = trainer.evaluate()["train"]
    assert losses[0] > 10.0 and train_loss < 1.0, (losses[0], train_loss)


def test_settings_that_make_no_step_fail_before_training(tmp_path):
    # 1 epoch of the Verdict's few dozen micro-batches cannot fill one 10,000-micro-batch step
    with pytest.raises(ValueError, match="make no optimizer step of 10000 micro-batches"):
        make_trainer(tmp_path, grad_accum=10_000)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--context-length", "0"], "--context-length must be >= 1, got 0"),
    (["--stride", "0"], "--stride must be >= 1, got 0"),
    (["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),  # accepted before: the loss climbed
    (["--lr", "nan"], "--lr must be a finite number, got nan"),  # was "min_lr must be in [0, lr]"
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--min-lr", "1"], "min_lr must be <= lr (0.0004), got 1.0"),
    (["--sample-tokens", "-1"], "--sample-tokens must be >= 0, got -1"),  # failed at the end of epoch 1
    (["--start-context", ""], "start_context is empty"),  # failed at the end of epoch 1
])
def test_bad_settings_are_one_line_errors_before_any_work(tmp_path, capsys, argv, message):
    from gptfast import cli
    assert cli.main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptfast train: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing was started


@pytest.mark.parametrize("kw, message", [
    (dict(seed=1.7), "seed must be an integer, got 1.7"),  # was silently rounded
    (dict(epochs=True), "epochs must be a number, got True"),
    (dict(max_steps=2.5), "max_steps must be an integer, got 2.5"),
    (dict(grad_clip=float("nan")), "grad_clip must be a finite number, got nan"),
    (dict(optimizer="sgd"), "optimizer must be one of nanogpt, classic, got 'sgd'"),
])
def test_train_config_checks_types_and_ranges(kw, message):
    with pytest.raises(OptionError, match=re.escape(message)):
        TrainConfig(**kw)


def test_classic_optimizer_is_exactly_the_books_adamw():
    """--optimizer classic: torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1), as
    the book builds it: the same hyperparameters and, after two steps, the same weights bit for bit."""
    torch.manual_seed(0)
    ours = GPTModel(GPTConfig.from_preset("tiny", **SMALL), backend="torch")
    book = GPTModel(GPTConfig.from_preset("tiny", **SMALL), backend="torch")
    book.load_state_dict(ours.state_dict())
    opt = make_optimizer(ours, TrainConfig(optimizer="classic", lr=4e-4, weight_decay=0.1))
    ref = torch.optim.AdamW(book.parameters(), lr=4e-4, weight_decay=0.1)
    assert len(opt.param_groups) == 1 and opt.param_groups[0].keys() == ref.param_groups[0].keys()
    assert {k: v for k, v in opt.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in ref.param_groups[0].items() if k != "params"}
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 0.1
    x = torch.randint(0, 50257, (2, 32))
    for model, o in ((ours, opt), (book, ref)):
        for _ in range(2):
            torch.manual_seed(1)  # the same dropout masks
            model(x[:, :-1], targets=x[:, 1:]).backward()
            o.step()
            o.zero_grad()
    for (name, a), b in zip(ours.named_parameters(), book.parameters()):
        assert torch.equal(a, b), name


def _subcommands():
    from gptfast import cli
    return next(a for a in cli.build_parser()._actions if a.dest == "command").choices


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_every_flag_has_help_naming_its_default_at_most_once(command):
    sub = _subcommands()[command]
    formatter = sub._get_formatter()
    for action in sub._actions:
        if action.dest == "help":
            continue
        flag = "/".join(action.option_strings) or action.dest
        assert action.help, f"{command} {flag} has no help text"
        text = formatter._expand_help(action)  # as --help prints it (ArgumentDefaultsHelpFormatter adds one)
        assert text.lower().count("default") <= 1, f"{command} {flag}: {text!r}"
