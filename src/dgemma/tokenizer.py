"""Tokenizer and chat layer: Gemma 4 vocabulary, chat template, streaming detokenizer, reasoning split.

DiffusionGemma uses the Gemma 4 tokenizer and turn format. What the default template
(`templates/gemma4_chat.jinja`) renders, piece by piece::

    <bos>
    <|turn>system\\n<|think|>\\n{system}<turn|>\\n   only when thinking is on or there is a system message;
                                                  `<|think|>\\n` only when thinking is on
    <|turn>user\\n{text}<turn|>\\n
    <|turn>model\\n{answer}<turn|>\\n               history; thinking channels are stripped from answers
    <|turn>model\\n                                generation prompt, thinking on
    <|turn>model\\n<|channel>thought\\n<channel|>   generation prompt, thinking off (an empty thought channel)

Message text is trimmed. With thinking on the model writes `<|channel>thought\\n{reasoning}<channel|>`
before its answer, and it ends its turn with `<turn|>`.

Sources this was checked against:
- huggingface/transformers `tests/models/diffusion_gemma/test_modeling_diffusion_gemma.py`
  (`test_diffusion_gemma_chat_template[_with_thinking]`): the exact prompts google/diffusiongemma-26B-A4B-it
  renders for one user message, thinking off and on (ids 2 `<bos>`, 105 `<|turn>`, 106 `<turn|>`,
  98 `<|think|>`, 100 `<|channel>`, 101 `<channel|>`).
- Google's "Gemma 4 prompt formatting" (ai.google.dev/gemma/docs/core/prompt-formatting-gemma4): the control
  tokens, `<|think|>` in the system turn, reasoning in `<|channel>thought ... <channel|>`, no thoughts in history.
- Gemma 4 26B/31B `chat_template.jinja` (copy in ollama/ollama
  `model/renderers/testdata/gemma4_31b_chat_template.jinja2`): system-turn layout, `trim` of contents,
  thought stripping on history, the empty thought channel on the generation prompt when thinking is off.
- transformers `cli/serving/utils.py` (gemma4 response template): reasoning between `<|channel>thought\\n`
  and `<channel|>`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Container, Iterable, Sequence
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal, overload

import jinja2.ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _Backend

from .config import ConfigError

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
TURN_START, TURN_END = "<|turn>", "<turn|>"
CHANNEL_START, CHANNEL_END = "<|channel>", "<channel|>"
THOUGHT_LABEL = "thought\n"  # follows CHANNEL_START when the channel holds reasoning

_REPLACEMENT_CHAR = "\ufffd"
_CHANNEL_MARKERS = re.compile(f"({re.escape(CHANNEL_START)}|{re.escape(CHANNEL_END)})")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _template_env() -> ImmutableSandboxedEnvironment:
    """The Jinja environment Hugging Face renders chat templates in (so checkpoint templates work unchanged)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read {path}: {exc}") from exc


def _token_name(entry: str | dict[str, Any] | None, default: str) -> str:
    """A special token from tokenizer_config.json: a string, an AddedToken dict, or absent."""
    if isinstance(entry, dict):
        return entry["content"]
    return entry or default


def _find_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str:
    """`chat_template.jinja`, else tokenizer_config.json's `chat_template`, else the packaged Gemma 4 template."""
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    if template:
        return template
    return files("dgemma").joinpath("templates/gemma4_chat.jinja").read_text(encoding="utf-8")


