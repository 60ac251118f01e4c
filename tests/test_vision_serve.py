"""Images in chat completions: a live server with the openai client, the bad inputs (400s), and `dgemma batch`."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import write_picture

import dgemma
from dgemma.cli import main
from dgemma.tokenizer import split_reasoning

pytest.importorskip("fastapi")
pytest.importorskip("PIL")
openai = pytest.importorskip("openai")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from dgemma.engine.scheduler import Scheduler  # noqa: E402
from dgemma.serve.app import ServeSettings, create_app  # noqa: E402
from dgemma.serve.jobs import Limits  # noqa: E402
from dgemma.media.sources import MediaPolicy  # noqa: E402
from dgemma.processor import MediaLimits  # noqa: E402

STEPS = 3


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(*urls: str, text: str = "What is shown?", kind: str = "image_url") -> list[dict]:
    return [{"role": "user", "content": [*({"type": kind, kind: {"url": u}} for u in urls),
                                         {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    return write_picture(tmp_path_factory.mktemp("pictures") / "a.png")


def expected_answer(model_dir, messages, seed: int, max_tokens: int) -> tuple[str, int]:
    """(content, image tokens) of the Python API for the same request."""
    model = dgemma.DiffusionGemma.from_pretrained(model_dir)
    tok = model.tokenizer
    inputs = model.processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    stops = set(model.generation_config.eos_token_id) | set(tok.stop_ids)
    out = model.generate(**inputs, max_new_tokens=max_tokens, max_denoising_steps=STEPS, seed=seed,
                         eos_token_id=sorted(stops))
    kept = []
    for t in out.sequences[0, inputs["input_ids"].shape[1]:].tolist()[:max_tokens]:
        if t in stops:
            break
        kept.append(t)
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special} - {100, 101}
    return split_reasoning(tok.decode([t for t in kept if t not in specials]))[1], \
        int((inputs["mm_token_type_ids"] > 0).sum())


@pytest.fixture(scope="module")
def server(vision_model_dir, tmp_path_factory):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    media_dir = tmp_path_factory.mktemp("served-media")
    cmd = [sys.executable, "-m", "dgemma", "serve", "--model", str(vision_model_dir), "--port", str(port),
           "--max-slots", "2", "--max-tokens", "64", "--max-prompt-tokens", "1024", "--log-level", "warning",
           "--device", "cpu", "--allowed-local-media-path", str(media_dir)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not come up within 90 s"
        time.sleep(0.2)
    yield url, media_dir
    proc.terminate()
    proc.wait(timeout=20)


def test_openai_client_with_a_data_url_image(server, vision_model_dir, picture):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    messages = image_message(data_url(picture))
    answer = client.chat.completions.create(model=str(vision_model_dir).rstrip("/").split("/")[-1], messages=messages,
                                            max_tokens=16, seed=3, extra_body={"max_denoising_steps": STEPS})
    content, image_tokens = expected_answer(vision_model_dir, messages, 3, 16)
    assert answer.choices[0].message.content == content
    assert answer.usage.model_dump()["prompt_tokens_details"]["image_tokens"] == image_tokens == 252  # the default budget of 280


def test_local_paths_only_under_the_allowed_folder(server, vision_model_dir, picture):
    url, media_dir = server
    name = str(vision_model_dir).rstrip("/").split("/")[-1]
    (media_dir / "a.png").write_bytes(picture.read_bytes())
    body = {"model": name, "max_tokens": 8, "max_denoising_steps": STEPS, "seed": 1}
    ok = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                    json={**body, "messages": image_message(str(media_dir / "a.png"))})
    assert ok.status_code == 200, ok.text
    refused = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                         json={**body, "messages": image_message(str(picture))})
    assert refused.status_code == 400 and "outside the allowed folder" in refused.json()["error"]["message"]


@pytest.fixture(scope="module")
def http(vision_model_dir):
    model = dgemma.DiffusionGemma.from_pretrained(vision_model_dir)
    limits = Limits(prompt_tokens=1024, media=MediaLimits(max_items=2, max_pixels=40_000, max_bytes=200_000,
                                                          policy=MediaPolicy(allow_local=False)))
    name = str(vision_model_dir).rstrip("/").split("/")[-1]
    app = create_app(model, Scheduler(model.model, slots=2, max_len=1200, max_queue=4), ServeSettings(name, limits=limits))
    with TestClient(app) as client:
        client.model_name = name
        yield client


def _png(w, h, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), "white").save(buf, "PNG")
    return buf.getvalue()


def _url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize("messages,message", [
    (image_message(_url(_png(64, 64)[:70])), "corrupt or truncated"),
    (image_message(_url(b"GIF89a not really")), "unsupported format"),
    (image_message(_url(_png(300, 300))), "over the limit of 40000 pixels"),
    (image_message(*[_url(_png(8, 8))] * 3), "3 images and videos in one request are over the limit of 2"),
    (image_message("https://example.com/a.png"), "host 'example.com' is not allowed"),
    (image_message("/etc/hostname"), "local media paths are not allowed"),
    (image_message("data:image/png;base64,%%%"), "not valid base64"),
    (image_message(_url(b"\x00" * 300_000)), "over the limit of 200000 bytes"),
    (image_message(_url(b"\x00" * 64, "video/mp4"), kind="video_url"), "cannot decode video"),
])
def test_bad_media_get_400_with_openai_error_json(http, messages, message):
    response = http.post("/v1/chat/completions", json={"model": http.model_name, "messages": messages,
                                                       "max_tokens": 8})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["param"] == "messages" and error["type"] == "invalid_request_error"


def test_decompression_bomb_gets_400(http, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    response = http.post("/v1/chat/completions", json={"model": http.model_name, "max_tokens": 8,
                                                       "messages": image_message(_url(_png(30, 30)))})
    assert response.status_code == 400 and "decompression bomb" in response.json()["error"]["message"]


def test_n_choices_share_one_tower_run(http, picture, monkeypatch):
    from dgemma.model.model import DiffusionGemmaModel

    calls = []
    real = DiffusionGemmaModel.image_features
    monkeypatch.setattr(DiffusionGemmaModel, "image_features", lambda self, *a: calls.append(1) or real(self, *a))
    response = http.post("/v1/chat/completions", json={"model": http.model_name, "max_tokens": 8, "n": 2, "seed": 0,
                                                       "max_denoising_steps": STEPS,
                                                       "messages": image_message(data_url(picture))})
    assert response.status_code == 200 and len(response.json()["choices"]) == 2 and calls == [1]


def test_text_only_server_refuses_an_image(picture):
    model = dgemma.DiffusionGemma.from_pretrained("tiny")
    app = create_app(model, Scheduler(model.model, slots=1, max_len=600, max_queue=1), ServeSettings("tiny"))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 8,
                                                             "messages": image_message(data_url(picture))})
    assert response.status_code == 400 and "no vision tower" in response.json()["error"]["message"]


def test_batch_fails_the_bad_line_and_runs_the_rest(vision_model_dir, picture, tmp_path, capsys):
    name = str(vision_model_dir).rstrip("/").split("/")[-1]
    body = {"model": name, "max_tokens": 8, "max_denoising_steps": STEPS, "seed": 0}
    lines = [{"custom_id": "good", "url": "/v1/chat/completions",
              "body": {**body, "messages": image_message(data_url(picture))}},
             {"custom_id": "bad", "url": "/v1/chat/completions",
              "body": {**body, "messages": image_message(_url(b"not an image"))}},
             {"custom_id": "text", "url": "/v1/chat/completions",
              "body": {**body, "messages": [{"role": "user", "content": "hi"}]}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--model",
                 str(vision_model_dir), "--device", "cpu", "--max-slots", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "1 of 3 requests failed" in err and "Traceback" not in err
    out = {json.loads(line)["custom_id"]: json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()}
    good = out["good"]["response"]["body"]
    assert out["good"]["response"]["status_code"] == 200
    assert good["usage"]["prompt_tokens_details"] == {"image_tokens": 252}
    assert good["choices"][0]["message"]["content"] == expected_answer(vision_model_dir, lines[0]["body"]["messages"],
                                                                       0, 8)[0]
    assert out["bad"]["response"]["status_code"] == 400
    assert "unsupported format" in out["bad"]["response"]["body"]["error"]["message"]
    assert out["text"]["response"]["status_code"] == 200
