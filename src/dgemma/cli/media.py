"""Images and video on the command line: `--image PATH` / `--video PATH` (generate), `/image` / `/video` (chat)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import CLIError

MEDIA_KEYS = ("pixel_values", "image_position_ids", "mm_token_type_ids", "pixel_values_videos", "video_position_ids")


def add_media_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image to read with the prompt (repeatable; needs a model with a vision tower). "
                             "With --chat they open the user turn; otherwise <|image|> in the prompt marks where "
                             "each goes (at the start where it has none)")
    parser.add_argument("--video", action="append", default=[], metavar="PATH",
                        help="a video to read with the prompt (repeatable; 32 frames sampled uniformly, "
                             "needs PyAV: pip install 'dgemma[video]')")


def check_files(paths: list[str], flag: str) -> None:
    """Each path names a readable file (checked before the weights load)."""
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise CLIError(f"{flag} {path}: no such file")
        if not p.is_file():
            raise CLIError(f"{flag} {path}: not a file")


def media_parts(images: list[str], videos: list[str]) -> list[dict[str, Any]]:
    """Chat content parts for the files, images first."""
    return [*({"type": "image", "path": p} for p in images), *({"type": "video", "path": p} for p in videos)]


def prompt_inputs(model, prompt: str, images: list[str], videos: list[str], chat: bool, thinking: bool
                  ) -> tuple[list[int], dict[str, Any]]:
    """(prompt ids, the media inputs `generate` takes) of a prompt with files."""
    processor = model.processor
    if chat:
        content = [*media_parts(images, videos), {"type": "text", "text": prompt}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=True,
                                               return_dict=True, enable_thinking=thinking)
    else:
        from ..processor import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER

        missing = "".join([IMAGE_PLACEHOLDER] * (len(images) - prompt.count(IMAGE_PLACEHOLDER))
                          + [VIDEO_PLACEHOLDER] * (len(videos) - prompt.count(VIDEO_PLACEHOLDER)))
        inputs = processor(text=missing + prompt, images=images or None, videos=videos or None)
    return inputs["input_ids"][0].tolist(), {k: inputs[k] for k in MEDIA_KEYS if k in inputs}


def add_media_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """What a served request's images and videos may be and come from (`dgemma serve`, `dgemma batch`)."""
    from .common import int_at_least_1, positive_float

    parser.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                        help="hosts whose http(s) image and video URLs the server fetches (default: none; data: URLs "
                             "are always read)")
    parser.add_argument("--allowed-local-media-path", type=Path, metavar="DIR",
                        help="local image and video paths are read only under this folder (default: none are read)")
    parser.add_argument("--max-images-per-request", type=int_at_least_1, default=8, metavar="N",
                        help="images and videos in one request, at most (default 8)")
    parser.add_argument("--max-image-pixels", type=int_at_least_1, default=50_000_000, metavar="N",
                        help="pixels of an image or a video frame, at most (default 50M)")
    parser.add_argument("--max-media-bytes", type=int_at_least_1, default=20 << 20, metavar="N",
                        help="bytes of one image or video, at most (default 20 MiB; requests are also bounded by "
                             "--max-body-bytes)")
    parser.add_argument("--max-video-seconds", type=positive_float, default=300.0, metavar="S",
                        help="length of one video, at most (default 300)")


def media_limits(args: argparse.Namespace):
    """`MediaLimits` from `add_media_limit_arguments`' options."""
    from ..media.sources import MediaPolicy
    from ..processor import MediaLimits

    root = args.allowed_local_media_path
    if root is not None and not root.is_dir():
        raise CLIError(f"--allowed-local-media-path {root}: not a directory")
    policy = MediaPolicy(tuple(args.allowed_media_domains), allow_local=root is not None, local_root=root,
                         max_bytes=args.max_media_bytes)
    return MediaLimits(args.max_images_per_request, args.max_image_pixels, args.max_media_bytes,
                       args.max_video_seconds, policy)
