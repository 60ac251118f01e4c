"""From committed canvases to a choice's text: stop tokens, stop strings, reasoning, streaming deltas.

Streaming sends only text that later tokens cannot change, so the deltas add up to the final text exactly:
the decoding of the tokens up to the last one that is not a byte-fallback token (a run of byte tokens is
decoded as a unit, and one bad byte turns the whole run into U+FFFD), less a tail that could still grow
into a stop string, and no reasoning while the `thought` label of a thought channel may still be arriving.
"""

from __future__ import annotations

from bisect import bisect_left

from ..tokenizer import CHANNEL_END, CHANNEL_START, THOUGHT_LABEL, Tokenizer, split_reasoning


class TextDecoder:
    """Decodes generated tokens to (reasoning, content); built once per tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        specials = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        markers = {tokenizer.token_to_id(CHANNEL_START), tokenizer.token_to_id(CHANNEL_END)}
        self._drop = specials - markers  # kept: the channel markers that delimit reasoning
        self._byte_ids = {i for b in range(256) if (i := tokenizer.token_to_id(f"<0x{b:02X}>")) is not None}
        self._pieces: dict[int, str] = {}

    def piece(self, token: int) -> str:
        """One token's own text, special tokens as written (a draft position, as the playground shows it)."""
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._pieces[token]

    def decode(self, tokens: list[int], reasoning: bool, opened: bool = False) -> tuple[str, str]:
        """Completions: ("", text without special tokens). Chat: the thought channel split off as reasoning;
        `opened`: the prompt left the channel open (known from the prompt, so text already streamed as content
        is never taken back as reasoning by a later marker)."""
        if not reasoning:
            return "", self.tokenizer.decode(tokens, skip_special_tokens=True)
        return split_reasoning(self.tokenizer.decode([t for t in tokens if t not in self._drop]), opened)

    def stable_length(self, tokens: list[int]) -> int:
        """How many leading tokens decode to text that no later token changes: up to the last non-byte token."""
        end = len(tokens)
        while end and tokens[end - 1] in self._byte_ids:
            end -= 1
        return end


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
        """What the text adds to what was sent before; until the choice finishes, only its stable part."""
        if self.finished:
            reasoning, content = self.text()
        else:
            stable = self.tokens[:self.decoder.stable_length(self.tokens)]
            reasoning, content = self.decoder.decode(stable, self.reasoning, self.opened)
            hold = max((len(s) - 1 for s in self.stop_strings), default=0)
            content = content[:max(len(content) - hold, 0)]
            reasoning = "" if THOUGHT_LABEL.startswith(reasoning) else reasoning
        sent = [new if new.startswith(old) else old for new, old in zip((reasoning, content), self._sent)]
        deltas = (sent[0][len(self._sent[0]):], sent[1][len(self._sent[1]):])
        self._sent = (sent[0], sent[1])
        return deltas
