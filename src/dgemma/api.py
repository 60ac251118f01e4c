"""The user-facing model object, shaped like transformers' `DiffusionGemmaForBlockDiffusion`.

    model = dgemma.DiffusionGemma.from_pretrained("path/to/checkpoint")  # or "dgemma-code-tiny" (shipped), "tiny" (preset)
    out = model.generate(input_ids=ids, max_new_tokens=256)                     # out.sequences, out.tokens_per_forward

`generate` takes the reference's arguments with the same meanings and defaults; after the same
`torch.manual_seed` it returns the same tokens as transformers. Passing `seed` gives each row its own
random stream instead, so a row's tokens do not depend on the rest of the batch. Images and video go in under
transformers' names (`pixel_values`, `image_position_ids`, `mm_token_type_ids`, `pixel_values_videos`,
`video_position_ids`), as `model.processor` makes them (docs/multimodal.md).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import VISION_MASKS, WEIGHT_DTYPES, ConfigError, DiffusionGemmaConfig, GenerationConfig, preset
from .engine.autoregressive import generate_ar
from .engine.generate import CanvasCommit, CanvasSpec, DenoiseStep, GenerationStats, stream_generate
from .engine.media import prompt_media
from .engine.static import StaticPool
from .model.model import DiffusionGemmaModel
from .model.weights import load_weights, save_weights
from .processor import Processor
from .sampling.constraint import row_constraints
from .sampling.grammar import Constraint, GrammarCompiler
from .shipped import resolve
from .tokenizer import Tokenizer, byte_tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerateOutput:
    """What `generate` returns. Read like transformers' `ModelOutput`: by attribute, by key (`out["sequences"]`)
    or by position over the fields that are set (`out[0]`, `out.to_tuple()`); `logits`, `scores`,
    `hidden_states` and `past_key_values`, unused by diffusion generation, are None as in the reference."""

    sequences: torch.Tensor  # [B, prompt + generated], the prompt as given (padding included)
    tokens_per_forward: torch.Tensor  # [B] non-pad generated tokens / decoder passes
    stats: GenerationStats
    past_key_values: None = None
    logits: None = None
    scores: None = None
    hidden_states: None = None

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, key: str | int | slice):
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.keys()


def is_unit_initialised(name: str) -> bool:
    """Parameters transformers initialises to one (norm weights and router scales); the rest draw normal(0, std)."""
    return name.endswith(("norm.weight", "router.scale", "per_expert_scale"))


def init_weights(model: DiffusionGemmaModel, seed: int = 0) -> DiffusionGemmaModel:
    """Random weights as transformers initialises them: normal(0, initializer_range), norms and scales one."""
    g = torch.Generator().manual_seed(seed)
    std = model.config.initializer_range
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_unit_initialised(name):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _as_rows(input_ids, attention_mask) -> tuple[list[list[int]], torch.Tensor]:
    if input_ids is None:
        raise ConfigError("input_ids is required")
    if isinstance(input_ids, torch.Tensor):
        ids = _token_tensor(input_ids, "input_ids")
    elif len(input_ids) == 0:
        raise ConfigError("no prompts given")
    elif all(_is_int(t) for t in input_ids):  # one prompt as a flat list of ids
        ids = torch.tensor(input_ids, dtype=torch.long)
    else:
        rows = [list(r) for r in input_ids]
        if len({len(r) for r in rows}) > 1:
            raise ConfigError("input_ids rows have different lengths: pad them and pass attention_mask")
        if not all(_is_int(t) for r in rows for t in r):
            raise ConfigError("input_ids must hold integer token ids")
        ids = torch.tensor(rows, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ConfigError(f"input_ids must be [batch, length], got shape {list(ids.shape)}")
    if ids.shape[0] == 0:
        raise ConfigError(f"no prompts given (input_ids has shape {list(ids.shape)})")
    if attention_mask is None:
        return ids.tolist(), ids
    mask = torch.as_tensor(attention_mask).bool()
    if mask.shape != ids.shape:
        raise ConfigError(f"attention_mask shape {list(mask.shape)} differs from input_ids {list(ids.shape)}")
    return [row[m].tolist() for row, m in zip(ids, mask)], ids


MEDIA_INPUTS = ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids")


def _type_rows(type_ids, ids: torch.Tensor, attention_mask) -> list[list[int]] | None:
    """`mm_token_type_ids` as rows, cut by `attention_mask` as the prompts are."""
    if type_ids is None:
        return None
    types = torch.as_tensor(type_ids)
    types = types[None] if types.dim() == 1 else types
    if types.shape != ids.shape:
        raise ConfigError(f"mm_token_type_ids shape {list(types.shape)} differs from input_ids {list(ids.shape)}")
    if attention_mask is None:
        return types.tolist()
    return [row[m].tolist() for row, m in zip(types, torch.as_tensor(attention_mask).bool().reshape(ids.shape))]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _token_tensor(tokens, name: str) -> torch.Tensor:
    """`tokens` as a long tensor; ids of another dtype (floats: 5.5 would become 5) are refused."""
    tokens = torch.as_tensor(tokens)
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ConfigError(f"{name} must hold integer token ids, got dtype {str(tokens.dtype).removeprefix('torch.')}")
    return tokens.long()


def _seed_list(seed, batch: int) -> list[int]:
    """One seed per row from an int, or a list / tensor / array of them (one per row)."""
    if hasattr(seed, "tolist"):  # a tensor or an array
        seed = seed.tolist()
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * batch
    if len(seeds) != batch:
        raise ConfigError(f"got {len(seeds)} seeds for a batch of {batch}")
    for s in seeds:
        if not _is_int(s) or not -(2**63) <= s < 2**64:
            raise ConfigError(f"a seed must be an integer in [-2**63, 2**64), got {s!r}")
    return [int(s) for s in seeds]


def _float_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The weight dtype: a torch dtype or its name, one of `WEIGHT_DTYPES`."""
    name = str(dtype).removeprefix("torch.")
    if name not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    return getattr(torch, name)


