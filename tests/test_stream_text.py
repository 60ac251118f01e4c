"""Streamed text adds up to the final text: `ChoiceOutput` deltas (the server's streams and `dgemma chat`) and
`IncrementalDetokenizer` pieces, on canvases of byte-fallback tokens, special tokens, channel markers and words."""

from __future__ import annotations

import logging
import random
import string

import pytest

from dgemma.serve.output import ChoiceOutput, TextDecoder
from dgemma.tokenizer import IncrementalDetokenizer
from dgemma.train.tokenizer import train_tokenizer

TOK = train_tokenizer([string.printable], vocab_size=800, min_frequency=1)  # ASCII in words, the rest in bytes
DECODER = TextDecoder(TOK)
PAD, EOS, FILL, UNUSED, THINK, OPEN, CLOSE, TURN_END = 0, 1, 4, 50, 98, 100, 101, 106


def ids(text: str) -> list[int]:
    return TOK.encode(text, add_bos=False)


def byte(b: int) -> int:
    return TOK.token_to_id(f"<0x{b:02X}>")


def run(canvases: list[list[int]], reasoning: bool, opened: bool = False, stop_strings=()):
    """(what the deltas add up to, the final text, whether anything was sent before the end)."""
    c = ChoiceOutput(DECODER, {EOS, TURN_END}, list(stop_strings), reasoning, pad_id=PAD, limit=10**6, opened=opened)
    sent, early = ["", ""], False
    for canvas in canvases:
        if c.finished:
            break
        c.add_canvas(canvas, passes=1)
        reasoning_delta, content_delta = c.delta()
        early = early or bool(reasoning_delta or content_delta) and not c.finished
        sent = [sent[0] + reasoning_delta, sent[1] + content_delta]
    c.end()
    reasoning_delta, content_delta = c.delta()
    return (sent[0] + reasoning_delta, sent[1] + content_delta), c.text(), early


@pytest.mark.parametrize("reasoning", [False, True])
def test_a_dropped_special_token_inside_a_byte_run_does_not_end_the_stream(reasoning):
    """decode drops `<unused50>`, so the bytes on either side of it make one character: "€" (it used to stream
    as "��" and then nothing more)."""
    euro = [byte(0xE2), byte(0x82), UNUSED, byte(0xAC)]
    streamed, final, _ = run([euro, ids(" hello") + [EOS]], reasoning)
    assert streamed == final == ("", "€ hello")


def test_channel_markers_between_byte_runs_in_a_completion():
    """A completion drops the channel markers too: the byte runs around them merge."""
    canvases = [[byte(0xE2), OPEN, byte(0x82)], [CLOSE, byte(0xAC)] + ids(" ok"), [EOS]]
    streamed, final, _ = run(canvases, reasoning=False)
    assert streamed == final == ("", "€ ok")


def test_the_label_of_a_later_thought_block_is_held_until_it_is_known():
    canvases = [ids("<|channel>thought\nPlan A<channel|>Answer one.<|channel>"), ids("thought"),
                ids("\nPlan B<channel|> Answer two.") + [TURN_END]]
    streamed, final, _ = run(canvases, reasoning=True)
    assert streamed == final == ("Plan A\nPlan B", "Answer one. Answer two.")


def test_a_stream_that_no_longer_matches_goes_on_and_says_so(caplog):
    """Should settled text ever change, the stream resumes from where it differs instead of stalling."""
    class Wrong(TextDecoder):
        def settled(self, tokens, reasoning, opened=False):
            return "", "\ufffd\ufffd"

    c = ChoiceOutput(Wrong(TOK), {EOS}, [], False, pad_id=PAD, limit=100)
    c.add_canvas(ids("ab"), passes=1)
    assert c.delta() == ("", "\ufffd\ufffd")
    c.add_canvas(ids(" cd") + [EOS], passes=1)
    with caplog.at_level(logging.WARNING, logger="dgemma.serve.output"):
        assert c.delta() == ("", "ab cd")
    assert "no longer matches" in caplog.text


PIECES = [*(ids(w) for w in ("thou", "ght", "thought", "\n", " hello", "Plan", " ", "END", "x")),
          *([byte(b)] for b in "€é🚀".encode()), [byte(0xFF)], [byte(0x80)],
          [UNUSED], [PAD], [FILL], [THINK], [OPEN], [CLOSE], [OPEN, *ids("thought\n")]]


def random_canvases(rng: random.Random) -> list[list[int]]:
    tokens: list[int] = []
    for _ in range(rng.randint(1, 30)):
        tokens += rng.choice(PIECES)
    if rng.random() < 0.5:
        tokens.append(rng.choice([EOS, TURN_END]))
    cuts = sorted(rng.sample(range(1, len(tokens)), min(len(tokens) - 1, rng.randint(0, 8))))
    return [tokens[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])]


@pytest.mark.parametrize("reasoning, opened", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("stop_strings", [(), ("END",)])
def test_streamed_deltas_add_up_to_the_final_text(reasoning, opened, stop_strings):
    rng = random.Random(f"{reasoning}{opened}{stop_strings}")
    streamed_early = 0
    for _ in range(300):
        canvases = random_canvases(rng)
        streamed, final, early = run(canvases, reasoning, opened, stop_strings)
        assert streamed == final, canvases
        streamed_early += early
    assert streamed_early > 50  # it streams, not only at the end


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_incremental_detokenizer_pieces_add_up_to_decode(skip_special_tokens):
    rng = random.Random(skip_special_tokens)
    for _ in range(300):
        canvases = random_canvases(rng)
        detok = IncrementalDetokenizer(TOK, skip_special_tokens=skip_special_tokens)
        text = "".join(detok.add(canvas) for canvas in canvases) + detok.flush()
        assert text == TOK.decode(sum(canvases, []), skip_special_tokens=skip_special_tokens), canvases
