"""The server's text layer and infilling canvas, without a server: stop tokens and strings, reasoning, deltas."""

from __future__ import annotations

import string

import pytest
import torch

pytest.importorskip("fastapi")

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.serve.infill import hole_size, infill_canvas  # noqa: E402
from dgemma.serve.jobs import JobBuilder, Limits  # noqa: E402
from dgemma.serve.output import ChoiceOutput, TextDecoder  # noqa: E402
from dgemma.serve.protocol import ChatRequest  # noqa: E402
from dgemma.tokenizer import Tokenizer, byte_tokenizer  # noqa: E402
from dgemma.train.tokenizer import train_tokenizer  # noqa: E402

TOK = byte_tokenizer()
DECODER = TextDecoder(TOK)
# every text is a run of byte tokens in TOK, settled only at the end; in WORDS, ASCII text is in ordinary tokens
WORDS = train_tokenizer([string.printable], vocab_size=800, min_frequency=1)
WORDS_DECODER = TextDecoder(WORDS)
STOPS = {1, 106}
UNUSED = 50  # a special token that decodes to nothing


def ids(text: str, tok=TOK) -> list[int]:
    return tok.encode(text, add_bos=False)


def words(text: str) -> list[int]:
    return ids(text, WORDS)


def choice(stop_strings=(), reasoning=False, limit=1000, decoder=DECODER) -> ChoiceOutput:
    return ChoiceOutput(decoder, STOPS, list(stop_strings), reasoning, pad_id=0, limit=limit)


def test_text_ends_before_the_stop_token_and_counts_it():
    c = choice()
    c.add_canvas(ids("Hello") + [106, 0, 0], passes=3)
    assert c.text() == ("", "Hello") and c.finish_reason == "stop"
    assert c.completion_tokens == 6 and c.decoder_passes == 3


def test_limit_cuts_whole_canvases_to_max_tokens():
    c = choice(limit=7)
    c.add_canvas(ids("abcd"), passes=2)
    assert not c.finished
    c.add_canvas(ids("efgh"), passes=2)
    assert c.text() == ("", "abcdefg") and c.finish_reason == "length" and c.completion_tokens == 7


def test_reasoning_is_split_from_the_answer():
    c = choice(reasoning=True)
    c.add_canvas(ids("<|channel>thought\nLet me think.<channel|>The answer.") + [106], passes=1)
    assert c.text() == ("Let me think.", "The answer.")


@pytest.mark.parametrize("opened, expected", [
    (False, ("", "def foo(): return 1 hello world")),  # a stray closing marker: the streamed content stands
    (True, ("def foo(): return 1", "hello world")),  # the prompt opened the channel: reasoning from the start
])
def test_a_closing_marker_without_an_opener_does_not_take_back_streamed_text(opened, expected):
    """The deltas add up to the final (reasoning, content) also when a `<channel|>` arrives with no opener in the
    output (it used to turn content already streamed into reasoning)."""
    c = ChoiceOutput(WORDS_DECODER, STOPS, [], True, pad_id=0, limit=1000, opened=opened)
    sent = ["", ""]
    for canvas in (words("def foo(): return 1") + [UNUSED], words("<channel|> hello world") + [106]):
        c.add_canvas(canvas, passes=1)
        reasoning, content = c.delta()
        sent = [sent[0] + reasoning, sent[1] + content]
        assert sent[not opened].startswith("def foo()")  # streamed before the marker arrives
    assert c.text() == expected
    assert (sent[0].strip(), sent[1].strip()) == expected


def test_streaming_deltas_hold_back_a_possible_stop_string_and_add_up():
    c = choice(stop_strings=["END"], decoder=WORDS_DECODER)
    c.add_canvas(words("one two E"), passes=1)
    assert c.delta() == ("", "one two")  # " E" could still become " END"
    c.add_canvas(words("Nx three EN"), passes=1)
    assert c.delta() == ("", " ENx three ")
    c.add_canvas(words("D four"), passes=1)
    assert c.finish_reason == "stop"
    assert c.delta() == ("", "") and c.text() == ("", "one two ENx three ")


