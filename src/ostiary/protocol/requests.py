"""Typed forms of the request bodies Ostiary accepts.

These are what the decoder (:mod:`ostiary.protocol.decoding`) produces after strict
validation, and what backends receive. ``raw`` keeps the validated JSON object as the
client sent it, so that a backend which speaks OpenAI's wire format upstream can
forward fields it does not interpret without loss.

They are treated as immutable (a changed request is an ``attrs.evolve`` copy). The
two every chat request builds, :class:`ChatCompletionRequest` and
:class:`ChatMessage`, are slotted but not frozen: a frozen attrs class sets each
field through ``object.__setattr__``, which for some forty fields is a large part
of a request's decoding.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs

NO_EXTENSIONS: Mapping[str, Any] = MappingProxyType({})

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "ContentPart",
    "EmbeddingRequest",
    "FunctionCall",
    "FunctionDefinition",
    "ResponseFormat",
    "StreamOptions",
    "Tool",
    "ToolCall",
    "ToolChoice",
]

JsonObject = dict[str, Any]


@attrs.frozen
class ContentPart:
    """One part of a multi-part message. Only ``text`` parts are read by the core;
    the others (image_url, input_audio, file) are kept as sent in ``data``."""

    type: str
    text: str | None = None
    data: JsonObject | None = attrs.field(default=None, eq=False)


@attrs.frozen
class FunctionCall:
    name: str
    arguments: str


@attrs.frozen
class ToolCall:
    id: str
    function: FunctionCall
    type: str = "function"


@attrs.define
class ChatMessage:
    role: str
    content: str | tuple[ContentPart, ...] | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # Assistant-message fields OpenAI accepts; kept as sent for upstreams.
    audio: Any = attrs.field(default=None, eq=False)
    function_call: Any = attrs.field(default=None, eq=False)

    def text(self) -> str:
        """The message's text: the string content, or its text parts joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type in ("text", "refusal"))


@attrs.frozen
class FunctionDefinition:
    name: str
    description: str | None = None
    parameters: JsonObject | None = attrs.field(default=None, eq=False)
    strict: bool | None = None


@attrs.frozen
class Tool:
    function: FunctionDefinition
    type: str = "function"


@attrs.frozen
class ToolChoice:
    """``"none"``, ``"auto"``, ``"required"``, or a named function (``function``)."""

    mode: str
    function: str | None = None


@attrs.frozen
class StreamOptions:
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


@attrs.frozen
class ResponseFormat:
    type: str
    json_schema: JsonObject | None = attrs.field(default=None, eq=False)


# No on_setattr hooks: with them (the converter of ``stream``) attrs would set every
# field in __init__ through object.__setattr__ still.
@attrs.define(on_setattr=attrs.setters.NO_OP)
class ChatCompletionRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    #: ``null`` is accepted (OpenAI's spec has it nullable) and means false.
    stream: bool | None = attrs.field(default=False, converter=bool)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = attrs.field(default=None, eq=False)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    tools: tuple[Tool, ...] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = attrs.field(default=None, eq=False)
    service_tier: str | None = None
    reasoning_effort: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    verbosity: str | None = None
    # Accepted as sent and forwarded to OpenAI-compatible upstreams untouched; the
    # core does not read them. A backend that cannot honour one refuses it by name.
    modalities: Any = attrs.field(default=None, eq=False)
    audio: Any = attrs.field(default=None, eq=False)
    prediction: Any = attrs.field(default=None, eq=False)
    web_search_options: Any = attrs.field(default=None, eq=False)
    functions: Any = attrs.field(default=None, eq=False)
    function_call: Any = attrs.field(default=None, eq=False)
    moderation: Any = attrs.field(default=None, eq=False)
    prompt_cache_options: Any = attrs.field(default=None, eq=False)
    prompt_cache_retention: Any = attrs.field(default=None, eq=False)
    raw: JsonObject = attrs.field(factory=dict, eq=False, repr=False)
    #: Parameters outside OpenAI's API (``top_k``...), checked by name and type.
    extensions: Mapping[str, Any] = attrs.field(default=NO_EXTENSIONS, eq=False, repr=False)

    @property
    def output_limit(self) -> int | None:
        """The client's cap on generated tokens (``max_completion_tokens`` wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


@attrs.frozen
class CompletionRequest:
    model: str
    prompt: str | tuple[str, ...] | tuple[int, ...] | tuple[tuple[int, ...], ...]
    stream: bool | None = attrs.field(default=False, converter=bool)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = attrs.field(default=None, eq=False)
    logprobs: int | None = None
    user: str | None = None
    raw: JsonObject = attrs.field(factory=dict, eq=False, repr=False)
    extensions: Mapping[str, Any] = attrs.field(default=NO_EXTENSIONS, eq=False, repr=False)

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompts(self) -> tuple[str | tuple[int, ...], ...]:
        """The prompt as a tuple of prompts (a batch of one for a single prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return (p,)
        if p and isinstance(p[0], int):
            return (p,)
        return p  # type: ignore[return-value]


@attrs.frozen
class EmbeddingRequest:
    model: str
    input: str | tuple[str, ...] | tuple[int, ...] | tuple[tuple[int, ...], ...]
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None
    raw: JsonObject = attrs.field(factory=dict, eq=False, repr=False)

    def inputs(self) -> tuple[str | tuple[int, ...], ...]:
        """The input as a tuple of inputs (a batch of one for a single input)."""
        i = self.input
        if isinstance(i, str):
            return (i,)
        if i and isinstance(i[0], int):
            return (i,)
        return i  # type: ignore[return-value]
