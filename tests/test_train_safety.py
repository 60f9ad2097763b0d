"""Nothing lost, nothing silent: no save writes non-finite weights, Ctrl-C stops at a step
boundary (exact resume, tokens seen, the evaluation's metrics line), a resumed or fresh
run never duplicates or mixes metrics lines, and checkpoints are saved at the end, on
Ctrl-C, every --save-every steps and as best.pt, each save timed."""
import json
import os
import signal

import pytest
import torch

from gptfast import cli, train
from gptfast.checkpoint import load_checkpoint, load_model
from gptfast.train import TrainingDiverged
from test_train import make_trainer


def _metric_steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _finite(path):
    return all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values())


def _ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)


def test_an_update_that_makes_the_weights_nan_is_never_saved(tmp_path):
    """The loss of step 3 is finite, its update is not: the save after step 3 must refuse."""
    trainer = make_trainer(tmp_path, max_steps=6, save_every=1)
    real_update = trainer.optimizer.step

    def poisoned_update(*args, **kwargs):
        real_update(*args, **kwargs)
        if trainer.step == 2:  # the update of step 3
            with torch.no_grad():
                trainer.model.tok_emb.weight[0, 0] = float("nan")
    trainer.optimizer.step = poisoned_update
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    assert "non-finite by step 3" in str(e.value)
    assert f"the last good checkpoint {trainer.checkpoint_path} (step 2) is kept" in str(e.value)
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 2 and _finite(trainer.checkpoint_path)


def test_diverging_resume_keeps_the_good_checkpoint_and_says_so(tmp_path, capsys):
    """The issue's reproduction: a resumed run whose update overflows (--lr 1e39 is a finite,
    valid number) exits 3, the message names the checkpoint kept, and it is intact."""
    run = ["train", "--preset", "tiny", "--context-length", "32", "--eval-freq", "2", "--eval-iter", "1",
           "--sample-tokens", "0", "--out", str(tmp_path)]
    assert cli.main(run + ["--max-steps", "4"]) == 0
    before = load_checkpoint(tmp_path / "checkpoint.pt")["model"]
    code = cli.main(run + ["--max-steps", "8", "--save-every", "1", "--lr", "1e39",
                           "--resume", str(tmp_path / "checkpoint.pt")])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"the last good checkpoint {tmp_path / 'checkpoint.pt'} (step 4) is kept" in err
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["step"] == 4 and all(torch.equal(before[k], v) for k, v in after["model"].items())
    assert all(torch.isfinite(p).all() for p in load_model(tmp_path / "best.pt").parameters())


def _interrupt_at_call(trainer, n):
    """Send Ctrl-C from inside the n-th training forward (mid-step: dropout has drawn)."""
    real, calls = trainer.runner, []

    def runner(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            _ctrl_c()
        return out
    trainer.runner = runner


def test_ctrl_c_mid_step_saves_at_the_step_boundary_and_resumes_exactly(tmp_path):
    kw = dict(max_steps=6, grad_accum=2, epochs=3)
    full = make_trainer(tmp_path / "full", **kw).fit()["step_loss"]
    first = make_trainer(tmp_path / "run", **kw)
    _interrupt_at_call(first, 5)  # the first micro-batch of step 3
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state = load_checkpoint(first.checkpoint_path)
    assert state["step"] == 3  # the step in flight finished first
    assert state["tokens_seen"] == 3 * 2 * 2 * 32  # 3 steps of 2 micro-batches of 2 x 32 tokens
    second = make_trainer(tmp_path / "run", **kw)
    second.resume(first.checkpoint_path)
    assert second.fit()["step_loss"] == full


def test_ctrl_c_during_evaluation_keeps_its_metrics_line(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6)  # evaluations after steps 1, 3, 6
    real = trainer.evaluate

    def evaluate():
        if trainer.step == 3:
            _ctrl_c()
        return real()
    trainer.evaluate = evaluate
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(trainer.checkpoint_path)["step"] == 3
    assert _metric_steps(tmp_path) == [1, 3]


def test_resume_after_a_kill_cuts_the_metrics_back_to_the_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=6, eval_freq=1, save_every=3)
    real = trainer.train_step

    def killed_at_step_5():
        if trainer.step == 4:
            raise SystemExit("killed")  # no handler saves: as after SIGKILL, checkpoint.pt is step 3's
        return real()
    trainer.train_step = killed_at_step_5
    with pytest.raises(SystemExit):
        trainer.fit()
    assert _metric_steps(tmp_path) == [1, 2, 3, 4]
    resumed = make_trainer(tmp_path, max_steps=6, eval_freq=1, save_every=3)
    resumed.resume(tmp_path / "checkpoint.pt")
    resumed.fit()
    assert _metric_steps(tmp_path) == [1, 2, 3, 4, 5, 6]


def test_a_fresh_run_into_a_used_folder_starts_a_new_log_and_says_so(tmp_path):
    make_trainer(tmp_path, max_steps=3).fit()
    said = []
    second = make_trainer(tmp_path, max_steps=3)
    second.log = said.append
    second.fit()
    assert _metric_steps(tmp_path) == [1, 3]
    assert len([s for s in said if "holds an earlier run" in s]) == 1
    assert f"--resume {tmp_path / 'checkpoint.pt'}" in said[0]


def test_saves_at_the_end_every_save_every_and_best_on_improvement(tmp_path, monkeypatch):
    saved = []
    real = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda path, *a, **kw: (saved.append((path.name, kw["step"])),
                                                                          real(path, *a, **kw)))
    said = []
    trainer = make_trainer(tmp_path, max_steps=8, eval_freq=2, save_every=5)
    trainer.log = said.append
    trainer.progress = False
    history = trainer.fit()
    best, improved = float("inf"), []
    for step, val in zip(history["steps"], history["val_loss"]):
        if val < best:
            best, improved = val, improved + [step]
    assert [s for name, s in saved if name == "checkpoint.pt"] == [5, 8]
    assert [s for name, s in saved if name == "best.pt"] == improved
    assert load_checkpoint(tmp_path / "best.pt")["val_loss"] == pytest.approx(best)
    assert len([s for s in said if s.startswith("saved ") and " s" in s]) == len(saved)  # each timed


def test_training_throughput_excludes_evaluation_time(tmp_path, monkeypatch):
    """A fake clock: each step takes 1 s, each evaluation 10 s; tokens/s counts the steps only."""
    clock = [0.0]
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock[0])
    trainer = make_trainer(tmp_path, max_steps=6)
    real_step, real_eval = trainer.train_step, trainer.evaluate

    def step():
        clock[0] += 1.0
        return real_step()

    def evaluate():
        clock[0] += 10.0
        return real_eval()
    trainer.train_step, trainer.evaluate = step, evaluate
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = 2 * 32
    assert [r["step"] for r in records] == [1, 3, 6]
    assert all(r["tokens_per_s"] == pytest.approx(tokens_per_step) for r in records)
    # wall: since the previous line, the steps and this evaluation (the first: 1 step + 10 s)
    assert [r["wall_tokens_per_s"] for r in records] == pytest.approx(
        [tokens_per_step / 11, 2 * tokens_per_step / 12, 3 * tokens_per_step / 13])
