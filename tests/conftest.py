"""Shared fixtures: tiny DiffusionGemma checkpoints written by transformers' own `save_pretrained`.

Two configurations: `window` (sliding window 8, prompts longer than it) and `multi` (8-token canvases,
several per request). Each in two weight variants: `random` (as transformers initialises them: near-uniform
predictions, one token accepted per pass) and `confident` (embeddings scaled up and the residual branches
damped, so the decoder is sure of itself: several tokens accepted per pass, early stopping, EOS).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (tests/test_moe_kernel.py). The switch is read when
# triton is imported, so it is set here, before any test module imports it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEXT_BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, global_head_dim=32, num_global_key_value_heads=1, num_experts=4, top_k_experts=2,
    moe_intermediate_size=32, max_position_embeddings=4096, use_bidirectional_attention="vision",
)
VISION = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, head_dim=16)
CONFIGS = {
    "window": dict(text=dict(sliding_window=8, num_hidden_layers=4,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
                   canvas_length=16),
    "multi": dict(text=dict(sliding_window=32, num_hidden_layers=3,
                            layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
                  canvas_length=8),
}


def build_reference(name: str, variant: str, seed: int = 0):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    spec = CONFIGS[name]
    cfg = DiffusionGemmaConfig(text_config={**TEXT_BASE, **spec["text"]}, vision_config=VISION,
                               canvas_length=spec["canvas_length"])
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    if variant == "confident":
        with torch.no_grad():
            model.model.decoder.embed_tokens.weight.mul_(20)
            for n, p in model.named_parameters():
                if n.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                    p.mul_(0.3)
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test models are tiny: their matmuls take microseconds, and extra threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_checkpoint(tmp_path_factory):
    """(name, variant) -> (path, transformers model loaded back from that path)."""
    pytest.importorskip("transformers")
    from transformers import DiffusionGemmaForBlockDiffusion

    cache = {}

    def get(name: str, variant: str = "random"):
        key = (name, variant)
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{name}-{variant}")
            build_reference(name, variant).save_pretrained(path)
            cache[key] = (path, DiffusionGemmaForBlockDiffusion.from_pretrained(path).eval())
        return cache[key]

    return get


# A tiny model that reads images (VISION.md's recipe): an image of 60 soft tokens is longer than the sliding window
# (8), a full-attention layer sits between sliding ones, and the tensors transformers initialises to constants are
# perturbed so that a mix-up of any of them shows.
VISION_TEXT = dict(sliding_window=8, num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
VISION_TOWER = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=16, patch_size=4, pooling_kernel_size=2,
                    position_embedding_size=160, standardize=True)
VISION_IDS = dict(image_token_id=500, boi_token_id=501, eoi_token_id=502)
VIDEO_TOKEN_ID = 503  # written into config.json after saving: transformers' DiffusionGemmaConfig has no such field


def build_vision_reference(canvas_length: int = 8, seed: int = 0):
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    cfg = DiffusionGemmaConfig(text_config={**TEXT_BASE, **VISION_TEXT}, vision_config=VISION_TOWER,
                               canvas_length=canvas_length, **VISION_IDS)
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("position_embedding_table", "std_bias")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith(("norm.weight", "std_scale")):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def vision_checkpoint(tmp_path_factory):
    """(path, transformers model) of the tiny vision model, saved by transformers' `save_pretrained`."""
    pytest.importorskip("transformers")
    import json

    path = tmp_path_factory.mktemp("vision")
    model = build_vision_reference()
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "video_token_id": VIDEO_TOKEN_ID}))
    return path, model


@pytest.fixture(scope="session")
def vision_model_dir(vision_checkpoint, tmp_path_factory):
    """The tiny vision model with a (byte-level) tokenizer beside it: what the processor, CLI and server need."""
    import shutil

    from dgemma.tokenizer import byte_tokenizer

    path = tmp_path_factory.mktemp("vision-tok")
    shutil.copytree(vision_checkpoint[0], path, dirs_exist_ok=True)
    byte_tokenizer().save(path)
    return path


def write_picture(path, w: int = 50, h: int = 30, seed: int = 0):
    """A random RGB PNG at `path`."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path
@pytest.fixture(scope="session")
def served():
    """`served(ARGS, ENV)`: a context manager running `dgemma serve ARGS` (see `_served`)."""
    return _served


@contextlib.contextmanager
def _served(args: list[str], env: dict[str, str], wait_s: float = 120):
    """`dgemma serve ARGS` on a free local port, in a subprocess: yields its URL once /health answers; stopped after."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "dgemma", "serve", *args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up within {wait_s:g} s")
        time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
