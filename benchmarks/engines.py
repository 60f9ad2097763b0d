"""The engines bench_generate.py times, behind one call: `run(prompts, n)` -> (token ids per
prompt, time to first token in s, decode tokens/s after the first token, all rows counted).

- gptfast: `Generator(model, dtype=...)` (its own clock: it reads each token back to the host);
- transformers: `GPT2LMHeadModel.generate` with a streamer that stamps each step;
- CTranslate2: the model converted by its transformers converter from a Hugging Face folder of
  the same weights (gptfast.weights.save_hf + a tokenizer.json from the bundled GPT-2 ranks),
  cached by a hash of the weights; a per-token callback stamps the first token.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time

import torch

from gptfast.generate import Generator
from gptfast.tokenizer import GPT2_PATTERN, RANKS_FILE
from gptfast.weights import save_hf, to_hf_state_dict

from common import agreeing_prefix, load_average  # noqa: E402

START_LOAD = load_average()
LABELS = {"transformers-fp32": "transformers fp32", "ct2-float32": "CTranslate2 float32",
          "ct2-int8": "CTranslate2 int8"}


def label(name: str) -> str:
    return LABELS.get(name, f"gptfast {name}")


def versions() -> str:
    import transformers
    try:
        import ctranslate2
        ct2 = ctranslate2.__version__
    except ImportError:
        ct2 = "not installed"
    return f"transformers {transformers.__version__}, ctranslate2 {ct2}"


class Gptfast:
    def __init__(self, model, dtype, device):
        self.generator = Generator(model, dtype=dtype, device=device)
        self.generator.generate_ids([[1, 2, 3, 4]], 8)  # warm-up

    def run(self, prompts, n):
        ids = self.generator.generate_ids(prompts, n)
        s = self.generator.stats
        return ids, s["time_to_first_token_s"], s["decode_tokens_per_s"]


class _Stamps:
    """A transformers streamer that records when each step's tokens arrive (the first call
    carries the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


class Transformers:
    def __init__(self, model, device):
        from transformers import GPT2Config, GPT2LMHeadModel
        state, config = to_hf_state_dict(model)
        hf = GPT2LMHeadModel(GPT2Config(**config))
        missing, unexpected = hf.load_state_dict(state, strict=False)
        # a tied head is left out of the export: transformers ties lm_head to wte itself
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        self.hf, self.device = hf.eval().to(device), device
        self.run([[1, 2, 3, 4]], 8)  # warm-up

    @torch.inference_mode()
    def run(self, prompts, n):
        idx = torch.tensor(prompts, device=self.device)
        stamps = _Stamps()
        t0 = time.perf_counter()
        out = self.hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                               pad_token_id=0, attention_mask=torch.ones_like(idx), streamer=stamps)
        end = time.perf_counter()
        first = stamps.times[1]
        return out[:, idx.shape[1]:].tolist(), first - t0, len(prompts) * (n - 1) / (end - first)


class CTranslate2:
    def __init__(self, folder, compute_type):
        import ctranslate2
        self.gen = ctranslate2.Generator(str(folder), device="cpu", compute_type=compute_type,
                                         intra_threads=torch.get_num_threads(), inter_threads=1)
        self.vocab = json.loads((folder / "vocabulary.json").read_text())
        self.run([[1, 2, 3, 4]], 8)  # warm-up

    def run(self, prompts, n):
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        first = []

        def stamp(step):  # called per row and token; returning nothing lets decoding go on
            if not first:
                first.append(time.perf_counter())

        t0 = time.perf_counter()
        res = self.gen.generate_batch(tokens, max_length=n, min_length=n, sampling_topk=1,
                                      include_prompt_in_result=False, callback=stamp)
        end = time.perf_counter()
        return [r.sequences_ids[0] for r in res], first[0] - t0, len(prompts) * (n - 1) / (end - first[0])


def ct2_missing(device) -> str | None:
    """Why CTranslate2 cannot run here, or None."""
    if device.type != "cpu":
        return "the CPU comparison only (CTranslate2's CUDA build is another install)"
    try:
        import ctranslate2  # noqa: F401
    except ImportError:
        return "ctranslate2 is not installed (pip install -e '.[bench]')"
    return None


def ct2_folder(model, cache):
    """CTranslate2's conversion of `model` (float32), made once per set of weights."""
    import ctranslate2
    from transformers.convert_slow_tokenizer import TikTokenConverter
    digest = hashlib.sha1()
    for t in model.state_dict().values():
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    folder = cache / f"ct2-{digest.hexdigest()[:12]}"
    if not (folder / "model.bin").exists():
        hf = cache / "hf"
        save_hf(model, hf)
        TikTokenConverter(vocab_file=str(RANKS_FILE), pattern=GPT2_PATTERN,
                          extra_special_tokens={"<|endoftext|>": 50256}).converted().save(str(hf / "tokenizer.json"))
        ctranslate2.converters.TransformersConverter(str(hf)).convert(str(folder), force=True)
        shutil.rmtree(hf)
    return folder


def build(names, model, device, cache) -> dict:
    """{name: engine} for gptfast dtypes and the peers named in `names` (in that order)."""
    built = {}
    for name in names:
        if name == "transformers-fp32":
            built[name] = Transformers(model, device)
        elif name.startswith("ct2-"):
            why = ct2_missing(device)
            if why:
                print(f"{label(name)} skipped: {why}")
                continue
            built[name] = CTranslate2(ct2_folder(model, cache), name[4:])
        else:
            built[name] = Gptfast(model, name, device)
    return built


def check_logits_and_reference(model, built, device, prompt, n):
    """gptfast's and transformers' fp32 logits agree; returns gptfast fp32's greedy tokens."""
    if "transformers-fp32" in built:
        with torch.inference_mode():
            idx = torch.tensor([prompt], device=device)
            diff = (model(idx) - built["transformers-fp32"].hf(idx).logits).abs().max().item()
        print(f"max |logits(gptfast) - logits(transformers)| = {diff:.2e} (fp32)")
        assert diff < 1e-3, diff
    engine = built.get("float32") or Gptfast(model, "float32", device)
    return engine.run([prompt], 60)[0][0]


def check_greedy(model, prompt, ids, ref, label_, device):
    """fp32 greedy tokens must equal `ref`, except after a near tie: at the first divergence
    the fp32 top-2 logit gap must be within 1e-4 of the logit scale (fp32 engines differ by
    summation order only, ~1e-6 relative)."""
    n = min(len(ids), len(ref))
    k = agreeing_prefix(ids, ref)
    if k < n:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ref[:k]], device=device))[0, -1].float()
        top2 = logits.topk(2).values
        gap, scale = (top2[0] - top2[1]).item(), logits.abs().max().item()
        assert gap <= 1e-4 * scale, f"{label_}: greedy tokens differ at step {k}, top-2 gap {gap:.3g} (no tie)"
        print(f"{label_}: greedy tokens diverge at step {k}, a near tie (top-2 gap {gap:.2e})")
