"""Video input: frames decoded with PyAV, sampled as Gemma 4 samples them; videos made here with PyAV."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dgemma.media import MediaError
from dgemma.media.video import load_video, sample_indices, timestamp

av = pytest.importorskip("av")
pytest.importorskip("PIL")


def make_video(frames: int, fps: int = 10, size=(48, 32)) -> bytes:
    """An mpeg4 video whose frame i is a flat grey of level 8 * i (so a decoded frame tells its index)."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size[1], size[0], 3), 8 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def _levels(video, step=8):
    return [round(float(np.asarray(f).mean()) / step) for f in video.frames]


def test_uniform_sampling_as_gemma4():
    assert sample_indices(64, 24.0) == list(range(0, 64, 2))
    assert sample_indices(10, 24.0) == list(range(10))  # fewer frames than asked for: all of them
    assert sample_indices(100, 10.0, sample_fps=2) == [i * 100 // 20 for i in range(20)]
    assert timestamp(0.0) == "00:00" and timestamp(75.9) == "01:15" and timestamp(3600) == "60:00"


def test_decode_and_sample_a_video_file(tmp_path):
    data = make_video(30, fps=10)
    (tmp_path / "v.mp4").write_bytes(data)
    video = load_video(tmp_path / "v.mp4", num_frames=6)
    assert _levels(video) == [0, 5, 10, 15, 20, 25]
    assert video.timestamps == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert len(load_video(data).frames) == 30  # 32 asked by default, 30 there
    assert _levels(load_video(data, num_frames=None, fps=2)) == [0, 5, 10, 15, 20, 25]


@pytest.mark.parametrize("data,kwargs,message", [
    (b"\x00\x01 not a video", {}, "cannot decode video"),
    (lambda: make_video(30)[:200], {}, "cannot decode video|no frames"),
    (lambda: make_video(30, fps=10), dict(max_seconds=1.0), "longer than the limit of 1 seconds"),
    (lambda: make_video(3), dict(max_bytes=100), "over the limit of 100 bytes"),
    (lambda: make_video(3), dict(max_pixels=100), "over the limit of 100 pixels"),
])
def test_bad_videos_get_specific_errors(data, kwargs, message):
    with pytest.raises(MediaError, match=message):
        load_video(data() if callable(data) else data, **kwargs)


def test_a_file_without_video_stream():
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(MediaError, match="no video stream"):
        load_video(buf.getvalue())


def test_frames_as_a_list():
    from PIL import Image

    frames = [Image.new("RGB", (8, 8), (6 * i,) * 3) for i in range(40)]
    video = load_video(frames)
    assert _levels(video, step=6) == [i * 40 // 32 for i in range(32)]
    assert video.timestamps[1] == (40 // 32) / 24
    with pytest.raises(MediaError, match="no frames"):
        load_video([])


def test_processor_reads_a_video_file(vision_checkpoint, tmp_path):
    import dgemma
    from dgemma.tokenizer import byte_tokenizer

    config = dgemma.DiffusionGemmaConfig.load(vision_checkpoint[0])
    (tmp_path / "v.mp4").write_bytes(make_video(12, fps=4))
    processor = dgemma.Processor(byte_tokenizer(), config, num_frames=4)
    out = processor(text="<|video|>", videos=[str(tmp_path / "v.mp4")])
    assert out["num_frames_per_video"] == [4] and out["pixel_values_videos"].shape == (4, 280, 48)
    text = processor.tokenizer.decode([t for t in out["input_ids"][0].tolist() if t not in (500, 501, 502, 503)])
    assert text == "<bos>00:00  00:00  00:01  00:02 "  # frames 0, 3, 6, 9 at 4 fps
