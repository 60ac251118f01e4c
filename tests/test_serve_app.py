"""The app in-process: request timeouts, and the API key checked before anything else."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.engine.scheduler import Scheduler  # noqa: E402
from dgemma.serve.app import ServeSettings, create_app  # noqa: E402


@pytest.fixture(scope="module")
def http():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = DiffusionGemma.from_pretrained("tiny")
    scheduler = Scheduler(model.model, slots=2, max_len=600, max_queue=4)
    app = create_app(model, scheduler, ServeSettings("tiny", api_key="k", timeout_s=0.2))
    with TestClient(app, headers={"Authorization": "Bearer k"}) as client:
        client.scheduler = scheduler
        yield client
    torch.set_num_threads(threads)


SLOW = {"model": "tiny", "prompt": "slow", "max_tokens": 512, "max_denoising_steps": 256, "seed": 0}


def test_a_request_past_its_timeout_gets_504_and_frees_its_slot(http):
    response = http.post("/v1/completions", json=SLOW)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    deadline = time.monotonic() + 2
    while http.scheduler.active_requests:
        assert time.monotonic() < deadline, "the timed-out request still holds its slot"
        time.sleep(0.01)


def test_a_stream_past_its_timeout_ends_with_an_error_event(http):
    text = http.post("/v1/completions", json={**SLOW, "stream": True}).text
    assert text.rstrip().endswith('"code": "timeout"}}') and "[DONE]" not in text


def test_the_api_key_is_checked_before_the_body(http):
    response = http.post("/v1/completions", content=b"{oops", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401
    response = http.post("/v1/completions", json={**SLOW, "temperature": 0.7})
    assert response.status_code == 400 and "set t_min and t_max" in response.json()["error"]["message"]


@pytest.mark.parametrize("extra, status, param, message", [
    # the engine allocated a history of this many canvases: a 500 with torch's error, or all the memory
    ({"stability_threshold": 2**62}, 400, "stability_threshold",
     "stability_threshold is 4611686018427387904; this server allows at most 256"),
    # an empty stop string matched at once: every completion came back empty
    ({"stop": ""}, 400, "stop", "stop: String should have at least 1 character"),
])
def test_settings_the_engine_cannot_take_are_400_and_the_engine_keeps_running(http, extra, status, param, message):
    response = http.post("/v1/completions", json={**SLOW, **extra})
    assert response.status_code == status
    assert response.json()["error"]["param"] == param and response.json()["error"]["message"] == message
    assert http.get("/health").json() == {"status": "ok"}


def test_the_frameworks_own_errors_carry_an_error_code(http):
    """Unknown routes, wrong methods, an undecodable body and a body that outgrows the limit while it is read
    (no Content-Length) answer with a code, like the server's own errors."""
    assert http.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert http.get("/v1/completions").json()["error"]["code"] == "method_not_allowed"
    response = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\xff"}',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": "the request body could not be read as JSON (is it UTF-8?)",
                                        "type": "invalid_request_error", "param": None, "code": "invalid_json"}

    def chunks():
        for _ in range(1100):  # past the default 1 MiB
            yield b" " * 1024

    response = http.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("field", ["prompt", "suffix"])
def test_text_with_a_lone_surrogate_is_a_400(http, field):
    """JSON can carry half of a UTF-16 pair; the tokenizer cannot take it (it raised a TypeError: a 500)."""
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, field: "a\\ud800b"}
    content = "{" + ", ".join(f'"{k}": ' + (f'"{v}"' if isinstance(v, str) else str(v)) for k, v in body.items()) + "}"
    response = http.post("/v1/completions", content=content.encode(), headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == field and "not valid Unicode: surrogates not allowed at character 1" in error["message"]


@pytest.mark.parametrize("extra, message", [
    ({"t_min": 0, "t_max": 1e-40}, "t_max must lie in [1e-06, 1e+06], got 1e-40"),  # came back empty, with a 200
    ({"t_min": 1e38, "t_max": 1e39}, "t_max must lie in [1e-06, 1e+06], got 1e+39"),
    ({"n": 7}, "7 requests submitted together; this server holds at most 6 at once (2 slots and a queue of 4)"),
])
def test_requests_the_server_can_never_run_are_400_not_busy(http, extra, message):
    """Out-of-range temperatures, and more choices than slots and queue together (that was a 429 with
    Retry-After, which a client would retry for ever)."""
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 4, **extra})
    assert response.status_code == 400 and message in response.json()["error"]["message"]


def test_an_infill_completion_ends_at_the_filler():
    """A model trained to pad the hole writes the filler after its completion: infill jobs stop there (finish
    reason "stop", the filler's tail not counted); plain completions do not."""
    from dgemma.serve.jobs import JobBuilder, Limits
    from dgemma.serve.output import ChoiceOutput, TextDecoder
    from dgemma.serve.protocol import CompletionRequest
    from dgemma.tokenizer import FILL_TOKEN

    model = DiffusionGemma.from_pretrained("tiny")
    jobs, tok = JobBuilder(model, "tiny", Limits()), model.tokenizer
    fill = tok.token_to_id(FILL_TOKEN)
    infill = jobs.completion(CompletionRequest(model="tiny", prompt="a = ", suffix="\nb = 2", max_tokens=8, seed=0))
    plain = jobs.completion(CompletionRequest(model="tiny", prompt="a = ", max_tokens=8, seed=0))
    assert infill.hole_end_ids == {fill} and plain.hole_end_ids == frozenset()
    out = ChoiceOutput(TextDecoder(tok), set(jobs.stop_ids) | infill.hole_end_ids, [], False, tok.pad_id, 8)
    out.add_canvas(tok.encode("12", add_bos=False) + [fill] * 6 + [50] * 24, passes=3)
    assert out.finish_reason == "stop" and out.text() == ("", "12") and out.completion_tokens == 3


