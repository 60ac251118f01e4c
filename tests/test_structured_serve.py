"""Structured output and tool calls through `dgemma serve` (the shipped model, the `openai` client) and `dgemma batch`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

FAST = {"max_denoising_steps": 8}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"},
                                                "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"]}}}


@pytest.fixture(scope="module")
def client(served):
    with served(["--model", "dgemma-code-tiny", "--max-slots", "2", "--device", "cpu"], {"OMP_NUM_THREADS": "1"}) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def test_response_format_json_schema_in_chat_and_completions(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chat = client.chat.completions.create(model="dgemma-code-tiny", messages=[{"role": "user", "content": "who?"}],
                                          response_format=fmt, n=2, seed=1, max_tokens=64, extra_body=FAST)
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    done = client.completions.create(model="dgemma-code-tiny", prompt="def f(x):", seed=2, max_tokens=64,
                                     extra_body={"response_format": fmt, **FAST})
    jsonschema.validate(json.loads(done.choices[0].text), PERSON)


def test_vllm_structured_outputs(client):
    def ask(spec, seed=0):
        r = client.completions.create(model="dgemma-code-tiny", prompt="x =", seed=seed, max_tokens=32,
                                      extra_body={"structured_outputs": spec, **FAST})
        return r.choices[0].text
    assert re.fullmatch(r"[0-9]{2}:[0-9]{2}", ask({"regex": r"[0-9]{2}:[0-9]{2}"}))
    assert ask({"choice": ["left", "right"]}) in ("left", "right")
    assert re.fullmatch(r"(go){1,3}!", ask({"grammar": 'start: "go"{1,3} "!"'}))
    jsonschema.validate(json.loads(ask({"json": PERSON})), PERSON)


def test_streamed_json_adds_up(client):
    stream = client.chat.completions.create(
        model="dgemma-code-tiny", messages=[{"role": "user", "content": "who?"}], stream=True, seed=3, max_tokens=64,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, extra_body=FAST)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_required_and_named_tool_calls(client, choice):
    r = client.chat.completions.create(model="dgemma-code-tiny", messages=[{"role": "user", "content": "weather?"}],
                                       tools=[WEATHER, TIME], tool_choice=choice, seed=4, max_tokens=64,
                                       parallel_tool_calls=False, extra_body=FAST)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    name = call.function.name
    assert name == "get_time" if isinstance(choice, dict) else name in ("get_weather", "get_time")
    schema = (WEATHER if name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_calls_stream_as_deltas_and_history_renders(client):
    stream = client.chat.completions.create(
        model="dgemma-code-tiny", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, stream=True, seed=5, max_tokens=96, extra_body=FAST)
    chunks = [c.choices[0] for c in stream if c.choices]
    deltas = [d for c in chunks for d in c.delta.tool_calls or []]
    first, fragments = deltas[0], [d.function.arguments for d in deltas[1:] if d.index == 0]
    assert first.id and first.type == "function" and first.function.name == "get_weather"  # the name first
    assert len(fragments) > 1 and all(d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(fragments)  # the arguments come in pieces, canvas by canvas, as OpenAI streams them
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].finish_reason == "tool_calls"
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "tool_calls": [{"id": first.id, "type": "function", "function": {
                   "name": first.function.name, "arguments": arguments}}]},
               {"role": "tool", "tool_call_id": first.id, "content": "sunny"}]
    r = client.chat.completions.create(model="dgemma-code-tiny", messages=history, tools=[WEATHER], seed=6,
                                       max_tokens=32, extra_body=FAST)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     'unsupported JSON schema keywords ["not"]'),
    ({"structured_outputs": {"regex": "(a"}}, "invalid regex"),
    ({"structured_outputs": {"choice": []}}, "choice is empty"),
    ({"structured_outputs": {"grammar": "start: " + "(" * 40 + '"a"' + ")" * 40}}, "more than 32 levels deep"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "not a valid JSON schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names the function 'nope'"),
])
def test_bad_structured_requests_are_400(client, extra, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="dgemma-code-tiny", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=16, extra_body={**extra, **FAST})
    assert words in e.value.body["message"]


def test_an_unfinished_constraint_finishes_with_length_and_says_so(client):
    r = client.completions.create(model="dgemma-code-tiny", prompt="x", seed=0, max_tokens=16,
                                  extra_body={"structured_outputs": {"regex": "[a-z]{200}"}, **FAST})
    assert r.choices[0].finish_reason == "length"
    assert "before the output matched its constraint" in r.choices[0].model_extra["incomplete_reason"]


def test_batch_answers_structured_lines(tmp_path):
    lines = [{"custom_id": "a", "url": "/v1/chat/completions", "body": {
                 "model": "dgemma-code-tiny", "messages": [{"role": "user", "content": "who"}], "seed": 1,
                 "max_tokens": 64, "response_format": {"type": "json_schema", "json_schema": {"name": "p",
                                                                                              "schema": PERSON}},
                 **FAST}},
             {"custom_id": "b", "url": "/v1/chat/completions", "body": {
                 "model": "dgemma-code-tiny", "messages": [{"role": "user", "content": "w"}], "tools": [WEATHER],
                 "tool_choice": "required", "seed": 2, "max_tokens": 64, **FAST}},
             {"custom_id": "c", "url": "/v1/completions", "body": {
                 "model": "dgemma-code-tiny", "prompt": "x", "structured_outputs": {"choice": []}}}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    subprocess.run([sys.executable, "-m", "dgemma", "batch", "--input", str(src), "--output", str(out), "--model",
                    "dgemma-code-tiny"], check=False, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600,
                   capture_output=True)
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    body = got["a"]["response"]["body"]
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), PERSON)
    call = got["b"]["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert got["c"]["response"]["status_code"] == 400
