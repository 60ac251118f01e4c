"""The image processor against transformers' `Gemma4ImageProcessorPil`: equal outputs, bit for bit."""

from __future__ import annotations

import io

import numpy as np
import pytest

from dgemma.media import ImageProcessor, MediaError

PIL = pytest.importorskip("PIL")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil  # noqa: E402


def _image(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return image if mode == "RGBA" else image.convert(mode)


def _assert_equal(ours, theirs):
    assert ours.pixel_values.dtype == np.float32
    np.testing.assert_array_equal(ours.pixel_values, theirs["pixel_values"])
    np.testing.assert_array_equal(ours.image_position_ids, theirs["image_position_ids"])
    assert ours.num_soft_tokens_per_image == list(theirs["num_soft_tokens_per_image"])


@pytest.mark.parametrize("budget", [70, 140, 280, 560, 1120])
def test_equal_to_transformers_for_every_budget(budget):
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate([(50, 30), (768, 768), (1024, 768), (300, 20)])]
    theirs = Gemma4ImageProcessorPil(max_soft_tokens=budget)(images=images, return_tensors="np")
    _assert_equal(ImageProcessor(max_soft_tokens=budget)(images), theirs)


def test_token_counts_of_known_sizes():
    """VISION.md's worked sizes at the default budget of 280."""
    images = [_image(w, h) for w, h in [(500, 500), (1024, 768), (1920, 1080), (2000, 100)]]
    assert ImageProcessor()(images).num_soft_tokens_per_image == [256, 266, 264, 222]


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "LA", "CMYK"])
def test_colour_modes_convert_as_transformers_does(mode):
    image = _image(97, 61, mode)
    theirs = Gemma4ImageProcessorPil(max_soft_tokens=70)(images=[image], return_tensors="np")
    _assert_equal(ImageProcessor(max_soft_tokens=70)([image]), theirs)


def test_paths_bytes_arrays_and_pil_give_the_same(tmp_path):
    image = _image(120, 80)
    path = tmp_path / "a.png"
    image.save(path)
    expected = ImageProcessor()([image])
    array = np.asarray(image)
    for source in (path, str(path), path.read_bytes(), array, array.astype(np.float32) / 255, array.transpose(2, 0, 1)):
        got = ImageProcessor()([source])
        np.testing.assert_array_equal(got.pixel_values, expected.pixel_values)
    theirs = Gemma4ImageProcessorPil()(images=[array], return_tensors="np")
    _assert_equal(ImageProcessor()([array]), theirs)


def test_small_patch_settings_match_transformers():
    """The tiny test model's settings (patch 4, 2 x 2 pooling)."""
    images = [_image(50, 30), _image(30, 50, seed=1)]
    theirs = Gemma4ImageProcessorPil(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)(
        images=images, return_tensors="np")
    _assert_equal(ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)(images), theirs)


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data,message", [
    (b"not an image at all", "unsupported format"),
    (_png(Image.new("RGB", (64, 64)))[:60], "corrupt or truncated"),
])
def test_bad_bytes_get_specific_errors(data, message):
    with pytest.raises(MediaError, match=message):
        ImageProcessor()([data])


def test_decompression_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over twice its limit
    with pytest.raises(MediaError, match="decompression bomb"):
        ImageProcessor()([_png(Image.new("RGB", (100, 100)))])


def test_pixel_limit_and_budgets():
    with pytest.raises(MediaError, match="over the limit of 100 pixels"):
        ImageProcessor(max_pixels=100)([_image(20, 20)])
    with pytest.raises(MediaError, match="max_soft_tokens must be one of 70, 140, 280, 560, 1120"):
        ImageProcessor(max_soft_tokens=100)
    with pytest.raises(MediaError, match="cannot read image"):
        ImageProcessor()(["/nonexistent/x.png"])
    with pytest.raises(MediaError, match="array must be"):
        ImageProcessor()([np.zeros((4, 4, 2), np.uint8)])
