"""`dgemma generate`: one prompt in, text out, streamed canvas by canvas (or the live canvas, or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..shipped import DEFAULT_MODEL
from ..tokenizer import is_valid_text
from .canvas_view import CanvasView
from .common import (MODEL_HELP, PROG, CLIError, add_device_arguments, add_sampler_arguments, int_at_least_1,
                     load_with_tokenizer, sampler_settings)
from .constraint_args import add_constraint_arguments, constraint_from_args
from .media import add_media_arguments, check_files, prompt_inputs


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    add_media_arguments(g)
    add_constraint_arguments(g)
    add_device_arguments(g)
    g.set_defaults(func=cmd_generate)


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


def split_thinking(tokenizer, tokens: list[int]) -> tuple[str, str]:
    """(reasoning, answer): `split_reasoning` on the text decoded with special tokens kept. Special tokens
    other than the channel markers are dropped first so neither part shows `<pad>`, `<bos>`, ..."""
    from ..tokenizer import CHANNEL_END, CHANNEL_START, split_reasoning

    markers = {tokenizer.token_to_id(CHANNEL_START), tokenizer.token_to_id(CHANNEL_END)} - {None}
    drop = _special_ids(tokenizer) - markers
    return split_reasoning(tokenizer.decode([t for t in tokens if t not in drop], skip_special_tokens=False))


def cmd_generate(args: argparse.Namespace) -> int:
    from ..engine.generate import CanvasCommit, DenoiseStep, GenerationResult
    from ..tokenizer import IncrementalDetokenizer

    if args.thinking:
        args.chat = True
    if args.show_canvas and args.json:
        raise CLIError("--show-canvas and --json cannot be combined (both write to stdout)")
    if args.show_canvas and args.mode == "ar":
        raise CLIError("--show-canvas needs --mode diffusion (autoregressive decoding has no canvas)")
    if (args.image or args.video) and args.mode == "ar":
        raise CLIError("--image and --video need --mode diffusion")
    check_files(args.image, "--image")
    check_files(args.video, "--video")

    # everything that can be checked without the weights is checked before loading them
    gen = sampler_settings(args)
    constraint = constraint_from_args(args)
    if constraint is not None and args.mode == "ar":
        raise CLIError("structured output needs --mode diffusion")
    prompt = _read_prompt(args.prompt)
    model = load_with_tokenizer(args.model, args.device, args.dtype)
    if args.canvas_length is not None:
        model.config.canvas_length = args.canvas_length
    tok = model.tokenizer
    media = {}
    if args.image or args.video:
        prompt_ids, media = prompt_inputs(model, prompt, args.image, args.video, args.chat, args.thinking)
    elif args.chat:
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
            for event in model.stream_generate([prompt_ids], generation_config=gen, seed=args.seed, **media,
                                               constraint=constraint, constraint_policy=args.constraint_policy):
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
        reasoning, text = split_thinking(tok, content_ids)

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
        if constraint is not None:
            doc["complete"] = bool(stats.grammar_complete[0])
        stdout.write(json.dumps(doc, ensure_ascii=False) + "\n")
        stdout.flush()
        return 0 if _report_incomplete(constraint, stats) else 1

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
    return 0 if _report_incomplete(constraint, stats) else 1


def _report_incomplete(constraint, stats) -> bool:
    """False (and a warning line) when the output ran out of tokens before its constraint was satisfied."""
    if constraint is None or stats.grammar_complete[0]:
        return True
    print(f"{PROG}: warning: the output ended at --max-new-tokens before it matched the {constraint.kind.replace('_', ' ')}"
          f" (it is a valid prefix, not a complete match)", file=sys.stderr, flush=True)
    return False