_GEN_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _config_overrides(config) -> dict:
    """The settings a `generation_config` argument sets: for a dgemma `GenerationConfig`, the fields that differ
    from its defaults; for transformers' `DiffusionGemmaGenerationConfig` (anything with the same `to_dict`), the
    fields that are not None. The rest come from the model's generation config, as in transformers."""
    if isinstance(config, GenerationConfig):
        default = GenerationConfig()
        return {f: getattr(config, f) for f in _GEN_FIELDS if getattr(config, f) != getattr(default, f)}
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise ConfigError("generation_config must be a dgemma GenerationConfig or transformers' "
                          f"DiffusionGemmaGenerationConfig, got {type(config).__name__}")
    d = to_dict()
    out = {f: d[f] for f in _GEN_FIELDS if d.get(f) is not None}
    sampler = d.get("sampler_config")
    bound = sampler.get("entropy_bound") if isinstance(sampler, dict) else getattr(sampler, "entropy_bound", None)
    if bound is not None:
        out["entropy_bound"] = bound
    return out


class DiffusionGemma:
    def __init__(self, model: DiffusionGemmaModel, generation_config: GenerationConfig,
                 tokenizer: Tokenizer | None = None, vision_mask: str = "gemma4"):
        self.model = model
        self.generation_config = generation_config
        self.tokenizer = tokenizer
        self._static = StaticPool()
        if vision_mask not in VISION_MASKS:
            raise ConfigError(f"vision_mask must be one of {', '.join(map(repr, VISION_MASKS))}, got {vision_mask!r}")
        model.vision_mask = vision_mask
        self._processor: Processor | None = None
        self._grammar_compilers: dict[tuple[int, ...], GrammarCompiler] = {}

    @property
    def processor(self) -> Processor:
        """Text, images and video to this model's inputs (`dgemma.Processor`; needs the tokenizer)."""
        if self._processor is None:
            if self.tokenizer is None:
                raise ConfigError("the model has no tokenizer (tokenizer.json missing): no processor")
            self._processor = Processor(self.tokenizer, self.config)
        return self._processor

    @property
    def config(self) -> DiffusionGemmaConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: DiffusionGemmaConfig, seed: int = 0, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", vision_mask: str = "gemma4") -> "DiffusionGemma":
        """A model with random weights (timing, tests); the tokenizer is the byte-level fallback."""
        model = init_weights(DiffusionGemmaModel(config), seed).to(device=device, dtype=_float_dtype(dtype)).eval()
        model.requires_grad_(False)
        tok = byte_tokenizer() if config.text_config.vocab_size >= 512 else None
        return cls(model, GenerationConfig.for_model(config), tok, vision_mask)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str = torch.float32,
                        device: str | torch.device = "cpu", vision_mask: str = "gemma4") -> "DiffusionGemma":
        """Load a checkpoint directory (HF layout) or a shipped model by name (`dgemma-code-tiny`), or build a
        preset (`tiny`, `bench`, `26b-a4b`) with random weights. `vision_mask`: how image tokens attend to each
        other in the encoder: "gemma4" (as the model was trained: both ways within an image on sliding-window
        layers, inside the window; full-attention layers causal) or "transformers" (transformers 5.23
        DiffusionGemma `generate`: both ways on every layer, past the window)."""
        dtype = _float_dtype(dtype)
        kind, directory = resolve(path)
        if kind == "preset":
            log.warning("preset %r: random weights, not a trained model", path)
            return cls.from_config(preset(str(path)), dtype=dtype, device=device, vision_mask=vision_mask)
        config = DiffusionGemmaConfig.load(directory)
        model = load_weights(directory, config, dtype=dtype, device=device)
        tokenizer = Tokenizer.from_dir(directory) if (directory / "tokenizer.json").is_file() else None
        return cls(model, GenerationConfig.load(directory, config), tokenizer, vision_mask)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save(path)
        self.generation_config.save(path)
        save_weights(self.model, path, max_shard_bytes)
        self.save_tokenizer(path)

    def save_tokenizer(self, path: str | Path) -> None:
        """`tokenizer.json`, `chat_template.jinja` and, where the directory has none, the `tokenizer_config.json`
        transformers needs to load the tokenizer unchanged (`Tokenizer.save`; nothing without a tokenizer)."""
        if self.tokenizer is not None:
            self.tokenizer.save(path)

    # -- generation ------------------------------------------------------------------------------
    def _generation_config(self, generation_config, prompt_len: int, kwargs: dict) -> GenerationConfig:
        """The settings of one call, as transformers resolves them: the model's generation config, then what a
        `generation_config` argument sets, then keyword arguments."""
        steps = kwargs.pop("num_diffusion_steps", None)
        if steps is not None:
            if kwargs.get("max_denoising_steps") not in (None, steps):
                raise ConfigError("num_diffusion_steps and max_denoising_steps disagree; pass one of them")
            kwargs["max_denoising_steps"] = steps
        if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
            kwargs["eos_token_id"] = []  # as in transformers: an explicit None turns stopping at EOS off
        no_pad = "pad_token_id" in kwargs and kwargs["pad_token_id"] is None  # and padding after it
        gen = self.generation_config
        if generation_config is not None:
            gen = gen.updated(**_config_overrides(generation_config))
        gen = gen.updated(**kwargs)
        if no_pad:
            gen = dataclasses.replace(gen, pad_token_id=None)
        gen.validate()
        if gen.max_length is not None:
            # the reference's rule: max_length (which counts the prompt) applies while max_new_tokens is at its
            # default of 256; any other max_new_tokens, from the call or the checkpoint, takes precedence
            if gen.max_new_tokens == 256:
                if gen.max_length <= prompt_len:
                    raise ConfigError(f"max_length ({gen.max_length}) leaves no room after the {prompt_len}-token "
                                      "prompt")
                gen = gen.updated(max_new_tokens=gen.max_length - prompt_len)
            else:
                log.warning("max_length=%d is ignored: max_new_tokens=%d takes precedence", gen.max_length,
                            gen.max_new_tokens)
        return gen

    def _generators(self, batch: int, seed, do_sample: bool) -> list[torch.Generator] | None:
        if seed is None and do_sample:
            return None
        seeds = _seed_list(0 if seed is None else seed, batch)
        return [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def grammar_compiler(self, stop_ids: Sequence[int]) -> GrammarCompiler:
        """The grammar engine over this model's vocabulary with `stop_ids` ending the output (built once per stop
        set: seconds for a 262,144-token vocabulary)."""
        if self.tokenizer is None:
            raise ConfigError("constrained generation needs the model's tokenizer (tokenizer.json missing)")
        key = tuple(stop_ids)
        if key not in self._grammar_compilers:
            self._grammar_compilers[key] = GrammarCompiler(self.tokenizer.backend.to_str(), self.model.text.vocab_size,
                                                           list(key))
        return self._grammar_compilers[key]

    def stream_generate(self, input_ids=None, attention_mask=None, generation_config: GenerationConfig | None = None,
                        decoder_input_ids: torch.Tensor | None = None, fixed_mask: torch.Tensor | None = None,
                        seed: int | Sequence[int] | None = None, static_cache: bool | None = None,
                        constraint: Constraint | Sequence[Constraint | None] | None = None,
                        constraint_policy: str = "argmax", **kwargs) -> Iterator:
        """Yields `DenoiseStep` (each pass's draft and accepted mask), `CanvasCommit` and finally a
        `GenerationResult`. `decoder_input_ids` [B, C] starts the first canvas; `fixed_mask` [B, C] marks
        positions whose given token is kept (never re-noised). `static_cache` (default: on for CUDA) runs the
        decoder passes with fixed shapes over a reused cache, captured as a CUDA graph on the GPU. `constraint` (a
        `Constraint`, or one per row, None for an unconstrained row) makes the output match a JSON schema, regex,
        choice or grammar (`constraint_policy`: "argmax" or "dp", see `dgemma.sampling.constraint`)."""
        media_inputs = {k: kwargs.pop(k) for k in MEDIA_INPUTS if k in kwargs}
        kwargs.pop("num_frames_per_video", None)  # the processor's, for the caller: the positions already tell
        type_ids = kwargs.pop("mm_token_type_ids", None)
        prompts, ids = _as_rows(input_ids, attention_mask)
        gen = self._generation_config(generation_config, ids.shape[1], kwargs)
        media = prompt_media(self.model, prompts, _type_rows(type_ids, ids, attention_mask), **media_inputs)
        constraints = None
        if constraint is not None:
            constraints = row_constraints(self.grammar_compiler(gen.eos_token_id or []), constraint, len(prompts),
                                          gen.pad_token_id, constraint_policy)
        start = None
        if decoder_input_ids is not None:
            tokens = _token_tensor(decoder_input_ids, "decoder_input_ids")
            tokens = tokens[None] if tokens.dim() == 1 else tokens
            fixed = None if fixed_mask is None else torch.as_tensor(fixed_mask, dtype=torch.bool)
            start = CanvasSpec(tokens, fixed[None] if fixed is not None and fixed.dim() == 1 else fixed)
        elif fixed_mask is not None:
            raise ConfigError("fixed_mask needs decoder_input_ids (the tokens to keep)")
        if static_cache is None:
            static_cache = self.device.type == "cuda"
        yield from stream_generate(self.model, prompts, gen, self._generators(len(prompts), seed, gen.do_sample), start,
                                   self._static if static_cache else None, media, constraints)

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None,
                 return_dict_in_generate: bool | None = None, **kwargs) -> GenerateOutput | torch.Tensor:
        """Same arguments and defaults as transformers' `generate` (plus `seed`, `fixed_mask`). `streamer` gets
        the prompt, each pass's draft (`put_draft(value=...)`, where it has that method) and each committed canvas
        (`put`), then `end()`, as transformers' streamers do. With `return_dict_in_generate=False` (argument or
        `generation_config` attribute) it returns the sequences tensor only."""
        if return_dict_in_generate is None:  # the call's, else the generation_config argument's, else the model's
            return_dict_in_generate = self.generation_config.return_dict_in_generate
            if generation_config is not None:
                return_dict_in_generate = _config_overrides(generation_config).get("return_dict_in_generate",
                                                                                  return_dict_in_generate)
        if streamer is not None and getattr(streamer, "_takes_logits", False):
            raise ConfigError("streamers that take the draft logits (_takes_logits) are not supported; "
                              "use DiffusionGemma.stream_generate for per-pass output")
        _, ids = _as_rows(input_ids, attention_mask)
        draft = getattr(streamer, "put_draft", None)
        result, started = None, False
        for result in self.stream_generate(input_ids, attention_mask, generation_config, **kwargs):
            if streamer is None or not isinstance(result, (DenoiseStep, CanvasCommit)):
                continue
            if not started:  # the prompt once the settings have been checked, as the reference puts it
                streamer.put(ids.cpu())
                started = True
            if isinstance(result, CanvasCommit):
                streamer.put(result.tokens.cpu())
            elif draft is not None:
                draft(value=result.draft.cpu())
        if streamer is not None:
            streamer.end()
        for row, complete in enumerate(result.stats.grammar_complete):
            if complete is False:
                log.warning("row %d: the output ran out of tokens (max_new_tokens) before its constraint was satisfied; "
                            "its text is a valid prefix, not a complete match", row)
        generated = torch.tensor(result.tokens, dtype=torch.long)
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else self.model.device  # the reference's
        sequences = torch.cat([ids.cpu(), generated], dim=1).to(device)
        if not return_dict_in_generate:
            return sequences
        return GenerateOutput(sequences, torch.tensor(result.stats.tokens_per_forward, device=device), result.stats)

    def generate_ar(self, input_ids, attention_mask=None, max_new_tokens: int = 256, temperature: float = 0.0,
                    seed: int | None = None, eos_token_id: list[int] | None = None) -> GenerateOutput:
        """Plain autoregressive decoding through the encoder (same weights): the baseline diffusion is measured
        against. Greedy at temperature 0."""
        prompts, ids = _as_rows(input_ids, attention_mask)
        gen = self.generation_config.updated(eos_token_id=eos_token_id)
        gen.validate()
        gens = None if seed is None else self._generators(len(prompts), seed, True)
        result = generate_ar(self.model, prompts, max_new_tokens, gen.eos_token_id or [], gen.pad_token_id,
                             temperature, gens)
        generated = torch.tensor(result.tokens, dtype=torch.long)
        return GenerateOutput(torch.cat([ids.cpu(), generated], dim=1),
                              torch.tensor(result.stats.tokens_per_forward), result.stats)


def load_text_model(name: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> DiffusionGemma:
    """`DiffusionGemma.from_pretrained` for work that reads and writes text: a model without a tokenizer is
    refused."""
    model = DiffusionGemma.from_pretrained(name, dtype=dtype, device=device)
    if model.tokenizer is None:
        raise ConfigError(f"{name}: the model has no tokenizer (tokenizer.json missing)")
    return model
