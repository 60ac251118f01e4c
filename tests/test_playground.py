"""The playground page at `/`: served without the API key, self-contained, and its script's protocol code (request
bodies, SSE parsing, the folding of chunks into text) run under node against the real server's streams."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import torch

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.engine.scheduler import Scheduler  # noqa: E402
from dgemma.serve.app import ServeSettings, create_app  # noqa: E402
from dgemma.serve.infill import hole_size  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def model():
    return DiffusionGemma.from_pretrained("tiny")


@pytest.fixture(scope="module")
def http(model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    scheduler = Scheduler(model.model, slots=2, max_len=600, max_queue=4)
    app = create_app(model, scheduler, ServeSettings("tiny", api_key="k"))
    with TestClient(app) as client:
        yield client
    torch.set_num_threads(threads)


def test_the_page_is_served_without_the_key_and_loads_nothing_from_elsewhere(http):
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<title>dgemma playground</title>" in page.text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(|@import""", page.text)  # works offline
    assert '"/v1/chat/completions"' in page.text and '"/v1/completions"' in page.text
    assert http.get("/v1/models").status_code == 401  # the API still needs the key


def test_no_playground_leaves_only_the_api(model):
    scheduler = Scheduler(model.model, slots=1, max_len=600, max_queue=1)
    app = create_app(model, scheduler, ServeSettings("tiny", playground=False))
    with TestClient(app) as client:
        response = client.get("/")
        assert response.status_code == 404 and "error" in response.json()
        assert client.get("/v1/models").status_code == 200


# -- the page's script under node --------------------------------------------------------------------------

HARNESS = """
const fs = require("fs");
const page = require(process.argv[2]);
const input = JSON.parse(fs.readFileSync(0, "utf8"));
if (input.op === "body") {
  process.stdout.write(JSON.stringify(page.requestBody(input.mode, input.settings, input.model, input.input)));
} else {
  const run = page.newRun();
  let buffer = "";
  for (let i = 0; i < input.stream.length; i += 7) {  // arrives in pieces that cut lines and events
    let events;
    [events, buffer] = page.parseSSE(buffer + input.stream.slice(i, i + 7));
    for (const event of events) page.applyEvent(run, event, i);
  }
  run.rest = buffer;
  run.summary = page.summary(run, 2);
  process.stdout.write(JSON.stringify(run));
}
"""


@pytest.fixture(scope="module")
def page_js(http, tmp_path_factory):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = re.search(r"<script>(.*)</script>", http.get("/").text, re.S).group(1)
    folder = tmp_path_factory.mktemp("playground")
    (folder / "page.js").write_text(script)
    (folder / "harness.js").write_text(HARNESS)

    def run(**message):
        out = subprocess.run([node, str(folder / "harness.js"), str(folder / "page.js")], input=json.dumps(message),
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    return run


def settings(**given):
    return {"drafts": True, "thinking": False, "stop": "", "max_tokens": "40", "max_denoising_steps": str(STEPS),
            "entropy_bound": "", "t_min": "", "t_max": "", "seed": "7", **given}


def stream_and_whole(http, path, body):
    """The streamed answer to the page's body, and the same request answered in one piece."""
    key = {"Authorization": "Bearer k"}
    streamed = http.post(path, json=body, headers=key)
    assert streamed.status_code == 200, streamed.text
    whole = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return streamed.text, http.post(path, json=whole, headers=key).json()


@pytest.mark.parametrize("suffix", ["", "\n    return total\n"])
def test_a_completion_as_the_page_asks_and_reads_it(http, page_js, model, suffix):
    body = page_js(op="body", mode="completion", settings=settings(), model="tiny",
                   input={"prompt": "def add(a, b):\n", "suffix": suffix})
    assert body["max_tokens"] == 40 and body["seed"] == 7 and "entropy_bound" not in body
    assert body["stream_options"] == {"include_usage": True, "include_drafts": True}
    assert ("suffix" in body) == bool(suffix)
    stream, whole = stream_and_whole(http, "/v1/completions", body)
    run = page_js(op="parse", stream=stream)
    assert run["done"] and run["error"] is None and run["rest"] == ""
    assert run["content"] == whole["choices"][0]["text"] and run["finish"] == whole["choices"][0]["finish_reason"]
    assert run["usage"] == whole["usage"]
    assert run["drafts"] == whole["usage"]["decoder_passes"]  # a live canvas per denoising pass
    draft = run["draft"]
    width = len(draft["pieces"])
    assert len(draft["accepted_mask"]) == width and sum(draft["accepted_mask"]) == draft["accepted"]
    c = model.config.canvas_length
    assert width == (hole_size(40, len(model.tokenizer.encode(suffix, add_bos=False)), c) if suffix else c)
    assert run["summary"].startswith(f"{whole['usage']['completion_tokens']} tokens · ")


def test_a_chat_turn_with_thinking_and_a_stop_string(http, page_js):
    messages = [{"role": "user", "content": "Name a colour."}]
    body = page_js(op="body", mode="chat", settings=settings(thinking=True, stop=r"a\nb", drafts=False),
                   model="tiny", input={"messages": messages})
    assert body["chat_template_kwargs"] == {"enable_thinking": True} and body["stop"] == ["a\nb"]
    assert body["stream_options"] == {"include_usage": True}
    stream, whole = stream_and_whole(http, "/v1/chat/completions", body)
    run = page_js(op="parse", stream=stream)
    message = whole["choices"][0]["message"]
    assert run["content"] == message["content"] and run["reasoning"] == (message["reasoning_content"] or "")
    assert run["drafts"] == 0 and run["usage"] == whole["usage"]


def test_an_error_event_in_the_stream_is_what_the_page_shows(page_js):
    stream = 'data: {"choices": [{"index": 0, "text": "so far", "finish_reason": null}]}\n\n' \
             'data: {"error": {"message": "the generation did not finish within 1 s", "code": "timeout"}}\n\n'
    run = page_js(op="parse", stream=stream)
    assert run["content"] == "so far" and run["error"] == "the generation did not finish within 1 s"
    assert not run["done"]
