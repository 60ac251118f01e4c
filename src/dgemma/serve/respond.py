"""Running a `Job` on the scheduler and answering it: one JSON body, or server-sent events.

Streaming sends a chunk per committed canvas (the text it adds), a draft chunk per denoising step when asked
(`stream_options.include_drafts`: an empty delta plus a `draft` object, which standard clients ignore), a
final chunk per choice with its `finish_reason`, the usage when asked, then `data: [DONE]`. A client that
disconnects, a timeout, or a choice that hit a stop string cancels the scheduler requests at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.responses import Response

from ..config import ConfigError
from ..engine.generate import CanvasCommit, DenoiseStep, GenerationResult
from ..engine.scheduler import AsyncStreams, Event, QueueFull, RequestFailed, Scheduler, ShuttingDown
from .errors import APIError
from .jobs import Job
from .metrics import Metrics
from .output import ChoiceOutput, TextDecoder
from .protocol import chat_choice, chat_message, completion_choice, envelope, usage
from .tool_parser import ToolCallStream, parse_tool_calls


@dataclass
class Runner:
    """What answering a job needs from the server."""

    scheduler: Scheduler
    decoder: TextDecoder
    metrics: Metrics
    model_name: str
    stop_ids: set[int]
    pad_id: int
    timeout_s: float

    async def respond(self, job: Job, http: HTTPRequest) -> Response:
        try:
            streams = AsyncStreams(self.scheduler, job.requests)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full", headers={"Retry-After": "1"}) from e
        except ShuttingDown as e:
            raise _shutting_down() from e
        except ConfigError as e:
            raise APIError(400, str(e), code="invalid_value") from e
        run = _Run(self, job, streams)
        watcher = asyncio.create_task(_cancel_on_disconnect(http, streams))
        if job.stream:
            return StreamingResponse(run.sse(watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async for _ in run.chunks():
                pass
        except TimeoutError as e:
            raise _timeout(self.timeout_s) from e
        finally:
            watcher.cancel()
        return JSONResponse(run.body())


async def _cancel_on_disconnect(http: HTTPRequest, streams: AsyncStreams) -> None:
    """Wait for the client to go away (the body is already read), then free its slots."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    streams.cancel()


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; send the request again once it is back", code="shutting_down")


def _timeout(seconds: float) -> APIError:
    return APIError(504, f"the generation did not finish within {seconds:g} s", code="timeout")


