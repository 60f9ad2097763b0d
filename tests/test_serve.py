"""`gptfast serve`: a live server on a free localhost port serving a tiny model made here,
driven by the official `openai` client and raw HTTP (httpx). Every answer is checked against
the no-cache classic `generate` (greedy) or the reference sampler (seeded)."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

httpx = pytest.importorskip("httpx", reason="httpx is a test dependency: pip install 'gptfast[test]'")
openai = pytest.importorskip("openai", reason="the openai client is a test dependency: pip install 'gptfast[test]'")
uvicorn = pytest.importorskip("uvicorn", reason="gptfast serve needs the extra: pip install 'gptfast[serve]'")

from generation_checks import reference_ids, reference_sampled_ids, tiny, varied  # noqa: E402
from gptfast import get_tokenizer  # noqa: E402
from gptfast.api_server import create_app  # noqa: E402
from gptfast.finetune.instruct import RESPONSE_HEADER, format_input  # noqa: E402
from gptfast.generate import Generator  # noqa: E402
from gptfast.tokenizer import EOT_ID  # noqa: E402

TOK = get_tokenizer()
PROMPT = "Every effort moves you"


class Server:
    """A uvicorn server in a thread on a free port of 127.0.0.1."""

    def __init__(self, model, **kw):
        api_key = kw.pop("api_key", None)
        self.gen = Generator(model, dtype="float32", **kw)
        self.model = model
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.gen, "tiny", api_key), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "the test server did not start"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)

    def metric(self, name):
        text = httpx.get(self.url + "/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith(name)}


def text_model(ctx=128):
    return tiny(vocab=50257, ctx=ctx, emb=32, layers=1, init="torch")


@pytest.fixture(scope="module")
def server():
    s = Server(text_model(), max_batch=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http():
    with httpx.Client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def greedy(model, prompt_ids, n):
    """The no-cache reference: ids up to and including eos, and the text before it."""
    ids = reference_ids(model, prompt_ids, n, eos_id=EOT_ID)
    return ids, TOK.decode(ids)


def test_completion(server, client):
    ids = TOK.encode(PROMPT)
    ref_ids, ref_text = greedy(server.model, ids, 20)
    varied(ref_ids, 8)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0)
    assert out.choices[0].text == ref_text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (len(ids), 20, len(ids) + 20)
    assert out.object == "text_completion" and out.model == "tiny"
    # several prompts (text and token ids) in one request: one choice each
    many = client.completions.create(model="tiny", prompt=[ids, TOK.encode("Hello")], max_tokens=7, temperature=0)
    assert [c.text for c in many.choices] == [greedy(server.model, ids, 7)[1], greedy(server.model, TOK.encode("Hello"), 7)[1]]
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_streaming(server, client):
    ref = greedy(server.model, TOK.encode(PROMPT), 25)[1]
    pieces = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=25, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == ref
    assert pieces[-1].choices[0].finish_reason == "length" and len(pieces) > 3
    # raw SSE: OpenAI's chunk objects, the usage chunk asked for, then data: [DONE]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 25, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == ref
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 25
    # chat streams: a role delta first, content deltas, a finish chunk
    chat = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant" and chat[-1].choices[0].finish_reason == "length"


def test_stop_strings(server, client):
    full = greedy(server.model, TOK.encode(PROMPT), 30)[1]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    for stream in (False, True):
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "zzzz"],
                                        stream=stream)
        pieces = list(out) if stream else [out]
        assert "".join(p.choices[0].text for p in pieces) == full[: full.find(stop)]
        assert pieces[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_reproducible(server, client):
    ids = TOK.encode(PROMPT)
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=30, temperature=1.2, top_p=0.9, extra_body={"top_k": 50})
    a, b, c = (client.completions.create(seed=s, **kw).choices[0].text for s in (7, 7, 8))
    ref = reference_sampled_ids(server.model, ids, 30, 7, 1.2, 50, 0.9)
    ref = ref[: ref.index(EOT_ID)] if EOT_ID in ref else ref
    assert a == b == TOK.decode(ref)
    assert a != c, "another seed gave the same sample"


def test_chat_uses_the_instruction_format(server, client):
    instruction = "Name a colour."
    ids = TOK.encode(format_input({"instruction": instruction}) + RESPONSE_HEADER)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": instruction}],
                                         max_tokens=12, temperature=0)
    assert out.choices[0].message.content == greedy(server.model, ids, 12)[1]
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens == len(ids)
    system = "You answer in one word."
    sys_ids = TOK.encode(format_input({"instruction": instruction}).replace(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        system) + RESPONSE_HEADER)
    out = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": instruction}])
    assert out.choices[0].message.content == greedy(server.model, sys_ids, 12)[1]


def test_16_concurrent_clients_each_get_their_own_answer(server, http):
    prompts = [TOK.encode(t) for t in ("Every effort", "Hello there", "I HAD always thought Jack Gisburn", "The",
                                       "rather a cheap genius", "though a good fellow enough", "so it was",
                                       "Gisburn")]
    jobs = [(prompts[i % 8], 4 + 2 * i, i % 2 == 0) for i in range(16)]  # budgets 4..34, half streamed

    def run(job):
        prompt, n, stream = job
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream}
        if not stream:
            return http.post(server.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            return "".join(json.loads(line[6:])["choices"][0]["text"] for line in r.iter_lines()
                           if line.startswith("data: {"))
    alone = [run(job) for job in jobs]
    for (p, n, _), text in list(zip(jobs, alone))[:3]:  # and against the no-cache reference
        assert text == greedy(server.model, p, n)[1]
    before = server.metric("gptfast_batch_occupancy_bucket")
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    wrong = [i for i, (a, b) in enumerate(zip(together, alone)) if a != b]
    assert not wrong, f"clients {wrong} got another answer than alone"
    after = server.metric("gptfast_batch_occupancy_bucket")
    single = after['gptfast_batch_occupancy_bucket{le="1"}'] - before['gptfast_batch_occupancy_bucket{le="1"}']
    total = after['gptfast_batch_occupancy_bucket{le="+Inf"}'] - before['gptfast_batch_occupancy_bucket{le="+Inf"}']
    assert total > single, "no step ever advanced two requests together"


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "mystery": 1}, 400, "mystery"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 500}, 400, "max_tokens"),  # beyond the 128-token context
    ({"model": "tiny", "prompt": "x " * 200}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x " * 200}]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ('{"model": "tiny", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "top_k": -3}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": [99999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     400, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "a"}]}, 400, "messages"),
])
def test_bad_requests_are_openai_errors(server, http, body, status, param):
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    assert error["param"] == param, error
    ok = http.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200, "the server did not stay up"


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000)


def slowed(server, monkeypatch, seconds=0.01):
    """Every decode step takes at least `seconds`: a request is still running when the test acts."""
    runner = server.gen.engine.runner
    decode = runner.decode

    def slow(*args, **kw):
        time.sleep(seconds)
        return decode(*args, **kw)
    monkeypatch.setattr(runner, "decode", slow)


def wait_for(check, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_queue_full_auth_and_disconnect(monkeypatch):
    s = Server(text_model(), max_batch=1, max_queue=1, api_key="sekret")
    try:
        slowed(s, monkeypatch)
        auth = {"Authorization": "Bearer sekret"}
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(s.url + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with httpx.stream("POST", s.url + "/v1/completions", json=body, headers=auth) as first:
            lines = first.iter_lines()
            next(line for line in lines if line.startswith("data: {"))  # running: the one row is taken
            queued = threading.Thread(target=httpx.post, args=(s.url + "/v1/completions",),
                                      kwargs=dict(json={**body, "stream": False, "max_tokens": 3}, headers=auth,
                                                  timeout=60))
            queued.start()
            wait_for(lambda: s.gen.engine.waiting() == 1, "the second request to queue")
            full = httpx.post(s.url + "/v1/completions", json=body, headers=auth)
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert full.json()["error"]["type"] == "rate_limit_error"
        # the first client left mid-stream: its row goes at once to the queued request
        wait_for(lambda: s.metric('gptfast_sequences_finished_total{reason="cancelled"}'), "the cancellation")
        queued.join(30)
        assert s.gen.engine.running() == s.gen.engine.waiting() == 0
        tokens = s.metric("gptfast_generated_tokens_total")["gptfast_generated_tokens_total"]
        assert tokens < 100 + 3, f"the cancelled request ran on: {tokens} tokens generated"
        assert httpx.get(s.url + "/metrics").status_code == 200  # /health and /metrics need no key
    finally:
        s.stop()


def test_one_failing_request_spares_the_others(server, http, monkeypatch):
    from gptfast.textout import TextOutput
    push = TextOutput.push

    def fragile(self, token):  # the stop-string handling of one request raises on its 3rd token
        if "BOOM" in self.stop and len(self.ids) == 2:
            raise RuntimeError("stop-string handler exploded")
        push(self, token)
    monkeypatch.setattr(TextOutput, "push", fragile)
    slowed(server, monkeypatch, 0.002)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 30, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        good = [pool.submit(http.post, server.url + "/v1/completions", json=body) for _ in range(2)]
        bad = pool.submit(http.post, server.url + "/v1/completions", json={**body, "stop": ["BOOM"]})
        streamed = http.post(server.url + "/v1/completions", json={**body, "stop": ["BOOM"], "stream": True}).text
    assert bad.result().status_code == 500 and "stop-string handler exploded" in bad.result().json()["error"]["message"]
    assert '"error"' in streamed and streamed.endswith("data: [DONE]\n\n")
    ref = greedy(server.model, TOK.encode(PROMPT), 30)[1]
    assert [g.result().json()["choices"][0]["text"] for g in good] == [ref, ref]


@pytest.fixture(scope="module", autouse=True)
def server_process(tmp_path_factory):
    """`gptfast serve` in a subprocess (for SIGTERM), started with the module's first test so its
    start-up (importing torch, loading the checkpoint) overlaps the other tests."""
    from gptfast.checkpoint import save_checkpoint
    model = tiny(vocab=50257, ctx=256, emb=128, heads=4, layers=4, init="torch")
    path = save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny.pt", model)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "gptfast.cli", "serve", "--checkpoint", str(path), "--port",
                             str(port), "--dtype", "float32", "--shutdown-timeout", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.url = f"http://127.0.0.1:{port}"
    yield proc
    proc.kill()


def test_mailbox_tells_the_engine_its_loop_closed():
    # the engine cancels a request whose updates cannot be posted (its sink raises): a post taken
    # just before the loop closed (its wake-up never runs) must not hide the closed loop from the
    # posts after it
    import asyncio

    from gptfast.api_server import _Mailbox
    loop = asyncio.new_event_loop()
    mailbox, queue = _Mailbox(loop), asyncio.Queue()
    mailbox.post(queue, ["a"])  # the loop is not running: the wake-up waits
    loop.close()
    for _ in range(2):
        with pytest.raises(RuntimeError):
            mailbox.post(queue, ["b"])
    loop = asyncio.new_event_loop()  # and on a live loop every post arrives, in order
    mailbox, queue = _Mailbox(loop), asyncio.Queue()
    for b in range(3):
        mailbox.post(queue, [b])
    loop.run_until_complete(asyncio.sleep(0))
    assert [queue.get_nowait() for _ in range(queue.qsize())] == [[0], [1], [2]]
    loop.close()


def test_sigterm_with_requests_in_flight(server_process):
    proc, url = server_process, server_process.url
    wait_for(lambda: _up(url) or proc.poll() is not None, "the server process to start", timeout=90)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "stream": True}
    ends = []

    def client():
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            ends.append([line for line in r.iter_lines() if line][-1])
    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: _running(url) == 3, "three requests in flight")
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(120)  # --shutdown-timeout 1: a hang, not slowness, would reach this bound
    for t in threads:
        t.join(30)
    assert rc == 0, proc.stdout.read().decode()[-2000:]
    assert len(ends) == 3 and all(e == "data: [DONE]" for e in ends), ends  # each stream closed properly
    assert not _up(url), "still accepting connections"


def _up(url):
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _running(url):
    text = httpx.get(url + "/metrics", timeout=5).text
    return int(float(next(line.split()[1] for line in text.splitlines() if line.startswith("gptfast_running_sequences "))))


def test_without_fastapi_one_line(monkeypatch, capsys):
    from gptfast.cli import main
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi -> ImportError
    assert main(["serve", "--gpt2", "124M"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "gptfast serve: error: gptfast serve needs FastAPI and uvicorn (fastapi is missing): pip install 'gptfast[serve]'"]


def test_serve_names_what_it_lacks_of_the_fast_http_stack(monkeypatch):
    import types

    from gptfast.serve import missing_fast_http
    monkeypatch.setitem(sys.modules, "uvloop", types.ModuleType("uvloop"))  # importable
    monkeypatch.setitem(sys.modules, "httptools", None)  # import httptools -> ImportError
    assert missing_fast_http() == ["httptools"]
    monkeypatch.setitem(sys.modules, "httptools", types.ModuleType("httptools"))
    assert missing_fast_http() == []


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1, got 0"),
    (["--max-queue", "0"], "--max-queue must be >= 1, got 0"),
    (["--prefill-chunk", "-1"], "--prefill-chunk must be >= 0, got -1"),
])
def test_bad_serve_settings_are_one_line_errors(tmp_path, capsys, argv, message):
    # argparse's usage, then one line naming the flag and the rule, before any model is loaded
    from gptfast import cli
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--checkpoint", str(tmp_path / "none.pt"), *argv])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2 and last == f"gptfast serve: error: argument {argv[0]}: {message}", last
