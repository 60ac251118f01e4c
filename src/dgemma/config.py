"""Configuration: the model config (HF `config.json`) and the diffusion generation config.

Field names match Hugging Face's `diffusion_gemma` / `diffusion_gemma_text` so a checkpoint's
`config.json` and `generation_config.json` read and write without translation. Two presets:
`26b-a4b` (google/diffusiongemma-26B-A4B-it) and `tiny` (both attention types, MoE top-2; tests, demos).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or value that dgemma cannot use."""


VIDEO_TOKEN_ID = 258_884  # Gemma 4's `<|video|>` soft token


SLIDING, FULL = "sliding_attention", "full_attention"
ROPE_TYPES = ("default", "proportional")  # the two the model uses (sliding, full); others are refused, not approximated
ACTIVATION = "gelu_pytorch_tanh"  # tanh-approximated GELU, the only activation the model uses
BIDIRECTIONAL = (None, "vision")  # "vision": bidirectional within each image (`VisionConfig`); "all" is refused
VISION_MASKS = ("gemma4", "transformers")  # how image tokens attend to each other in the encoder (docs/multimodal.md)


def _default_rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
    }


@dataclass
class TextConfig:
    """The language model (`text_config`, `model_type: diffusion_gemma_text`)."""

    vocab_size: int = 262_144
    hidden_size: int = 2816
    intermediate_size: int = 2112
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = 2
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 262_144
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1  # None: no EOS
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    rope_parameters: dict[str, dict[str, Any]] = field(default_factory=_default_rope_parameters)
    sliding_window: int = 1024
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    num_experts: int = 128
    top_k_experts: int = 8
    moe_intermediate_size: int = 704
    use_bidirectional_attention: str | None = "vision"
    attention_bias: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.layer_types is None:
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if self.layer_types and self.layer_types[-1] != FULL:
            self.layer_types[-1] = FULL  # the last layer is always global, as in the reference
        self.validate()

    def validate(self) -> None:
        for name in _TEXT_SIZES:
            value = getattr(self, name)
            if value is None:  # transformers' default for the MoE sizes: it cannot build that model either
                raise ConfigError(f"text_config.{name} is missing or null: it must be an integer >= 1")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"text_config.{name} must be an integer >= 1, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_hidden_layers}"
            )
        unknown = set(self.layer_types) - {SLIDING, FULL}
        if unknown:
            raise ConfigError(f"unknown layer types {sorted(unknown)}; expected {SLIDING!r} or {FULL!r}")
        if not isinstance(self.rope_parameters, dict):
            raise ConfigError(f"text_config.rope_parameters must be a JSON object, got "
                              f"{type(self.rope_parameters).__name__}")
        for layer_type in sorted(set(self.layer_types)):
            params = self.rope_parameters.get(layer_type)
            if params is None:
                raise ConfigError(f"text_config.rope_parameters has no entry for {layer_type!r}")
            if not isinstance(params, dict):
                raise ConfigError(f"text_config.rope_parameters[{layer_type!r}] must be a JSON object, got "
                                  f"{type(params).__name__}")
            rope_type = params.get("rope_type", "default")
            if rope_type not in ROPE_TYPES:
                raise ConfigError(f"text_config.rope_parameters[{layer_type!r}]: rope_type {rope_type!r} is not "
                                  f"supported (dgemma implements {' and '.join(map(repr, ROPE_TYPES))})")
        if self.num_experts < 1 or not 1 <= self.top_k_experts <= self.num_experts:
            raise ConfigError(f"need 1 <= top_k_experts ({self.top_k_experts}) <= num_experts ({self.num_experts})")
        for i in range(self.num_hidden_layers):
            kv = self.layer_kv_heads(i)
            if self.num_attention_heads % kv:
                raise ConfigError(f"layer {i}: {self.num_attention_heads} query heads not divisible by {kv} KV heads")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = value if isinstance(value, (list, tuple)) and name == "eos_token_id" else [value]
            if value is not None and not all(isinstance(i, int) and not isinstance(i, bool)
                                             and 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"text_config.{name} must be null or a token id in [0, {self.vocab_size})"
                                  f"{' (or a list of them)' if name == 'eos_token_id' else ''}, got {value!r}")
        if self.attention_bias:
            raise ConfigError("attention_bias=True is not part of the DiffusionGemma architecture")
        if self.hidden_activation != ACTIVATION:
            raise ConfigError(f"text_config.hidden_activation {self.hidden_activation!r} is not supported "
                              f"(dgemma implements {ACTIVATION!r})")
        if self.use_bidirectional_attention not in BIDIRECTIONAL:
            raise ConfigError(f"text_config.use_bidirectional_attention {self.use_bidirectional_attention!r} is not "
                              f"supported (dgemma implements 'vision' and null: a causal encoder over text)")

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_head_dim(self, layer: int) -> int:
        return self.head_dim if self.is_sliding(layer) else self.global_head_dim

    def layer_kv_heads(self, layer: int) -> int:
        if self.is_sliding(layer) or self.num_global_key_value_heads is None:
            return self.num_key_value_heads
        return self.num_global_key_value_heads

    @property
    def eos_token_ids(self) -> list[int]:
        """The EOS ids as a list; [] for None (no EOS)."""
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("global_head_dim")
        d.pop("num_global_key_value_heads")
        # transformers 5.x stores the full-attention overrides per layer index
        d["per_layer_config"] = {
            str(i): {"head_dim": self.layer_head_dim(i), "num_key_value_heads": self.layer_kv_heads(i)}
            for i in range(self.num_hidden_layers)
            if not self.is_sliding(i)
        }
        d["model_type"] = "diffusion_gemma_text"
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "TextConfig":
        """Reads a `text_config` as transformers does: an absent field takes DiffusionGemmaTextConfig's default (not
        this class's, the 26B model's), and `per_layer_config` (the full layers' overrides) wins over the Gemma 4
        style `global_head_dim` / `num_global_key_value_heads`."""
        d = dict(d)
        mt = d.pop("model_type", "diffusion_gemma_text")
        if mt != "diffusion_gemma_text":
            raise ConfigError(f"text_config.model_type is {mt!r}, expected 'diffusion_gemma_text'")
        per_layer = d.pop("per_layer_config", None)
        kwargs = {**_HF_TEXT_DEFAULTS, **{k: v for k, v in d.items() if k in _TEXT_FIELDS}}
        if "layer_types" in d and "num_hidden_layers" not in d and isinstance(d["layer_types"], list):
            kwargs["num_hidden_layers"] = len(d["layer_types"])
        if per_layer is not None:
            override = _full_layer_override(per_layer)
            # transformers leaves out an override equal to the global value: those full layers take the global one
            kwargs["global_head_dim"] = override.get("head_dim", kwargs["head_dim"])
            kwargs["num_global_key_value_heads"] = override.get("num_key_value_heads")
        if kwargs.get("rope_parameters") is None:
            kwargs.pop("rope_parameters")
        try:
            config = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad text_config: {e}") from e
        layers = {_layer_index(k) for k, v in (per_layer or {}).items() if v}
        if layers:
            full = {i for i in range(config.num_hidden_layers) if not config.is_sliding(i)}
            if layers != full:
                raise ConfigError(f"text_config.per_layer_config overrides layers {sorted(layers)}, but the "
                                  f"full-attention layers are {sorted(full)}: dgemma supports one override shared "
                                  f"by every full-attention layer")
        return config


