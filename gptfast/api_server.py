"""The HTTP side of `gptfast serve` (gptfast.serve is its command line): the OpenAI API over
one continuous-batching engine (gptfast.engine), so that tools in any language can use a
model, and many clients cost little more than one.

POST /v1/completions and /v1/chat/completions (streamed as server-sent events in OpenAI's chunk
format, ending with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text).
Bad requests are 400s with OpenAI error objects, a full queue is 429 with Retry-After, a
missing or wrong key (with --api-key) is 401; a client that goes away frees its batch rows at
the next step; SIGTERM stops accepting, lets requests in flight finish for --shutdown-timeout
seconds, cancels the rest and exits 0. FastAPI and uvicorn are the optional extra `serve`.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from .engine import QueueFull
from .generate import Generator
from .metrics import ServerMetrics
from .openai_api import ApiError, ChatRequest, CompletionRequest, check_request, chunk, response, usage
from .tokenizer import EOT_ID


def create_app(gen: Generator, model_name: str, api_key: str | None = None):
    """The FastAPI app serving `gen`'s engine (whose observer becomes the app's metrics)."""
    metrics = gen.engine.observer = ServerMetrics(gen.engine)
    service = _Service(gen, model_name, metrics)

    @asynccontextmanager
    async def lifespan(app):
        yield
        gen.engine.close(timeout=2.0)  # what uvicorn's graceful shutdown left running is cancelled

    app = FastAPI(title="gptfast", description="OpenAI-compatible API", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return await api_error(request, validation_error(e))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):  # a bug in one request: it fails, the server stays up
        return await api_error(request, ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await service.run(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await service.run(body, request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "gptfast"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _Service:
    """Both completion endpoints: check the request, queue it, answer or stream it."""

    def __init__(self, gen, model_name, metrics):
        self.gen, self.name, self.metrics = gen, model_name, metrics
        self.mailbox = None

    async def run(self, body, request: Request):
        gen, engine = self.gen, self.gen.engine
        if body.model != self.name:
            raise ApiError(404, f"The model `{body.model}` does not exist; this server has `{self.name}`",
                           "model", code="model_not_found")
        job = check_request(body, gen.tokenizer, gen.context_size, gen.cfg.vocab_size)
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        mailbox = self.mailbox
        if mailbox is None or mailbox.loop is not loop:  # (a server has one loop; tests make several)
            mailbox = self.mailbox = _Mailbox(loop)
        post = mailbox.post
        try:
            handle = engine.submit(job.prompts, job.max_tokens, job.params, eos_id=EOT_ID, stop=job.stop,
                                   tokenizer=gen.tokenizer, sink=lambda batch: post(updates, batch))
        except QueueFull as e:
            raise ApiError(429, f"The server is busy: {e}. Retry later.", kind="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        self.metrics.received(sum(map(len, job.prompts)))
        stream = _Stream(job, self.name, handle, updates)
        if job.stream:
            return EventStream(stream.events(), handle)
        try:
            texts, reasons, tokens = await stream.gather(request)
        finally:
            handle.cancel()  # a no-op when done; frees the rows when the client left
        return response(job, self.name, texts, reasons, tokens)


class _Mailbox:
    """Updates from the engine's thread into the requests' queues on the event loop, with one
    wake-up of the loop for all that a step sends (a wake-up per request per step was a write to
    the loop's self-pipe each, and as many turns of the loop: CPU the decode step needs)."""

    def __init__(self, loop):
        self.loop, self.posted, self.lock = loop, [], threading.Lock()

    def post(self, queue: asyncio.Queue, batch):
        with self.lock:
            self.posted.append((queue, batch))
            if len(self.posted) > 1 and not self.loop.is_closed():  # a wake-up is on its way
                return
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nothing will read these (the engine cancels)
            with self.lock:
                self.posted.clear()
            raise

    def _deliver(self):
        with self.lock:
            posted, self.posted = self.posted, []
        for queue, batch in posted:
            queue.put_nowait(batch)


def validation_error(e):
    """pydantic's first complaint as an OpenAI 400: unknown fields as OpenAI words them."""
    err = e.errors()[0]
    # the field's path, without pydantic's names for the branches of a union ("str", "list[int]")
    loc = [str(p) for p in err["loc"][1:] if p not in ("str", "int", "float", "bool") and "[" not in str(p)]
    param = loc[0] if loc else None
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {'.'.join(loc)}", param)
    if err["type"] == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    return ApiError(400, f"{'.'.join(loc) or 'body'}: {err['msg']}", param)


class _Stream:
    """One request's updates (from the engine's thread via the event loop) as SSE events or
    as the final texts."""

    def __init__(self, job, model_name, handle, updates):
        self.job, self.name, self.handle, self.updates = job, model_name, handle, updates
        n = len(job.prompts)
        self.texts, self.reasons, self.tokens = [""] * n, [None] * n, [0] * n

    async def batches(self, request=None):
        """Update batches until every prompt is done; with `request`, stop if its client leaves."""
        left, get = len(self.texts), None
        while left:
            if request is None:  # streaming: the response notices a client that left
                batch = await self.updates.get()
            else:
                get = get or asyncio.ensure_future(self.updates.get())
                done, _ = await asyncio.wait({get}, timeout=0.25)
                if not done:
                    if await request.is_disconnected():
                        get.cancel()
                        self.handle.cancel()
                        return
                    continue
                batch, get = get.result(), None
            for u in batch:
                if u.error is not None or u.finish == "cancelled":
                    raise ApiError(500 if u.error else 503, f"generation failed: {u.error}" if u.error else
                                   "the server is shutting down", kind="server_error")
                self.texts[u.index] += u.text
                self.tokens[u.index] = u.tokens
                if u.finish is not None:
                    self.reasons[u.index] = u.finish
                    left -= 1
            yield batch

    async def gather(self, request):
        async for _ in self.batches(request):
            pass
        return self.texts, self.reasons, self.tokens

    async def events(self):
        job, name = self.job, self.name
        try:
            if job.chat:
                for i in range(len(job.prompts)):
                    yield _sse(chunk(job, name, i, role=True))
            async for batch in self.batches():
                for u in batch:
                    if u.text:
                        yield _sse(chunk(job, name, u.index, text=u.text))
                    if u.finish is not None:
                        yield _sse(chunk(job, name, u.index, finish=u.finish))
            if job.include_usage:
                yield _sse(chunk(job, name, usage_=usage(sum(map(len, job.prompts)), sum(self.tokens))))
        except ApiError as e:  # the stream has begun: the error is an event
            yield _sse(e.body())
        finally:
            self.handle.cancel()
        yield "data: [DONE]\n\n"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events whose request is cancelled however the response ends (a client that
    left, a send that failed, a shutdown): its batch rows are freed at the next step."""

    def __init__(self, events, handle):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.handle = handle

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.handle.cancel()


class _Guard:
    """ASGI middleware (not BaseHTTPMiddleware, which would buffer and hide disconnects): the API
    key on /v1/ routes, and every answer's status counted for /metrics."""

    def __init__(self, app, api_key, metrics):
        self.app, self.metrics = app, metrics
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.expected is not None and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await self._unauthorized(send, "missing" if not given else "wrong")

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.request(message["status"])
            await send(message)
        await self.app(scope, receive, counted)

    async def _unauthorized(self, send, what):
        self.metrics.request(401)
        body = json.dumps({"error": {"message": f"Incorrect API key provided ({what} Authorization: Bearer key)",
                                     "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}})
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body.encode()})
