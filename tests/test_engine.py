"""The continuous-batching engine: requests joining and leaving a running batch at different
lengths (and sliding windows) each give exactly what they give alone (the no-cache classic
`generate`); seeded draws independent of the batch; failures, cancellation and the queue
bound confined to their request; generate()'s cached engine; the fused decode step."""
import gc
import threading
import time

import pytest
import torch

from generation_checks import (first_diff, ids_of, reference_ids, reference_sampled_ids, reference_sampled_rows, tiny,
                               varied)
from gptfast import cpu_decode
from gptfast import generate as generate_mod
from gptfast.engine import Engine, QueueFull
from gptfast.textout import TextOutput
from gptfast.generate import Generator, generate
from gptfast.runner import batch_sizes
from gptfast.sampling import SamplingParams

# the chunked-prefill tests drive the fused CPU step's calls
needs_fused = pytest.mark.skipif(not cpu_decode.has_kernel(), reason="gptfast._C was not built with its CPU decode step")

GREEDY = SamplingParams()


class Steps:
    """An engine observer recording how many sequences each step advanced."""

    def __init__(self):
        self.sizes, self.reasons = [], []

    def step(self, n_tokens, seconds):
        self.sizes.append(n_tokens)

    def token(self, seconds, first):
        pass

    def finished(self, reason):
        self.reasons.append(reason)


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-step"])
@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_requests_join_a_running_batch(static):
    # a long request runs; others arrive while it decodes (short and long prompts, one longer
    # than the context, budgets that slide past it), join at step boundaries, leave when done
    model = tiny(ctx=32)
    steps = Steps()
    engine = Engine(model, max_batch=4, observer=steps)
    engine.runner.static = static
    if static:  # as a static runner is built: no fused CPU step
        engine.runner.fused = None
    jobs = [([7], 60), ([1, 2, 3, 4, 5], 9), (list(range(10, 50)), 12), ([3, 1, 4], 30), ([9, 9], 3), ([5], 25)]
    first = engine.submit([jobs[0][0]], jobs[0][1], GREEDY)
    updates = first.updates()
    head = next(updates)  # the first request is running now
    handles = [engine.submit([p], n, GREEDY) for p, n in jobs[1:]]
    got = [head[0].ids + [t for batch in updates for u in batch for t in u.ids]] + [ids_of(h)[0] for h in handles]
    for i, ((prompt, n), ids) in enumerate(zip(jobs, got)):
        ref = reference_ids(model, prompt, n)
        varied(ref, min(n, 10) // 2)
        assert ids == ref, f"request {i}: first mismatch at token {first_diff(ids, ref)}"
    assert max(steps.sizes) == 4, f"never a full batch of 4: {steps.sizes}"  # they did run together
    assert engine.running() == engine.waiting() == 0 and sorted(engine._free) == [0, 1, 2, 3]


def test_sampled_request_independent_of_its_batch():
    model = tiny()
    kw = dict(temperature=1.3, top_k=30, top_p=0.95)
    ref = reference_sampled_ids(model, [1, 2, 3], 40, 11, **kw)
    engine = Engine(model, max_batch=8)
    others = [engine.submit([[5, 6], [7]], 50, SamplingParams(**kw, seed=3)),
              engine.submit([[8] * 9], 20, GREEDY)]
    mine = engine.submit([[1, 2, 3]], 40, SamplingParams(**kw, seed=11))
    assert ids_of(mine)[0] == ref
    assert ids_of(others[0]) == reference_sampled_rows(model, [[5, 6], [7]], 50, 3, **kw)
    assert ids_of(others[1])[0] == reference_ids(model, [8] * 9, 20)
    # prompt i of a request draws on the op's row i: two equal prompts of one request differ
    a, b = ids_of(engine.submit([[4, 4], [4, 4]], 30, SamplingParams(**kw, seed=5)))
    assert a != b, "two prompts of one seeded request drew the same tokens"


def test_failure_stays_with_its_request(monkeypatch):
    model = tiny()
    engine = Engine(model, max_batch=8)
    push = TextOutput.push

    def fragile(self, token):  # a request whose stop-string handling raises on its 3rd token
        if self.stop == ["boom"] and len(self.ids) == 2:
            raise ValueError("stop-string handler exploded")
        push(self, token)
    monkeypatch.setattr(TextOutput, "push", fragile)
    good = [engine.submit([[1, 2, 3]], 20, GREEDY), engine.submit([[4, 5]], 25, GREEDY)]
    bad = engine.submit([[6, 7]], 20, GREEDY, stop=["boom"])
    errors = [u.error for batch in bad.updates() for u in batch if u.error]
    assert errors == ["ValueError: stop-string handler exploded"]
    assert ids_of(good[0])[0] == reference_ids(model, [1, 2, 3], 20)
    assert ids_of(good[1])[0] == reference_ids(model, [4, 5], 25)
    assert ids_of(engine.submit([[6, 7]], 5, GREEDY))[0] == reference_ids(model, [6, 7], 5)  # still serving


@pytest.mark.parametrize("fused", [True, False], ids=["fused-step", "model-forward"])
def test_a_failed_prefill_fails_its_request_alone(fused):
    # the call that prefills [13, 13, 13] raises (on CPU the fused step, which would also carry any
    # decoding rows of that step; else the model's forward): that request fails with the error,
    # and the requests before and after it are served as alone
    model = tiny()
    engine = Engine(model, max_batch=4, fused_cpu_step=fused)
    name = "fused_step" if fused else "prefill"
    real = getattr(engine.runner, name)

    def flaky(*args):
        if [13, 13, 13] in args[1 if fused else 2]:  # the windows
            raise RuntimeError("prefill exploded")
        return real(*args)
    setattr(engine.runner, name, flaky)
    assert ids_of(engine.submit([[1, 2, 3]], 6, GREEDY))[0] == reference_ids(model, [1, 2, 3], 6)
    bad = engine.submit([[13, 13, 13]], 6, GREEDY)
    assert [u.error for batch in bad.updates() for u in batch if u.error] == ["RuntimeError: prefill exploded"]
    assert ids_of(engine.submit([[4, 5]], 6, GREEDY))[0] == reference_ids(model, [4, 5], 6)  # still serving
    engine.close()


@needs_fused
def test_prompts_prefilled_in_chunks():
    # prefill_chunk=3 on the fused CPU step: no call takes more than 3 prompt tokens, so a long
    # prompt is prefilled over several steps while the running requests keep decoding in them,
    # and every request still gives exactly what it gives alone: greedy ones (a prompt longer
    # than the context, a window that slides and is recomputed in chunks) and sampled requests of
    # two prompts of different lengths, whose first draw waits for both (alone: the 9-token
    # prompt's logits are held for two steps, its last chunk using the step's whole budget)
    model = tiny(ctx=24)
    engine = Engine(model, max_batch=4, prefill_chunk=3)
    calls, real = [], engine.runner.fused_step

    def recorded(rows, windows, starts, outputs):
        calls.append([len(w) for w in windows])
        return real(rows, windows, starts, outputs)
    engine.runner.fused_step = recorded
    kw = dict(temperature=1.2, top_k=20)
    first = engine.submit([[7]], 40, GREEDY)
    greedy = [([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 9), (list(range(10, 40)), 5), ([3, 1, 4], 30)]
    handles = [engine.submit([p], n, GREEDY) for p, n in greedy]
    sampled = engine.submit([list(range(20, 29)), [6]], 12, SamplingParams(**kw, seed=5))
    assert ids_of(first)[0] == reference_ids(model, [7], 40)
    for (prompt, n), h in zip(greedy, handles):
        assert ids_of(h)[0] == reference_ids(model, prompt, n), f"prompt {prompt[:3]}..."
    want = reference_sampled_rows(model, [list(range(20, 29)), [6]], 12, 5, **kw)
    assert ids_of(sampled) == want
    assert ids_of(Engine(model, max_batch=4, prefill_chunk=3).submit(
        [list(range(20, 29)), [6]], 12, SamplingParams(**kw, seed=5))) == want
    assert calls and all(sum(n for n in call if n > 1) <= 3 for call in calls), f"a call took more: {calls}"
    assert any(1 in call and max(call) > 1 for call in calls), "no prompt chunk rode along a decoding row"
    with pytest.raises(ValueError, match="prefill_chunk must be an integer >= 1 or None, got 0"):
        Engine(model, prefill_chunk=0)
    # the default chunk (64) is cut to the step's max_rows (32 for fp32 weights, where torch's
    # GEMM wins beyond): a 45-token prompt in calls of at most max_rows tokens
    model = tiny(ctx=48)
    engine = Engine(model, max_batch=2)
    assert engine.runner.fused.max_rows < 45 < engine.prefill_chunk, "the setup no longer cuts a chunk to max_rows"
    calls.clear()
    real = engine.runner.fused_step
    engine.runner.fused_step = recorded
    assert ids_of(engine.submit([list(range(3, 48))], 4, GREEDY))[0] == reference_ids(model, list(range(3, 48)), 4)
    assert max(map(sum, calls)) <= engine.runner.fused.max_rows, f"a call over max_rows: {calls}"


@needs_fused
def test_chunked_prefill_edge_cases():
    # chunks of 3: (1) a sampled request of two prompts that both run past the context: a held
    # prompt must not slide again (it would recompute forever); (2) a sliding sequence's
    # recompute comes back at each of its tokens, after new prompts: a new 1-token prompt is
    # answered at once, not when the sliding request ends; (3) more decoding rows (max_rows + 2)
    # than the step's max_rows (32, fp32 weights) beside a prompt being prefilled in row 0: the
    # calls hold no padding rows, whose dummy keys would overwrite the prompt's first slot
    kw = dict(temperature=1.2, top_k=20)
    model = tiny(ctx=24)
    both = [list(range(30, 50)), list(range(60, 83))]
    handle, got = Engine(model, max_batch=4, prefill_chunk=3).submit(both, 8, SamplingParams(**kw, seed=3)), []
    reader = threading.Thread(target=lambda: got.append(ids_of(handle)), daemon=True)
    reader.start()
    reader.join(60)  # a request that never ends fails the test instead of hanging it
    assert got == [reference_sampled_rows(model, both, 8, 3, **kw)], "never finished" if not got else got

    engine = Engine(model, max_batch=4, prefill_chunk=3)
    calls, real = [0], engine.runner.fused_step

    def counted(*args):
        calls[0] += 1
        return real(*args)
    engine.runner.fused_step = counted
    seen, late = [], {}

    def sink(updates):  # at the long request's 5th token (it slides from its first) a short one comes
        seen.extend(u for u in updates)
        if sum(len(u.ids) for u in seen) == 5 and not late:
            late["at"] = calls[0]
            late["handle"] = engine.submit([[7]], 1, GREEDY, sink=lambda u: late.setdefault("done", calls[0]))
    engine.submit([list(range(1, 25))], 15, GREEDY, sink=sink)
    deadline = time.monotonic() + 60  # a request that never ends fails the test instead of hanging it
    while not any(u.finish for u in seen) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [t for u in seen for t in u.ids] == reference_ids(model, list(range(1, 25)), 15)
    assert late["done"] - late["at"] <= 2, f"the short prompt waited {late['done'] - late['at']} calls"

    model = tiny(ctx=48)
    rows = Engine(model).runner.fused.max_rows + 2  # decoding rows: more than one call takes
    engine = Engine(model, max_batch=rows + 1, prefill_chunk=3)
    first = engine.submit([[5]], 3, GREEDY)  # leaves row 0 to the prompt, below the decoding rows
    decoding = [engine.submit([[i + 10]], 40, GREEDY) for i in range(rows)]
    prompt = [100] + list(range(41, 60))
    assert ids_of(engine.submit([prompt], 15, GREEDY))[0] == reference_ids(model, prompt, 15)
    assert all(ids_of(h)[0] == reference_ids(model, [i + 10], 40) for i, h in enumerate(decoding))
    assert ids_of(first)[0] == reference_ids(model, [5], 3)


def test_cancel_frees_the_row_and_queue_bound():
    model = tiny(ctx=48)
    engine = Engine(model, max_batch=1, max_queue=2)
    gate = threading.Event()
    running = engine.submit([[1, 2]], 10_000, GREEDY, sink=lambda batch: gate.set())  # slides forever
    gate.wait(30)
    queued = [engine.submit([[3]], 5, GREEDY), engine.submit([[4]], 5, GREEDY)]  # wait: the one row is taken
    with pytest.raises(QueueFull, match="2 prompts are waiting"):
        engine.submit([[5]], 5, GREEDY)
    assert engine.waiting() == 2 and engine.running() == 1
    running.cancel()  # its row goes to the next request in line
    assert [ids_of(h)[0] for h in queued] == [reference_ids(model, [3], 5), reference_ids(model, [4], 5)]
    assert engine.running() == engine.waiting() == 0
    engine.close()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit([[1]], 1, GREEDY)


def test_batch_sizes():
    assert batch_sizes(1) == [1] and batch_sizes(32) == [1, 2, 4, 8, 16, 32] and batch_sizes(12) == [1, 2, 4, 8, 12]


def test_classic_generate_keeps_its_engine():
    model = tiny()
    idx = torch.tensor([[3, 1, 4]])
    out = generate(model, idx, 10, 48)
    engine = generate_mod._ENGINES[model][1]
    assert torch.equal(generate(model, idx, 10, 48), out) and generate_mod._ENGINES[model][1] is engine
    with torch.no_grad():  # an update in place (a training step) is seen by the same engine
        model.out_head.weight.mul_(-1)
    assert generate(model, idx, 10, 48)[0, 3:].tolist() == reference_ids(model, [3, 1, 4], 10)
    assert generate_mod._ENGINES[model][1] is engine
    model.double()  # parameters moved to new storage: a new engine
    assert generate(model, idx, 10, 48)[0, 3:].tolist() == reference_ids(model, [3, 1, 4], 10)
    assert generate_mod._ENGINES[model][1] is not engine
    n = len(generate_mod._ENGINES)
    del model, engine
    gc.collect()
    assert len(generate_mod._ENGINES) == n - 1, "generate() kept a dead model's engine alive"


@pytest.mark.filterwarnings("ignore:CUDA graphs need a model on CUDA")
def test_fused_step_draws_as_the_eager_path():
    # one sampled request alone: its draw runs inside the static decode step (the CUDA graph's
    # body) with a device seed; it must equal the per-request eager draw and the reference
    model = tiny()
    kw = dict(temperature=1.1, top_k=25)
    fused = Engine(model, max_batch=4)
    fused.runner.static = True
    ids = ids_of(fused.submit([[1, 2], [3, 4, 5]], 20, SamplingParams(**kw, seed=9)))
    assert any(key[1] is not None for key in fused.runner.graphs), "the fused step never ran"
    eager = Engine(model, max_batch=4)
    assert ids == ids_of(eager.submit([[1, 2], [3, 4, 5]], 20, SamplingParams(**kw, seed=9)))
    assert ids == reference_sampled_rows(model, [[1, 2], [3, 4, 5]], 20, 9, **kw)
    # alone again but in rows 1 and 2 (row 0 was taken when it came): never fused, same draws
    for engine in (fused, eager):
        first = engine.submit([[8] * 3], 2, GREEDY)
        assert ids_of(engine.submit([[1, 2], [3, 4, 5]], 20, SamplingParams(**kw, seed=9))) == ids
        ids_of(first)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_rows_at_different_lengths(backend):
    # decode rows at different lengths through the captured graphs; a sampled request alone
    # makes one host sync per token (the sampled ids inside the graph)
    model = tiny(ctx=64, emb=64, backend=backend, init="torch").cuda()
    engine = Engine(model, max_batch=8)
    jobs = [([7], 80), ([1, 2, 3, 4, 5], 30), (list(range(10, 40)), 50)]
    handles = [engine.submit([p], n, GREEDY) for p, n in jobs]
    for (p, n), h in zip(jobs, handles):
        assert ids_of(h)[0] == reference_ids(model, p, n), f"prompt {p[:3]}"
    assert any(g is not False for g in engine.runner.graphs.values()), "no CUDA graph captured"
    torch.cuda.synchronize()
    with pytest.warns(UserWarning) as syncs:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            ids_of(engine.submit([[1, 2]], 40, SamplingParams(temperature=1.0, top_k=20, seed=1)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    n_syncs = sum("synchroniz" in str(w.message) for w in syncs)
    assert n_syncs <= 40 + 3, f"{n_syncs} host syncs for 40 tokens"
