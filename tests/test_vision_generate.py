"""Images in the encoder, against transformers: generation token for token with `vision_mask="transformers"`,
encoder logits under Gemma 4's vision mask with the default one, video as frames, mixed batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import VIDEO_TOKEN_ID, VISION_IDS

import dgemma
from dgemma.engine.media import batch_media, prompt_media
from dgemma.media import ImageProcessor
from dgemma.model.kv_cache import KVCache

pytest.importorskip("transformers")
pytest.importorskip("PIL")
from PIL import Image  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

IMG, BOI, EOI = VISION_IDS["image_token_id"], VISION_IDS["boi_token_id"], VISION_IDS["eoi_token_id"]
PROCESSOR = ImageProcessor(patch_size=4, pooling_kernel_size=2, max_soft_tokens=70)


def _pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _batch(rows_of_sizes, filler=(10, 11, 12)):
    """Equal-length rows `bos text [boi image eoi text]...` (padded with text), their pixels and type ids."""
    pictures = _pictures([s for row in rows_of_sizes for s in row])
    processed = PROCESSOR(pictures)
    counts = iter(processed.num_soft_tokens_per_image)
    rows = []
    for sizes in rows_of_sizes:
        row = [2, filler[0]]
        for _ in sizes:
            row += [BOI, *[IMG] * next(counts), EOI, filler[1]]
        rows.append(row)
    width = max(len(r) for r in rows)
    rows = [r[:1] + [filler[2]] * (width - len(r)) + r[1:] for r in rows]
    ids = torch.tensor(rows)
    return ids, torch.from_numpy(processed.pixel_values), torch.from_numpy(processed.image_position_ids), \
        (ids == IMG).long()


@pytest.mark.parametrize("rows_of_sizes,seed", [
    ([[(50, 30)]], 0),  # one image of 60 soft tokens: longer than the sliding window (8)
    ([[(50, 30), (30, 50)], [(64, 64)]], 1),  # several images in several rows
])
def test_generate_matches_transformers_token_for_token(vision_checkpoint, rows_of_sizes, seed):
    path, ref = vision_checkpoint
    ids, pixels, positions, types = _batch(rows_of_sizes)
    settings = dict(max_new_tokens=16, max_denoising_steps=4)
    torch.manual_seed(seed)
    expected = ref.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                            image_position_ids=positions, mm_token_type_ids=types, **settings)
    ours = dgemma.DiffusionGemma.from_pretrained(path, vision_mask="transformers")
    torch.manual_seed(seed)
    got = ours.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                        image_position_ids=positions, mm_token_type_ids=types, **settings)
    assert torch.equal(got.sequences, expected.sequences)


def _reference_encoder_logits(ref, ids, pixels, positions, types, masks):
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    position_ids = torch.arange(ids.shape[1])[None].expand_as(ids)
    mapping = masks(config=ref.config.get_text_config(), inputs_embeds=torch.empty(*ids.shape, 0),
                    attention_mask=torch.ones_like(ids).bool(), past_key_values=cache, position_ids=position_ids,
                    block_sequence_ids=_block_ids(types))
    hidden = ref.model.encoder(input_ids=ids, pixel_values=pixels, image_position_ids=positions,
                               attention_mask=mapping, position_ids=position_ids, past_key_values=cache,
                               mm_token_type_ids=types).last_hidden_state
    logits = ref.lm_head(hidden).float()
    cap = ref.config.text_config.final_logit_softcapping
    return torch.tanh(logits / cap) * cap


def _block_ids(types):
    from transformers.models.gemma4.modeling_gemma4 import get_block_sequence_ids_for_mask

    return get_block_sequence_ids_for_mask(types, types.device)


def _our_encoder_logits(model, ids, pixels, positions, types):
    media = prompt_media(model, ids.tolist(), types.tolist(), pixels, positions)
    cache = KVCache(model.text, ids.shape[0], ids.shape[1], model.config.canvas_length)
    return model.logits(model.encode(ids, cache, media=batch_media(media, ids.shape[1], model.device)))


@torch.no_grad()
def test_default_mask_is_gemma4s_vision_mask(vision_checkpoint):
    """Gemma 4's mask (transformers' `create_masks_for_vision_model`): both ways within an image on sliding layers,
    inside the window; full layers causal. It differs from the wider one, which the other mode reproduces."""
    from transformers.masking_utils import create_masks_for_generate
    from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model

    path, ref = vision_checkpoint
    ids, pixels, positions, types = _batch([[(50, 30), (30, 50)], [(64, 64)]])
    ours = dgemma.DiffusionGemma.from_pretrained(path)
    gemma4 = _our_encoder_logits(ours.model, ids, pixels, positions, types)
    expected = _reference_encoder_logits(ref, ids, pixels, positions, types, create_masks_for_vision_model)
    assert (gemma4 - expected).abs().max() <= 1e-4
    wide = _reference_encoder_logits(ref, ids, pixels, positions, types, create_masks_for_generate)
    assert (gemma4 - wide).abs().max() > 1e-2  # the two masks really differ here
    ours.model.vision_mask = "transformers"
    assert (_our_encoder_logits(ours.model, ids, pixels, positions, types) - wide).abs().max() <= 1e-4


def test_mixed_batch_rows_keep_their_tokens(vision_checkpoint):
    """A row without images and a row with one, each with its own seed: the same tokens as alone."""
    path, _ = vision_checkpoint
    model = dgemma.DiffusionGemma.from_pretrained(path)
    image_ids, pixels, positions, types = _batch([[(50, 30)]])
    text_ids = torch.tensor([[2] + list(range(20, 40))])
    settings = dict(max_new_tokens=16, max_denoising_steps=4)
    alone_image = model.generate(input_ids=image_ids, pixel_values=pixels, image_position_ids=positions, seed=5,
                                 **settings).sequences[0, image_ids.shape[1]:]
    alone_text = model.generate(input_ids=text_ids, seed=6, **settings).sequences[0, text_ids.shape[1]:]
    width = image_ids.shape[1]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    ids[0], mask[0] = image_ids[0], 1
    ids[1, :text_ids.shape[1]], mask[1, :text_ids.shape[1]] = text_ids[0], 1
    both = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_position_ids=positions,
                          seed=[5, 6], **settings).sequences[:, width:]
    assert torch.equal(both[0], alone_image) and torch.equal(both[1], alone_text)


def test_video_equals_its_frames_as_images(vision_checkpoint):
    """transformers' DiffusionGemma has no video: the reference is its generate over the frames as images (video
    soft tokens written with the image id), which is what a video is to Gemma 4."""
    path, ref = vision_checkpoint
    frames = _pictures([(40, 24)] * 3, seed=3)
    model = dgemma.DiffusionGemma.from_pretrained(path, vision_mask="transformers")
    processor = dgemma.Processor(dgemma.tokenizer.byte_tokenizer(), model.config, max_soft_tokens=70)
    inputs = processor(text="<|video|> What happens?", videos=[frames])
    assert inputs["num_frames_per_video"] == [3]
    ids = inputs["input_ids"]
    assert int((ids == VIDEO_TOKEN_ID).sum()) == 3 * len(inputs["video_position_ids"][0][inputs["video_position_ids"]
                                                                                         [0][:, 0] >= 0]) // 4
    settings = dict(max_new_tokens=8, max_denoising_steps=3)
    torch.manual_seed(0)
    got = model.generate(**inputs, **settings)
    as_images = torch.where(ids == VIDEO_TOKEN_ID, IMG, ids)
    torch.manual_seed(0)
    expected = ref.generate(as_images, attention_mask=inputs["attention_mask"],
                            pixel_values=inputs["pixel_values_videos"], image_position_ids=inputs["video_position_ids"],
                            mm_token_type_ids=(as_images == IMG).long(), **settings)
    assert torch.equal(got.sequences[:, ids.shape[1]:], expected.sequences[:, ids.shape[1]:])


@pytest.mark.parametrize("change,message", [
    (dict(drop_image=True), "holds 2 image"),
    (dict(extra_image=True), "holds 1 image"),
    (dict(no_pixels=True), "holds 1 image"),
])
def test_placeholders_and_images_must_match(vision_checkpoint, change, message):
    path, _ = vision_checkpoint
    model = dgemma.DiffusionGemma.from_pretrained(path)
    sizes = [[(50, 30), (30, 50)]] if change.get("drop_image") else [[(50, 30)]]
    ids, pixels, positions, _ = _batch(sizes)
    if change.get("drop_image"):
        pixels, positions = pixels[:1], positions[:1]
    if change.get("extra_image"):
        pixels, positions = torch.cat([pixels, pixels]), torch.cat([positions, positions])
    kwargs = {} if change.get("no_pixels") else dict(pixel_values=pixels, image_position_ids=positions)
    with pytest.raises(dgemma.ConfigError, match=message):
        model.generate(input_ids=ids, max_new_tokens=8, **kwargs)