class Tokenizer:
    """A `tokenizers.Tokenizer` with Gemma 4's special-token ids and a chat template."""

    def __init__(self, backend: _Backend, chat_template: str, *,
                 bos_token: str = BOS, eos_token: str = EOS, pad_token: str = PAD) -> None:
        self._backend = backend
        self.chat_template = chat_template
        self._template = _template_env().from_string(chat_template)
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self._bos_id = self._require_id(bos_token)
        self._eos_id = self._require_id(eos_token)
        self._pad_id = self._require_id(pad_token)
        stops = [self._eos_id] + [backend.token_to_id(t) for t in (EOS, TURN_END)]
        self._stop_ids = tuple(dict.fromkeys(i for i in stops if i is not None))

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load `tokenizer.json` (and the chat template, special-token names) from a model directory."""
        model_dir = Path(path)
        tokenizer_file = model_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in model directory {model_dir} (expected {tokenizer_file})")
        try:
            backend = _Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception on malformed files
            raise ValueError(f"could not load tokenizer from {tokenizer_file}: {exc}") from exc
        config_file = model_dir / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        return cls(
            backend,
            _find_chat_template(model_dir, config),
            bos_token=_token_name(config.get("bos_token"), BOS),
            eos_token=_token_name(config.get("eos_token"), EOS),
            pad_token=_token_name(config.get("pad_token"), PAD),
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` and `chat_template.jinja` to a model directory, and a `tokenizer_config.json`
        where it has none (a checkpoint's own is kept): see `transformers_config`."""
        model_dir = Path(path)
        model_dir.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(model_dir / "tokenizer.json"))
        (model_dir / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        config_file = model_dir / "tokenizer_config.json"
        if not config_file.exists():
            config_file.write_text(json.dumps(self.transformers_config(), indent=2) + "\n", encoding="utf-8")

    def transformers_config(self) -> dict[str, str]:
        """The `tokenizer_config.json` that makes transformers' AutoTokenizer load this tokenizer unchanged: its
        generic fast class (without it a dgemma directory gets GemmaTokenizer, which replaces the normalizer and
        pre-tokenizer, so the ids differ) and the special tokens (the chat template renders `bos_token`)."""
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token}
        unk = getattr(self._backend.model, "unk_token", None)
        if unk and self._backend.token_to_id(unk) is not None:
            config["unk_token"] = unk
        return config

    def _require_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer vocabulary")
        return token_id

    @property
    def backend(self) -> _Backend:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (the model's embedding table may be larger)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a generation: eos, plus `<eos>` and the end-of-turn `<turn|>` where the vocabulary has them."""
        return self._stop_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (`<|turn>`, ...) become their ids."""
        try:
            ids = self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the backend's only word for a str it cannot take: a lone surrogate
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ConfigError(f"text is not valid Unicode: {e.reason} at character {e.start}") from None
            raise
        return [self._bos_id, *ids] if add_bos else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @overload
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = ...,
                            enable_thinking: bool = ..., tokenize: Literal[False] = ...,
                            **template_kwargs: Any) -> str: ...

    @overload
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = ...,
                            enable_thinking: bool = ..., *, tokenize: Literal[True],
                            **template_kwargs: Any) -> list[int]: ...

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                            enable_thinking: bool = False, tokenize: bool = False,
                            **template_kwargs: Any) -> str | list[int]:
        """Render `messages` ({"role", "content"} dicts) to a prompt string, or to ids with `tokenize=True`.

        The rendered prompt already starts with `<bos>`, so it is tokenized without adding another.
        Extra keyword arguments (e.g. `tools`) are passed to the template. Raises `jinja2.TemplateError`
        for conversations the template rejects, ValueError for an empty one.
        """
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation: pass at least one message")
        text = self._template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            pad_token=self.pad_token,
            **template_kwargs,
        )
        return self.encode(text, add_bos=False) if tokenize else text


def is_valid_text(text: str) -> bool:
    """False for a str carrying lone surrogates: undecodable bytes from argv or stdin (surrogateescape) or a
    JSON `\\ud800` escape; such text has no UTF-8 form, and the tokenizer refuses it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def split_reasoning(text: str, opened: bool | None = None, *, final: bool = True) -> tuple[str, str]:
    """Split generated text into (reasoning, content).

    Reasoning is the text inside `<|channel>thought\\n ... <channel|>` blocks (joined by newlines; an unclosed
    block from a truncated generation runs to the end). `opened`: whether the prompt left a channel open, so
    that the text starts inside it; None guesses so when the first marker is a `<channel|>` (text before it
    then counts as reasoning). Content is everything else. Both are stripped. Decode with special tokens kept,
    or the markers are gone. `final=False`: the text may still grow (streaming), so an unclosed block that is
    still no more than a start of its `thought\\n` label counts as empty until the label is known.
    """
    parts = _CHANNEL_MARKERS.split(text)  # text, marker, text, marker, ..., text
    in_channel = (len(parts) > 1 and parts[1] == CHANNEL_END) if opened is None else opened
    reasoning: list[str] = []
    content: list[str] = []
    for i, part in enumerate(parts):
        if i % 2:
            in_channel = part == CHANNEL_START
        elif in_channel and not final and i == len(parts) - 1 and THOUGHT_LABEL.startswith(part):
            continue  # the block's label may still be arriving: nothing of it is known to be reasoning yet
        elif in_channel:
            reasoning.append(part.removeprefix(THOUGHT_LABEL).strip())
        else:
            content.append(part)
    return "\n".join(r for r in reasoning if r), "".join(content).strip()


def settled_length(ids: Sequence[int], byte_ids: Container[int], skipped: Container[int] = (), start: int = 0) -> int:
    """How many leading `ids` decode to text that no later id changes: all but a trailing run of byte-fallback
    tokens (decoded as one unit: one bad byte turns the whole run into U+FFFD). `skipped` ids (special tokens
    that decode drops) count as part of the run, since the byte runs on either side of them merge. Ids before
    `start` are settled already. The rule `IncrementalDetokenizer` and the server's streaming share."""
    end = len(ids)
    while end > start and (ids[end - 1] in byte_ids or ids[end - 1] in skipped):
        end -= 1
    return end


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces whose concatenation is `decode(all_ids)`.

    Never splits a UTF-8 character: text ending in U+FFFD (an incomplete character) is held back, and so is a
    trailing run of byte-fallback tokens (`<0xE2>` ...), which the tokenizer decodes as one unit. Each call
    decodes only a small window: the tokens of the last emitted piece (for context) and the pending ones.
    Call `flush()` at the end of the stream; it returns what is still held and resets the decoder.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        backend = tokenizer.backend
        self._backend = backend
        self._byte_ids = frozenset(
            i for b in range(256) if (i := backend.token_to_id(f"<0x{b:02X}>")) is not None
        )
        self._skipped_ids = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special
        ) if skip_special_tokens else frozenset()
        self._ids: list[int] = []  # window: the last emitted piece's tokens, then the pending ones
        self._read = 0  # window index of the first token not yet emitted

    def _text(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=False)  # skipped ids never enter the window

    def add(self, ids: Iterable[int]) -> str:
        """Feed new token ids; return the text they complete (possibly "")."""
        self._ids.extend(i for i in map(int, ids) if i not in self._skipped_ids)
        end = settled_length(self._ids, self._byte_ids, start=self._read)
        if end == self._read:
            return ""
        prefix = self._text(self._ids[: self._read])
        text = self._text(self._ids[:end])
        if len(text) <= len(prefix) or text.endswith(_REPLACEMENT_CHAR):
            return ""
        del self._ids[: self._read]
        self._read = end - self._read
        return text[len(prefix):]

    def flush(self) -> str:
        """Return all text still held back (incomplete characters included, as `decode` renders them)."""
        prefix = self._text(self._ids[: self._read])
        text = self._text(self._ids)
        self._ids.clear()
        self._read = 0
        return text[len(prefix):]


