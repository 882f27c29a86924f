"""Bounds on what one request may ask for, each with a default and a config key
(``[limits]`` in the TOML file, same names)."""

from __future__ import annotations

import attrs

__all__ = ["RequestLimits"]


@attrs.frozen(kw_only=True)
class RequestLimits:
    #: Largest request body accepted, in bytes (413 beyond; checked from
    #: ``content-length`` before the body is read).
    max_body_bytes: int = attrs.field(default=4 * 1024 * 1024, validator=attrs.validators.ge(1))
    #: Deepest nesting of JSON arrays and objects in a body (at most 254, the depth
    #: orjson writes when a body is forwarded upstream).
    max_json_depth: int = attrs.field(
        default=32, validator=[attrs.validators.ge(1), attrs.validators.le(254)]
    )
    #: JSON arrays and objects in a body, all levels together: bounds the time one
    #: body can take to parse (two million empty arrays fit in 4 MiB).
    max_json_containers: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    #: Keys of JSON objects in a body, all objects together (400,000 fit in 4 MiB).
    max_json_keys: int = attrs.field(default=100_000, validator=attrs.validators.ge(1))
    #: Messages in one chat request.
    max_messages: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    #: Content parts in one chat request, all messages together.
    max_content_parts: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    #: Tool calls in one chat request's messages, all messages together.
    max_tool_calls: int = attrs.field(default=4096, validator=attrs.validators.ge(1))
    #: Characters in one message's content (all text parts together).
    max_message_chars: int = attrs.field(default=1_000_000, validator=attrs.validators.ge(1))
    #: Choices per request (``n``).
    max_n: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    #: Generated tokens per choice (``max_tokens`` / ``max_completion_tokens``).
    max_output_tokens: int = attrs.field(default=32_768, validator=attrs.validators.ge(1))
    #: Stop sequences per request.
    max_stop_sequences: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    #: Tools per request.
    max_tools: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    #: Schemas (a node and its subschemas) in one JSON Schema: a tool's
    #: ``parameters`` or ``response_format.json_schema.schema``.
    max_schema_nodes: int = attrs.field(default=5000, validator=attrs.validators.ge(1))
    #: Levels of subschemas nesting in one JSON Schema.
    max_schema_depth: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    #: Bytes of one JSON Schema, as compact JSON.
    max_schema_bytes: int = attrs.field(default=256 * 1024, validator=attrs.validators.ge(1))
    #: Tool calls one choice of a backend's output may make (more: 502).
    max_output_tool_calls: int = attrs.field(default=128, validator=attrs.validators.ge(1))
    #: Bytes of one output tool call's arguments (more: 502).
    max_output_argument_bytes: int = attrs.field(
        default=1024 * 1024, validator=attrs.validators.ge(1)
    )
    #: Bytes of one choice's content or one tool call's arguments that strict mode
    #: (a ``strict`` tool or ``json_schema`` response format) validates; longer
    #: output fails validation (502 ``invalid_model_output``).
    max_strict_output_bytes: int = attrs.field(default=256 * 1024, validator=attrs.validators.ge(1))
    #: Characters of one ``pattern`` in a strict schema (run by a linear-time regex engine).
    max_schema_pattern_chars: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    #: Inputs in one embeddings request or prompts in one completions request.
    max_batch_inputs: int = attrs.field(default=2048, validator=attrs.validators.ge(1))
    #: Token ids in one request's ``input`` or ``prompt``, all items together
    #: (OpenAI's embeddings endpoint allows 300,000 tokens per request).
    max_token_ids: int = attrs.field(default=300_000, validator=attrs.validators.ge(1))
    #: Entries in ``logit_bias`` (OpenAI documents no bound).
    max_logit_bias: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
