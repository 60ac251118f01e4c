"""Gemma 4's image processor with Pillow and numpy: the same numbers as transformers' `Gemma4ImageProcessorPil`.

Steps: RGB (transparency composited onto white) -> aspect-preserving bicubic resize so that the image holds at
most `max_soft_tokens * k**2` patches with sides multiples of `k * patch` -> scale to [0, 1] (no mean/std: the
model maps to [-1, 1] itself) -> patches of `patch x patch x 3` values, channels last within a patch, row by row
-> padded to the budget with zero patches at position (-1, -1).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
DEFAULT_BUDGET = 280


class MediaError(ValueError):
    """An image or video that cannot be read or used: the message says which and why."""


def _pil():
    try:
        import PIL.Image
    except ImportError:  # an optional extra: the core install reads text only
        raise MediaError("reading images needs Pillow: pip install 'dgemma[vision]'") from None
    return PIL.Image


@dataclass
class ProcessedImages:
    """What the processor returns for a list of images (transformers' names)."""

    pixel_values: np.ndarray  # [N, max_patches, 3 * patch**2] float32
    image_position_ids: np.ndarray  # [N, max_patches, 2] int64, (column, row); (-1, -1) pads
    num_soft_tokens_per_image: list[int]


def target_size(height: int, width: int, patch_size: int, max_patches: int, pooling_kernel_size: int
                ) -> tuple[int, int]:
    """The largest (height, width) with the image's aspect ratio, sides multiples of `k * patch`, that holds at
    most `max_patches` patches; a side below one block becomes one block (very long or very tall images)."""
    target_px = max_patches * patch_size ** 2
    factor = math.sqrt(target_px / (height * width))
    side = pooling_kernel_size * patch_size
    h = int(math.floor(factor * height / side)) * side
    w = int(math.floor(factor * width / side)) * side
    if h == 0 and w == 0:
        raise MediaError(f"a {width}x{height} image cannot be resized to at least one {side}-pixel block")
    longest = (max_patches // pooling_kernel_size ** 2) * side
    if h == 0:
        h, w = side, min(int(math.floor(width / height)) * side, longest)
    elif w == 0:
        h, w = min(int(math.floor(height / width)) * side, longest), side
    if h * w > target_px:
        raise MediaError(f"a {width}x{height} image does not fit {max_patches} patches of {patch_size} pixels")
    return h, w


def to_rgb(image: Any) -> Any:
    """A PIL image in RGB, transparency composited onto white (as transformers converts)."""
    Image = _pil()
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(source: Any, max_pixels: int | None = None) -> Any:
    """A decoded RGB PIL image from a path, bytes, a PIL image or an array ([H, W], [H, W, 3|4], uint8 or
    floats in [0, 1]). Corrupt or truncated data, unknown formats and decompression bombs (Pillow's limit) raise
    `MediaError`; so does an image of more than `max_pixels` pixels."""
    Image = _pil()
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    else:
        if isinstance(source, (str, Path)):
            try:
                data = Path(source).read_bytes()
            except OSError as e:
                raise MediaError(f"cannot read image {source}: {e.strerror or e}") from None
        elif isinstance(source, (bytes, bytearray, memoryview)):
            data = bytes(source)
        else:
            raise MediaError(f"an image must be a path, bytes, a PIL image or an array, got {type(source).__name__}")
        image = _decode(data)
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise MediaError(f"image of {image.width}x{image.height} pixels is over the limit of {max_pixels} pixels")
    return to_rgb(image)


def _decode(data: bytes) -> Any:
    Image = _pil()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decodes now: a truncated file fails here, not later
    except Image.DecompressionBombError as e:
        raise MediaError(f"image refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise MediaError("not an image in a format Pillow reads (unsupported format or not an image)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MediaError(f"corrupt or truncated image: {e}") from None
    if image.width < 1 or image.height < 1:
        raise MediaError("image has no pixels")
    return image


def _from_array(array: np.ndarray) -> Any:
    Image = _pil()
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] > 4:
        array = np.moveaxis(array, 0, -1)  # channels first -> last
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise MediaError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4], got shape {list(array.shape)}")
    if array.dtype != np.uint8:
        if not np.issubdtype(array.dtype, np.floating) or not (np.all(array >= 0) and np.all(array <= 1)):
            raise MediaError(f"an image array must be uint8, or floats in [0, 1], got {array.dtype}")
        array = (array * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array))


class ImageProcessor:
    """`Gemma4ImageProcessorPil` with Pillow and numpy. `max_soft_tokens`: one of `SOFT_TOKEN_BUDGETS`."""

    def __init__(self, patch_size: int = 16, pooling_kernel_size: int = 3, max_soft_tokens: int = DEFAULT_BUDGET,
                 max_pixels: int | None = None):
        check_budget(max_soft_tokens)
        self.patch_size, self.pooling_kernel_size = patch_size, pooling_kernel_size
        self.max_soft_tokens, self.max_pixels = max_soft_tokens, max_pixels

    def __call__(self, images: list[Any], max_soft_tokens: int | None = None) -> ProcessedImages:
        budget = check_budget(self.max_soft_tokens if max_soft_tokens is None else max_soft_tokens)
        patches, positions, counts = [], [], []
        for source in images:
            p, pos = self.patchify(open_image(source, self.max_pixels), budget)
            patches.append(p)
            positions.append(pos)
            counts.append(int((pos[:, 0] >= 0).sum()) // self.pooling_kernel_size ** 2)
        width = 3 * self.patch_size ** 2
        if not patches:
            return ProcessedImages(np.zeros((0, 0, width), np.float32), np.zeros((0, 0, 2), np.int64), [])
        return ProcessedImages(np.stack(patches), np.stack(positions), counts)

    def patchify(self, image: Any, budget: int) -> tuple[np.ndarray, np.ndarray]:
        """An RGB PIL image -> (patches [max_patches, 3 * patch**2] float32, positions [max_patches, 2])."""
        p, k = self.patch_size, self.pooling_kernel_size
        max_patches = budget * k ** 2
        h, w = target_size(image.height, image.width, p, max_patches, k)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), resample=_pil().Resampling.BICUBIC)
        pixels = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)  # [H, W, 3]
        rows, cols = h // p, w // p
        patches = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, -1)
        grid_x, grid_y = np.meshgrid(np.arange(cols), np.arange(rows), indexing="xy")
        positions = np.stack([grid_x, grid_y], axis=-1).reshape(rows * cols, 2)
        pad = max_patches - rows * cols
        patches = np.pad(patches, [(0, pad), (0, 0)])
        positions = np.pad(positions, [(0, pad), (0, 0)], constant_values=-1).astype(np.int64)
        return patches, positions


def check_budget(max_soft_tokens: Any) -> int:
    if max_soft_tokens not in SOFT_TOKEN_BUDGETS or isinstance(max_soft_tokens, bool):
        raise MediaError(f"max_soft_tokens must be one of {', '.join(map(str, SOFT_TOKEN_BUDGETS))}, got "
                         f"{max_soft_tokens!r}")
    return int(max_soft_tokens)