# Gemma 4 control tokens at their real ids; a byte tokenizer keeps them there so prompts render alike.
# `<|fill|>` (an unused id in Gemma 4) is dgemma's infilling filler: the token a model trained with infilling
# writes into the places of a hole that the missing text does not need.
FILL_TOKEN = "<|fill|>"
GEMMA4_SPECIAL_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, FILL_TOKEN: 4, "<|think|>": 98,
                      "<|channel>": 100, "<channel|>": 101, "<|turn>": 105, "<turn|>": 106}


def byte_tokenizer() -> Tokenizer:
    """A 512-token byte-level tokenizer: Gemma 4's special tokens at their ids, byte b at id 256 + b.

    For models without a trained vocabulary (random-weight presets): any text encodes, nothing is unknown.
    """
    from tokenizers import AddedToken, decoders, models

    vocab = {f"<unused{i}>": i for i in range(256)}
    for name, i in GEMMA4_SPECIAL_IDS.items():
        del vocab[f"<unused{i}>"]
        vocab[name] = i
    vocab.update({f"<0x{b:02X}>": 256 + b for b in range(256)})
    backend = _Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    specials = sorted((i, name) for name, i in vocab.items() if i < 256)  # control and unused ids
    backend.add_special_tokens([AddedToken(name, special=True) for _, name in specials])
    template = files("dgemma").joinpath("templates/gemma4_chat.jinja").read_text()
    return Tokenizer(backend, template)
