"""The app in-process: request timeouts, and the API key checked before anything else."""

from __future__ import annotations

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
