"""`dgemma chat`: a conversation in the terminal, each reply streamed canvas by canvas.

    dgemma chat --model path/to/checkpoint --thinking
    printf 'Hi\\nWhat did I just say?\\n' | dgemma chat --seed 0     # one turn per line when stdin is not a terminal

Each turn renders the whole conversation with the chat template (earlier answers without their reasoning, as
the template keeps them) and generates the reply. Commands: /help, /reset, /system TEXT, /thinking on|off,
/image PATH and /video PATH (attach to the next message), /exit. A message may span lines between a pair of triple quotes. Ctrl-C stops a reply (the turn is dropped);
a turn the model cannot take (the conversation outgrew the context) is said, and the conversation goes on.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

from ..config import ConfigError, GenerationConfig
from ..shipped import DEFAULT_MODEL
from ..tokenizer import is_valid_text
from .common import (MODEL_HELP, CLIError, add_device_arguments, add_sampler_arguments, load_with_tokenizer,
                     sampler_settings)
from .media import MEDIA_KEYS, check_files, media_parts

HELP = """commands:
  /help            this list
  /reset           forget the conversation (the system prompt stays)
  /system TEXT     set the system prompt (and start over); /system alone removes it
  /thinking on|off let the model think before it answers (reasoning shown dimmed)
  /image PATH      attach an image to the next message (a model with a vision tower)
  /video PATH      attach a video to the next message
  /exit            leave (or Ctrl-D)
a message over several lines goes between triple quotes: \"\"\" ... \"\"\""""

_DIM, _RESET = "\x1b[2m", "\x1b[0m"


def add_parser(sub: argparse._SubParsersAction) -> None:

    c = sub.add_parser(
        "chat", help="chat with the model in the terminal",
        description="An interactive conversation: each reply is generated over the whole conversation and "
                    "streamed canvas by canvas. Type /help for the commands. When stdin is not a terminal, "
                    "each line is one user turn.",
        epilog="Sampler settings default to the model's generation_config.json. With --seed S, reply k "
               "(counted from 0; a stopped or refused turn is not a reply) uses seed S + k, so a session "
               "replays exactly.")
    c.add_argument("--model", default=DEFAULT_MODEL, metavar="PATH_OR_NAME", help=MODEL_HELP)
    c.add_argument("--system", metavar="TEXT", help="system prompt")
    c.add_argument("--thinking", action="store_true", help="let the model think before it answers")
    add_sampler_arguments(c, seed_help="seed of the first reply (then N+1, ...)")
    c.add_argument("--show-canvas", action="store_true", help="animate each canvas while it denoises")
    add_device_arguments(c)
    c.set_defaults(func=cmd_chat)


@dataclass
class Conversation:
    """The turns so far and how the next reply is generated."""

    model: object  # DiffusionGemma
    gen: GenerationConfig
    system: str | None = None
    thinking: bool = False
    seed: int | None = None
    turns: list[dict] = field(default_factory=list)
    replies: int = 0  # replies generated in this session (the seed offset of the next one)
    images: list[str] = field(default_factory=list)  # attached to the next message
    videos: list[str] = field(default_factory=list)

    def user_turn(self, user: str) -> dict:
        if not (self.images or self.videos):
            return {"role": "user", "content": user}
        return {"role": "user", "content": [*media_parts(self.images, self.videos), {"type": "text", "text": user}]}

    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, self.user_turn(user)]

    def prompt_ids(self, user: str) -> list[int]:
        return self.model.tokenizer.apply_chat_template(self.messages(user), add_generation_prompt=True,
                                                        enable_thinking=self.thinking, tokenize=True)

    def prompt_inputs(self, user: str) -> tuple[list[int], dict]:
        """The prompt ids and, where the conversation holds images or videos, the media inputs of `generate`."""
        messages = self.messages(user)
        if not any(isinstance(m["content"], list) for m in messages):
            return self.prompt_ids(user), {}
        inputs = self.model.processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                          enable_thinking=self.thinking)
        return inputs["input_ids"][0].tolist(), {k: inputs[k] for k in MEDIA_KEYS if k in inputs}

    def reply_seed(self) -> int | None:
        return None if self.seed is None else self.seed + self.replies

    def reset(self) -> None:
        self.turns = []
        self.images, self.videos = [], []


