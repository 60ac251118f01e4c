"""The `dgemma` entry point: the parser of every subcommand, and the one place where errors become exit codes.

Every bad input ends with one `dgemma: error: ...` line on stderr and a non-zero exit status
(2 for command-line usage errors, 1 for everything the library rejects, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ..config import ConfigError
from ..model.kv_cache import CacheFullError
from ..model.weights import CheckpointError
from . import batch, bench, chat, evaluate, generate, info, serve, tokenizer, train
from .common import EXTRAS, PROG, CLIError, Parser

# each module adds its subcommand(s); the order is the one `dgemma -h` lists
SUBCOMMANDS = (generate, chat, info, train, tokenizer, serve, batch, evaluate, bench)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dgemma")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="DiffusionGemma: text diffusion, a canvas of tokens at a time.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (works under test capture and redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never take the CLI down
            self.handleError(record)


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


class _LogToStderr:
    """While active, the library's log records (e.g. the random-weights warning) print once to stderr as
    `dgemma: warning: ...`. Restores the logger on exit so an embedding program is left as it was."""

    def __enter__(self) -> "_LogToStderr":
        self.logger = logging.getLogger("dgemma")
        self.saved = (self.logger.propagate, self.logger.level)
        self.handler = _StderrHandler(logging.INFO)
        self.handler.setFormatter(_LevelFormatter(f"{PROG}: %(levelname)s: %(message)s"))
        self.logger.addHandler(self.handler)
        self.logger.propagate = False  # exactly once: not again through a root handler
        if self.logger.level == logging.NOTSET:
            self.logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.propagate, level = self.saved
        self.logger.setLevel(level)


def _fail(message: str, code: int = 1) -> int:
    message = " ".join(str(message).split()) or "unknown error"  # one line
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to sys.exit)."""
    from jinja2.exceptions import TemplateError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # -h, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        with _LogToStderr():
            return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `dgemma generate ... | head -1`
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except CLIError as e:
        return _fail(str(e), 2)
    except (ConfigError, CheckpointError, CacheFullError) as e:
        return _fail(str(e))
    except FileNotFoundError as e:
        return _fail(str(e) if e.filename is None else f"{e.filename}: {e.strerror}")
    except OSError as e:
        return _fail(f"{e.filename}: {e.strerror}" if e.filename else str(e))
    except TemplateError as e:
        return _fail(f"chat template: {e}")
    except ValueError as e:  # the tokenizer's errors (unreadable tokenizer.json, missing special tokens)
        return _fail(str(e))
    except RuntimeError as e:
        import torch

        if isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e):  # the CPU allocator's
            return _fail(f"out of memory: {e}")
        raise
    except ModuleNotFoundError as e:  # an optional extra that is not installed
        extra = EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        return _fail(f"this needs the {e.name} package: pip install 'dgemma[{extra}]'")


def entry() -> None:  # pragma: no cover - `python -m dgemma` and the console script
    sys.exit(main())
