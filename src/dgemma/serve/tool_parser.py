"""Reading the model's tool calls (Gemma 4's `<|tool_call>call:NAME{key:value,...}<tool_call|>`) into OpenAI
`tool_calls` as its text arrives, canvas by canvas.

`ToolCallStream` takes the chat content as it settles and gives back the text outside the calls plus OpenAI
streaming deltas: a call's index, id and name as soon as `call:NAME{` is read, then fragments of its arguments as a
JSON string. The arguments are translated from Gemma 4's syntax (bare keys, strings between `<|"|>`, no
whitespace) to JSON as they arrive, so the fragments add up to the final arguments exactly; a non-streaming answer
runs the same reader over the whole text. A call the model writes malformed (possible only where the output is
not constrained to a call) ends where its syntax breaks, and the text after that point is content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .tool_grammar import CALL_END, CALL_START, QUOTE

_HEAD = re.compile(r"call:([A-Za-z_][A-Za-z0-9_.\-]*)\{")
_HEAD_PREFIX = re.compile(r"(c(a(l(l(:([A-Za-z_][A-Za-z0-9_.\-]*)?)?)?)?)?)?")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_WORDS = {"true": "true", "false": "false", "null": "null"}


class _More(Exception):
    """The text ends before the construct being read does."""


class _Malformed(Exception):
    def __init__(self, at: int):
        self.at = at


def _partial_suffix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could be the start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class _Arguments:
    """Gemma 4 arguments (the text after `call:NAME{`) read into JSON: `read()` gives the JSON that no later text
    changes, and where the object closed (None: not yet)."""

    def __init__(self, text: str):
        self.s, self.out = text, []

    def read(self) -> tuple[str, int | None]:
        try:
            end = self._object(0)
        except _More:
            end = None
        return "".join(self.out), end

    def _need(self, i: int) -> None:
        if i >= len(self.s):
            raise _More

    def _object(self, i: int) -> int:
        """An object body from i (after its "{") to after its "}"."""
        self.out.append("{")
        first = True
        while True:
            self._need(i)
            if self.s[i] == "}":
                self.out.append("}")
                return i + 1
            if not first:
                if self.s[i] != ",":
                    raise _Malformed(i)
                i += 1
            colon = self.s.find(":", i)
            if colon < 0:
                if not re.fullmatch(r"\s*[A-Za-z0-9_]*", self.s[i:]):
                    raise _Malformed(i)
                raise _More
            key = self.s[i:colon].strip()
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise _Malformed(i)
            self.out.append(("" if first else ", ") + json.dumps(key) + ": ")
            i = self._value(colon + 1)
            first = False

    def _value(self, i: int) -> int:
        s = self.s
        while i < len(s) and s[i].isspace():
            i += 1
        self._need(i)
        if s.startswith(QUOTE, i):
            return self._string(i + len(QUOTE))
        if QUOTE.startswith(s[i:]):  # perhaps a delimiter still arriving
            raise _More
        if s[i] == "{":
            return self._object(i + 1)
        if s[i] == "[":
            return self._list(i + 1)
        m = re.compile(r"[^,}\]]*").match(s, i)
        if m.end() == len(s):
            raise _More
        word = m.group(0).strip()
        if word in _WORDS:
            self.out.append(_WORDS[word])
        elif _NUMBER.fullmatch(word):
            self.out.append(json.dumps(json.loads(word)))
        else:
            raise _Malformed(i)
        return m.end()

    def _string(self, i: int) -> int:
        end = self.s.find(QUOTE, i)
        text = self.s[i:] if end < 0 else self.s[i:end]
        if end < 0:  # all but what may be the start of the closing delimiter is settled
            text = text[:len(text) - _partial_suffix(text, QUOTE)]
        self.out.append(json.dumps(text, ensure_ascii=False)[:-1])
        if end < 0:
            raise _More
        self.out.append('"')
        return end + len(QUOTE)

    def _list(self, i: int) -> int:
        self.out.append("[")
        first = True
        while True:
            self._need(i)
            if self.s[i] == "]":
                self.out.append("]")
                return i + 1
            if not first:
                if self.s[i] != ",":
                    raise _Malformed(i)
                self.out.append(", ")
                i += 1
            i = self._value(i)
            first = False


class ToolCallStream:
    """One choice's content, fed as it settles: `feed` gives back (text outside the calls, tool_calls deltas)."""

    def __init__(self):
        self._buffer = ""  # text not yet given back, from the start of the call being read or the held-back tail
        self._call: dict[str, Any] | None = None  # the call being read: its index and arguments sent so far
        self.calls: list[dict[str, Any]] = []  # every call, whole (OpenAI's message form)

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict[str, Any]]]:
        """`text`: what the content adds; `final`: the content is complete (nothing is held back any more)."""
        self._buffer += text
        content, deltas = [], []
        while True:
            if self._call is None:
                start = self._buffer.find(CALL_START)
                if start < 0:
                    keep = 0 if final else _partial_suffix(self._buffer, CALL_START)
                    content.append(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                head = _HEAD.match(self._buffer, len(CALL_START))
                if head is None:
                    rest = self._buffer[len(CALL_START):]
                    if not final and _HEAD_PREFIX.fullmatch(rest):
                        break  # the head is still arriving
                    content.append(CALL_START)  # not a call after all: the marker is text
                    self._buffer = rest
                    continue
                self._open(head.group(1), deltas)
                self._buffer = self._buffer[head.end():]
            if not self._read_arguments(deltas, final):
                break
        return "".join(content), deltas

    def _open(self, name: str, deltas: list[dict[str, Any]]) -> None:
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": ""}}
        self.calls.append(call)
        self._call = {"index": len(self.calls) - 1, "sent": ""}
        deltas.append({"index": self._call["index"], "id": call["id"], "type": "function",
                       "function": {"name": name, "arguments": ""}})

    def _read_arguments(self, deltas: list[dict[str, Any]], final: bool) -> bool:
        """Read the current call's arguments; True when the call is over (the buffer then holds what follows)."""
        reader = _Arguments(self._buffer)
        try:
            arguments, end = reader.read()
        except _Malformed as e:
            arguments, end = "".join(reader.out), None
            self._send(arguments, deltas)
            self._buffer, self._call = self._buffer[e.at:], None  # the call ends where its syntax broke
            return True
        self._send(arguments, deltas)
        if end is None:
            if final:
                self._buffer, self._call = "", None
            return final
        rest = self._buffer[end:]
        if rest.startswith(CALL_END):
            rest = rest[len(CALL_END):]
        elif CALL_END.startswith(rest) and not final:
            return False  # the end marker is still arriving
        self._buffer, self._call = rest, None
        return True

    def _send(self, arguments: str, deltas: list[dict[str, Any]]) -> None:
        call = self._call
        fragment = arguments[len(call["sent"]):]
        if fragment:
            call["sent"] = arguments
            self.calls[call["index"]]["function"]["arguments"] = arguments
            deltas.append({"index": call["index"], "function": {"arguments": fragment}})


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """(the text outside the calls, OpenAI tool_calls) from a whole output: `ToolCallStream` over all of it."""
    stream = ToolCallStream()
    content, _ = stream.feed(text, final=True)
    return content.strip(), stream.calls
