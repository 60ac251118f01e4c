"""The Gemma 4 vision tower: image patches in, soft tokens in the text model's embedding space out.

Layout and arithmetic follow transformers' `Gemma4VisionModel` + `Gemma4MultimodalEmbedder` (module names are
the checkpoint's: `model.encoder.vision_tower.*`, `model.encoder.embed_vision.*`):

1. patch embedding: `input_proj(2 * pixels - 1)` plus a learned 2D position table (one row per column, one per
   row, summed; zero on padding patches);
2. pre/post-norm encoder layers, attention bidirectional over an image's real patches, scaling 1.0 (the scale
   lives in `q_norm` / `k_norm`), values normed without a scale, 2D (axial) RoPE: the first half of each head's
   channels rotate by the patch's column, the second half by its row;
3. pooling: each k x k block of patches averaged into one soft token (in fp32), scaled by sqrt(width);
4. standardization `(h - std_bias) * std_scale` in fp32, then cast to the weight dtype once;
5. `embed_vision`: a scale-free RMSNorm and a linear map to the text width (no sqrt(hidden) embedding scale).

Pixels arrive as the image processor gives them (`dgemma.media`): `[images, max_patches, 3 * patch**2]` with
(column, row) positions per patch, (-1, -1) for padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import RMSNorm, gelu_tanh


@dataclass
class EncoderMedia:
    """What an encoder pass needs of a batch's images: the soft tokens `embeds` [N, text hidden] that replace the
    token embeddings at `slots` [B, T] (True N times, filled row by row), and `blocks` [B, T]: the image or video
    frame each token belongs to (-1: none), whose tokens attend to each other both ways."""

    embeds: torch.Tensor
    slots: torch.Tensor
    blocks: torch.Tensor


class Projection(nn.Module):
    """A bias-free linear layer under the checkpoint's name `<name>.linear.weight` (Gemma 4's clippable linear,
    without clipping: the DiffusionGemma tower has none)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def axial_rope_tables(config: VisionConfig, positions: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [N, P, 1, head_dim] for patch positions [N, P, 2] (column, row): per head, channels
    [0, D/2) turn with the column and [D/2, D) with the row, each half laid out for `rotate_half`."""
    quarter = config.head_dim // 4
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float,
                                                          device=positions.device) / (2 * quarter)))
    freqs = positions[..., None].float() * inv_freq  # [N, P, 2, D/4]
    col, row = freqs[:, :, 0], freqs[:, :, 1]
    angles = torch.cat([col, col, row, row], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_axial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on each half of the head channels [N, P, heads, D] with its own angles."""
    parts = [p * c + _rotate_half(p) * s for p, c, s in zip(x.chunk(2, -1), cos.chunk(2, -1), sin.chunk(2, -1))]
    return torch.cat(parts, dim=-1)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.head_dim = d
        self.q_proj = Projection(h, config.num_attention_heads * d)
        self.k_proj = Projection(h, config.num_key_value_heads * d)
        self.v_proj = Projection(h, config.num_key_value_heads * d)
        self.o_proj = Projection(config.num_attention_heads * d, h)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x [N, P, H]; `keys` [N, 1, 1, P]: the real patches, which every patch attends to."""
        n, p, _ = x.shape
        q = apply_axial_rope(self.q_norm(self.q_proj(x).view(n, p, -1, self.head_dim)), cos, sin)
        k = apply_axial_rope(self.k_norm(self.k_proj(x).view(n, p, -1, self.head_dim)), cos, sin)
        v = self.v_norm(self.v_proj(x).view(n, p, -1, self.head_dim))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keys,
                                             scale=1.0, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(n, p, -1))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.gate_proj = Projection(config.hidden_size, config.intermediate_size)
        self.up_proj = Projection(config.hidden_size, config.intermediate_size)
        self.down_proj = Projection(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh(self.gate_proj(x)) * self.up_proj(x))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = VisionAttention(config)
        self.mlp = VisionMLP(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, keys))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PatchEmbedder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.input_proj = nn.Linear(3 * config.patch_size ** 2, config.hidden_size, bias=False)
        self.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, config.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        # no normalisation in the processor: the model maps [0, 1] to [-1, 1] itself (in the pixels' dtype)
        x = self.input_proj((2 * (pixels - 0.5)).to(self.input_proj.weight.dtype))
        where = positions.clamp(min=0)
        table = self.position_embedding_table
        pos = F.embedding(where[..., 0], table[0]) + F.embedding(where[..., 1], table[1])
        return x + torch.where(padding[..., None], 0.0, pos)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))


class VisionTower(nn.Module):
    """Patches [N, P, 3 * patch**2] and positions [N, P, 2] -> soft tokens [tokens, vision width], the real ones of
    every image in order (`Gemma4VisionModel`)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embedder = PatchEmbedder(config)
        self.encoder = Encoder(config)
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(config.hidden_size))
            self.register_buffer("std_scale", torch.ones(config.hidden_size))

    def forward(self, pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        padding = (positions == -1).all(dim=-1)
        x = self.patch_embedder(pixels, positions, padding)
        cos, sin = axial_rope_tables(self.config, positions, x.dtype)
        keys = ~padding[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, keys)
        pooled, real = self.pool(x.masked_fill(padding[..., None], 0.0), positions)
        pooled = pooled[real]
        if self.config.standardize:  # in fp32: subtracting the bias cancels large values
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled.to(x.dtype)

    def pool(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over each k x k block of patches (fp32), times sqrt(width) in fp32: [N, P / k**2, H] and which of
        those slots hold a real block [N, P / k**2]. Patch (x, y) of an image W patches wide goes to slot
        x // k + (W // k) * (y // k): the pooled grid row by row."""
        k = self.config.pooling_kernel_size
        n, p, _ = x.shape
        length = p // k ** 2
        if length * k ** 2 != p:
            raise ValueError(f"{p} patches per image cannot be pooled by {k} x {k} blocks")
        where = positions.clamp(min=0)
        width = where[..., 0].max(dim=-1, keepdim=True)[0] + 1
        blocks = torch.div(where, k, rounding_mode="floor")
        slot = blocks[..., 0] + (width // k) * blocks[..., 1]
        weights = F.one_hot(slot.long(), length).float() / k ** 2
        pooled = (weights.transpose(1, 2) @ x.float()).to(x.dtype)
        real = ~(weights == 0).all(dim=1)
        return pooled.float() * self.config.hidden_size ** 0.5, real


class VisionEmbedder(nn.Module):
    """Soft tokens into the text model's space: scale-free RMSNorm, then a linear map (`embed_vision`)."""

    def __init__(self, config: VisionConfig, text_hidden: int):
        super().__init__()
        self.embedding_pre_projection_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, with_scale=False)
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(self.embedding_pre_projection_norm(x))


def soft_token_counts(positions: torch.Tensor, pooling_kernel_size: int) -> list[int]:
    """Soft tokens per image [N, P, 2]: its real patches over k**2."""
    return ((positions != -1).all(dim=-1).sum(dim=-1) // pooling_kernel_size ** 2).tolist()
