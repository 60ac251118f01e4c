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
from ..model.vision import EncoderMedia

IMAGE_TYPE, VIDEO_TYPE = 1, 2


@dataclass
class PromptMedia:
    """One prompt's soft tokens [n, text hidden] in slot order, which positions take them [L] and the block of each
    position [L] (-1: none)."""

    embeds: torch.Tensor
    slots: torch.Tensor
    blocks: torch.Tensor

    @property
    def soft_tokens(self) -> int:
        return int(self.slots.sum())


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


def _features(model: DiffusionGemmaModel, pixels, positions, what: str) -> list[torch.Tensor]:
    if pixels is None:
        return []
    pixels, positions = torch.as_tensor(pixels), torch.as_tensor(positions)
    if positions is None or pixels.dim() != 3 or positions.shape != (*pixels.shape[:2], 2):
        raise ConfigError(f"{what}: pixel values must be [images, patches, values] with positions [images, patches, 2]"
                          f", got {list(pixels.shape)} and {None if positions is None else list(positions.shape)}")
    try:
        return model.image_features(pixels.float(), positions.long())
    except ValueError as e:  # no tower, or patch counts the pooling cannot take
        raise ConfigError(str(e)) from None


def prompt_media(model: DiffusionGemmaModel, prompts: Sequence[Sequence[int]],
                 mm_token_type_ids: Sequence[Sequence[int]] | None = None, pixel_values=None,
                 image_position_ids=None, pixel_values_videos=None, video_position_ids=None
                 ) -> list[PromptMedia | None] | None:
    """Per prompt its media (None for a prompt without); None when no prompt has any. Raises `ConfigError` when the
    placeholders and the images do not match (counts, or the soft tokens of each image)."""
    cfg = model.config
    image_id, video_id = cfg.image_token_id, cfg.video_token_id
    has_soft = any(t in (image_id, video_id) for p in prompts for t in p)
    if pixel_values is None and pixel_values_videos is None and not has_soft:
        return None
    if model.vision_tower is None:
        raise ConfigError("this checkpoint has no vision tower (no vision_config): it reads text only")
    if image_position_ids is None and pixel_values is not None or \
            video_position_ids is None and pixel_values_videos is not None:
        raise ConfigError("pixel values need their patch positions (image_position_ids / video_position_ids)")
    per_kind = {image_id: ("image", _features(model, pixel_values, image_position_ids, "images")),
                video_id: ("video", _features(model, pixel_values_videos, video_position_ids, "videos"))}
    if mm_token_type_ids is not None and [len(t) for t in mm_token_type_ids] != [len(p) for p in prompts]:
        raise ConfigError("mm_token_type_ids must have the shape of input_ids")
    out: list[PromptMedia | None] = []
    taken = {image_id: 0, video_id: 0}
    for r, prompt in enumerate(prompts):
        prompt = list(prompt)
        soft = [t for t in prompt if t in (image_id, video_id)]
        if not soft:
            out.append(None)
            continue
        embeds = torch.empty(len(soft), model.text.hidden_size, dtype=model.dtype, device=model.device)
        for token, (what, features) in per_kind.items():
            runs = _runs([t == token for t in prompt])
            given = features[taken[token]:taken[token] + len(runs)]
            if [len(f) for f in given] != runs:
                raise ConfigError(_mismatch(what, features, prompts, token))
            taken[token] += len(runs)
            if given:  # this kind's soft tokens, in order, into its slots
                embeds[torch.tensor([t == token for t in soft])] = torch.cat(given).to(embeds.dtype)
        types = list(mm_token_type_ids[r]) if mm_token_type_ids is not None else \
            [IMAGE_TYPE if t == image_id else VIDEO_TYPE if t == video_id else 0 for t in prompt]
        slots = torch.tensor([t in (image_id, video_id) for t in prompt], dtype=torch.bool)
        out.append(PromptMedia(embeds, slots, _blocks(types)))
    for token, (what, features) in per_kind.items():
        if taken[token] != len(features):
            raise ConfigError(_mismatch(what, features, prompts, token))
    return out


def _mismatch(what: str, features: list[torch.Tensor], prompts: Sequence[Sequence[int]], token: int) -> str:
    runs = [n for p in prompts for n in _runs([t == token for t in p])]
    return (f"the prompt holds {len(runs)} {what}(s) of {runs} soft tokens but {len(features)} {what}(s) of "
            f"{[len(f) for f in features]} were given (each <|{what}|> placeholder needs one {what}, expanded by "
            f"the processor)")


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
