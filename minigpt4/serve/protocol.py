"""The OpenAI chat-completions wire format: request and response models, and error bodies.

Only what MiniGPT-4 can honour is accepted: text and image parts, `temperature`, `top_p`,
`max_tokens` / `max_completion_tokens`, `stop`, `n=1`, `stream` (+ `stream_options.include_usage`).
Fields the model cannot honour in a way a client would notice (tools, log-probs, several choices)
are refused with a 400 rather than silently ignored; other unknown fields are ignored, as OpenAI's
own compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FinishReason = Literal["stop", "length"]


class APIError(Exception):
    """An error to send back as OpenAI's `{"error": {...}}` body with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request ----


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


PART_TYPES = ("text", "image_url")


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content", mode="before")
    @classmethod
    def _check_parts(cls, content: object) -> object:
        """Name the part that is wrong and what is accepted (pydantic's union errors do not)."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise ValueError(f"must be a string or a list of content parts, not {_json_type(content)}")
        accepted = " or ".join(repr(kind) for kind in PART_TYPES)
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise ValueError(
                    f"part {j} must be an object with a type ({accepted}), not {_json_type(part)}"
                )
            kind = part.get("type")
            if kind not in PART_TYPES:
                raise ValueError(
                    f"part {j} has type {kind!r}, which this server does not accept; accepted types: {accepted}"
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise ValueError(f"part {j} (type 'text') needs a string field 'text'")
            url = part.get("image_url")
            if kind == "image_url" and not (isinstance(url, dict) and isinstance(url.get("url"), str)):
                raise ValueError(f"part {j} (type 'image_url') needs 'image_url': {{'url': '<data: URL>'}}")
        return content


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return names.get(type(value), "a string" if isinstance(value, str) else "a list")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Strict, as OpenAI's API is: `max_tokens: true` or `n: "1"` is the client's mistake, not a 1.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> ChatCompletionRequest:
        if self.n != 1:
            raise ValueError(f"n={self.n}: only n=1 is supported")
        if self.logprobs:
            raise ValueError("logprobs are not supported")
        if self.tools:
            raise ValueError("tools are not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError(f"stop holds {len(self.stop)} strings; at most 4 are allowed")
        return self

    @property
    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- response ----


def _omit_none(value: object) -> bool:
    return value is None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Answer(BaseModel):
    """What an answer and each chunk of a streamed answer have in common."""

    id: str
    created: int
    model: str


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_omit_none)
    content: str | None = Field(None, exclude_if=_omit_none)


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_omit_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "minigpt4"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
