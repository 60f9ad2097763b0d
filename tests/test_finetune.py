"""Fine-tuning: data loading and its errors, the instruction collate, end-to-end runs on CPU."""
import argparse
import copy
import dataclasses
import json
import os
import random
import signal
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from gptfast import cli
from gptfast.checkpoint import load_checkpoint
from gptfast.config import GPTConfig, OptionError
from gptfast.finetune import RECIPE, classify, instruct
from gptfast.model import GPTModel
from gptfast.train import RunFiles, TrainConfig
from gptfast.tokenizer import EOT_ID, get_tokenizer


PAD = EOT_ID
# a model small enough to train in seconds on one core (GPT-2's vocabulary, tiny everything else)
TOY = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0)


def _run_cli(argv):
    """Parse with only the fine-tuning subcommands (as `gptfast` registers them) and run."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    classify.add_parser(sub)
    instruct.add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


# ---------------------------------------------------------------- instruction collate

def test_collate_pads_and_ignores_all_but_the_first_end_token():
    inputs, targets = instruct.collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, PAD, PAD, PAD], [7, 8, 9, PAD, PAD]]
    # the expected targets as published with the classic recipe
    assert targets.tolist() == [[1, 2, 3, 4, PAD], [6, PAD, -100, -100, -100], [8, 9, PAD, -100, -100]]


def test_collate_prompt_masking_and_allowed_max_length():
    batch = [([0, 1, 2, 3, 4], 3), ([5, 6], 1), ([7, 8, 9], 2)]
    _, plain = instruct.collate(batch)
    _, masked = instruct.collate(batch, mask_prompt=True)
    for row, (ids, prompt_len) in enumerate(batch):
        # target j predicts token j+1: the prompt's tokens 1..P-1 sit at targets 0..P-2
        assert masked[row, : prompt_len - 1].eq(-100).all()
        assert masked[row, prompt_len - 1:].tolist() == plain[row, prompt_len - 1:].tolist()
    assert masked[0].tolist() == [-100, -100, 3, 4, PAD]
    full_x, full_y = instruct.collate(batch, mask_prompt=True)
    x, y = instruct.collate(batch, mask_prompt=True, allowed_max_length=3)
    assert x.shape == y.shape == (3, 3)
    assert torch.equal(x, full_x[:, :3]) and torch.equal(y, full_y[:, :3])


# ---------------------------------------------------------------- data sets

def test_spam_collection_counts_balance_and_split():
    examples, labels = classify.read_labelled(classify.SPAM_DATA)
    assert labels == ["ham", "spam"]
    counts = Counter(labels[c] for _, c in examples)
    assert counts == {"ham": 4827, "spam": 747}  # the published counts of the UCI collection
    balanced = classify.balance(examples, seed=123)
    assert Counter(c for _, c in balanced) == {0: 747, 1: 747}
    spam = sorted(t for t, c in examples if c == 1)
    assert sorted(t for t, c in balanced if c == 1) == spam  # the small class is kept whole
    assert classify.balance(examples, seed=123) == balanced
    assert classify.balance(examples, seed=7) != balanced
    train, val, test = classify.split(balanced, seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert classify.split(balanced, seed=123) == (train, val, test)
    assert classify.split(balanced, seed=1)[0] != train
    assert sorted(train + val + test) == sorted(balanced)


def test_instruction_data_and_prompt_format():
    data = instruct.load_instruction_data(instruct.INSTRUCTION_DATA)
    assert len(data) == 1100
    train, val, test = instruct.split_data(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert train + test + val == data  # file order: 85% train, 10% test, 5% validation
    with_input = {"instruction": "Do X.", "input": "abc", "output": "ok"}
    assert instruct.format_input(with_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Input:\nabc")
    assert instruct.format_input({**with_input, "input": ""}).endswith("### Instruction:\nDo X.")
    (ids, prompt_len), = instruct.encode_records([with_input])
    tok = get_tokenizer()
    assert tok.decode(ids) == instruct.format_input(with_input) + "\n\n### Response:\nok"
    assert tok.decode(ids[:prompt_len]) == instruct.format_input(with_input)


@pytest.mark.parametrize("content, labels, message", [
    ("ham\thello\nspam\tbuy now\nno tab here\n", None, r"bad\.tsv:3: expected 'label<TAB>text'"),
    ("ham\thello\nspam\tbuy\nphish\tclick\n", ["ham", "spam"], r"bad\.tsv:3: unknown label 'phish'"),
    ("", None, r"bad\.tsv is empty"),
    ("ham\thello\n\xff\n", None, r"bad\.tsv is not UTF-8"),
    ("ham\tonly one class\n", None, "at least 2 classes"),
    ("ham\thello\nspam\tbuy\n", ["ham", "ham", "spam"], "name a class twice"),
])
def test_labelled_file_errors_name_the_line(tmp_path, content, labels, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content.encode("latin-1"))  # \xff: a byte that is not UTF-8
    with pytest.raises(ValueError, match=message):
        classify.read_labelled(path, labels)


def test_csv_with_quotes_header_and_three_classes(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('label,text\nb,"hello, world"\na,plain\nc,"say ""hi"""\n')
    assert classify.read_labelled(path) == ([("hello, world", 1), ("plain", 0), ('say "hi"', 2)], ["a", "b", "c"])
    path.write_text('a,x\n,no label\n')  # an empty label is an error, as in TSV
    with pytest.raises(ValueError, match=r"d\.csv:2: expected 'label,text'"):
        classify.read_labelled(path)


