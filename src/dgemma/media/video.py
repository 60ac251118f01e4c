"""Video input: frames decoded with PyAV and sampled as Gemma 4's video processor samples them.

Gemma 4 has no video tower: a video is a row of frames, each an image at the 70-token budget, and the text
carries one `mm:ss <|image>...<image|>` group per frame. Frames are sampled uniformly: `num_frames` (32 by
default) at indices `i * total // num_frames`, or `fps` frames per second of video; a video with fewer frames
than asked for gives all of them. A list of frames (images) is taken as a video too, at `fps` (24 when unknown,
as transformers assumes).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .image import MediaError, open_image

DEFAULT_FRAMES = 32
VIDEO_BUDGET = 70  # soft tokens per frame
DEFAULT_FPS = 24.0  # transformers' assumption for frames given without a frame rate


@dataclass
class Video:
    """Sampled frames (RGB PIL images) and the time of each, in seconds."""

    frames: list[Any]
    timestamps: list[float]


def sample_indices(total: int, fps: float | None, num_frames: int | None = DEFAULT_FRAMES,
                   sample_fps: float | None = None) -> list[int]:
    """Which of `total` frames to keep: `sample_fps` per second of video (needs the video's `fps`), else
    `num_frames` spread uniformly (all frames when there are fewer)."""
    if sample_fps is not None:
        if not fps:
            raise MediaError("sampling by frames per second needs the video's frame rate, which is unknown")
        num_frames = max(1, int(total / fps * sample_fps))
    n = min(num_frames or total, total)
    return [i * total // n for i in range(n)]


def timestamp(seconds: float) -> str:
    """mm:ss, truncated, as Gemma 4's processor writes it."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def load_video(source: Any, num_frames: int | None = DEFAULT_FRAMES, fps: float | None = None,
               max_bytes: int | None = None, max_seconds: float | None = None, max_pixels: int | None = None) -> Video:
    """Decode and sample a video from a path or bytes (PyAV), or take a list of frames (images in any form
    `open_image` reads). `fps`: frames per second to sample instead of `num_frames`."""
    if isinstance(source, Video):
        return source
    if isinstance(source, (list, tuple)):
        if not source:
            raise MediaError("a video given as a list of frames has no frames")
        frames = [open_image(f, max_pixels) for f in source]
        keep = sample_indices(len(frames), DEFAULT_FPS, num_frames, fps)
        return Video([frames[i] for i in keep], [i / DEFAULT_FPS for i in keep])
    if isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise MediaError(f"cannot read video {source}: {e.strerror or e}") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        raise MediaError(f"a video must be a path, bytes or a list of frames, got {type(source).__name__}")
    if max_bytes is not None and len(data) > max_bytes:
        raise MediaError(f"video of {len(data)} bytes is over the limit of {max_bytes} bytes")
    return _decode(data, num_frames, fps, max_seconds, max_pixels)


def _av():
    try:
        import av
    except ImportError:
        raise MediaError("reading video needs PyAV: pip install 'dgemma[video]'") from None
    return av


def _decode(data: bytes, num_frames: int | None, sample_fps: float | None, max_seconds: float | None,
            max_pixels: int | None) -> Video:
    """Two passes over the stream: count the frames that decode, then keep the sampled ones (a container's frame
    count is not always there, nor right; holding every decoded frame would take gigabytes for a minute of HD)."""
    av = _av()
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = _video_stream(container, max_pixels)
            rate = float(stream.average_rate) if stream.average_rate else None
            total = 0
            for _ in container.decode(stream):
                total += 1
                if max_seconds is not None and total / (rate or DEFAULT_FPS) > max_seconds:
                    raise MediaError(f"video is longer than the limit of {max_seconds:g} seconds")
        if total == 0:
            raise MediaError("the video has no frames that decode")
        keep = sample_indices(total, rate, num_frames, sample_fps)
        wanted, frames = set(keep), []
        with av.open(io.BytesIO(data)) as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    frames.append(frame.to_image())
    except MediaError:
        raise
    except (av.FFmpegError, ValueError, OSError, IndexError) as e:
        raise MediaError(f"cannot decode video: {e}") from None
    if len(frames) != len(keep):  # a second pass that decodes fewer frames than the first
        raise MediaError("the video does not decode the same way twice (corrupt stream)")
    rate = rate or DEFAULT_FPS
    return Video(frames, [i / rate for i in keep])


def _video_stream(container: Any, max_pixels: int | None) -> Any:
    if not container.streams.video:
        raise MediaError("the file has no video stream")
    stream = container.streams.video[0]
    if max_pixels is not None and stream.width * stream.height > max_pixels:
        raise MediaError(f"video of {stream.width}x{stream.height} pixels per frame is over the limit of {max_pixels} "
                         f"pixels")
    return stream
