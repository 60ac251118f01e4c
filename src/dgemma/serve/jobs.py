"""From a validated request body to a `Job`: prompt tokens, sampler settings, limits, one request per choice."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

from ..api import DiffusionGemma
from ..config import ConfigError, GenerationConfig
from ..engine.scheduler import Request
from ..media import MediaError
from ..processor import MediaLimits, Processor
from ..sampling.constraint import row_constraints
from ..sampling.grammar import Constraint, ConstraintError
from ..tokenizer import CHANNEL_END, CHANNEL_START, FILL_TOKEN, TURN_START
from .errors import APIError
from .infill import hole_size, infill_canvas
from .protocol import ChatRequest, CompletionRequest, SamplingRequest
from .structured import request_constraint
from .tool_grammar import CALL_END, CALL_START, QUOTE, call_constraint
from .tools import check_tools, chosen_tools

_RESERVED_TEMPLATE_KWARGS = {"messages", "add_generation_prompt", "tokenize", "bos_token", "eos_token", "pad_token"}


@dataclass
class Limits:
    """What one request may ask for (the server's guard against requests that would hog it)."""

    prompt_tokens: int = 2048
    max_tokens: int = 1024
    n: int = 8
    denoising_steps: int = 256
    media: MediaLimits = field(default_factory=MediaLimits)  # images and video: counts, sizes, where they may come from


@dataclass
class Job:
    """A request ready for the scheduler: one scheduler request per choice, and how to present the output."""

    id: str
    object: str  # "text_completion" or "chat.completion"
    prompt_tokens: int
    requests: list[Request]
    limit: int  # tokens kept per choice
    hole: int | None  # infilling: positions of the canvas that make the completion
    stop_strings: list[str]
    stream: bool
    include_usage: bool
    include_drafts: bool
    hole_end_ids: frozenset[int] = frozenset()  # infilling: tokens that end the completion inside the hole (filler)
    channel_open: bool = False  # chat: the prompt ends inside an open thought channel
    image_tokens: int = 0  # the prompt's image and video-frame soft tokens
    constrained: bool = False  # the output follows a grammar (structured output or a required tool call)
    tool_calls: bool = False  # chat with tools: the model's calls are parsed into tool_calls

    @property
    def chat(self) -> bool:
        return self.object == "chat.completion"


class JobBuilder:
    def __init__(self, model: DiffusionGemma, model_name: str, limits: Limits):
        if model.tokenizer is None:
            raise ConfigError("the model has no tokenizer (tokenizer.json missing): it cannot be served")
        self.model, self.tokenizer, self.model_name, self.limits = model, model.tokenizer, model_name, limits
        self.canvas_length = model.config.canvas_length
        self.vocab_size = model.config.text_config.vocab_size
        self.device = model.device
        base = model.generation_config
        self.stop_ids = list(dict.fromkeys([*(base.eos_token_id or []), *self.tokenizer.stop_ids]))
        self.gen = base.updated(eos_token_id=self.stop_ids)
        # a model trained to pad an infilling hole writes the filler after its completion: the completion ends there
        fill = self.tokenizer.token_to_id(FILL_TOKEN)
        self.filler_ids = frozenset() if fill is None else frozenset({fill})
        self.channel_ids = (self.tokenizer.token_to_id(CHANNEL_START), self.tokenizer.token_to_id(CHANNEL_END))
        self.turn_id = self.tokenizer.token_to_id(TURN_START)
        self.processor = Processor(model.tokenizer, model.config, limits=limits.media)
        self.soft_ids = (model.config.image_token_id, model.config.video_token_id)
        self.special_ids = {i for i, t in self.tokenizer.backend.get_added_tokens_decoder().items() if t.special}

    def completion(self, body: CompletionRequest) -> Job:
        prompt = self._encode(body.prompt, "prompt") if isinstance(body.prompt, str) else list(body.prompt)
        constraint = request_constraint(body.response_format, body.structured_outputs)
        if not body.suffix:
            return self._job(body, "text_completion", "cmpl", prompt, self._max_tokens(body.max_tokens),
                             constraint=constraint)
        if constraint is not None:
            raise APIError(400, "structured output cannot be combined with suffix (infilling)", param="suffix")
        suffix = self._encode(body.suffix, "suffix", add_bos=False)
        if len(suffix) >= self.canvas_length:
            raise APIError(400, f"suffix has {len(suffix)} tokens; infilling takes at most {self.canvas_length - 1} "
                                f"(one canvas holds the completion and the suffix)", param="suffix")
        hole = hole_size(self._max_tokens(body.max_tokens), len(suffix), self.canvas_length)
        return self._job(body, "text_completion", "cmpl", prompt, hole, suffix=suffix)

    def chat(self, body: ChatRequest) -> Job:
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise APIError(400, "max_tokens and max_completion_tokens disagree; pass one of them",
                           param="max_completion_tokens")
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens)
        kwargs = dict(body.chat_template_kwargs or {})
        thinking = kwargs.pop("enable_thinking", None)
        thinking = thinking if body.enable_thinking is None else body.enable_thinking
        if not isinstance(thinking, (bool, type(None))):
            raise APIError(400, "chat_template_kwargs.enable_thinking must be a boolean", param="chat_template_kwargs")
        reserved = sorted((_RESERVED_TEMPLATE_KWARGS | {"tools"}) & kwargs.keys())
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {reserved}", param="chat_template_kwargs")
        messages = [m.template_dict() for m in body.messages]
        media = None
        tools = check_tools(body.tools)
        mode, names = chosen_tools(body.tool_choice, tools)
        if mode != "none":  # "none": the tools are left out of the prompt
            kwargs["tools"] = body.tools
        try:
            if any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"]) for m in messages):
                inputs = self.processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                            enable_thinking=bool(thinking), **kwargs)
                prompt = inputs["input_ids"][0].tolist()
                media = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask",
                                                                      "num_frames_per_video")}
            else:
                prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                            enable_thinking=bool(thinking), tokenize=True, **kwargs)
        except MediaError as e:
            raise APIError(400, str(e), param="messages", code="invalid_media") from e
        except Exception as e:  # the template renders user input: whatever it rejects is a bad request
            raise APIError(400, f"chat template: {e}", param="messages") from e
        constraint = request_constraint(body.response_format, body.structured_outputs)
        if mode == "required":
            if constraint is not None:
                raise APIError(400, "a required tool call cannot be combined with response_format or "
                                    "structured_outputs", param="tool_choice")
            ids = {s: self._special_id(s) for s in (CALL_START, CALL_END, QUOTE)}
            constraint = call_constraint(tools, names, body.parallel_tool_calls is not False, ids)
        if constraint is not None and thinking:
            raise APIError(400, "structured output cannot be combined with enable_thinking", param="enable_thinking")
        job = self._job(body, "chat.completion", "chatcmpl", prompt, max_tokens, media=media, constraint=constraint)
        job.channel_open = self._channel_open(prompt)
        job.image_tokens = sum(t in self.soft_ids for t in prompt) if media else 0
        job.tool_calls = mode != "none"
        return job

    def _special_id(self, token: str) -> int | None:
        """A special token's id, None where the vocabulary writes it as text."""
        i = self.tokenizer.token_to_id(token)
        return i if i is not None and i in self.special_ids else None

    def _channel_open(self, prompt: list[int]) -> bool:
        """Whether the generation prompt (after the last `<|turn>`, the model's turn) leaves a thought channel
        open. Markers earlier in the prompt are the messages' (a user may write `<|channel>`): they open nothing."""
        turn = max((i for i, t in enumerate(prompt) if t == self.turn_id), default=-1)
        markers = [t for t in prompt[turn + 1:] if t in self.channel_ids]
        return bool(markers) and markers[-1] == self.channel_ids[0]

    # -- shared ------------------------------------------------------------------------------------
    def _encode(self, text: str, param: str, add_bos: bool = True) -> list[int]:
        try:
            return self.tokenizer.encode(text, add_bos=add_bos)
        except ConfigError as e:  # text JSON can carry but the tokenizer cannot take (a lone surrogate)
            raise APIError(400, f"{param}: {e}", param=param) from e

    def _max_tokens(self, requested: int | None) -> int:
        if requested is None:
            return min(self.gen.max_new_tokens, self.limits.max_tokens)
        if requested > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {requested}; this server allows at most {self.limits.max_tokens}",
                           param="max_tokens")
        return requested

    def _generation_config(self, body: SamplingRequest, max_new_tokens: int) -> GenerationConfig:
        steps = body.max_denoising_steps
        if steps is not None and steps > self.limits.denoising_steps:
            raise APIError(400, f"max_denoising_steps is {steps}; this server allows at most "
                                f"{self.limits.denoising_steps}", param="max_denoising_steps")
        stability = body.stability_threshold  # the engine keeps this many past canvases per request
        if stability is not None and stability > self.limits.denoising_steps:
            raise APIError(400, f"stability_threshold is {stability}; this server allows at most "
                                f"{self.limits.denoising_steps}", param="stability_threshold")
        settings = body.sampler_settings()
        settings["max_denoising_steps"] = steps or min(self.gen.max_denoising_steps, self.limits.denoising_steps)
        gen = self.gen.updated(max_new_tokens=max_new_tokens, **settings)
        try:
            gen.validate()
        except ConfigError as e:
            raise APIError(400, str(e)) from e
        return gen

    def _job(self, body: SamplingRequest, object_: str, prefix: str, prompt: list[int], limit: int,
             suffix: list[int] | None = None, media: dict | None = None, constraint: Constraint | None = None) -> Job:
        if body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if body.n > self.limits.n:
            raise APIError(400, f"n is {body.n}; this server allows at most {self.limits.n}", param="n")
        if len(prompt) > self.limits.prompt_tokens:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server allows at most "
                                f"{self.limits.prompt_tokens}", param="messages" if object_ != "text_completion"
                           else "prompt", code="context_length_exceeded")
        gen = self._generation_config(body, limit)
        base_seed = body.seed if body.seed is not None else secrets.randbits(63)
        requests = []
        for i in range(body.n):
            seed = (base_seed + i) % 2**64
            start = None if suffix is None else infill_canvas(suffix, limit, self.canvas_length, self.vocab_size,
                                                                seed, self.device)
            requests.append(Request(prompt, gen, seed, start, include_drafts=self._drafts(body), media=media,
                                    constraint=self._canvas_constraint(constraint, gen)))
        options = body.stream_options
        return Job(f"{prefix}-{uuid.uuid4().hex}", object_, len(prompt), requests, limit,
                   limit if suffix is not None else None, body.stop_strings(), body.stream,
                   bool(options and options.include_usage), self._drafts(body),
                   self.filler_ids if suffix is not None else frozenset(), constrained=constraint is not None)

    def _canvas_constraint(self, constraint: Constraint | None, gen: GenerationConfig):
        """One request's grammar state (each choice its own)."""
        if constraint is None:
            return None
        try:
            return row_constraints(self.model.grammar_compiler(gen.eos_token_id or []), constraint, 1,
                                   gen.pad_token_id)[0]
        except ConstraintError as e:
            raise APIError(400, str(e), code="invalid_value") from e

    @staticmethod
    def _drafts(body: SamplingRequest) -> bool:
        return bool(body.stream and body.stream_options and body.stream_options.include_drafts)

