"""`dgemma serve`: load a model, size the KV cache, and run the OpenAI-compatible server with uvicorn.
`add_engine_arguments` and `build_engine` are shared with `dgemma batch`.

Imports nothing beyond the standard library at module level, so the rest of the CLI works without the
`serve` extra installed.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import socket
import sys
from pathlib import Path

from ..config import WEIGHT_DTYPES
from ..shipped import DEFAULT_MODEL
from .common import MODEL_HELP, CLIError, int_argument, int_at_least_1, pick_device, positive_float
from .media import add_media_limit_arguments, media_limits

log = logging.getLogger(__name__)


def _port(text: str) -> int:
    return int_argument(text, lambda v: 1 <= v <= 65535, "in 1..65535", "port")


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="Serve DiffusionGemma over HTTP: /v1/models, /v1/completions (with `suffix` infilling), "
                    "/v1/chat/completions, /health, Prometheus /metrics and a playground page at /. Requests are "
                    "batched continuously.",
        epilog="The API key may also be given in the DGEMMA_API_KEY environment variable (kept out of `ps`).")
    add_engine_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/*")
    s.add_argument("--max-queue", type=int, default=64, metavar="N", help="requests waiting for a slot, at most")
    s.add_argument("--max-body-bytes", type=int_at_least_1, default=1 << 20, metavar="N")
    s.add_argument("--timeout", type=positive_float, default=600.0, metavar="S",
                   help="seconds a request may take, queueing included")
    s.add_argument("--no-playground", dest="playground", action="store_false",
                   help="do not serve the playground page at / (the API is served either way)")
    s.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    s.set_defaults(func=cmd_serve)


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The model, the engine's size and what one request may ask for: shared by `serve` and `batch`."""
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_NAME", help=MODEL_HELP)
    p.add_argument("--served-model-name", metavar="NAME", help="the model id requests name (default: --model's "
                                                               "name)")
    p.add_argument("--max-slots", type=int_at_least_1, default=16, metavar="N",
                   help="requests generating at once, at most (fewer if the KV-cache budget is smaller)")
    p.add_argument("--kv-cache-gib", type=positive_float, default=4.0, metavar="GIB",
                   help="KV-cache memory budget; fixes the number of slots (default 4)")
    p.add_argument("--max-prompt-tokens", type=int_at_least_1, default=2048, metavar="N")
    p.add_argument("--max-tokens", type=int_at_least_1, default=1024, metavar="N", help="max_tokens allowed")
    p.add_argument("--max-n", type=int_at_least_1, default=8, metavar="N", help="choices per request allowed")
    add_media_limit_arguments(p)
    p.add_argument("--max-denoising-steps", type=int_at_least_1, default=256, metavar="N",
                   help="max_denoising_steps allowed")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES,
                   help="weight dtype (default: float32 on CPU, bfloat16 otherwise)")
    p.add_argument("--device", help="torch device (default: cuda if available)")


def build_engine(args: argparse.Namespace, max_queue: int):
    """(model, scheduler, limits, served name) from `add_engine_arguments`' options: the KV-cache budget sized to
    requests of the largest prompt and output allowed."""
    from ..api import DiffusionGemma
    from ..config import ConfigError
    from ..engine.scheduler import Scheduler, slots_for_budget
    from ..serve.jobs import Limits

    device = pick_device(args.device)
    dtype = args.dtype or ("float32" if device.type == "cpu" else "bfloat16")
    model = DiffusionGemma.from_pretrained(args.model, dtype=dtype, device=device)
    c = model.config.canvas_length
    limits = Limits(args.max_prompt_tokens, args.max_tokens, args.max_n, args.max_denoising_steps,
                    media_limits(args))
    # the last canvas is never encoded: a request holds its prompt and all but one of its canvases
    max_len = limits.prompt_tokens + (math.ceil(limits.max_tokens / c) - 1) * c
    context = model.config.text_config.max_position_embeddings
    if limits.prompt_tokens + math.ceil(limits.max_tokens / c) * c > context:
        raise ConfigError(f"--max-prompt-tokens {limits.prompt_tokens} + --max-tokens {limits.max_tokens} (whole "
                          f"canvases of {c}) exceed the model context of {context}")
    slots = slots_for_budget(model.config.text_config, max_len, c, model.model.dtype, int(args.kv_cache_gib * 2**30),
                             args.max_slots)
    scheduler = Scheduler(model.model, slots, max_len, max_queue)
    return model, scheduler, limits, served_name(args.model, args.served_model_name)


def served_name(model: str, served_model_name: str | None = None) -> str:
    """The model id clients send: `--served-model-name`, else the model directory's name (`.` included)."""
    return served_model_name or Path(model).resolve().name or model


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..config import ConfigError
    from ..serve.app import EngineServer, ServeSettings, create_app

    if args.max_queue < 0:
        raise ConfigError(f"--max-queue must be >= 0, got {args.max_queue}")
    sock = _bind(args.host, args.port)  # before the model loads: a taken port is said at once, not minutes later
    model, scheduler, limits, name = build_engine(args, args.max_queue)
    api_key = args.api_key or os.environ.get("DGEMMA_API_KEY") or None
    if api_key is None and not _is_loopback(args.host):
        log.warning("serving on %s without an API key: anyone who can reach it can use it", args.host)
    settings = ServeSettings(name, api_key, args.max_body_bytes, args.timeout, limits, args.playground)
    app = create_app(model, scheduler, settings)
    print(f"dgemma: serving {name!r} on http://{args.host}:{args.port}: {scheduler.slots} slots of "
          f"{scheduler.max_len} tokens, "
          f"queue {args.max_queue}" + (f"; playground at http://{args.host}:{args.port}/" if args.playground else ""),
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    EngineServer(config, scheduler).run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), for uvicorn to listen on."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CLIError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise CLIError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