_TEXT_FIELDS = {f.name for f in dataclasses.fields(TextConfig)}
# the sizes every layer is built from: a string or a 0 here fails deep inside torch otherwise
_TEXT_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "global_head_dim", "max_position_embeddings", "sliding_window",
               "num_experts", "top_k_experts", "moe_intermediate_size")
# transformers 5.23's DiffusionGemmaTextConfig defaults: what a field absent from config.json means (the MoE sizes
# default to None there, which builds no model: refused by validate). global_head_dim / num_global_key_value_heads
# apply only without a per_layer_config, as there.
_HF_TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=262_144, hidden_size=2304, intermediate_size=9216, num_hidden_layers=30, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, global_head_dim=512, num_global_key_value_heads=None,
    hidden_activation=ACTIVATION, max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0,
    eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, rope_parameters=None, sliding_window=512,
    layer_types=None, final_logit_softcapping=30.0, num_experts=None, top_k_experts=None, moe_intermediate_size=None,
    use_bidirectional_attention=None, attention_bias=False, initializer_range=0.02)
assert set(_HF_TEXT_DEFAULTS) == _TEXT_FIELDS
_PER_LAYER_KEYS = ("head_dim", "num_key_value_heads")


def _layer_index(key: Any) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ConfigError(f"text_config.per_layer_config key {key!r} is not a layer index") from None


