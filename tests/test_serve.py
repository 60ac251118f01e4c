"""`dgemma serve` end to end: the real server in a subprocess, driven by the official `openai` client.

Every generated text is checked against `stream_generate` run here, alone, with the same seed.
"""

from __future__ import annotations

import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from dgemma import DiffusionGemma, split_reasoning  # noqa: E402
from dgemma.engine.generate import stream_generate  # noqa: E402
from dgemma.serve.infill import infill_canvas  # noqa: E402

KEY = "test-key"
STEPS = 4


@pytest.fixture(scope="module")
def server(served):
    """Two slots and a queue of one: three requests fill it."""
    with served(["--model", "tiny", "--max-slots", "2", "--max-queue", "1", "--max-tokens", "256", "--max-n", "2",
                 "--max-prompt-tokens", "512", "--max-denoising-steps", "64", "--max-body-bytes", "65536",
                 "--device", "cpu"], {"DGEMMA_API_KEY": KEY, "OMP_NUM_THREADS": "1"}, wait_s=90) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server computes beside us on a small machine
    yield DiffusionGemma.from_pretrained("tiny")
    torch.set_num_threads(threads)


def _expected(tiny, prompt: list[int], max_tokens: int, seed: int, chat: bool = False, start=None,
              hole: int | None = None) -> tuple[str, str]:
    """(reasoning, text) of `stream_generate` alone: the first `max_tokens` tokens (the hole's, when infilling)
    before the first stop token (or filler, when infilling), decoded as the API presents them."""
    tok = tiny.tokenizer
    stops = set(tiny.generation_config.eos_token_id) | set(tok.stop_ids)
    hole_end = {tok.token_to_id("<|fill|>")} if hole else set()
    gen = tiny.generation_config.updated(max_new_tokens=max_tokens, max_denoising_steps=STEPS,
                                         eos_token_id=sorted(stops))
    *_, result = stream_generate(tiny.model, [prompt], gen, [torch.Generator().manual_seed(seed)], start)
    kept = []
    for t in result.tokens[0][:hole or max_tokens]:
        if t in stops | hole_end:
            break
        kept.append(t)
    if not chat:
        return "", tok.decode(kept, skip_special_tokens=True)
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special} - {100, 101}
    return split_reasoning(tok.decode([t for t in kept if t not in specials]))


def test_health_models_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics").text
    for name in ("dgemma_queue_depth", "dgemma_batch_size", "dgemma_tokens_per_second", "dgemma_passes_per_canvas",
                 "dgemma_request_latency_seconds_bucket"):
        assert name in metrics


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", [2, 300, 301, 302]])
def test_completion_equals_the_request_generated_alone(client, tiny, prompt):
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, seed=7,
                                    extra_body={"max_denoising_steps": STEPS})
    ids = tiny.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    assert out.choices[0].text == _expected(tiny, ids, 40, 7)[1]
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.decoder_passes == 2 * STEPS  # random weights never stop early: 2 canvases of 4 passes
    assert out.usage.tokens_per_forward == out.usage.completion_tokens / (2 * STEPS)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_chat_with_thinking_and_n_choices(client, tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, seed=11, n=2,
                                         extra_body={"max_denoising_steps": STEPS,
                                                     "chat_template_kwargs": {"enable_thinking": True}})
    prompt = tiny.tokenizer.apply_chat_template(messages, enable_thinking=True, tokenize=True)
    assert out.usage.prompt_tokens == len(prompt)
    for i, choice in enumerate(out.choices):  # choice i is the request with seed 11 + i
        reasoning, content = _expected(tiny, prompt, 32, 11 + i, chat=True)
        assert choice.message.content == content
        assert choice.message.reasoning_content == (reasoning or None)


def test_streaming_sends_a_chunk_per_canvas_then_done(client, tiny):
    kwargs = dict(model="tiny", prompt="Once upon a time", max_tokens=96, seed=3,
                  extra_body={"max_denoising_steps": STEPS})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    assert len(finals) <= 3  # a chunk per committed canvas (3 at most); the last one finishes
    assert chunks[-1].usage.decoder_passes == len(finals) * STEPS


