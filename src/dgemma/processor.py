"""The processor: text, images and video to the model's inputs, under transformers' names.

    processor = dgemma.Processor.from_pretrained("path/to/checkpoint")      # or model.processor
    inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    out = model.generate(**inputs, max_new_tokens=64)

Each `<|image|>` in the text becomes `<|image> + N x <|image|> + <image|>` (N: the image's soft tokens), each
`<|video|>` one `mm:ss <|image> + N x <|video|> + <image|>` group per sampled frame, joined by spaces (Gemma 4's
processor layout). `mm_token_type_ids` marks image soft tokens 1 and video soft tokens 2 (the rest 0), which
is how the encoder finds each image's block. The placeholders are expanded at the level of ids, so any
tokenizer works, whether or not it knows Gemma 4's special tokens.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DiffusionGemmaConfig
from .media import ImageProcessor, MediaError
from .media.image import DEFAULT_BUDGET, check_budget
from .media.sources import MediaPolicy, part_media, read_reference
from .media.video import DEFAULT_FRAMES, VIDEO_BUDGET, Video, load_video, timestamp
from .shipped import resolve
from .tokenizer import Tokenizer

IMAGE_PLACEHOLDER = "<|image|>"
VIDEO_PLACEHOLDER = "<|video|>"
IMAGE_TYPE, VIDEO_TYPE = 1, 2  # mm_token_type_ids
_PLACEHOLDERS = re.compile(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})")


class BatchFeature(dict):
    """A dict of model inputs that also reads by attribute (`inputs.input_ids`), like transformers' BatchFeature."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class MediaLimits:
    """Bounds on one request's media (None: unbounded): images and videos together, pixels of an image or a
    frame, bytes of one file, seconds of one video."""

    max_items: int | None = None
    max_pixels: int | None = None
    max_bytes: int | None = None
    max_video_seconds: float | None = None
    policy: MediaPolicy = field(default_factory=MediaPolicy)