class _Screen:
    """Writes a reply as it arrives: reasoning dimmed (on a terminal), then the answer; the live canvas when
    asked."""

    def __init__(self, out: TextIO, err: TextIO, tokenizer, tty: bool, show_canvas: bool):
        from .canvas_view import CanvasView

        self.out, self.err, self.tty = out, err, tty
        self.view = CanvasView(out, tokenizer, tty) if show_canvas else None
        self.in_reasoning = False
        self.err_open = False  # reasoning written to stderr without its line ended
        self.ends_line = False  # what was written to stdout ends with a line break (nothing written: no)

    def write(self, reasoning: str, content: str) -> None:
        if reasoning and not self.tty:  # piped: the answer alone on stdout, the reasoning on stderr
            self.err.write(reasoning)
            self.err.flush()
            self.err_open = not reasoning.endswith("\n")
        elif reasoning:
            if not self.in_reasoning:
                self._text(_DIM)
                self.in_reasoning = True
            self._text(reasoning)
        if content:
            self._end_reasoning()
            self._text(content)

    def _end_reasoning(self) -> None:
        if self.in_reasoning:
            self._text(_RESET + "\n\n")
            self.in_reasoning = False

    def _text(self, text: str) -> None:
        if not text:
            return
        self.ends_line = text.endswith("\n")
        if self.view is not None:
            self.view.text(text)
        else:
            self.out.write(text)
            self.out.flush()

    def close(self) -> None:
        self._end_reasoning()
        if self.err_open:
            self.err.write("\n")
            self.err.flush()
        if self.view is not None:
            self.view.close()
        if not self.ends_line:
            self.out.write("\n")
        self.out.flush()


def _read(stdin: TextIO, prompt: str, tty: bool) -> str | None:
    """One line (None at the end of the input); on a terminal, Ctrl-C abandons the line being typed."""
    if not tty:
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")
    while True:
        try:
            return input(prompt)
        except EOFError:
            return None
        except KeyboardInterrupt:
            print()


def _lines(stdin: TextIO, prompt: str, tty: bool) -> Iterator[str]:
    """User inputs: one per line, or the lines between a pair of triple quotes."""
    while (line := _read(stdin, prompt, tty)) is not None:
        start = line.lstrip()
        if not start.startswith('"""'):
            yield line
            continue
        first = start[3:].rstrip()
        if first.endswith('"""'):  # opened and closed on one line
            yield first[:-3]
            continue
        parts = [start[3:]]
        while True:
            more = _read(stdin, "... ", tty)
            if more is None:  # the input ended inside the block: leave, sending nothing half-typed
                return
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                break
            parts.append(more)
        yield "\n".join(parts).strip("\n")


def _command(line: str, convo: Conversation, err: TextIO) -> bool:
    """Run a /command; False to leave."""
    name, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/help":
        print(HELP, file=err)
    elif name == "/reset":
        convo.reset()
        print("(conversation cleared)", file=err)
    elif name == "/system":
        if not is_valid_text(arg):
            print("(the system prompt is not valid UTF-8 text; unchanged)", file=err)
            err.flush()
            return True
        convo.system = arg or None
        convo.reset()
        print(f"(system prompt {'set' if arg else 'removed'}; conversation cleared)", file=err)
    elif name == "/thinking":
        if arg not in ("on", "off"):
            print("(usage: /thinking on|off)", file=err)
        else:
            convo.thinking = arg == "on"
            print(f"(thinking {arg})", file=err)
    elif name in ("/image", "/video"):
        _attach(name, arg, convo, err)
    else:
        print(f"(unknown command {name}; /help lists them)", file=err)
    err.flush()
    return True


def _attach(name: str, path: str, convo: Conversation, err: TextIO) -> None:
    if not path:
        print(f"(usage: {name} PATH)", file=err)
        return
    if convo.model.config.vision_config is None:
        print("(this model reads text only: it has no vision tower)", file=err)
        return
    try:
        check_files([path], name)
    except CLIError as e:
        print(f"({e})", file=err)
        return
    (convo.images if name == "/image" else convo.videos).append(path)
    print(f"({name[1:]} {path} attached to the next message)", file=err)