def test_streaming_drafts_are_opt_in(client):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=32, seed=1, stream=True,
                                            stream_options={"include_drafts": True},
                                            extra_body={"max_denoising_steps": STEPS})
    drafts = [c.choices[0].draft for c in stream if getattr(c.choices[0], "draft", None)]
    assert [d["step"] for d in drafts] == [1, 2, 3, 4]
    assert all(d["canvas_index"] == 0 and isinstance(d["text"], str) for d in drafts)


def test_infilling_fills_the_hole_before_the_suffix(client, tiny):
    tok, c = tiny.tokenizer, tiny.config.canvas_length
    out = client.completions.create(model="tiny", prompt="def add(a, b):\n", suffix="\n    return total",
                                    max_tokens=10, seed=5, extra_body={"max_denoising_steps": STEPS})
    suffix = tok.encode("\n    return total", add_bos=False)
    start = infill_canvas(suffix, 10, c, 512, 5, torch.device("cpu"))
    expected = _expected(tiny, tok.encode("def add(a, b):\n"), c, 5, start=start, hole=10)[1]
    assert out.choices[0].text == expected
    assert out.usage.completion_tokens <= 10 and out.usage.decoder_passes == STEPS


def test_stop_strings_cut_the_text(client, tiny):
    kwargs = dict(model="tiny", prompt="The sea", max_tokens=64, seed=9, extra_body={"max_denoising_steps": STEPS})
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[6:8]
    out = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert out.text == text[:text.find(stop)] and out.finish_reason == "stop"


@pytest.mark.parametrize("kwargs,param,message", [
    (dict(max_tokens=0), "max_tokens", "greater than or equal to 1"),
    (dict(max_tokens=1000), "max_tokens", "at most 256"),
    (dict(n=3), "n", "at most 2"),
    (dict(extra_body={"t_min": 0.9, "t_max": 0.5}), None, "t_min (0.9) must not exceed t_max (0.5)"),
    (dict(extra_body={"max_denoising_steps": 65}), "max_denoising_steps", "at most 64"),
    (dict(extra_body={"temperature_schedule": "cosine"}), "temperature_schedule", "unknown parameter"),
    (dict(prompt=[2, 9999]), None, "outside the vocabulary"),
    (dict(prompt="x" * 600), "prompt", "at most 512"),
    (dict(suffix="y" * 40), "suffix", "at most 31"),
])
def test_bad_parameters_get_400_with_a_message(client, kwargs, param, message):
    request = {"model": "tiny", "prompt": "hello", "max_tokens": 8, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**request)
    error = e.value.body
    assert e.value.status_code == 400 and message in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_chat_requests(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "function", "content": "x"}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_wrong_or_missing_api_key_gets_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    response = httpx.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


def test_malformed_and_oversized_bodies(server):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server}/v1/completions", content=b"{not json", headers=headers)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    response = httpx.post(f"{server}/v1/completions", content=b"x" * 70000, headers=headers)
    assert response.status_code == 413 and "65536" in response.json()["error"]["message"]


def _gauge(server: str, name: str) -> float:
    line = next(x for x in httpx.get(f"{server}/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


def test_full_queue_gets_429_and_disconnects_free_slots(server, client):
    """Three long streams fill two slots and the queue; a fourth request is refused; closing the streams
    frees everything at once."""
    body = {"model": "tiny", "prompt": "long", "max_tokens": 256, "stream": True, "max_denoising_steps": 64}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server, headers=headers, timeout=30) as http:
        streams = [http.stream("POST", "/v1/completions", json=body) for _ in range(3)]
        responses = [s.__enter__() for s in streams]
        assert [r.status_code for r in responses] == [200, 200, 200]
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="one more", max_tokens=8)
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full"
        for s in streams:
            s.__exit__(None, None, None)
    deadline = time.monotonic() + 5
    while _gauge(server, "dgemma_active_requests") + _gauge(server, "dgemma_queue_depth") > 0:
        assert time.monotonic() < deadline, "closed streams still hold their slots"
        time.sleep(0.05)
    assert client.completions.create(model="tiny", prompt="after", max_tokens=8).choices
