"""OpenAI batch files answered through the server's own app, in-process (`dgemma batch`, in `dgemma.cli.batch`).

Each input line is a request of OpenAI's Batch API: `{"custom_id": ..., "method": "POST", "url":
"/v1/chat/completions" or "/v1/completions", "body": {...}}`. Every request goes through the same app as
`dgemma serve` (validation, limits, sampler settings, output), called in-process, and all of them share the
continuous-batching scheduler, its slots kept full. Each answer is one output line, as OpenAI writes them:
`{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`; a line that is not a request
(bad JSON, a missing custom_id, another url) gets `response: null` and an `error`. Lines are written as their
requests finish, each flushed at once: a run that stops (Ctrl-C, a crash) keeps what it wrote, and running
the same command again continues it, answering only the custom_ids the output does not have yet.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..tokenizer import is_valid_text

URLS = ("/v1/chat/completions", "/v1/completions")


@dataclass
class Line:
    number: int  # 1-based line of the input
    custom_id: str | None
    url: str | None
    body: bytes | None  # the request body to send; None when the line is not a valid request
    problem: str | None = None  # why it is not


def read_requests(text: str, source: str) -> list[Line]:
    """The input's requests in order; a line that is not a valid request is kept with its problem. Duplicate
    custom_ids are an error for the whole file (results could not be told apart)."""
    from ..config import ConfigError

    lines, seen = [], {}
    for number, raw in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028 etc.
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            lines.append(Line(number, None, None, None, f"not JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(item, dict):
            lines.append(Line(number, None, None, None, "not a JSON object"))
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id or not is_valid_text(custom_id):
            lines.append(Line(number, None, None, None, "custom_id must be a non-empty string of valid Unicode"))
            continue
        if custom_id in seen:
            raise ConfigError(f"{source}:{number}: custom_id {custom_id!r} is also on line {seen[custom_id]}; "
                              f"each request needs its own")
        seen[custom_id] = number
        url, method, body = item.get("url"), item.get("method", "POST"), item.get("body")
        problem = (f"url must be one of {', '.join(URLS)}, got {url!r}" if url not in URLS else
                   f"method must be POST, got {method!r}" if method != "POST" else
                   "body must be a JSON object" if not isinstance(body, dict) else
                   "stream: true is not supported in a batch" if body.get("stream") else None)
        lines.append(Line(number, custom_id, url, None if problem else json.dumps(body).encode(), problem))
    return lines


def answered_ids(path: Path) -> set[str]:
    """custom_ids an earlier run already wrote to `path`. A last line cut short (the run was killed while writing
    it) is removed, so that the lines appended next start on a line of their own."""
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        with path.open("r+b") as f:
            f.truncate(len(complete))
    done = set()
    for raw in complete.decode("utf-8", errors="replace").split("\n"):
        try:
            item = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if isinstance(item, dict) and isinstance(item.get("custom_id"), str):
            done.add(item["custom_id"])
    return done


async def call(app, url: str, body: bytes) -> tuple[int, Any]:
    """POST `body` to the ASGI `app` in-process: (status, parsed JSON answer)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": url, "raw_path": url.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("batch", 0), "server": ("batch", 0)}
    sent = False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await never.wait()  # the client never leaves
        return {"type": "http.disconnect"}

    status, chunks = 500, []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, json.loads(b"".join(chunks) or b"null")


def result_line(line: Line, status: int | None = None, answer: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id}
    if line.problem is not None:
        out.update(response=None, error={"code": "invalid_request", "message": f"line {line.number}: {line.problem}"})
    else:
        request_id = answer.get("id") if isinstance(answer, dict) else None
        out.update(response={"status_code": status, "request_id": request_id, "body": answer}, error=None)
    return out


async def run_batch(app, lines: list[Line], out: TextIO, concurrency: int, progress) -> dict[str, int]:
    """Answer `lines` with at most `concurrency` requests in flight; write each result as it comes."""
    gate = asyncio.Semaphore(concurrency)
    counts = {"ok": 0, "failed": 0, "completion_tokens": 0}

    async def one(line: Line) -> None:
        if line.problem is not None:
            record = result_line(line)
        else:
            async with gate:
                status, answer = await call(app, line.url, line.body)
            record = result_line(line, status, answer)
        ok = record["error"] is None and record["response"]["status_code"] == 200
        counts["ok" if ok else "failed"] += 1
        if ok:
            counts["completion_tokens"] += record["response"]["body"]["usage"]["completion_tokens"]
        out.write(json.dumps(record) + "\n")  # ASCII: no character of a text can split or break the line
        out.flush()
        progress(counts)

    await asyncio.gather(*(one(line) for line in lines))
    return counts