def _full_layer_override(per_layer: Any) -> dict[str, Any]:
    """The one override `per_layer_config` gives the full-attention layers ({} when it gives none)."""
    if not isinstance(per_layer, dict) or not all(isinstance(v, dict) for v in per_layer.values()):
        raise ConfigError("text_config.per_layer_config must be a JSON object of layer index -> object of overrides")
    overrides = [v for v in per_layer.values() if v]
    for override in overrides:
        unknown = sorted(set(override) - set(_PER_LAYER_KEYS))
        if unknown:
            raise ConfigError(f"text_config.per_layer_config overrides {unknown}: dgemma supports per-layer "
                              f"{' and '.join(_PER_LAYER_KEYS)} only")
        if override != overrides[0]:
            raise ConfigError(f"text_config.per_layer_config gives layers different overrides ({overrides[0]} and "
                              f"{override}): dgemma supports one override shared by every full-attention layer")
    return overrides[0] if overrides else {}


@dataclass
class VisionConfig:
    """The Gemma 4 vision tower (`vision_config`, `model_type: gemma4_vision`). An absent field takes transformers'
    Gemma4VisionConfig default; keys dgemma does not read (`default_output_length`, ...) are kept in `extra` and
    written back."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    hidden_activation: str = ACTIVATION
    rms_norm_eps: float = 1e-6
    rope_parameters: dict[str, Any] = field(default_factory=lambda: {"rope_type": "axial", "rope_theta": 100.0})
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _VISION_SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"vision_config.{name} must be an integer >= 1, got {value!r}")
        if self.head_dim % 4:  # axial RoPE: half the channels rotate by column, half by row, each in pairs
            raise ConfigError(f"vision_config.head_dim must be a multiple of 4 (2D RoPE), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"vision_config: {self.num_attention_heads} query heads not divisible by "
                              f"{self.num_key_value_heads} KV heads")
        if self.hidden_activation != ACTIVATION:
            raise ConfigError(f"vision_config.hidden_activation {self.hidden_activation!r} is not supported "
                              f"(dgemma implements {ACTIVATION!r})")
        rope = self.rope_parameters if isinstance(self.rope_parameters, dict) else {}
        if rope.get("rope_type", "axial") != "axial" or not isinstance(rope.get("rope_theta", 100.0), (int, float)):
            raise ConfigError(f"vision_config.rope_parameters must be axial RoPE with a rope_theta, got "
                              f"{self.rope_parameters!r}")
        if self.use_clipped_linears:
            raise ConfigError("vision_config.use_clipped_linears=True is not supported (the DiffusionGemma vision "
                              "tower has none)")

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters.get("rope_theta", 100.0))

    def to_hf_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **d, "model_type": "gemma4_vision"}

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"vision_config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        mt = d.pop("model_type", "gemma4_vision")
        if mt != "gemma4_vision":
            raise ConfigError(f"vision_config.model_type is {mt!r}, expected 'gemma4_vision'")
        known = {k: v for k, v in d.items() if k in _VISION_FIELDS and v is not None}
        return cls(**known, extra={k: v for k, v in d.items() if k not in _VISION_FIELDS})


def gemma4_vision() -> VisionConfig:
    """The vision tower of google/diffusiongemma-26B-A4B-it (Gemma 4's: ~573M parameters)."""
    return VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                        num_key_value_heads=16, head_dim=72, standardize=True,
                        extra={"default_output_length": 280, "global_head_dim": 72})


