"""Request schemas (pydantic) and response shapes of the OpenAI-compatible API.

Standard OpenAI fields keep their meaning. DiffusionGemma's sampler settings are extra top-level fields
(`max_denoising_steps`, `entropy_bound`, `t_min`, `t_max`, `stability_threshold`, `confidence_threshold`),
chat takes `enable_thinking` (or `chat_template_kwargs: {"enable_thinking": ...}`), and streaming takes
`stream_options.include_drafts` for a chunk per denoising step. Unknown fields are rejected (400), not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

SEED_RANGE = dict(ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    include_drafts: bool = Field(False, description="dgemma: a chunk with the draft after every denoising step")


class SamplingRequest(_Body):
    """Fields shared by completions and chat completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1, description="rounded up to whole canvases; the output is cut")
    n: int = Field(1, ge=1, description="choices; choice i uses seed + i")
    stop: Annotated[str, StringConstraints(min_length=1)] | \
        Annotated[list[Annotated[str, StringConstraints(min_length=1)]], Field(max_length=4)] | None = None
    seed: int | None = Field(None, **SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    max_denoising_steps: int | None = Field(None, ge=1)
    entropy_bound: float | None = Field(None, gt=0)
    t_min: float | None = Field(None, ge=0)
    t_max: float | None = Field(None, gt=0)
    stability_threshold: int | None = Field(None, ge=0)
    confidence_threshold: float | None = Field(None, gt=0)
    # structured output (`serve.structured`): OpenAI's response_format, or vLLM's structured_outputs
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")  # as OpenAI and vLLM answer
        return value

    def sampler_settings(self) -> dict[str, Any]:
        keys = ("max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                "confidence_threshold")
        return {k: getattr(self, k) for k in keys}

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingRequest):
    prompt: str | list[Annotated[int, Field(ge=0)]]
    suffix: str | None = Field(None, description="infilling: the text the completion must lead into")
    # OpenAI fields taken at their no-op values only (clients send them explicitly)
    echo: Literal[False] = False
    logprobs: Literal[0] | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        """OpenAI's batch forms with one prompt (`["text"]`, `[[ids]]`) are that prompt; several are refused."""
        if isinstance(value, list) and value and all(isinstance(v, (str, list)) for v in value):
            if len(value) > 1:
                raise ValueError(f"{len(value)} prompts in one request are not supported: send one request per prompt")
            return value[0]
        return value


class TextPart(_Body):
    type: Literal["text"]
    text: str


class MediaURL(_Body):
    url: Annotated[str, StringConstraints(min_length=1)]
    detail: str | None = None  # OpenAI's; the image budget is the server's


class ImageURLPart(_Body):
    type: Literal["image_url"]
    image_url: MediaURL


class VideoURLPart(_Body):
    type: Literal["video_url"]
    video_url: MediaURL


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImageURLPart | VideoURLPart] | None = None
    name: str | None = None
    reasoning_content: str | None = None  # accepted in history, not shown to the model
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls (arguments: a JSON string, as OpenAI sends)
    tool_call_id: str | None = None  # a tool result: the call it answers

    def template_dict(self) -> dict[str, Any]:
        content = self.content if not isinstance(self.content, list) else [p.model_dump() for p in self.content]
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [_template_call(c) for c in self.tool_calls]
        if self.role == "tool":
            out.update(tool_call_id=self.tool_call_id, name=self.name)
        return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call with its arguments parsed, as chat templates take it."""
    import json

    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('each tool_calls item needs {"function": {"name": ..., "arguments": ...}}')
    args = fn.get("arguments") or "{}"
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise ValueError(f"tool call {fn['name']!r}: arguments are not JSON") from None
    if not isinstance(args, dict):
        raise ValueError(f"tool call {fn['name']!r}: arguments must be a JSON object")
    return {"id": call.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = None  # taken at its no-op value only
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # functions with JSON-schema parameters (`serve.tools`)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# -- responses -------------------------------------------------------------------------------------------

def model_card(name: str, created: int, canvas_length: int, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "dgemma", "canvas_length": canvas_length,
            "max_model_len": max_model_len}


def usage(prompt_tokens: int, completion_tokens: int, decoder_passes: int, image_tokens: int = 0) -> dict[str, Any]:
    """`image_tokens`: the prompt's image and video-frame soft tokens (counted in `prompt_tokens` too)."""
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens, "decoder_passes": decoder_passes,
           "tokens_per_forward": completion_tokens / decoder_passes if decoder_passes else 0.0}
    if image_tokens:
        out["prompt_tokens_details"] = {"image_tokens": image_tokens}
    return out


def envelope(id_: str, object_: str, created: int, model: str, choices: list[dict[str, Any]],
             **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": object_, "created": created, "model": model, "choices": choices, **extra}


def completion_choice(index: int, text: str, finish_reason: str | None, **extra: Any) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason, **extra}


def chat_message(reasoning: str, content: str) -> dict[str, Any]:
    return {"role": "assistant", "content": content, "reasoning_content": reasoning or None}


def chat_choice(index: int, message: dict[str, Any], finish_reason: str | None, *, delta: bool = False,
                **extra: Any) -> dict[str, Any]:
    return {"index": index, "delta" if delta else "message": message, "logprobs": None,
            "finish_reason": finish_reason, **extra}
