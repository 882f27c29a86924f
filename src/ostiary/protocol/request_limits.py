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
    #: Deepest nesting of JSON arrays and objects in a body.
    max_json_depth: int = attrs.field(default=32, validator=attrs.validators.ge(1))
    #: Messages in one chat request.
    max_messages: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
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
    #: Inputs in one embeddings request or prompts in one completions request.
    max_batch_inputs: int = attrs.field(default=2048, validator=attrs.validators.ge(1))