_VISION_FIELDS = {f.name for f in dataclasses.fields(VisionConfig)} - {"extra"}
_VISION_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "pooling_kernel_size", "patch_size", "position_embedding_size")


@dataclass
class DiffusionGemmaConfig:
    """The whole model (`config.json`, `model_type: diffusion_gemma`)."""

    text_config: TextConfig = field(default_factory=TextConfig)
    canvas_length: int = 256
    vision_config: VisionConfig | None = None  # None: a text-only model
    boi_token_id: int = 255_999
    eoi_token_id: int = 258_882
    image_token_id: int = 258_880
    # Gemma 4's `<|video|>`: transformers' DiffusionGemmaConfig has no such field, so it is written only when it differs
    video_token_id: int = VIDEO_TOKEN_ID
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if isinstance(self.canvas_length, bool) or not isinstance(self.canvas_length, int) or self.canvas_length < 1:
            raise ConfigError(f"canvas_length must be >= 1, got {self.canvas_length!r}")
        if not self.tie_word_embeddings:
            raise ConfigError("tie_word_embeddings=False (untied encoder/decoder) is not supported")
        if isinstance(self.vision_config, dict):
            self.vision_config = VisionConfig.from_hf_dict(self.vision_config)

    def to_hf_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DiffusionGemmaForBlockDiffusion"],
            "model_type": "diffusion_gemma",
            "text_config": self.text_config.to_hf_dict(),
            "canvas_length": self.canvas_length,
            "boi_token_id": self.boi_token_id,
            "eoi_token_id": self.eoi_token_id,
            "image_token_id": self.image_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }
        if self.vision_config is not None:
            d["vision_config"] = self.vision_config.to_hf_dict()
        if self.video_token_id != VIDEO_TOKEN_ID:
            d["video_token_id"] = self.video_token_id
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "DiffusionGemmaConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object, got {type(d).__name__}")
        mt = d.get("model_type")
        if mt != "diffusion_gemma":
            raise ConfigError(f"config model_type is {mt!r}: not a DiffusionGemma checkpoint (expected 'diffusion_gemma')")
        text_config = d.get("text_config")
        # absent: transformers' DiffusionGemmaTextConfig defaults (TextConfig.from_hf_dict), which build no model
        # (no MoE sizes): refused there with the missing field named
        text_config = {} if text_config is None else text_config
        if not isinstance(text_config, dict):
            raise ConfigError(f"text_config must be a JSON object, got {type(text_config).__name__}")
        text = TextConfig.from_hf_dict(text_config)
        keys = ("canvas_length", "boi_token_id", "eoi_token_id", "image_token_id", "video_token_id",
                "tie_word_embeddings", "initializer_range")
        kwargs = {k: d[k] for k in keys if d.get(k) is not None}
        vision = d.get("vision_config")
        return cls(text_config=text, vision_config=None if vision is None else VisionConfig.from_hf_dict(vision),
                   **kwargs)

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "DiffusionGemmaConfig":
        path = Path(directory, "config.json")
        if not path.is_file():
            where = Path(directory).resolve()
            raise ConfigError(f"{path}: not a file" if path.exists() else f"{where}: no config.json there (not a "
                                                                          f"checkpoint directory)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    # -- sizes ---------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token active parameters of the text model (embedding counted once)."""
        t = self.text_config
        h = t.hidden_size
        attn = dense = 0
        for i in range(t.num_hidden_layers):
            d, kv = t.layer_head_dim(i), t.layer_kv_heads(i)
            n_v = kv * d if t.is_sliding(i) else 0
            attn += h * t.num_attention_heads * d * 2 + h * kv * d + h * n_v + 2 * d
            dense += 3 * h * t.intermediate_size + 8 * h + h * t.num_experts + t.num_experts  # 7 norms + router scale
        expert = 3 * h * t.moe_intermediate_size
        experts_total = t.num_hidden_layers * t.num_experts * expert
        experts_active = t.num_hidden_layers * t.top_k_experts * expert
        embed = t.vocab_size * h
        self_cond = 3 * h * t.intermediate_size + h
        total = embed + attn + dense + experts_total + self_cond + h
        active = embed + attn + dense + experts_active + self_cond + h
        return {"total": total, "active": active, "embedding": embed, "experts": experts_total}


WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # the dtypes a model loads in (torch attribute names)
TEMPERATURE_RANGE = (1e-6, 1e6)  # t_max; t_min lies in [0, t_max]


@dataclass
class GenerationConfig:
    """Diffusion sampling settings (`generation_config.json`); defaults are the reference defaults."""

    max_new_tokens: int = 256
    max_length: int | None = None
    max_denoising_steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    do_sample: bool = True
    eos_token_id: list[int] | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    return_dict_in_generate: bool = True  # False: `generate` returns the sequences tensor alone

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        if hasattr(eos, "tolist"):  # a tensor or an array, as transformers accepts
            eos = eos.tolist()
        if isinstance(eos, int) and not isinstance(eos, bool):
            eos = [eos]
        elif isinstance(eos, tuple):
            eos = list(eos)
        self.eos_token_id = eos

    def validate(self, canvas_length: int | None = None) -> None:
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")

        positive_int("max_denoising_steps", self.max_denoising_steps)
        positive_int("max_new_tokens", self.max_new_tokens)
        if self.max_length is not None:
            positive_int("max_length", self.max_length)
        if not _is_real(self.entropy_bound) or self.entropy_bound <= 0:
            raise ConfigError(f"entropy_bound must be a number > 0, got {self.entropy_bound!r}")
        for name in ("t_min", "t_max"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
        if self.t_min > self.t_max:
            raise ConfigError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        if self.t_max <= 0:
            raise ConfigError(f"t_max must be > 0, got {self.t_max}")
        # beyond these the temperature-scaled logits leave fp32's range (inf or NaN probabilities)
        if not TEMPERATURE_RANGE[0] <= self.t_max <= TEMPERATURE_RANGE[1]:
            raise ConfigError(f"t_max must lie in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}], got {self.t_max}")
        if isinstance(self.stability_threshold, bool) or not isinstance(self.stability_threshold, int) \
                or self.stability_threshold < 0:
            raise ConfigError(f"stability_threshold must be an integer >= 0, got {self.stability_threshold!r}")
        if not _is_real(self.confidence_threshold) or self.confidence_threshold <= 0:
            raise ConfigError(f"confidence_threshold must be a number > 0, got {self.confidence_threshold!r}")
        for name in ("do_sample", "return_dict_in_generate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")
        eos = self.eos_token_id
        if eos is not None and (not isinstance(eos, list)
                                or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in eos)):
            raise ConfigError(f"eos_token_id must be a token id or a list of them (integers >= 0), got {eos!r}")

    def updated(self, **overrides: Any) -> "GenerationConfig":
        """A copy with the non-None overrides applied; unknown names raise."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown generation settings: {sorted(unknown)}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_hf_dict(self) -> dict[str, Any]:
        """Every setting `from_hf_dict` reads back, except `do_sample` (dgemma's own: transformers'
        DiffusionGemmaGenerationConfig refuses a file that has it)."""
        d = {
            "max_new_tokens": self.max_new_tokens,
            "max_denoising_steps": self.max_denoising_steps,
            "sampler_config": {"entropy_bound": self.entropy_bound, "_cls_name": "EntropyBoundSamplerConfig"},
            "t_min": self.t_min,
            "t_max": self.t_max,
            "stability_threshold": self.stability_threshold,
            "confidence_threshold": self.confidence_threshold,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "return_dict_in_generate": self.return_dict_in_generate,
        }
        if self.max_length is not None:
            d["max_length"] = self.max_length
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "GenerationConfig":
        kwargs = {f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None}
        sampler = d.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            kwargs["entropy_bound"] = sampler["entropy_bound"]
        return cls(**kwargs)

    def save(self, directory: str | Path) -> None:
        Path(directory, "generation_config.json").write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, model_config: DiffusionGemmaConfig) -> "GenerationConfig":
        """Reads `generation_config.json` if present; token ids fall back to the model config."""
        path = Path(directory, "generation_config.json")
        data = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
        elif path.exists():
            raise ConfigError(f"{path}: not a file")
        settings = cls.from_hf_dict(data).__dict__
        if data.get("eos_token_id") is None:
            # as transformers reads a checkpoint: a generation_config.json without EOS (transformers' own
            # save_pretrained writes such files), or none at all, never stops at one
            settings["eos_token_id"] = []
        gen = cls.for_model(model_config, **settings)
        if data.get("pad_token_id") is None:  # nor pads what follows an EOS
            gen = dataclasses.replace(gen, pad_token_id=None)
        try:
            gen.validate()
        except ConfigError as e:  # without generation_config.json, the token ids came from config.json
            raise ConfigError(f"{path if path.is_file() else Path(directory, 'config.json')}: {e}") from e
        return gen

    @classmethod
    def for_model(cls, model_config: DiffusionGemmaConfig, **kwargs: Any) -> "GenerationConfig":
        t = model_config.text_config
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        kwargs.setdefault("eos_token_id", t.eos_token_ids)
        kwargs.setdefault("pad_token_id", t.pad_token_id)
        kwargs.setdefault("bos_token_id", t.bos_token_id)
        return cls(**kwargs)


def _is_real(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# -- presets ------------------------------------------------------------------------------------

# the small presets: TextConfig fields and canvas length (the rest: TextConfig's defaults, the 26B model's)
_SMALL_PRESETS = {
    "tiny": (dict(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        max_position_embeddings=4096, sliding_window=16, num_experts=8, top_k_experts=2,
        moe_intermediate_size=32, layer_types=[SLIDING, SLIDING, FULL, FULL]), 32),
    "bench": (dict(
        vocab_size=4096, hidden_size=384, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, global_head_dim=128, num_global_key_value_heads=1,
        max_position_embeddings=8192, sliding_window=128, num_experts=8, top_k_experts=2,
        moe_intermediate_size=224, layer_types=[SLIDING, SLIDING, SLIDING, FULL]), 256),
}
PRESETS = ("26b-a4b", *_SMALL_PRESETS)


def preset(name: str) -> DiffusionGemmaConfig:
    """`26b-a4b`: google/diffusiongemma-26B-A4B-it; `tiny`: a few layers of both kinds, for tests and demos;
    `bench`: the CPU benchmark's ~15.6M parameters (15,607,200, embedding counted once), big enough that matmuls
    dominate, small enough for a 2-core CPU: both attention kinds (3 sliding + 1 full, as in the 26B model's 5:1
    pattern, scaled down), GQA with different KV heads / head dims per kind, MoE top-2 of 8, 256-token canvas."""
    if name == "26b-a4b":
        return DiffusionGemmaConfig(text_config=TextConfig(), canvas_length=256)
    if name in _SMALL_PRESETS:
        fields, canvas = _SMALL_PRESETS[name]
        layer_types = list(fields["layer_types"])  # each config its own list
        return DiffusionGemmaConfig(text_config=TextConfig(**{**fields, "layer_types": layer_types}),
                                    canvas_length=canvas)
    raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