def test_a_stop_string_ends_the_tokens_and_their_count_at_the_token_that_completes_it():
    """Tokens after the one that completes a stop string are neither kept nor counted in the usage."""
    c = choice(stop_strings=["END"])
    c.add_canvas(ids("one two"), passes=2)
    c.add_canvas(ids(" ENDING here") + [0, 0], passes=3)
    assert c.finish_reason == "stop" and c.text() == ("", "one two ")
    assert c.tokens == ids("one two END") and c.completion_tokens == len(ids("one two END"))
    assert c.decoder_passes == 5


def test_streaming_sends_only_text_later_tokens_cannot_change():
    """A run of byte tokens decodes as a unit: it waits for the next other token (or the end). A special token
    that decoding drops does not end the run (the bytes on either side of it merge)."""
    c = choice(decoder=WORDS_DECODER)
    euro = words("€")  # three byte tokens
    c.add_canvas(words("ab") + euro[:1] + [UNUSED] + euro[1:2], passes=1)
    assert c.delta() == ("", "ab")
    c.add_canvas(euro[2:] + [UNUSED], passes=1)
    assert c.delta() == ("", "")
    c.add_canvas(words("c") + [1], passes=1)
    assert c.delta() == ("", "€c") and c.text() == ("", "ab€c")


def test_byte_tokens_stream_only_at_the_end():
    """With the byte-level tokenizer all text is one run of byte tokens: nothing is settled before the end."""
    c = choice()
    c.add_canvas(ids("ab") + [UNUSED], passes=1)
    assert c.delta() == ("", "")
    c.add_canvas(ids("c") + [1], passes=1)
    assert c.delta() == ("", "abc")


def test_streamed_reasoning_waits_for_the_thought_label():
    c = choice(reasoning=True, decoder=WORDS_DECODER)
    c.add_canvas([100] + words("thou") + [UNUSED], passes=1)
    assert c.delta() == ("", "")
    c.add_canvas(words("ght\nHmm.") + [101, UNUSED] + words("Yes") + [UNUSED], passes=1)
    assert c.delta() == ("Hmm.", "Yes")


def test_only_the_generation_prompt_can_leave_the_thought_channel_open():
    """A `<|channel>` the user writes is in the prompt as the marker's id, but it opens no channel: only markers
    after the last `<|turn>` (the model's turn) count (it used to make the whole answer reasoning)."""
    jobs = JobBuilder(DiffusionGemma.from_pretrained("tiny"), "tiny", Limits())

    def channel_open(text: str, thinking: bool) -> bool:
        body = ChatRequest(model="tiny", messages=[{"role": "user", "content": text}], enable_thinking=thinking)
        return jobs.chat(body).channel_open

    for thinking in (False, True):
        assert not channel_open("What does the <|channel> token mean?", thinking)
    jobs.tokenizer = Tokenizer(TOK.backend, "{{ bos_token }}{% for m in messages %}<|turn>user\n{{ m.content }}"
                                            "<turn|>\n{% endfor %}<|turn>model\n<|channel>thought\n")
    assert channel_open("What does the <channel|> token mean?", False)


def test_infill_canvas_fixes_the_suffix_after_the_hole():
    c, suffix = 32, [300, 301, 302]
    hole = hole_size(max_tokens=10, suffix_tokens=len(suffix), canvas_length=c)
    start = infill_canvas(suffix, hole, c, 512, seed=4, device=torch.device("cpu"))
    assert hole == 10 and start.tokens.shape == start.fixed.shape == (1, c)
    assert start.fixed[0].nonzero().flatten().tolist() == [10, 11, 12]
    assert start.tokens[0, 10:13].tolist() == suffix
    noise = torch.randint(0, 512, (c,), generator=torch.Generator().manual_seed(4))
    free = ~start.fixed[0]
    assert torch.equal(start.tokens[0][free], noise[free])  # the noise the sampler would have drawn
    assert hole_size(max_tokens=100, suffix_tokens=3, canvas_length=c) == 29
