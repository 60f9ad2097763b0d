"""Shared by the generation tests (test_generate, test_engine, test_serve): tiny random models
and the no-cache references that every generation path is compared with."""
import torch

from gptfast import GPTConfig, GPTModel
from gptfast.generate import generate
from gptfast.sampling import sample_top_k


def tiny(vocab=211, ctx=48, emb=32, heads=4, layers=2, backend="torch", seed=0, tie_weights=False, **kw):
    """A small random model. Untied: a tiny random model with a tied head greedily repeats its
    last token forever, which would make every greedy comparison vacuous (see `varied`)."""
    torch.manual_seed(seed)
    return GPTModel(GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=emb, n_heads=heads, n_layers=layers,
                              tie_weights=tie_weights, **kw), backend=backend).eval()


def varied(ids, at_least=8):
    """Guard: a greedy comparison only tests something when the output depends on the context."""
    assert len(set(ids)) >= at_least, f"degenerate model output {ids[:20]}...: the comparison would test nothing"


def ids_of(handle):
    """Each prompt's generated ids from an engine request's updates (no update may be an error)."""
    out = [[] for _ in handle.prompt_tokens]
    for batch in handle.updates():
        for u in batch:
            assert u.error is None, u.error
            out[u.index] += u.ids
    return out


def first_diff(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def reference_ids(model, prompt, n, ctx=None, eos_id=None):
    idx = torch.tensor([prompt], device=model.tok_emb.weight.device)
    out = generate(model, idx, n, ctx or model.cfg.context_length, eos_id=eos_id, use_cache=False)
    return out[0, len(prompt):].tolist()


def reference_sampled_rows(model, prompts, n, seed, temperature, top_k, top_p=None):
    """A seeded request's continuations built without the engine: a full no-cache forward per
    prompt and token, and one gptfast.sampling draw per step over the prompts' logits (row i =
    prompt i) with the op's (seed, offset) = (seed, step), as `seed=` promises."""
    rows, ctx = [list(p) for p in prompts], model.cfg.context_length
    for step in range(n):
        with torch.no_grad():
            logits = torch.cat([model(torch.tensor([r[-ctx:]]))[:, -1] for r in rows])  # (B, V)
        for r, t in zip(rows, sample_top_k(logits, top_k, temperature, top_p=top_p, seed=(seed, step)).tolist()):
            r.append(t)
    return [r[len(p):] for r, p in zip(rows, prompts)]


def reference_sampled_ids(model, prompt, n, seed, temperature, top_k, top_p=None):
    return reference_sampled_rows(model, [prompt], n, seed, temperature, top_k, top_p)[0]
