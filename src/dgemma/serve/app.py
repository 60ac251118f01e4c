"""The FastAPI app: OpenAI-compatible routes over a `Scheduler`, plus `/health`, `/metrics` and the playground
page at `/`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib.resources import files

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from ..api import DiffusionGemma
from ..engine.scheduler import Scheduler
from .errors import APIError, install_error_handlers
from .jobs import JobBuilder, Limits
from .metrics import Metrics
from .middleware import RequestGuard, RequestMetrics
from .output import TextDecoder
from .protocol import ChatRequest, CompletionRequest, model_card
from .respond import Runner

ENDPOINTS = {"/", "/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    timeout_s: float = 600.0
    limits: Limits = field(default_factory=Limits)
    playground: bool = True  # the page at `/` (static; it calls the API from the browser, with the key typed there)


def create_app(model: DiffusionGemma, scheduler: Scheduler, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the scheduler's thread (unless already running) and stops it."""
    jobs = JobBuilder(model, settings.model_name, settings.limits)
    metrics = Metrics(scheduler)
    runner = Runner(scheduler, TextDecoder(model.tokenizer), metrics, settings.model_name, set(jobs.stop_ids),
                    jobs.gen.pad_token_id, settings.timeout_s)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        owned = not scheduler.running
        if owned:
            scheduler.start()
        yield
        if owned:
            scheduler.stop()

    app = FastAPI(title="dgemma", summary="DiffusionGemma, OpenAI-compatible", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=ENDPOINTS)

    if settings.playground:
        page = files(__package__).joinpath("playground.html").read_text(encoding="utf-8")

        @app.get("/", include_in_schema=False)
        async def playground() -> HTMLResponse:
            return HTMLResponse(page)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.running
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = model_card(settings.model_name, created, model.config.canvas_length, scheduler.max_len)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model_by_id(model_id: str) -> dict:
        if model_id != settings.model_name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {settings.model_name!r}",
                           param="model", code="model_not_found")
        return model_card(settings.model_name, created, model.config.canvas_length, scheduler.max_len)

    # building a job tokenizes (a long prompt takes seconds): in a worker thread, so the event loop keeps serving
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await runner.respond(await run_in_threadpool(jobs.completion, body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await runner.respond(await run_in_threadpool(jobs.chat, body), request)

    return app


class EngineServer(uvicorn.Server):
    """uvicorn's server, which on Ctrl-C / SIGTERM first stops the engine (after the step under way), so the
    requests in flight and in the queue end at once with a 503 (an SSE error event when streaming) instead of
    being cut off when the graceful-shutdown timeout runs out."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler):
        super().__init__(config)
        self.scheduler = scheduler

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.scheduler.stop()
        super().handle_exit(sig, frame)