class Processor:
    """Tokenizer + image processor + video sampling for one checkpoint (`config` gives the token ids and the
    tower's patch and pooling sizes). `max_soft_tokens`: the image budget (70/140/280/560/1120);
    `num_frames` / `fps`: how video frames are sampled."""

    def __init__(self, tokenizer: Tokenizer, config: DiffusionGemmaConfig, max_soft_tokens: int = DEFAULT_BUDGET,
                 num_frames: int | None = DEFAULT_FRAMES, fps: float | None = None,
                 limits: MediaLimits | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.max_soft_tokens = check_budget(max_soft_tokens)
        self.num_frames, self.fps = num_frames, fps
        self.limits = limits or MediaLimits()
        if self.limits.policy.max_bytes is None and self.limits.max_bytes is not None:  # one bound on bytes read
            self.limits = dataclasses.replace(self.limits, policy=dataclasses.replace(self.limits.policy,
                                                                                      max_bytes=self.limits.max_bytes))
        vision = config.vision_config
        self.image_processor = None if vision is None else ImageProcessor(
            vision.patch_size, vision.pooling_kernel_size, self.max_soft_tokens, self.limits.max_pixels)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> "Processor":
        """The processor of a checkpoint directory or a shipped model (its `tokenizer.json` and `config.json`)."""
        _, directory = resolve(path)
        return cls(Tokenizer.from_dir(directory), DiffusionGemmaConfig.load(directory), **kwargs)

    # -- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], tokenize: bool = False,
                            return_dict: bool = False, add_generation_prompt: bool = True,
                            enable_thinking: bool = False, return_tensors: str = "pt",
                            **template_kwargs: Any) -> str | list[int] | BatchFeature:
        """Render a conversation whose contents may hold image and video parts. `tokenize=False`: the prompt text
        (placeholders not expanded); `tokenize=True`: its ids; with `return_dict=True` as well: every model
        input (`input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`, ...)."""
        messages, images, videos = self.split_media(conversation)
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  enable_thinking=enable_thinking, **template_kwargs)
        if not tokenize:
            return text
        inputs = self(text=text, images=images or None, videos=videos or None, add_bos=False,
                      return_tensors=return_tensors)
        return inputs if return_dict else inputs["input_ids"][0].tolist()

    def split_media(self, conversation: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list, list]:
        """(messages with each media part reduced to `{"type": "image"|"video"}`, the images, the videos), the
        media in order of appearance and read under the limits' policy."""
        messages, images, videos = [], [], []
        for message in conversation:
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(content, list):
                messages.append(message)
                continue
            parts = []
            for part in content:
                media = part_media(part) if isinstance(part, dict) else None
                if media is None:
                    parts.append(part)
                    continue
                kind, source = media
                (images if kind == "image" else videos).append(read_reference(source, self.limits.policy))
                parts.append({"type": kind})
            messages.append({**message, "content": parts})
        return messages, images, videos

    # -- text and media to inputs ----------------------------------------------------------------
    def __call__(self, text: str | Sequence[str] | None = None, images: Sequence[Any] | None = None,
                 videos: Sequence[Any] | None = None, add_bos: bool = True, return_tensors: str = "pt",
                 max_soft_tokens: int | None = None) -> BatchFeature:
        """Model inputs for prompts (one string or a batch) with their images and videos, in order of their
        placeholders (images: a flat list over the batch, or one list per prompt; videos: a flat list, each video
        a path, bytes, URL or list of frames). Rows are left-padded. `max_soft_tokens`: this call's image budget.
        Tensors are PyTorch's (`return_tensors="pt"`, the only kind)."""
        if return_tensors != "pt":
            raise MediaError(f"return_tensors must be 'pt', got {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text or [])
        flat_images = _flatten_images(images)
        flat_videos = _flatten_videos(videos)
        if not texts:
            if not flat_images and not flat_videos:
                raise MediaError("nothing to process: give text, images or videos")
            texts = [" ".join([IMAGE_PLACEHOLDER] * len(flat_images) + [VIDEO_PLACEHOLDER] * len(flat_videos))]
        counts = [(t.count(IMAGE_PLACEHOLDER), t.count(VIDEO_PLACEHOLDER)) for t in texts]
        _check_counts("image", sum(c[0] for c in counts), len(flat_images))
        _check_counts("video", sum(c[1] for c in counts), len(flat_videos))
        if self.limits.max_items is not None and len(flat_images) + len(flat_videos) > self.limits.max_items:
            raise MediaError(f"{len(flat_images) + len(flat_videos)} images and videos in one request are over the "
                             f"limit of {self.limits.max_items}")
        if (flat_images or flat_videos) and self.image_processor is None:
            raise MediaError("this checkpoint has no vision tower (no vision_config): it reads text only")
        out = BatchFeature()
        image_tokens: list[int] = []
        if flat_images:
            processed = self.image_processor([self._source(i) for i in flat_images], max_soft_tokens=max_soft_tokens)
            out["pixel_values"] = torch.from_numpy(processed.pixel_values)
            out["image_position_ids"] = torch.from_numpy(processed.image_position_ids)
            image_tokens = processed.num_soft_tokens_per_image
        video_layouts: list[tuple[list[float], int]] = []
        if flat_videos:
            pixels, positions = [], []
            for source in flat_videos:
                video = self.load_video(source)
                frames = self.image_processor(video.frames, max_soft_tokens=VIDEO_BUDGET)
                pixels.append(frames.pixel_values)
                positions.append(frames.image_position_ids)
                video_layouts.append((video.timestamps, frames.num_soft_tokens_per_image[0]))
            out["pixel_values_videos"] = torch.from_numpy(np.concatenate(pixels))
            out["video_position_ids"] = torch.from_numpy(np.concatenate(positions))
            out["num_frames_per_video"] = [len(t) for t, _ in video_layouts]
        rows = []
        image_iter, video_iter = iter(image_tokens), iter(video_layouts)
        for t in texts:
            rows.append(self._expand(t, image_iter, video_iter, add_bos))
        out.update(_pad_left(rows, self.tokenizer.pad_id if self.tokenizer else 0))
        return out

    def load_video(self, source: Any) -> Video:
        limits = self.limits
        return load_video(self._source(source, video=True), self.num_frames, self.fps, limits.max_bytes,
                          limits.max_video_seconds, limits.max_pixels)

    def _source(self, source: Any, video: bool = False) -> Any:
        if isinstance(source, (list, tuple)) and video:
            return [read_reference(s, self.limits.policy) for s in source]
        return read_reference(source, self.limits.policy)

    def _expand(self, text: str, image_tokens, video_layouts, add_bos: bool) -> tuple[list[int], list[int]]:
        """(ids, mm_token_type_ids) of one prompt with its placeholders expanded."""
        cfg, tok = self.config, self.tokenizer
        ids: list[int] = [tok.bos_id] if add_bos and not text.startswith(tok.bos_token) else []
        types: list[int] = [0] * len(ids)

        def text_piece(piece: str) -> None:
            encoded = tok.encode(piece, add_bos=False) if piece else []
            ids.extend(encoded)
            types.extend([0] * len(encoded))

        def soft(token: int, kind: int, n: int) -> None:
            ids.extend([cfg.boi_token_id, *[token] * n, cfg.eoi_token_id])
            types.extend([0, *[kind] * n, 0])

        for piece in _PLACEHOLDERS.split(text):
            if piece == IMAGE_PLACEHOLDER:
                soft(cfg.image_token_id, IMAGE_TYPE, next(image_tokens))
            elif piece == VIDEO_PLACEHOLDER:
                stamps, n = next(video_layouts)
                for i, seconds in enumerate(stamps):
                    text_piece(f"{' ' if i else ''}{timestamp(seconds)} ")
                    soft(cfg.video_token_id, VIDEO_TYPE, n)
            else:
                text_piece(piece)
        return ids, types


def _flatten_images(items: Any) -> list[Any]:
    """A flat list of images from None, one image, a flat list, or one list per prompt."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    return [image for item in items for image in (item if isinstance(item, (list, tuple)) else [item])]


def _flatten_videos(items: Any) -> list[Any]:
    """A flat list of videos from None, one video (a path, bytes, URL) or a list of them; a video may itself be
    a list of frames."""
    if items is None:
        return []
    return list(items) if isinstance(items, (list, tuple)) else [items]


def _check_counts(kind: str, placeholders: int, given: int) -> None:
    if placeholders != given:
        raise MediaError(f"the text has {placeholders} {kind} placeholder(s) but {given} {kind}(s) were given")


def _pad_left(rows: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    types = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (row_ids, row_types) in enumerate(rows):
        n = len(row_ids)
        ids[r, width - n:] = torch.tensor(row_ids, dtype=torch.long)
        types[r, width - n:] = torch.tensor(row_types, dtype=torch.long)
        mask[r, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
