"""dgemma.Processor: chat messages with image and video parts to the model's inputs, under transformers' names."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from conftest import VIDEO_TOKEN_ID, VISION_IDS

import dgemma
from dgemma.media import MediaError
from dgemma.media.sources import MediaPolicy
from dgemma.processor import MediaLimits

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

IMG, BOI, EOI = VISION_IDS["image_token_id"], VISION_IDS["boi_token_id"], VISION_IDS["eoi_token_id"]


@pytest.fixture(scope="module")
def checkpoint(vision_model_dir):
    return vision_model_dir


def _picture(w=50, h=30, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_chat_template_renders_media_parts_as_gemma4_placeholders(checkpoint):
    processor = dgemma.Processor.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [{"type": "image", "image": _picture()},
                                             {"type": "text", "text": " What is shown? "},
                                             {"type": "video", "video": [_picture(seed=1), _picture(seed=2)]}]}]
    text = processor.apply_chat_template(messages)
    assert text == "<bos><|turn>user\n<|image|>What is shown?<|video|><turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_every_source_form_gives_the_same_inputs(checkpoint, tmp_path):
    picture = _picture()
    data = _png(picture)
    (tmp_path / "a.png").write_bytes(data)
    encoded = base64.b64encode(data).decode()
    processor = dgemma.Processor.from_pretrained(checkpoint, max_soft_tokens=70)
    parts = [{"type": "image", "image": picture}, {"type": "image", "path": str(tmp_path / "a.png")},
             {"type": "image", "url": f"data:image/png;base64,{encoded}"}, {"type": "image", "base64": encoded},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}},
             {"type": "image", "image": np.asarray(picture)}]
    outputs = [processor.apply_chat_template([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}],
                                             tokenize=True, return_dict=True) for part in parts]
    first = outputs[0]
    assert set(first) == {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_position_ids"}
    ids = first["input_ids"][0].tolist()
    n = ids.count(IMG)
    assert n == 60 and ids[ids.index(IMG) - 1] == BOI and ids[ids.index(IMG) + n] == EOI
    assert first["mm_token_type_ids"][0].tolist() == [int(t == IMG) for t in ids]
    for other in outputs[1:]:
        for key in first:
            assert torch.equal(other[key], first[key]), key
    assert first.pixel_values.shape == (1, 280, 48)  # attribute access, as transformers' BatchFeature


def test_call_expands_placeholders_and_pads_left(checkpoint):
    processor = dgemma.Processor.from_pretrained(checkpoint, max_soft_tokens=70)
    out = processor(text=["<|image|> a", "b <|image|><|image|>"], images=[[_picture()], [_picture(30, 50), _picture()]])
    assert out["input_ids"].shape[0] == 2 and out["pixel_values"].shape[0] == 3
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][1].all()  # left padding
    assert (out["input_ids"] == IMG).sum() == 180


def test_video_layout_is_gemma4s(checkpoint):
    """One `mm:ss <|image> + N <|video|> + <image|>` group per frame, joined by spaces."""
    processor = dgemma.Processor.from_pretrained(checkpoint, max_soft_tokens=70)
    frames = [_picture(40, 24, seed=i) for i in range(30)]
    out = processor(text="<|video|>", videos=[frames])
    tok = processor.tokenizer
    ids = out["input_ids"][0].tolist()
    text = tok.decode([t for t in ids if t not in (IMG, BOI, EOI, VIDEO_TOKEN_ID)])
    assert text == "<bos>00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  " \
                   "00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:00  00:01  00:01  " \
                   "00:01  00:01  00:01  00:01 "
    assert out["num_frames_per_video"] == [30] and out["pixel_values_videos"].shape[0] == 30
    assert out["mm_token_type_ids"][0].tolist() == [2 * (t == VIDEO_TOKEN_ID) for t in ids]


@pytest.mark.parametrize("call,message", [
    (lambda p: p(text="<|image|><|image|>", images=[_picture()]), "2 image placeholder.* but 1 image"),
    (lambda p: p(text="no placeholder", images=[_picture()]), "0 image placeholder.* but 1 image"),
    (lambda p: p(text="<|video|>", videos=[]), "1 video placeholder.* but 0 video"),
    (lambda p: p(text="<|image|>", images=[b"garbage"]), "unsupported format"),
    (lambda p: p(text="<|image|>", images=["http://example.com/a.png"]), "host 'example.com' is not allowed"),
    (lambda p: p(text="<|image|>", images=["data:image/png;base64,@@@"]), "not valid base64"),
])
def test_bad_media_get_specific_errors(checkpoint, call, message):
    with pytest.raises(MediaError, match=message):
        call(dgemma.Processor.from_pretrained(checkpoint))


def test_limits_and_local_paths(checkpoint, tmp_path):
    inside, outside = tmp_path / "media", tmp_path / "elsewhere"
    inside.mkdir()
    outside.mkdir()
    for folder in (inside, outside):
        (folder / "a.png").write_bytes(_png(_picture()))
    limits = MediaLimits(max_items=1, policy=MediaPolicy(allow_local=True, local_root=inside))
    processor = dgemma.Processor.from_pretrained(checkpoint, limits=limits)
    processor(text="<|image|>", images=[str(inside / "a.png")])
    with pytest.raises(MediaError, match="outside the allowed folder"):
        processor(text="<|image|>", images=[str(outside / "a.png")])
    with pytest.raises(MediaError, match="outside the allowed folder"):
        processor(text="<|image|>", images=[str(inside / ".." / "elsewhere" / "a.png")])
    with pytest.raises(MediaError, match="2 images and videos in one request are over the limit of 1"):
        processor(text="<|image|><|image|>", images=[str(inside / "a.png")] * 2)
    no_local = dgemma.Processor.from_pretrained(checkpoint, limits=MediaLimits(policy=MediaPolicy(allow_local=False)))
    with pytest.raises(MediaError, match="local media paths are not allowed"):
        no_local(text="<|image|>", images=[str(inside / "a.png")])


def test_text_only_checkpoint_refuses_images(tmp_path):
    model = dgemma.DiffusionGemma.from_pretrained("tiny")
    with pytest.raises(MediaError, match="no vision tower"):
        model.processor(text="<|image|>", images=[_picture()])
    assert model.processor(text="plain text")["input_ids"].shape[0] == 1


def test_allowed_hosts_are_fetched_and_redirects_refused(checkpoint):
    """A local HTTP server stands in for an allowed media host."""
    import http.server
    import threading

    data = _png(_picture())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path == "/a.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            else:
                self.send_response(302)
                self.send_header("Location", "http://example.com/a.png")
                self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        limits = MediaLimits(policy=MediaPolicy(allowed_domains=("127.0.0.1",)))
        processor = dgemma.Processor.from_pretrained(checkpoint, limits=limits)
        fetched = processor(text="<|image|>", images=[f"{base}/a.png"])
        assert torch.equal(fetched["pixel_values"], processor(text="<|image|>", images=[data])["pixel_values"])
        with pytest.raises(MediaError, match="redirected to http://example.com/a.png"):
            processor(text="<|image|>", images=[f"{base}/moved.png"])
    finally:
        server.shutdown()
