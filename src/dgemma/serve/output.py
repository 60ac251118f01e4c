"""From committed canvases to a choice's text: stop tokens, stop strings, reasoning, streaming deltas.

Streaming sends only text that later tokens cannot change, so the deltas add up to the final text exactly:
the decoding of the tokens up to the last one that is neither a byte-fallback token nor a special token that
decoding drops (a run of byte tokens is decoded as a unit, also across dropped tokens, and one bad byte turns
the whole run into U+FFFD: `settled_length`, the rule `IncrementalDetokenizer` follows), less a tail that could
still grow into a stop string, and no reasoning of a block while its `thought` label may still be arriving.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left

from ..tokenizer import CHANNEL_END, CHANNEL_START, Tokenizer, settled_length, split_reasoning

TOOL_MARKERS = ("<|tool_call>", "<tool_call|>", '<|"|>')  # Gemma 4's call syntax (`serve.tools`)

log = logging.getLogger(__name__)


class TextDecoder:
    """Decodes generated tokens to (reasoning, content); built once per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        specials = frozenset(i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special)
        markers = {tokenizer.token_to_id(t) for t in (CHANNEL_START, CHANNEL_END, *TOOL_MARKERS)}
        # dropped before decoding: every special token for a completion; in chat all but the channel markers,
        # which delimit reasoning, and the tool-call markers (`serve.tools` parses calls from the text)
        self._drop = {False: specials, True: specials - markers}
        self._byte_ids = frozenset(i for b in range(256) if (i := tokenizer.token_to_id(f"<0x{b:02X}>")) is not None)
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        """One token's own text, special tokens as written (a draft position, as the playground shows it)."""
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._pieces[token]

    def _text(self, tokens: list[int], reasoning: bool) -> str:
        drop = self._drop[reasoning]
        return self.tokenizer.decode([t for t in tokens if t not in drop])

    def decode(self, tokens: list[int], reasoning: bool, opened: bool = False) -> tuple[str, str]:
        """Completions: ("", text without special tokens). Chat: the thought channel split off as reasoning;
        `opened`: the prompt left the channel open (known from the prompt, so text already streamed as content
        is never taken back as reasoning by a later marker)."""
        text = self._text(tokens, reasoning)
        return split_reasoning(text, opened) if reasoning else ("", text)

    def settled(self, tokens: list[int], reasoning: bool, opened: bool = False) -> tuple[str, str]:
        """`decode` of the part of the text that no later token changes (what may be streamed): the tokens up to
        `settled_length`, less a trailing U+FFFD (a character still incomplete, as `IncrementalDetokenizer` holds
        it), and without the reasoning of a block whose label may still be arriving."""
        end = settled_length(tokens, self._byte_ids, self._drop[reasoning])
        text = self._text(tokens[:end], reasoning).rstrip("\ufffd")
        return split_reasoning(text, opened, final=False) if reasoning else ("", text)


class ChoiceOutput:
    """One choice as its canvases commit: its first `limit` generated positions up to the first stop token,
    the text cut at the first stop string, and streaming deltas."""

    def __init__(self, decoder: TextDecoder, stop_ids: set[int], stop_strings: list[str], reasoning: bool,
                 pad_id: int, limit: int, opened: bool = False):
        self.decoder, self.stop_ids, self.stop_strings = decoder, stop_ids, stop_strings
        self.reasoning, self.pad_id, self.limit, self.opened = reasoning, pad_id, limit, opened
        self.positions = 0  # generated positions seen, at most `limit`
        self.tokens: list[int] = []
        self.completion_tokens = 0  # generated non-pad tokens, the stop token included
        self.decoder_passes = 0
        self.finish_reason: str | None = None
        self._sent = ("", "")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_canvas(self, tokens: list[int], passes: int) -> None:
        self.decoder_passes += passes
        kept = tokens[:self.limit - self.positions]
        self.positions += len(kept)
        start, counted = len(self.tokens), self.completion_tokens
        for t in kept:
            self.completion_tokens += int(t != self.pad_id)
            if t in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(t)
        if self._stop_string_in(self.tokens):
            self._cut_after_stop_string(start, counted)
            self.finish_reason = "stop"
        elif self.positions == self.limit:
            self.finish_reason = "length"

    def _stop_string_in(self, tokens: list[int]) -> bool:
        return self._stop_string_at(self.decoder.decode(tokens, self.reasoning, self.opened)[1]) is not None

    def _cut_after_stop_string(self, start: int, counted: int) -> None:
        """Keep the tokens up to the one that completes the first stop string (the canvas that just arrived
        holds it), and count only those, as an autoregressive server that stops there would."""
        end = bisect_left(range(start + 1, len(self.tokens) + 1), True,
                          key=lambda n: self._stop_string_in(self.tokens[:n])) + start + 1
        self.completion_tokens = counted + sum(t != self.pad_id for t in self.tokens[start:end])
        del self.tokens[end:]

    def end(self) -> None:
        """The generation ended without a stop: it ran out of tokens."""
        self.finish_reason = self.finish_reason or "length"

    def _stop_string_at(self, content: str) -> int | None:
        hits = [i for i in (content.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def text(self) -> tuple[str, str]:
        """(reasoning, content), content cut before the first stop string."""
        reasoning, content = self.decoder.decode(self.tokens, self.reasoning, self.opened)
        return reasoning, content[:self._stop_string_at(content)]

    def delta(self) -> tuple[str, str]:
        """What the text adds to what was sent before; until the choice finishes, only its settled part."""
        if self.finished:
            reasoning, content = self.text()
        else:
            reasoning, content = self.decoder.settled(self.tokens, self.reasoning, self.opened)
            hold = max((len(s) - 1 for s in self.stop_strings), default=0)
            content = content[:max(len(content) - hold, 0)]
        (r_delta, r_sent), (c_delta, c_sent) = (self._extend(self._sent[0], reasoning, "reasoning"),
                                                self._extend(self._sent[1], content, "content"))
        self._sent = (r_sent, c_sent)
        return r_delta, c_delta

    @staticmethod
    def _extend(sent: str, text: str, part: str) -> tuple[str, str]:
        """(what `text` adds to `sent`, the text sent from now on). Settled text only grows, so `text` starts with
        `sent`; a `text` that is a prefix of `sent` adds nothing yet. Should the two differ, the stream goes on
        from where they part (it never stalls), and the mismatch is logged."""
        if text.startswith(sent):
            return text[len(sent):], text
        if sent.startswith(text):
            return "", sent
        common = len(os.path.commonprefix([sent, text]))
        log.warning("streamed %s no longer matches the decoded text after %d characters (sent %r, now %r)",
                    part, common, sent[common:common + 40], text[common:common + 40])
        return text[common:], text
