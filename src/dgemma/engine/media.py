"""Images and video frames into a prompt: the tower runs once, its soft tokens go to the placeholder slots.

A prompt holds each image as `<|image> + N x image_token + <image|>` and each video frame the same with the
video token (the processor writes them). The vision tower runs once over a request's images (and once over its
frames), and the soft tokens fill the image-token slots, then the video-token slots, in order, row by row (as
transformers scatters them). `mm_token_type_ids` (1 image, 2 video; derived from the ids when not given) marks
the blocks that attend to each other both ways in the encoder. Nothing of this reaches the decoder: it sees
the images through the KV cache only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..model.model import DiffusionGemmaModel
from ..model.vision import EncoderMedia, soft_token_counts

IMAGE_TYPE, VIDEO_TYPE = 1, 2


@dataclass
class PromptMedia:
    """One prompt's soft tokens [n, text hidden] in slot order, which positions take them [L] and the block of each
    position [L] (-1: none)."""

    embeds: torch.Tensor
    slots: torch.Tensor
    blocks: torch.Tensor


def _runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of True."""
    runs, n = [], 0
    for f in [*flags, False]:
        if f:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def _blocks(types: list[int]) -> torch.Tensor:
    """Each contiguous run of image or video tokens is one block (transformers' `get_block_sequence_ids_for_mask`)."""
    blocks, block, previous = [], -1, False
    for t in types:
        vision = t in (IMAGE_TYPE, VIDEO_TYPE)
        if vision and not previous:
            block += 1
        blocks.append(block if vision else -1)
        previous = vision
    return torch.tensor(blocks, dtype=torch.long)


def _checked(model: DiffusionGemmaModel, pixels, positions, what: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pixels, positions) as tensors of the shapes the tower takes, or None without pixels."""
    if pixels is None:
        return None
    pixels, positions = torch.as_tensor(pixels), torch.as_tensor(positions)
    vision = model.config.vision_config
    k, width = vision.pooling_kernel_size, 3 * vision.patch_size ** 2
    if pixels.dim() != 3 or pixels.shape[2] != width or positions.shape != (*pixels.shape[:2], 2) \
            or pixels.shape[1] % k ** 2:
        raise ConfigError(f"{what}: pixel values must be [images, patches, {width}] (patches a multiple of {k ** 2}) "
                          f"with positions [images, patches, 2], got {list(pixels.shape)} and {list(positions.shape)}")
    return pixels.float(), positions.long()


def check_media(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]],
                mm_token_type_ids: Sequence[Sequence[int]] | None = None, pixel_values=None, image_position_ids=None,
                pixel_values_videos=None, video_position_ids=None) -> dict | None:
    """Raise `ConfigError` unless the prompts' placeholders and the given images match (without running the tower);
    returns {soft token id: its (pixels, positions) or None}, None without media."""
    cfg = model.config
    image_id, video_id = cfg.image_token_id, cfg.video_token_id
    no_pixels = pixel_values is None and pixel_values_videos is None
    if model.vision_tower is None:  # a text-only model reads soft-token ids as any other token
        if no_pixels:
            return None
        raise ConfigError("this checkpoint has no vision tower (no vision_config): it reads text only")
    if no_pixels and not any(t in (image_id, video_id) for p in prompts for t in p):
        return None
    if image_position_ids is None and pixel_values is not None or \
            video_position_ids is None and pixel_values_videos is not None:
        raise ConfigError("pixel values need their patch positions (image_position_ids / video_position_ids)")
    if mm_token_type_ids is not None and [len(t) for t in mm_token_type_ids] != [len(p) for p in prompts]:
        raise ConfigError("mm_token_type_ids must have the shape of input_ids")
    kinds = {}
    for token, what, pixels, positions in ((image_id, "image", pixel_values, image_position_ids),
                                           (video_id, "video", pixel_values_videos, video_position_ids)):
        checked = _checked(model, pixels, positions, what + "s")
        counts = [] if checked is None else soft_token_counts(checked[1], cfg.vision_config.pooling_kernel_size)
        runs = [n for p in prompts for n in _runs([t == token for t in p])]
        if runs != counts:
            raise ConfigError(f"the prompt holds {len(runs)} {what}(s) of {runs} soft tokens but {len(counts)} "
                              f"{what}(s) of {counts} were given (each <|{what}|> placeholder needs one {what}, "
                              f"expanded by the processor)")
        kinds[token] = checked
    return kinds


def prompt_media(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]],
                 mm_token_type_ids: Sequence[Sequence[int]] | None = None, pixel_values=None,
                 image_position_ids=None, pixel_values_videos=None, video_position_ids=None
                 ) -> list[PromptMedia | None] | None:
    """Per prompt its media (None for a prompt without); None when no prompt has any. Raises `ConfigError` when the
    placeholders and the images do not match (counts, or the soft tokens of each image)."""
    kinds = check_media(model, prompts, mm_token_type_ids, pixel_values, image_position_ids, pixel_values_videos,
                        video_position_ids)
    if kinds is None:
        return None
    cfg = model.config
    image_id, video_id = cfg.image_token_id, cfg.video_token_id
    features = {token: [] if checked is None else model.image_features(*checked) for token, checked in kinds.items()}
    out: list[PromptMedia | None] = []
    taken = {image_id: 0, video_id: 0}
    for r, prompt in enumerate(prompts):
        prompt = list(prompt)
        soft = [t for t in prompt if t in (image_id, video_id)]
        if not soft:
            out.append(None)
            continue
        embeds = torch.empty(len(soft), model.text.hidden_size, dtype=model.dtype, device=model.device)
        for token, given in features.items():
            n = len(_runs([t == token for t in prompt]))
            if n:  # this kind's soft tokens, in order, into its slots
                embeds[torch.tensor([t == token for t in soft])] = torch.cat(given[taken[token]:taken[token] + n]
                                                                             ).to(embeds.dtype)
            taken[token] += n
        types = list(mm_token_type_ids[r]) if mm_token_type_ids is not None else \
            [IMAGE_TYPE if t == image_id else VIDEO_TYPE if t == video_id else 0 for t in prompt]
        slots = torch.tensor([t in (image_id, video_id) for t in prompt], dtype=torch.bool)
        out.append(PromptMedia(embeds, slots, _blocks(types)))
    return out


def batch_media(media: Sequence[PromptMedia | None], width: int, device: torch.device) -> EncoderMedia | None:
    """The encoder input of right-padded rows `width` wide (None where no row has media)."""
    if all(m is None for m in media):
        return None
    slots = torch.zeros((len(media), width), dtype=torch.bool)
    blocks = torch.full((len(media), width), -1, dtype=torch.long)
    embeds = []
    for r, m in enumerate(media):
        if m is None:
            continue
        n = len(m.slots)
        slots[r, :n], blocks[r, :n] = m.slots, m.blocks
        embeds.append(m.embeds)
    return EncoderMedia(torch.cat(embeds).to(device), slots.to(device), blocks.to(device))
