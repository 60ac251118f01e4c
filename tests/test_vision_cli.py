"""`dgemma generate --image/--video` and `dgemma chat` /image, /video."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch
from conftest import write_picture

import dgemma
from dgemma.cli import main

pytest.importorskip("PIL")
FAST = ["--max-new-tokens", "16", "--steps", "3", "--seed", "0", "--device", "cpu"]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dgemma: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_generate_with_an_image_is_the_python_api(vision_model_dir, tmp_path, capsys):
    picture = write_picture(tmp_path / "a.png")
    assert main(["generate", "--model", str(vision_model_dir), *FAST, "--chat", "--image", str(picture),
                 "--json", "What is shown?"]) == 0
    doc = json.loads(capsys.readouterr().out)
    model = dgemma.DiffusionGemma.from_pretrained(vision_model_dir)
    inputs = model.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image", "path": str(picture)}, {"type": "text", "text": "What is shown?"}]}],
        tokenize=True, return_dict=True)
    assert doc["prompt_tokens"] == inputs["input_ids"].shape[1] > 60
    out = model.generate(**inputs, max_new_tokens=16, max_denoising_steps=3, seed=0)
    assert doc["tokens"] == out.sequences[0, inputs["input_ids"].shape[1]:].tolist()[:len(doc["tokens"])]


@pytest.mark.parametrize("setup,args,words", [
    (None, ["--image", "{tmp}/nosuch.png"], ["--image", "nosuch.png: no such file"]),
    ("corrupt", ["--image", "{tmp}/bad.png"], ["corrupt or truncated"]),
    ("text", ["--image", "{tmp}/bad.png"], ["unsupported format"]),
    ("video", ["--video", "{tmp}/bad.mp4"], ["cannot decode video"]),
])
def test_bad_media_is_one_line(vision_model_dir, tmp_path, capsys, setup, args, words):
    if setup == "corrupt":
        write_picture(tmp_path / "good.png")
        (tmp_path / "bad.png").write_bytes((tmp_path / "good.png").read_bytes()[:80])
    elif setup == "text":
        (tmp_path / "bad.png").write_text("plain text")
    elif setup == "video":
        (tmp_path / "bad.mp4").write_bytes(b"\x00" * 64)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["generate", "--model", str(vision_model_dir), *FAST, *argv, "hi"])
    assert code != 0
    line = _error_line(capsys.readouterr().err)
    for word in words:
        assert word in line


def test_image_on_a_text_only_model(tmp_path, capsys):
    picture = write_picture(tmp_path / "a.png")
    assert main(["generate", "--model", "tiny", *FAST, "--image", str(picture), "hi"]) != 0
    assert "no vision tower" in _error_line(capsys.readouterr().err)


def test_chat_attaches_media_to_the_next_message(vision_model_dir, tmp_path, capsys, monkeypatch):
    picture = write_picture(tmp_path / "a.png")
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path}/nosuch.png\n/image {picture}\nWhat is it?\n"))
    assert main(["chat", "--model", str(vision_model_dir), *FAST]) == 0
    out, err = capsys.readouterr()
    assert "nosuch.png: no such file" in err and f"image {picture} attached to the next message" in err
    assert main(["generate", "--model", str(vision_model_dir), *FAST, "--chat", "--image", str(picture),
                 "What is it?"]) == 0
    assert capsys.readouterr().out == out  # the same reply as generate with the image


def test_chat_on_a_text_only_model_says_so(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {tmp_path}/a.png\n"))
    assert main(["chat", "--model", "tiny", *FAST]) == 0
    assert "reads text only" in capsys.readouterr().err


def test_generate_with_a_video(vision_model_dir, tmp_path, capsys):
    pytest.importorskip("av")
    from test_video import make_video

    (tmp_path / "v.mp4").write_bytes(make_video(8, fps=4, size=(40, 24)))
    assert main(["generate", "--model", str(vision_model_dir), *FAST, "--video", str(tmp_path / "v.mp4"),
                 "--json", "What happens?"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["prompt_tokens"] > 8 * 15 and len(doc["tokens"]) == 16
    assert torch.tensor(doc["tokens"]).numel() == 16
