"""`dgemma tokenizer train`: learn a BPE vocabulary in the Gemma 4 layout (`dgemma.train.tokenizer`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..train.data import find_files, read_records
from ..train.tokenizer import RESERVED, record_texts, save_tokenizer, train_tokenizer
from .common import CLIError


def add_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tokenizer", help="tokenizer tools (train)",
                       description="Tokenizer tools. 'dgemma tokenizer train' learns a BPE vocabulary in the "
                                   "Gemma 4 layout (special tokens at their Gemma 4 ids, byte fallback).")
    actions = t.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    actions.required = True
    tr = actions.add_parser("train", help="train a BPE tokenizer on text files, folders or JSONL",
                            description="Train a BPE tokenizer and write tokenizer.json, chat_template.jinja and "
                                        "tokenizer_config.json (for transformers' AutoTokenizer).")
    tr.add_argument("--data", action="extend", nargs="+", required=True, metavar="PATH",
                    help="text files, folders (read recursively) or JSONL files (a shell glob works; repeatable)")
    tr.add_argument("--ext", action="append", metavar="EXT", help="only files ending in EXT when walking folders")
    tr.add_argument("--vocab-size", type=int, required=True, metavar="N",
                    help=f"total vocabulary size, the {RESERVED} reserved ids included")
    tr.add_argument("--min-frequency", type=int, default=2, metavar="N", help="rarest pair to merge (default 2)")
    tr.add_argument("--out", required=True, metavar="DIR", help="output directory")
    tr.set_defaults(func=cmd_tokenizer_train)


def _output_dir(out: str) -> Path:
    """--out, checked before training: a directory, or a path where one can be made."""
    if not out:
        raise CLIError("--out is empty; name the directory to write the tokenizer to")
    path = Path(out)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CLIError(f"--out {out}: {existing} exists and is not a directory")
    return path


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    out = _output_dir(args.out)
    find_files(args.data, args.ext)  # a missing path fails now, not after the files before it are read
    tokenizer = train_tokenizer(record_texts(read_records(args.data, args.ext)), args.vocab_size, args.min_frequency)
    save_tokenizer(tokenizer, out)
    print(f"{args.out}: {tokenizer.vocab_size} tokens")
    return 0
