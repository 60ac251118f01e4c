"""Gemma 4 tool calls without a model: the chat template's rendering of tools, calls and results (in the official
template's order), and reading calls from text that arrives in pieces."""

from __future__ import annotations

import json
import random

import pytest
from jinja2 import TemplateError

from dgemma.serve.tool_grammar import CALL_END, CALL_START, QUOTE
from dgemma.serve.tool_parser import ToolCallStream, parse_tool_calls
from dgemma.shipped import resolve
from dgemma.tokenizer import Tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}
DECLARATION = ('<|tool>declaration:get_weather{description:<|"|>Weather<|"|>,parameters:{properties:{'
               'city:{type:<|"|>STRING<|"|>},days:{type:<|"|>INTEGER<|"|>}},required:[<|"|>city<|"|>],'
               'type:<|"|>OBJECT<|"|>}}<tool|>')
HEAD = f"<bos><|turn>system\n{DECLARATION}<turn|>\n<|turn>user\nweather?<turn|>\n<|turn>model\n"
CALLED = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
RESULT = '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(resolve("dgemma-code-tiny")[1])


def _render(tok, messages, **kw):
    return tok.apply_chat_template([{"role": "user", "content": "weather?"}, *messages], tools=[WEATHER],
                                   add_generation_prompt=True, **kw)


def test_results_come_after_the_calls_and_before_the_content(tok):
    """As Google's Gemma 4 template: calls, then the results of the tool messages that follow, then the content."""
    messages = [{"role": "assistant", "content": "Checking.", "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert _render(tok, messages) == f"{HEAD}{CALLED}{RESULT}Checking.<turn|>\n"


def test_a_turn_with_results_and_no_content_stays_open_for_the_model(tok):
    messages = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    assert _render(tok, messages) == f"{HEAD}{CALLED}{RESULT}"
    assert _render(tok, messages, enable_thinking=True) == (
        HEAD.replace("system\n", "system\n<|think|>\n") + f"{CALLED}{RESULT}<|channel>thought\n")


def test_calls_without_results_end_with_the_response_marker(tok):
    assert _render(tok, [{"role": "assistant", "content": None, "tool_calls": [CALL]}]) == (
        f"{HEAD}{CALLED}<|tool_response>")


def test_an_answer_after_results_shares_the_model_turn(tok):
    messages = [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                {"role": "assistant", "content": "It is sunny."}, {"role": "user", "content": "thanks"}]
    assert _render(tok, messages) == (
        f"{HEAD}{CALLED}{RESULT}It is sunny.<turn|>\n<|turn>user\nthanks<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>")


def test_a_tool_message_without_a_call_is_refused(tok):
    with pytest.raises(TemplateError, match="must follow an assistant message with tool_calls"):
        _render(tok, [{"role": "tool", "tool_call_id": "c1", "content": "sunny"}])


# -- reading calls -------------------------------------------------------------------------------------------------

TEXT = (f'Sure. {CALL_START}call:get_weather{{city:{QUOTE}a < b }}{CALL_END}{QUOTE},days:[1,2.50,{{k:null}}],'
        f'ok:true}}{CALL_END}\n{CALL_START}call:get_time{{}}{CALL_END}')


def test_calls_are_read_with_their_arguments_as_json():
    content, calls = parse_tool_calls(TEXT)
    assert content == "Sure." and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": f"a < b }}{CALL_END}", "days": [1, 2.5, {"k": None}],
                                                              "ok": True}
    assert calls[1]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("seed", range(20))
def test_pieces_add_up_to_the_whole_text(seed):
    """Fed in random pieces (as canvases commit), the deltas give the same content and arguments, the name first."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(TEXT)), 8))
    stream, content, calls = ToolCallStream(), "", {}
    for k, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(TEXT)])):
        text, deltas = stream.feed(TEXT[a:b], final=b == len(TEXT))
        content += text
        for d in deltas:
            if d["index"] not in calls:
                assert d["function"]["name"] and d["id"].startswith("call_")  # the first delta of a call names it
                calls[d["index"]] = ""
            calls[d["index"]] += d["function"]["arguments"]
    whole_content, whole_calls = parse_tool_calls(TEXT)
    assert content.strip() == whole_content
    assert list(calls.values()) == [c["function"]["arguments"] for c in whole_calls]


def test_text_that_only_looks_like_a_call_stays_text():
    assert parse_tool_calls(f"a {CALL_START}nope and <|tool") == (f"a {CALL_START}nope and <|tool", [])


def test_a_malformed_call_ends_where_its_syntax_breaks():
    content, calls = parse_tool_calls(f"{CALL_START}call:f{{a:1,b:oops}}{CALL_END} after")
    assert calls[0]["function"]["arguments"] == '{"a": 1, "b": '
    assert content == f"oops}}{CALL_END} after"