def test_the_served_name_is_the_model_directorys_even_for_dot(tmp_path, monkeypatch):
    from dgemma.cli.serve import served_name

    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert served_name(".") == "my-model"  # was '' (clients had to send "model": "")
    assert served_name(str(tmp_path / "my-model") + "/") == "my-model"
    assert served_name("dgemma-code-tiny") == "dgemma-code-tiny"
    assert served_name(".", "custom") == "custom"


def test_a_model_is_retrieved_by_id_and_no_op_openai_fields_are_taken(http):
    """`client.models.retrieve` (GET /v1/models/{id}), and fields clients send at their defaults (`echo: false`,
    `logprobs: null`); other values of them are refused."""
    card = http.get("/v1/models/tiny").json()
    assert card["id"] == "tiny" and card["object"] == "model"
    missing = http.get("/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    base = {"model": "tiny", "prompt": "x", "max_tokens": 4, "seed": 0, "max_denoising_steps": 1}  # within 0.2 s
    plain = http.post("/v1/completions", json=base).json()["choices"][0]["text"]
    explicit = http.post("/v1/completions", json={**base, "echo": False, "logprobs": None, "suffix": None})
    assert explicit.status_code == 200 and explicit.json()["choices"][0]["text"] == plain
    for field, value in (("echo", True), ("logprobs", 2)):
        response = http.post("/v1/completions", json={**base, field: value})
        assert response.status_code == 400 and response.json()["error"]["param"] == field
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 0,
            "max_denoising_steps": 1}
    assert http.post("/v1/chat/completions", json={**chat, "logprobs": False}).status_code == 200
    assert http.post("/v1/chat/completions", json={**chat, "logprobs": True}).status_code == 400


def test_a_batch_form_holding_one_prompt_is_that_prompt(http):
    base = {"model": "tiny", "max_tokens": 4, "seed": 0, "max_denoising_steps": 1}
    plain = http.post("/v1/completions", json={**base, "prompt": "x"}).json()["choices"][0]["text"]
    assert http.post("/v1/completions", json={**base, "prompt": ["x"]}).json()["choices"][0]["text"] == plain
    ids = DiffusionGemma.from_pretrained("tiny").tokenizer.encode("x")
    assert http.post("/v1/completions", json={**base, "prompt": [ids]}).json()["choices"][0]["text"] == plain
    several = http.post("/v1/completions", json={**base, "prompt": ["x", "y"]})
    assert several.status_code == 400 and several.json()["error"]["param"] == "prompt"
    assert "2 prompts in one request are not supported" in several.json()["error"]["message"]


def test_stream_options_need_stream(http):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 4, "stream_options": {"include_usage": True}}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"
    assert "only allowed with stream: true" in response.json()["error"]["message"]


def test_with_include_usage_every_chunk_has_a_usage_field_null_until_the_last(http):
    body = {"model": "tiny", "prompt": "x", "max_tokens": 8, "seed": 0, "max_denoising_steps": 1, "stream": True,
            "stream_options": {"include_usage": True}}
    lines = http.post("/v1/completions", json=body).text.split("\n\n")
    chunks = [json.loads(line[len("data: "):]) for line in lines if line.startswith("data: {")]
    assert [c["usage"] for c in chunks[:-1]] == [None] * (len(chunks) - 1) and len(chunks) >= 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    plain = http.post("/v1/completions", json={**body, "stream_options": None}).text
    assert '"usage"' not in plain


def test_stopping_the_engine_answers_the_requests_in_flight_and_new_ones_with_503():
    """What Ctrl-C / SIGTERM does first (`EngineServer.handle_exit`): requests running or queued end at once with a
    503 (an error event in a stream); a request that arrives afterwards gets a 503 too."""
    import threading

    model = DiffusionGemma.from_pretrained("tiny")
    scheduler = Scheduler(model.model, slots=1, max_len=600, max_queue=2)
    with TestClient(create_app(model, scheduler, ServeSettings("tiny"))) as client:
        answers = {}

        def ask(name, stream):
            answers[name] = client.post("/v1/completions", json={**SLOW, "stream": stream})

        threads = [threading.Thread(target=ask, args=(name, name == "streamed")) for name in ("plain", "streamed")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while scheduler.active_requests + scheduler.queue_depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        scheduler.stop()
        for t in threads:
            t.join()
        late = client.post("/v1/completions", json=SLOW)
    plain = answers["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down"
    assert answers["streamed"].text.rstrip().endswith('"code": "shutting_down"}}')
    assert late.status_code == 503 and "the server is shutting down" in late.json()["error"]["message"]


def test_metrics_count_the_tokens_clients_get(http):
    def generated() -> float:
        line = next(l for l in http.get("/metrics").text.splitlines() if l.startswith("dgemma_generated_tokens_total"))
        return float(line.split()[-1])

    before = generated()
    body = {"model": "tiny", "prompt": "x", "max_tokens": 5, "seed": 0, "max_denoising_steps": 1}
    usage = http.post("/v1/completions", json=body).json()["usage"]  # a 32-token canvas, 5 tokens kept
    assert generated() - before == usage["completion_tokens"] <= 5