def _tool_finish(finish: str | None, calls: list) -> str | None:
    """A choice that stopped after calling tools finishes with "tool_calls", as OpenAI's do."""
    return "tool_calls" if calls and finish == "stop" else finish


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _Run:
    """One job's choices as their events arrive."""

    def __init__(self, runner: Runner, job: Job, streams: AsyncStreams):
        self.runner, self.job, self.streams = runner, job, streams
        self.choices = [ChoiceOutput(runner.decoder, runner.stop_ids | job.hole_end_ids, job.stop_strings, job.chat,
                                     runner.pad_id, job.limit, job.channel_open) for _ in job.requests]
        self.tool_streams = [ToolCallStream() for _ in job.requests] if job.tool_calls else None
        self.arrived = time.perf_counter()
        self.created = int(time.time())
        self.first_canvas = True

    async def chunks(self) -> AsyncIterator[dict[str, Any]]:
        """Consume the scheduler's events; yield the stream's chunks (none for a non-streaming job)."""
        if self.job.stream and self.job.chat:
            for i in range(len(self.choices)):
                yield self._chunk(i, {"role": "assistant", "content": ""}, "", None)
        try:
            async for index, event in self.streams.events(self.runner.timeout_s):
                chunk = self._apply(index, event)
                if chunk is not None and self.job.stream:
                    yield chunk
        finally:
            self.streams.cancel()

    def _apply(self, index: int, event: Event) -> dict[str, Any] | None:
        choice = self.choices[index]
        if isinstance(event, RequestFailed):
            if event.reason == "error":
                raise APIError(500, event.message, code="engine_error")
            if event.reason == "shutdown":
                raise _shutting_down()
            return None  # cancelled: by us after a stop, or because the client left
        if choice.finished:
            return None  # events that were in flight when a stop string cancelled the request
        if isinstance(event, DenoiseStep):
            return self._draft(index, event)
        if isinstance(event, CanvasCommit):
            self._commit(index, event)
        elif isinstance(event, GenerationResult):
            choice.end()
        if not self.job.stream:
            return None
        reasoning, content = choice.delta()
        delta, finish = {"content": content, "reasoning_content": reasoning}, choice.finish_reason
        if self.tool_streams is not None:  # calls are read as their text settles: name first, then arguments
            stream = self.tool_streams[index]
            content, calls = stream.feed(content, final=choice.finished)
            delta.update(content=content, tool_calls=calls)
            finish = _tool_finish(finish, stream.calls)
        return self._chunk(index, delta, content, finish, **self._incomplete(choice))

    def _commit(self, index: int, event: CanvasCommit) -> None:
        tokens, passes = event.tokens[0].tolist(), int(event.passes[0])
        choice = self.choices[index]
        before = choice.completion_tokens
        choice.add_canvas(tokens, passes)
        # the tokens the client gets (within max_tokens, up to a stop), as usage counts them
        self.runner.metrics.canvas(choice.completion_tokens - before, passes)
        if self.first_canvas:
            self.runner.metrics.first_canvas.observe(time.perf_counter() - self.arrived)
            self.first_canvas = False
        if self.choices[index].finished:
            self.streams.cancel(index)

    def _draft(self, index: int, event: DenoiseStep) -> dict[str, Any]:
        draft, accepted = event.draft[0].tolist()[:self.job.hole], event.accepted[0].tolist()[:self.job.hole]
        decoder = self.runner.decoder
        info = {"canvas_index": event.canvas_index, "step": event.step, "accepted": sum(accepted),
                "text": decoder.tokenizer.decode(draft, skip_special_tokens=True),
                "pieces": [decoder.piece(t) for t in draft], "accepted_mask": [int(a) for a in accepted]}
        return self._chunk(index, {}, "", None, draft=info)

    def _chunk(self, index: int, delta: dict[str, Any], text: str, finish_reason: str | None,
               **extra: Any) -> dict[str, Any]:
        usage_field = {"usage": None} if self.job.include_usage else {}  # as OpenAI: null until the last chunk
        if self.job.chat:
            delta = {k: v for k, v in delta.items() if v or k == "role"}
            choice = chat_choice(index, delta, finish_reason, delta=True, **extra)
            return envelope(self.job.id, "chat.completion.chunk", self.created, self.runner.model_name, [choice],
                            **usage_field)
        return envelope(self.job.id, "text_completion", self.created, self.runner.model_name,
                        [completion_choice(index, text, finish_reason, **extra)], **usage_field)

    def usage(self) -> dict[str, Any]:
        return usage(self.job.prompt_tokens, sum(c.completion_tokens for c in self.choices),
                     sum(c.decoder_passes for c in self.choices), self.job.image_tokens)

    def _message(self, choice) -> tuple[dict[str, Any], str | None]:
        """A chat choice's message and finish reason, its tool calls parsed out where the request has tools."""
        reasoning, content = choice.text()
        message, finish = chat_message(reasoning, content), choice.finish_reason
        if self.job.tool_calls:
            content, calls = parse_tool_calls(content)
            if calls:
                message.update(content=content or None, tool_calls=calls)
                finish = _tool_finish(finish, calls)
        return message, finish

    def _incomplete(self, choice) -> dict[str, Any]:
        """A constrained choice cut by max_tokens says so: its text is a valid prefix, not a complete match."""
        if self.job.constrained and choice.finish_reason == "length":
            return {"incomplete_reason": "max_tokens was reached before the output matched its constraint"}
        return {}

    def body(self) -> dict[str, Any]:
        """The non-streaming answer."""
        choices = []
        for i, c in enumerate(self.choices):
            extra = self._incomplete(c)
            if self.job.chat:
                message, finish = self._message(c)
                choices.append(chat_choice(i, message, finish, **extra))
            else:
                choices.append(completion_choice(i, c.text()[1], c.finish_reason, **extra))
        return envelope(self.job.id, self.job.object, self.created, self.runner.model_name, choices,
                        usage=self.usage())

    async def sse(self, watcher: asyncio.Task) -> AsyncIterator[str]:
        try:
            async for chunk in self.chunks():
                yield _sse(chunk)
            if self.job.include_usage:
                kind = "chat.completion.chunk" if self.job.chat else "text_completion"
                yield _sse(envelope(self.job.id, kind, self.created, self.runner.model_name, [], usage=self.usage()))
            yield _sse("[DONE]")
        except TimeoutError:
            yield _sse(_timeout(self.runner.timeout_s).body())
        except APIError as e:
            yield _sse(e.body())
        finally:
            watcher.cancel()
