"""`gptfast serve`: an OpenAI-compatible HTTP server with continuous batching (gptfast.api_server),
for tools that speak the OpenAI API. FastAPI and uvicorn are an optional extra
(pip install 'gptfast[serve]'), imported only when the command runs.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import math
import os
import signal
import sys
import threading
from pathlib import Path

from .config import check_number
from .engine import PREFILL_CHUNK
from .generate import Generator, add_model_source, checked_type, load_model_source


# ---- CLI -------------------------------------------------------------------------------------
def add_parser(subparsers):
    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI HTTP API, batching concurrent requests",
        description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/metrics) with continuous batching. Needs the extra: pip install 'gptfast[serve]'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_source(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=checked_type(int, _check_port), default=8000, help="TCP port (0: any free one)")
    p.add_argument("--max-batch", type=checked_type(int, _check_at_least("--max-batch", 1)), default=32,
                   help="sequences decoded together")
    p.add_argument("--max-queue", type=checked_type(int, _check_at_least("--max-queue", 1)), default=256,
                   help="prompts allowed to wait for a batch row; more get 429")
    p.add_argument("--prefill-chunk", type=checked_type(int, _check_at_least("--prefill-chunk", 0)),
                   default=PREFILL_CHUNK, help="on CPU, the most prompt tokens one decoding step takes (a longer "
                   "prompt is prefilled over several steps, so the running requests' next tokens wait at most "
                   "that long); 0: every waiting prompt whole")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/ "
                   "(not given: $GPTFAST_API_KEY if set, else no key)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients send (not given: the checkpoint's file stem, or gpt2-SIZE)")
    p.add_argument("--shutdown-timeout", type=checked_type(float, _check_timeout), default=5.0,
                   help="seconds requests in flight may take to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info: startup and one line per request)")
    p.set_defaults(func=run_cli)


def _check_port(port):
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")


def _check_timeout(seconds):
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"--shutdown-timeout must be a finite number >= 0, got {seconds}")


def _check_at_least(flag, low):
    return functools.partial(check_number, flag, integer=True, op=">=", bound=low)


def model_name_of(args) -> str:
    if args.model_name:
        return args.model_name
    source = args.gpt2 or args.checkpoint
    return f"gpt2-{source}" if args.gpt2 and not Path(source).exists() else Path(source).stem


# uvicorn's fast parts (gptfast[serve] installs them: uvicorn's [standard]) and what it runs without each
FAST_HTTP = {"uvloop": "asyncio's own event loop", "httptools": "the pure-Python h11 parser"}


def missing_fast_http() -> list[str]:
    """What this Python lacks of FAST_HTTP, which uvicorn picks up by itself (uvloop is not made
    for Windows). Without them: ~0.1 ms more of a core per streamed token, taken from the decode
    step on a small CPU (README, Serving)."""
    def importable(name):
        try:
            importlib.import_module(name)
        except ImportError:
            return False
        return True
    wanted = [m for m in FAST_HTTP if not (m == "uvloop" and sys.platform == "win32")]
    return [m for m in wanted if not importable(m)]


def run_cli(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise ValueError(f"gptfast serve needs FastAPI and uvicorn ({e.name} is missing): "
                       "pip install 'gptfast[serve]'") from None
    from .api_server import create_app
    model, device = load_model_source(args)
    gen = Generator(model, dtype=args.dtype, device=device, max_batch=args.max_batch, max_queue=args.max_queue,
                    prefill_chunk=args.prefill_chunk or None)
    app = create_app(gen, model_name_of(args), args.api_key or os.environ.get("GPTFAST_API_KEY"))

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """SIGTERM / Ctrl-C: uvicorn stops accepting and waits for the requests in flight;
            after --shutdown-timeout the engine cancels what still runs (each stream then ends
            with an error event and [DONE]), so that wait ends."""
            if not self.should_exit:
                threading.Timer(args.shutdown_timeout, gen.engine.close).start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                   timeout_graceful_shutdown=args.shutdown_timeout + 5))
    missing = missing_fast_http()
    if missing:  # (uvicorn's logger: the Config above set it up at --log-level)
        logging.getLogger("uvicorn.error").warning(
            "gptfast serve: %s not installed, so uvicorn runs %s, which are slower: pip install 'gptfast[serve]' "
            "(or 'uvicorn[standard]')", " and ".join(missing), " and ".join(FAST_HTTP[m] for m in missing))
    # uvicorn raises the signal again after shutting down, for the handler it found: this one,
    # so that the process ends normally, exit 0
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
