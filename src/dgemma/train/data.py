"""Training data on disk -> records -> token examples.

Inputs are text files (one document each), folders (walked recursively, optionally filtered by extension) and
JSONL files whose lines hold `{"text"}`, `{"prompt", "completion"}` (loss on the completion) or `{"messages"}`
(a chat rendered with the tokenizer's chat template; loss on the final assistant message). Every problem is a
`DataError` that names the file, and the line for JSONL.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError

from ..tokenizer import TURN_END, Tokenizer

log = logging.getLogger(__name__)

ASSISTANT_ROLES = ("assistant", "model")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and the line for JSONL)."""


@dataclass
class Record:
    """One training example before tokenization: the model learns `target` given `prompt`.

    `prompt` is text ("" for a plain document) or the chat messages before the final assistant answer.
    """

    source: str  # "path" or "path:line", for error messages
    key: str  # what the held-out split hashes: a file's path below its data root, or a JSONL line
    prompt: str | list[dict]
    target: str


@dataclass
class Example:
    """Token ids of one record; the first `prompt_len` tokens carry no loss."""

    tokens: list[int]
    prompt_len: int
    source: str


def find_files(paths: Sequence[str | Path], extensions: Sequence[str] | None = None) -> list[tuple[Path, str]]:
    """(file, split key) for each path: files as given, folders walked recursively (hidden entries skipped,
    `extensions` such as ".py" filtering what the walk finds). Raises DataError for a missing path."""
    exts = tuple(e if e.startswith(".") else f".{e}" for e in extensions or ())
    found: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append((path, path.name))
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(part.startswith(".") for part in p.relative_to(path).parts)
                           and (not exts or p.name.endswith(exts)))
            if not files:
                raise DataError(f"{path}: no files" + (f" ending in {', '.join(exts)}" if exts else ""))
            found.extend((p, p.relative_to(path).as_posix()) for p in files)
        else:
            raise DataError(f"{path}: no such file or folder")
    return found


def read_records(paths: Sequence[str | Path], extensions: Sequence[str] | None = None,
                 exclude: Sequence[str | Path] = ()) -> Iterator[Record]:
    """Every record of every input, less the files found under `exclude`. A text file named on its own that is
    empty or not UTF-8 is an error; such text files found by walking a folder are skipped (and counted in the
    log). A JSONL file is data on purpose wherever it is found: an empty or unreadable one is always an error."""
    named = {Path(p) for p in paths}
    excluded = {f.resolve() for f, _ in find_files(exclude, extensions)}
    skipped: list[str] = []
    for file, key in find_files(paths, extensions):
        if file.resolve() in excluded:
            continue
        if file.suffix.lower() == ".jsonl" or (file.suffix.lower() == ".json" and _holds_records(file)):
            yield from read_jsonl(file)
            continue
        try:
            text = _read_text(file)
            if not text.strip():
                raise DataError(f"{file}: empty file")
        except DataError as e:
            if file in named:
                raise
            skipped.append(str(e))
            continue
        yield Record(str(file), key, "", text)
    if skipped:
        log.info("skipped %d file(s) found in folders, e.g. %s", len(skipped), skipped[0])


def _holds_records(file: Path) -> bool:
    """A `.json` file written as JSON lines (as `datasets` writes them): its first line is a record object.
    Any other `.json` file (a config in a code corpus, say) is text."""
    try:
        with file.open(encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        obj = json.loads(first)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(obj, dict) and bool(RECORD_FIELDS & obj.keys())


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text (byte {e.start}); pass --ext to choose which files to read") from None
    except OSError as e:  # some carry no file name (EIO): name it here
        raise DataError(f"{file}: cannot read it ({e.strerror or e})") from None


def read_jsonl(file: Path) -> Iterator[Record]:
    """One record per non-blank line (lines end at "\n" only: U+2028 and the like are valid inside a JSON string)."""
    count = 0
    for number, line in enumerate(_read_text(file).split("\n"), 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
        count += 1
        yield parse_record(obj, where, key=line.strip())
    if count == 0:
        raise DataError(f"{file}: empty file (no JSON lines)")


RECORD_FIELDS = frozenset({"text", "prompt", "completion", "messages"})  # what `parse_record` reads


def parse_record(obj: object, where: str, key: str) -> Record:
    """A JSONL object -> Record; raises DataError naming `where` for anything else."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _chat_record(obj["messages"], where, key)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings")
        return Record(where, key, prompt, completion)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string")
        return Record(where, key, "", obj["text"])
    raise DataError(f"{where}: record has none of the fields 'text', 'prompt'/'completion', 'messages' "
                    f"(keys: {', '.join(map(repr, obj)) or 'none'})")


def _chat_record(messages: object, where: str, key: str) -> Record:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a string 'role' and 'content'")
    if messages[-1]["role"] not in ASSISTANT_ROLES:
        raise DataError(f"{where}: the last message must be the assistant's (got role {messages[-1]['role']!r})")
    return Record(where, key, messages[:-1], messages[-1]["content"].strip())


def tokenize(record: Record, tokenizer: Tokenizer) -> Example:
    """`<bos> prompt target <eos>`; a chat renders its history with the generation prompt and the answer ends its
    turn (`<turn|>`) before `<eos>`."""
    if isinstance(record.prompt, list):
        try:
            prompt = tokenizer.apply_chat_template(record.prompt, add_generation_prompt=True, tokenize=True)
        except TemplateError as e:
            raise DataError(f"{record.source}: chat template: {e}") from None
        target = tokenizer.encode(record.target + TURN_END + "\n", add_bos=False)
    else:
        prompt = [tokenizer.bos_id, *tokenizer.encode(record.prompt, add_bos=False)]
        target = tokenizer.encode(record.target, add_bos=False)
    return Example(prompt + target + [tokenizer.eos_id], len(prompt), record.source)


def is_held_out(key: str, fraction: float) -> bool:
    """Deterministic split: the same key lands on the same side on every machine and run."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_records(records: Iterable[Record], holdout_frac: float) -> tuple[list[Record], list[Record]]:
    """(train, held-out)."""
    train: list[Record] = []
    held: list[Record] = []
    for r in records:
        (held if is_held_out(r.key, holdout_frac) else train).append(r)
    return train, held
