"""The OpenAI HTTP API as `gptfast serve` speaks it: request bodies (pydantic, strict types,
unknown fields refused as OpenAI does), their checks against the model, and the response and
stream-chunk objects. Everything here is plain data; gptfast.serve does the serving.

Chat completions use the Alpaca prompt that `finetune-instruct` trains on (gptfast.finetune.
instruct.format_input): one user message is the instruction; a leading system message, when
given, takes the place of the Alpaca preamble; the answer starts after "### Response:".
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict

from .finetune.instruct import PREAMBLE, RESPONSE_HEADER, format_input
from .sampling import SamplingParams


class ApiError(Exception):
    """An error answered with an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints share. OpenAI's defaults: temperature 1, top_p 1; top_k is ours."""
    model: str
    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None  # accepted, unused


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: Optional[bool] = None


# OpenAI features this server does not have: (field, the values that ask for nothing)
_UNSUPPORTED = (("n", (1,)), ("presence_penalty", (0.0,)), ("frequency_penalty", (0.0,)), ("echo", (False,)),
                ("logprobs", (None, False)), ("best_of", (None, 1)), ("suffix", (None,)))


@dataclass
class Job:
    """A checked request: token ids per prompt, one budget each, how to sample and stop."""
    prompts: list[list[int]]
    max_tokens: list[int]
    params: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))


def check_request(req: _Sampling, tokenizer, context_length: int, vocab_size: int) -> Job:
    """The request as a Job, or an ApiError naming the field and the problem."""
    for name, neutral in _UNSUPPORTED:
        value = getattr(req, name, None)
        if name in type(req).model_fields and (type(value), value) not in {(type(v), v) for v in neutral}:
            raise ApiError(400, f"{name}={value!r} is not supported by this server", name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by this server", "logit_bias")
    try:
        params = SamplingParams(req.temperature, req.top_k, None if req.top_p == 1 else req.top_p, req.seed)
    except ValueError as e:
        raise ApiError(400, str(e), str(e).split()[0]) from None
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", "stop")
    chat = isinstance(req, ChatRequest)
    prompts = [tokenizer.encode(chat_prompt(req.messages))] if chat else completion_prompts(req.prompt, tokenizer)
    for p in prompts:
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} in the prompt is outside the vocabulary [0, {vocab_size})",
                           "prompt")
    asked = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and asked < 0:
        raise ApiError(400, f"max_tokens must be >= 0, got {asked}", "max_tokens")
    budgets = []
    for p in prompts:  # OpenAI's rule: prompt + completion within the context (no sliding window here)
        if asked is None and len(p) >= context_length:
            raise ApiError(400, f"This model's maximum context length is {context_length} tokens, however the "
                           f"prompt has {len(p)} tokens, which leaves no room for a completion.", "prompt",
                           code="context_length_exceeded")
        if asked is not None and len(p) + asked > context_length:
            raise ApiError(400, f"This model's maximum context length is {context_length} tokens, however you "
                           f"requested {len(p) + asked} tokens ({len(p)} in the prompt, {asked} for the "
                           "completion). Shorten the prompt or max_tokens.", "max_tokens", code="context_length_exceeded")
        budgets.append(context_length - len(p) if asked is None else asked)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", "stream_options")
    return Job(prompts, budgets, params, stop, req.stream, include_usage, chat)


def completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of them -> token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt or isinstance(prompt[0], int):
        prompt = [prompt]
    rows = [tokenizer.encode(p, allowed_special="all") if isinstance(p, str) else list(p) for p in prompt]
    if not rows or any(not r for r in rows):
        raise ApiError(400, "prompt is empty; give at least one token", "prompt")
    return rows


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The Alpaca prompt of [system,] user, ending where the model writes its response."""
    system = messages[0].content if messages and messages[0].role == "system" else None
    rest = messages[1:] if system is not None else messages
    if len(rest) != 1 or rest[0].role != "user":
        raise ApiError(400, "the Alpaca prompt format takes one instruction: send one user message, after an "
                       "optional system message", "messages")
    if not rest[0].content.strip():
        raise ApiError(400, "the user message is empty", "messages")
    text = format_input({"instruction": rest[0].content})
    if system is not None:
        text = system + text[len(PREAMBLE):]
    return text + RESPONSE_HEADER


# ---- responses --------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(job: Job, model: str, texts: list[str], reasons: list[str], tokens: list[int]) -> dict:
    """The whole answer of a request that did not stream."""
    u = usage(sum(map(len, job.prompts)), sum(tokens))
    if job.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {"id": f"chatcmpl-{job.id}", "object": "chat.completion", "created": job.created, "model": model,
                "choices": choices, "usage": u}
    choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
    return {"id": f"cmpl-{job.id}", "object": "text_completion", "created": job.created, "model": model,
            "choices": choices, "usage": u}


def chunk(job: Job, model: str, index: int | None = None, text: str | None = None, finish: str | None = None,
          role: bool = False, usage_: dict | None = None) -> dict:
    """One server-sent event of a stream: a piece of choice `index`, its end, or the usage."""
    if job.chat:
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        head = {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk"}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        head = {"id": f"cmpl-{job.id}", "object": "text_completion"}
    out = {**head, "created": job.created, "model": model, "choices": [] if index is None else [choice]}
    if job.include_usage:
        out["usage"] = usage_
    return out
