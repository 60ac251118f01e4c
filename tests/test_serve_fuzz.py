"""Fuzzing the HTTP API with generated bodies: whatever arrives, the answer is never a 5xx, every error has
the OpenAI shape, and every stream ends with `[DONE]`. In-process (Starlette's TestClient re-raises any
exception the app lets through), with small limits so valid requests stay cheap."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.engine.scheduler import Scheduler  # noqa: E402
from dgemma.serve.app import ServeSettings, create_app  # noqa: E402
from dgemma.serve.jobs import Limits  # noqa: E402

EXAMPLES = 80


@pytest.fixture(scope="module")
def http():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = DiffusionGemma.from_pretrained("tiny")
    limits = Limits(prompt_tokens=64, max_tokens=64, n=2, denoising_steps=4)
    scheduler = Scheduler(model.model, slots=4, max_len=96, max_queue=32)
    app = create_app(model, scheduler, ServeSettings("tiny", max_body_bytes=4096, timeout_s=30, limits=limits))
    with TestClient(app) as client:
        yield client
    torch.set_num_threads(threads)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8)


def _mostly(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Usually a value of the field's type (sometimes out of range), one time in ten any JSON at all."""
    return st.integers(0, 9).flatmap(lambda k: json_value if k == 0 else strategy)


COMMON = {
    "max_tokens": _mostly(st.integers(1, 70)),
    "n": _mostly(st.integers(1, 2)),
    "stop": _mostly(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5)),
    "seed": _mostly(st.integers(-(2**63), 2**64 - 1)),
    "stream": _mostly(st.booleans()),
    "stream_options": _mostly(st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                  "include_drafts": st.booleans()})),
    "max_denoising_steps": _mostly(st.integers(1, 4)),
    "entropy_bound": _mostly(st.floats(0, 3)),
    "t_min": _mostly(st.floats(0, 1)),
    "t_max": _mostly(st.floats(0.5, 2)),
    "stability_threshold": _mostly(st.integers(0, 3)),
    "confidence_threshold": _mostly(st.floats(0, 1)),
}
COMPLETION = {**COMMON, "suffix": _mostly(st.text(max_size=40))}
CHAT = {**COMMON,
        "max_completion_tokens": _mostly(st.integers(1, 70)),
        "enable_thinking": _mostly(st.booleans()),
        "chat_template_kwargs": _mostly(st.dictionaries(st.sampled_from(["enable_thinking", "x"]),
                                                        json_value, max_size=2))}
MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": _mostly(st.sampled_from(["system", "developer", "user", "assistant"]))},
    optional={"content": _mostly(st.text(max_size=30) | st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2))}),
    min_size=1, max_size=3)


def _bodies(required: dict, optional: dict) -> st.SearchStrategy:
    """Bodies with the required fields (mostly) present, any of the optional ones, rarely an unknown one."""
    unknown = st.integers(0, 9).flatmap(lambda k: st.dictionaries(st.text(max_size=6), json_value, min_size=1,
                                                                  max_size=1) if k == 0 else st.just({}))
    known = st.fixed_dictionaries({"model": _mostly(st.just("tiny")), **required}, optional=optional)
    return st.builds(lambda k, u: {**u, **k}, known, unknown)


def _check(response) -> None:
    assert response.status_code < 500, response.text
    hypothesis.event(f"status {response.status_code}")
    if response.status_code >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert set(error) == {"message", "type", "param", "code"}
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-300:]
    elif response.request.url.path.endswith("completions"):
        assert response.json()["choices"]


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(body=_bodies({"prompt": _mostly(st.text(max_size=80) | st.lists(st.integers(-3, 600), max_size=12))},
                    COMPLETION))
def test_fuzzed_completions(http, body):
    _check(http.post("/v1/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(body=_bodies({"messages": _mostly(MESSAGES)}, CHAT))
def test_fuzzed_chat_completions(http, body):
    _check(http.post("/v1/chat/completions", content=json.dumps(body), headers={"Content-Type": "application/json"}))


@FUZZ
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/nope", "/health"]),
       method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), raw=st.binary(max_size=64),
       content_type=st.sampled_from(["application/json", "text/plain", "multipart/form-data", ""]))
def test_fuzzed_raw_requests(http, path, method, raw, content_type):
    _check(http.request(method, path, content=raw, headers={"Content-Type": content_type} if content_type else {}))
