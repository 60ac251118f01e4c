"""`dgemma batch`: a file of OpenAI batch requests answered offline, through the server's own code
(`dgemma.serve.batch`), with the engine of `dgemma serve`.

    dgemma batch -i requests.jsonl -o results.jsonl --model path/to/ckpt
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

from .common import CLIError, positive_float
from .serve import add_engine_arguments, build_engine


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    b.add_argument("--timeout", type=positive_float, default=3600.0, metavar="S",
                   help="seconds one request may take once submitted (default 3600)")
    b.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    from ..serve.batch import answered_ids, read_requests

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


def _answer(args: argparse.Namespace, todo: list, out: TextIO) -> dict[str, int]:
    from ..serve.app import ServeSettings, create_app
    from ..serve.batch import run_batch

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