@pytest.mark.parametrize("content, message", [
    ('[{"instruction": "a", "output": "b"}, {"instruction": "c", "input": ""}]', r"record 1 has no string 'output'"),
    ("", r"bad\.json is empty"),
    ('[{"instruction": "\xff"}]', r"bad\.json is not UTF-8"),
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
])
def test_instruction_file_errors_name_the_record(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content.encode("latin-1"))  # \xff: a byte that is not UTF-8
    with pytest.raises(ValueError, match=message):
        instruct.load_instruction_data(path)


def test_encode_truncates_and_pads():
    ids = classify.encode(["a b c d e f", "a"], max_length=3)
    tok = get_tokenizer()
    assert ids.tolist() == [tok.encode("a b c d e f")[:3], tok.encode("a") + [PAD, PAD]]


# ---------------------------------------------------------------- end to end on CPU

def _toy_classes(n, seed=0):
    """Separable toy set: messages from two disjoint word pools."""
    pools = {"animal": "cat dog horse cow sheep goat duck".split(), "color": "red blue green yellow pink".split()}
    rng = random.Random(seed)
    return [(label, " ".join(rng.choice(pools[label]) for _ in range(rng.randint(2, 5))))
            for label in rng.choices(sorted(pools), k=n)]


def test_classifier_learns_a_separable_toy_set_through_the_cli(tmp_path, monkeypatch):
    data = tmp_path / "toy.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in _toy_classes(200)))
    # the cli's "tiny" preset, shrunk to TOY so that this runs in seconds
    monkeypatch.setattr(GPTConfig, "from_preset", classmethod(lambda cls, name, **kw: TOY))
    out = tmp_path / "clf.pt"
    assert _run_cli(["finetune-classifier", "--preset", "tiny", "--data", str(data), "--train-all", "--lr", "3e-3",
                     "--epochs", "4", "--quiet", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file() and (tmp_path / "clf-loss.png").is_file() and (tmp_path / "clf-acc.png").is_file()
    history = json.loads((tmp_path / "clf-history.json").read_text())
    assert len(history["test_acc"]) == len(history["val_loss"]) == 4  # every split, every epoch
    clf = classify.Classifier.load(out, backend="torch", device="cpu")
    assert clf.labels == ["animal", "color"]
    held_out = _toy_classes(60, seed=99)
    correct = sum(clf.classify(text)[0] == label for label, text in held_out)
    assert correct / len(held_out) >= 0.8, f"accuracy {correct / len(held_out):.2f} (chance 0.5)"
    label, prob = clf.classify("red blue green")
    assert label == "color" and 0.5 < prob <= 1.0


def test_lora_classifier_trains_only_adapters_and_head_stays_loadable(tmp_path):
    torch.manual_seed(0)
    model = classify.make_classifier(GPTModel(TOY, backend="torch"), 2)
    from gptfast.lora import apply_lora, count_trainable
    apply_lora(model, rank=4, alpha=8)
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    examples = [(text, int(label == "color")) for label, text in _toy_classes(48)]
    loader = classify.make_loader(examples, 8, batch_size=8, shuffle=True)
    classify.train_classifier(model, {"train": loader}, epochs=1, lr=1e-2, progress=False)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # base and head frozen
    assert count_trainable(model) > 0
    clf = classify.Classifier(model, ["animal", "color"], 8)
    probs = clf.probabilities(["cat dog", "red"])
    clf.save(tmp_path / "c.pt")
    torch.testing.assert_close(classify.Classifier.load(tmp_path / "c.pt", "torch").probabilities(["cat dog", "red"]),
                               probs, atol=1e-5, rtol=1e-5)


def test_instruction_loss_falls():
    torch.manual_seed(0)
    model = GPTModel(TOY, backend="torch")
    data = instruct.load_instruction_data(instruct.INSTRUCTION_DATA)[:16]
    encoded = [(ids[:32], p) for ids, p in instruct.encode_records(data)]
    loader = instruct.make_loader(encoded, batch_size=8, shuffle=True, allowed_max_length=TOY.context_length)
    start = instruct.evaluate_loss(model, loader)  # about ln(50257) = 10.8 at random init
    history = instruct.train_instruct(model, loader, loader, epochs=5, lr=1e-2, eval_freq=100, progress=False)
    assert history["train_loss"][-1] < start - 2.0, (start, history["train_loss"])


def test_instruct_cli_writes_responses_and_a_loadable_model(tmp_path, monkeypatch):
    records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in "one two three four five".split() * 4]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(records))
    monkeypatch.setattr(GPTConfig, "from_preset", classmethod(lambda cls, name, **kw: TOY))
    out = tmp_path / "out"
    assert _run_cli(["finetune-instruct", "--preset", "tiny", "--data", str(data), "--epochs", "1", "--quiet",
                     "--max-new-tokens", "3", "--out-dir", str(out), "--device", "cpu", "--lora-rank", "2"]) == 0
    answers = json.loads((out / "responses.json").read_text())
    assert [a["output"] for a in answers] == [r["output"] for r in instruct.split_data(records)[2]]
    assert (out / "loss.png").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "lora.safetensors"), framework="pt") as f:  # the vocabulary head stays frozen
        assert f.keys() and not any(k.startswith("out_head") for k in f.keys())
    from gptfast.checkpoint import load_model
    from gptfast.generate import generate
    model = load_model(out / "model.pt", backend="torch", device="cpu").eval()  # the adapters merged in
    assert model.cfg.emb_dim == TOY.emb_dim
    tok = get_tokenizer()
    for a in answers:  # each answer is the greedy continuation of its prompt, decoded without the header
        prompt = tok.encode(instruct.format_input(a))
        ids = generate(model, torch.tensor([prompt]), 3, TOY.context_length, eos_id=EOT_ID)[0, len(prompt):]
        want = tok.decode([t for t in ids.tolist() if t != EOT_ID]).replace("### Response:", "").strip()
        assert a["model_response"] == want, (a, ids.tolist())


