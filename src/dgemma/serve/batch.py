"""`dgemma batch`: a file of OpenAI batch requests answered offline, through the server's own code.

    dgemma batch -i requests.jsonl -o results.jsonl --model path/to/ckpt

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

import argparse
import asyncio
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..tokenizer import is_valid_text

URLS = ("/v1/chat/completions", "/v1/completions")


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    from .cli import _positive_float, add_engine_arguments

    b = sub.add_parser(
        "batch", help="answer a file of OpenAI batch requests (JSONL) offline",
        description="Run a JSONL file of OpenAI Batch API requests (/v1/chat/completions, /v1/completions) "
                    "through the server's code in-process, batched continuously, and write one result line per "
                    "request as it finishes.",
        epilog="An existing output file is continued: requests whose custom_id it already holds are skipped. "
               "Streaming (stream: true) has no meaning here and is refused per request.")
    b.add_argument("-i", "--input", required=True, metavar="FILE", help="requests, one JSON object per line "
                                                                        "('-': stdin)")
    b.add_argument("-o", "--output", required=True, metavar="FILE", help="results, one JSON object per line "
                                                                         "('-': stdout)")
    add_engine_arguments(b)
    b.add_argument("--timeout", type=_positive_float, default=3600.0, metavar="S",
                   help="seconds one request may take once submitted (default 3600)")
    b.set_defaults(func=cmd_batch)


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


def cmd_batch(args: argparse.Namespace) -> int:
    from ..cli import CLIError

    if args.input == "-":
        text, source = sys.stdin.read(), "<stdin>"
    else:
        try:
            text, source = Path(args.input).read_text(encoding="utf-8-sig"), args.input
        except UnicodeDecodeError:
            raise CLIError(f"{args.input}: not UTF-8 text") from None
    if args.input != "-" and args.output != "-" and Path(args.output).exists() \
            and Path(args.input).resolve() == Path(args.output).resolve():
        raise CLIError(f"-i and -o are the same file, {args.input}: the results need a file of their own")
    lines = read_requests(text, source)  # a bad file is said before the model loads
    continuing = args.output != "-" and Path(args.output).is_file() and Path(args.output).stat().st_size > 0
    done = answered_ids(Path(args.output)) if continuing else set()
    # lines that are not requests were answered at the start of the run being continued
    todo = [line for line in lines if line.custom_id not in done and not (continuing and line.custom_id is None)]
    if continuing:
        print(f"dgemma: {args.output} already answers {len(lines) - len(todo)} of the {len(lines)} requests; "
              f"continuing with the other {len(todo)}", file=sys.stderr, flush=True)
    if not todo:
        return 0
    out = sys.stdout if args.output == "-" else open(args.output, "a", encoding="utf-8")  # noqa: SIM115
    try:
        counts = _answer(args, todo, out)
    finally:
        if out is not sys.stdout:
            out.close()
    if counts["failed"]:
        print(f"dgemma: {counts['failed']} of {len(todo)} requests failed; their errors are in {args.output}",
              file=sys.stderr, flush=True)
    return 0 if counts["failed"] == 0 else 1


def _answer(args: argparse.Namespace, todo: list[Line], out: TextIO) -> dict[str, int]:
    from .app import ServeSettings, create_app
    from .cli import build_engine

    # the queue holds the requests in flight beyond the slots (twice the slots), each with up to --max-n choices
    model, scheduler, limits, name = build_engine(args, max_queue=2 * args.max_slots * args.max_n)
    settings = ServeSettings(name, None, max_body_bytes=1 << 62, timeout_s=args.timeout, limits=limits,
                             playground=False)
    app = create_app(model, scheduler, settings)
    tty = sys.stderr.isatty()
    start = time.perf_counter()

    def progress(counts: dict[str, int]) -> None:
        finished = counts["ok"] + counts["failed"]
        if tty or finished == len(todo):
            rate = counts["completion_tokens"] / max(time.perf_counter() - start, 1e-9)
            back = "\r" if tty else ""  # a terminal shows one line, rewritten
            print(f"{back}dgemma: {finished}/{len(todo)} requests ({counts['failed']} failed), {rate:.1f} tokens/s",
                  end="\n" if finished == len(todo) else "", file=sys.stderr, flush=True)

    async def answer_all() -> dict[str, int]:
        try:  # twice the slots in flight: the queue holds the next requests while the slots work
            return await run_batch(app, todo, out, 2 * scheduler.slots, progress)
        finally:
            scheduler.stop()  # while the event loop still takes the requests' last events (Ctrl-C included)

    scheduler.start()
    try:
        return asyncio.run(answer_all())
    finally:
        scheduler.stop()