def _reply(convo: Conversation, user: str, screen: _Screen, decoder, err: TextIO) -> None:
    """Generate and show one reply; the turn joins the conversation only when the reply is complete."""
    from jinja2.exceptions import TemplateError

    from ..engine.generate import CanvasCommit, DenoiseStep, GenerationResult
    from ..media import MediaError
    from ..model.kv_cache import CacheFullError
    from ..serve.output import ChoiceOutput

    model = convo.model
    stop_ids = set(convo.gen.eos_token_id or [])
    c = model.config.canvas_length
    limit = -(-convo.gen.max_new_tokens // c) * c  # whole canvases, as generation writes them
    choice = ChoiceOutput(decoder, stop_ids, [], convo.thinking, convo.gen.pad_token_id, limit)
    seed = convo.reply_seed()
    result = None
    turn = convo.user_turn(user)
    try:
        prompt, media = convo.prompt_inputs(user)
        for event in model.stream_generate([prompt], generation_config=convo.gen, seed=seed, **media):
            if isinstance(event, DenoiseStep):
                if screen.view is not None:
                    screen.view.step(event)
            elif isinstance(event, CanvasCommit):
                if screen.view is not None:
                    screen.view.commit()
                if not choice.finished:
                    choice.add_canvas(event.tokens[0].tolist(), int(event.passes[0]))
                    screen.write(*choice.delta())
            elif isinstance(event, GenerationResult):
                result = event
    except (ConfigError, CacheFullError, TemplateError, MediaError) as e:
        screen.close()
        convo.images, convo.videos = [], []  # the media go with the dropped turn
        print(f"dgemma: error: {' '.join(str(e).split())} (the turn is dropped; /reset starts over)", file=err,
              flush=True)
        return
    except KeyboardInterrupt:
        screen.close()
        print("(stopped; the turn is dropped)", file=err, flush=True)
        return
    choice.end()
    screen.write(*choice.delta())
    screen.close()
    convo.turns += [turn, {"role": "assistant", "content": choice.text()[1]}]
    convo.images, convo.videos = [], []
    convo.replies += 1
    if result is not None:
        stats = result.stats
        passes = stats.passes_per_canvas[0]
        wall = stats.wall_time_s
        rate = f", {choice.completion_tokens / wall:.1f} tok/s" if wall > 0 else ""
        canvases = f"{len(passes)} canvas{'es' if len(passes) != 1 else ''}"
        print(f"{_DIM if screen.tty else ''}[{choice.completion_tokens} tokens, {canvases}, "
              f"{sum(passes) / max(len(passes), 1):.1f} passes/canvas{rate}]{_RESET if screen.tty else ''}",
              file=err, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    from ..serve.output import TextDecoder

    gen = sampler_settings(args)
    if args.system is not None and not is_valid_text(args.system):
        raise CLIError("--system is not valid UTF-8 text")
    if sys.stdin is None:
        raise CLIError("no stdin to read the conversation from")
    model = load_with_tokenizer(args.model, args.device, args.dtype)
    tok = model.tokenizer
    gen = gen.updated(eos_token_id=list(dict.fromkeys([*(gen.eos_token_id or []), *tok.stop_ids])))
    convo = Conversation(model, gen, args.system, args.thinking, args.seed)
    decoder = TextDecoder(tok)  # built once: it reads the tokenizer's special and byte tokens
    stdin, stdout, err = sys.stdin, sys.stdout, sys.stderr
    # undecodable bytes reach a line as surrogates: that line is refused, not the session
    if hasattr(stdin, "reconfigure"):
        stdin.reconfigure(errors="surrogateescape")
    tty = stdin.isatty() and stdout.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"dgemma chat: {args.model}. /help for commands, Ctrl-D to leave.", file=err, flush=True)
    for line in _lines(stdin, ">>> ", tty):
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(line, convo, err):
                break
            continue
        if not is_valid_text(line):
            print("dgemma: error: the message is not valid UTF-8 text", file=err, flush=True)
            continue
        _reply(convo, line, _Screen(stdout, err, tok, tty, args.show_canvas), decoder, err)
    return 0