@pytest.mark.parametrize("argv, message", [
    (["finetune-instruct", "--eval-freq", "0"], "--eval-freq must be >= 1, got 0"),
    (["finetune-classifier", "--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["finetune-instruct", "--lr=-0.5"], "--lr must be > 0, got -0.5"),
    (["finetune-classifier", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_out_of_range_options_are_one_line_errors_before_any_work(tmp_path, argv, message):
    # a data file that does not exist: the option check must come first
    with pytest.raises(OptionError) as e:
        _run_cli(argv + ["--preset", "tiny", "--data", str(tmp_path / "missing"), "--device", "cpu"])
    assert str(e.value) == message


@pytest.mark.parametrize("argv, message", [
    (["finetune-classifier", "--lora-alpha", "inf"], "--lora-alpha must be a finite number, got inf"),
    (["finetune-classifier", "--weight-decay", "inf"], "--weight-decay must be a finite number, got inf"),
    (["finetune-classifier", "--lora-rank", "-1"], "--lora-rank must be >= 0, got -1"),
    (["finetune-instruct", "--lr", "inf"], "--lr must be a finite number, got inf"),
    (["finetune-instruct", "--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    (["finetune-instruct", "--seed", "-5"], "--seed must be >= 0, got -5"),
])
def test_non_finite_and_negative_options_are_refused(tmp_path, argv, message):
    with pytest.raises(OptionError) as e:
        _run_cli(argv + ["--preset", "tiny", "--data", str(tmp_path / "missing"), "--device", "cpu"])
    assert str(e.value) == message


def test_unwritable_output_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "file").write_text("a file, not a folder")
    code = cli.main(["finetune-classifier", "--preset", "tiny", "--data", str(tmp_path / "missing.tsv"),
                     "--out", str(tmp_path / "file" / "clf.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.tsv" not in err and str(tmp_path / "file") in err, err  # the output first


def _toy_tsv(tmp_path, n=64):
    data = tmp_path / "toy.tsv"
    data.write_text("".join(f"{label}\t{text}\n" for label, text in _toy_classes(n)))
    return data


@pytest.mark.parametrize("command", ["finetune-classifier", "finetune-instruct"])
def test_fine_tuning_stops_on_nan_and_saves_nothing(tmp_path, monkeypatch, capsys, command):
    """--lr 1e37 is a valid number whose first update overflows the forward: exit 3, no NaN model written
    (the classifier used to report 62.5% accuracy and save NaN weights)."""
    monkeypatch.setattr(GPTConfig, "from_preset", classmethod(lambda cls, name, **kw: TOY))
    if command == "finetune-classifier":
        out, data = ["--out", str(tmp_path / "clf.pt")], _toy_tsv(tmp_path)
    else:
        records = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in "one two three four".split() * 5]
        data = tmp_path / "d.json"
        data.write_text(json.dumps(records))
        out = ["--out-dir", str(tmp_path / "out"), "--batch-size", "2"]
    code = cli.main([command, "--preset", "tiny", "--data", str(data), "--lr", "1e37", "--train-all"
                     if command == "finetune-classifier" else "--mask-prompt", "--quiet", "--device", "cpu", *out])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "stopped: no checkpoint of this run was written" in err
    assert not (tmp_path / "clf.pt").exists() and not (tmp_path / "out" / "model.pt").exists()


def test_fine_tuning_resumes_exactly_after_ctrl_c(tmp_path):
    torch.manual_seed(0)
    base = classify.make_classifier(GPTModel(dataclasses.replace(TOY, drop_rate=0.1), backend="torch"), 2)
    examples = [(text, int(label == "color")) for label, text in _toy_classes(48)]
    loaders = {"train": classify.make_loader(examples, 8, batch_size=4, shuffle=True),
               "val": classify.make_loader(examples[:8], 8, batch_size=4)}
    cfg = TrainConfig(**{**RECIPE, "batch_size": 4, "epochs": 2, "lr": 1e-3, "sample_tokens": 0})
    torch.manual_seed(1)
    full = classify.train_classifier(copy.deepcopy(base), loaders, cfg=cfg, progress=False)

    model, calls = copy.deepcopy(base), []
    forward = model.forward

    def interrupting_forward(*args, **kwargs):
        calls.append(model.training)
        if sum(calls) == 15:  # the 15th training micro-batch: inside epoch 2
            os.kill(os.getpid(), signal.SIGINT)
        return forward(*args, **kwargs)
    model.forward = interrupting_forward
    files = RunFiles(tmp_path, "clf-", final=False, best=False, plot=False)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        classify.train_classifier(model, loaders, cfg=cfg, files=files, progress=False)
    assert load_checkpoint(tmp_path / "clf-checkpoint.pt")["step"] == 15
    resumed = classify.train_classifier(copy.deepcopy(base), loaders, cfg=cfg, files=files, progress=False,
                                        resume=tmp_path / "clf-checkpoint.pt")
    assert resumed == full
    assert [json.loads(line)["step"] for line in (tmp_path / "clf-metrics.jsonl").read_text().splitlines()] == \
        full["step"]


# ---------------------------------------------------------------- judge

class _Judge(BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/api/chat" and body["messages"][0]["role"] == "user"
        reply = json.dumps({"message": {"role": "assistant", "content": "Score: 85"}, "done": True})
        self.send_response(200)
        self.end_headers()
        self.wfile.write(reply.encode())

    def log_message(self, *args):
        pass


def test_judge_scores_through_an_ollama_style_endpoint():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        instruct.check_judge(f"http://127.0.0.1:{server.server_port}")  # answers (501 to GET): reachable
        entries = [{"instruction": "Say hi.", "input": "", "output": "hi", "model_response": "hello"}]
        assert instruct.judge_scores(entries, f"http://127.0.0.1:{server.server_port}", progress=False) == [85]
    finally:
        server.shutdown()


def test_unreachable_judge_is_one_clear_error():
    server = HTTPServer(("127.0.0.1", 0), _Judge)
    port = server.server_port
    server.server_close()  # nothing listens there now
    with pytest.raises(RuntimeError, match=r"judge at http://127.0.0.1:\d+/api/chat is unreachable"):
        instruct.query_judge("hi", f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(RuntimeError, match=r"judge at http://127.0.0.1:\d+/ is unreachable"):
        instruct.check_judge(f"http://127.0.0.1:{port}/api/chat")


def test_commands_are_registered():
    assert {"gptfast.finetune.classify", "gptfast.finetune.instruct"} <= set(cli.COMMANDS)


def test_output_path_that_is_a_directory_is_one_line(tmp_path, capsys):
    data = tmp_path / "d.tsv"
    data.write_text("".join(f"{'ham' if i % 2 else 'spam'}\tmessage {i}\n" for i in range(40)))
    (tmp_path / "out.pt").mkdir()
    code = cli.main(["finetune-classifier", "--preset", "tiny", "--data", str(data), "--epochs", "1",
                     "--out", str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("gptfast finetune-classifier: error:") and "out.pt" in err
