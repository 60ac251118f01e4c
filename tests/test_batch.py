"""`dgemma batch`: OpenAI batch files answered through the server's code, continued after an interruption."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from dgemma import DiffusionGemma  # noqa: E402
from dgemma.cli import main  # noqa: E402
from dgemma.engine.scheduler import Scheduler  # noqa: E402
from dgemma.serve.app import ServeSettings, create_app  # noqa: E402

ENGINE = ["--model", "tiny", "--max-slots", "2", "--max-prompt-tokens", "128", "--max-tokens", "96",
          "--device", "cpu"]


def completion(i: int) -> dict:
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": f"def f{i}(x):", "max_tokens": 40, "seed": i, "max_denoising_steps": 3}}


CHAT = {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32, "n": 2, "seed": 4,
                 "max_denoising_steps": 3}}
BAD_BODY = {"custom_id": "bad", "url": "/v1/completions", "body": {"model": "tiny", "prompt": "x", "max_tokens": 0}}


@pytest.fixture(scope="module")
def served():
    """The same requests answered by the server, one at a time."""
    model = DiffusionGemma.from_pretrained("tiny")
    app = create_app(model, Scheduler(model.model, slots=1, max_len=200, max_queue=4), ServeSettings("tiny"))
    with TestClient(app) as client:
        yield lambda item: client.post(item["url"], json=item["body"]).json()


def write_lines(path, *items) -> None:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))


def results(path) -> dict[str | None, dict]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    assert len(by_id) == len(lines)  # one line per request
    return by_id


def test_a_batch_is_answered_as_the_server_answers_each_request(tmp_path, capsys, served):
    requests = [completion(0), completion(1), CHAT, completion(2), BAD_BODY,
                {"custom_id": "url", "url": "/v1/embeddings", "body": {}},
                {"custom_id": "stream", "url": "/v1/completions", "body": {**completion(0)["body"], "stream": True}},
                "{oops"]
    write_lines(tmp_path / "in.jsonl", *requests)
    code = main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE])
    err = capsys.readouterr().err
    assert code == 1 and "4 of 8 requests failed" in err and "Traceback" not in err
    out = results(tmp_path / "out.jsonl")
    for item in (completion(0), completion(1), completion(2), CHAT):
        line = out[item["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        answer, expected = line["response"]["body"], served(item)
        assert answer["choices"] == expected["choices"] and answer["usage"] == expected["usage"]
        assert line["response"]["request_id"] == answer["id"]
    assert out["bad"]["response"]["status_code"] == 400
    assert out["bad"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert "url must be one of /v1/chat/completions, /v1/completions" in out["url"]["error"]["message"]
    assert out["stream"]["error"]["message"] == "line 7: stream: true is not supported in a batch"
    assert out[None]["error"]["message"].startswith("line 8: not JSON") and out[None]["response"] is None


def test_a_run_that_stopped_is_continued(tmp_path, capsys, served):
    write_lines(tmp_path / "in.jsonl", *(completion(i) for i in range(4)))
    first = json.dumps({"custom_id": "c2", "response": {"status_code": 200, "body": {}}, "error": None})
    (tmp_path / "out.jsonl").write_text(first + "\n" + '{"custom_id": "c0", "respo')  # killed mid-line
    code = main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "already answers 1 of the 4 requests; continuing with the other 3" in err
    out = results(tmp_path / "out.jsonl")
    assert sorted(out) == ["c0", "c1", "c2", "c3"] and out["c2"]["response"]["body"] == {}  # c2 kept, not redone
    assert out["c0"]["response"]["body"]["choices"] == served(completion(0))["choices"]
    assert main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE]) == 0
    assert "continuing with the other 0" in capsys.readouterr().err


def test_a_file_with_a_repeated_custom_id_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    write_lines(tmp_path / "in.jsonl", completion(0), completion(1), completion(0))
    monkeypatch.setattr(DiffusionGemma, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE])
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'in.jsonl'}:3: custom_id 'c0' is also on line 1" in err
    code = main(["batch", "-i", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE])
    assert code == 1 and "missing.jsonl: No such file or directory" in capsys.readouterr().err
    write_lines(tmp_path / "good.jsonl", completion(0))
    code = main(["batch", "-i", str(tmp_path / "good.jsonl"), "-o", str(tmp_path / "no" / "out.jsonl"), *ENGINE])
    assert code == 1 and "no/out.jsonl: No such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_odd_characters_a_bom_and_a_rerun_of_a_finished_file(tmp_path, capsys, served):
    line_break = {**completion(0), "custom_id": "a\u2028b", "body": {**completion(0)["body"], "prompt": "x\u2028y"}}
    surrogate = '{"custom_id": "\\ud800", "url": "/v1/completions", "body": {}}'
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in (line_break, completion(1)))
    (tmp_path / "in.jsonl").write_text(text + surrogate + "\n", encoding="utf-8-sig")  # with a BOM
    argv = ["batch", "-i", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE]
    assert main(argv) == 1  # the surrogate line fails, alone
    out = results(tmp_path / "out.jsonl")
    assert out["a\u2028b"]["response"]["body"]["choices"] == served(line_break)["choices"]
    assert out["c1"]["response"]["status_code"] == 200
    assert "custom_id must be a non-empty string of valid Unicode" in out[None]["error"]["message"]
    written = (tmp_path / "out.jsonl").read_text()
    assert main(argv) == 0 and (tmp_path / "out.jsonl").read_text() == written  # nothing left to do
    assert "continuing with the other 0" in capsys.readouterr().err
    same = ["batch", "-i", str(tmp_path / "out.jsonl"), "-o", str(tmp_path / "out.jsonl"), *ENGINE]
    assert main(same) == 2 and "-i and -o are the same file" in capsys.readouterr().err
