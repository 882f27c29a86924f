"""Strict decoding of request bodies into the frozen types of :mod:`.requests`.

The body is parsed by :func:`.json_body.parse_json_object` (bounded nesting and size,
no key twice), the sizes of the arrays that structuring walks item by item are
checked on the parsed object (so a 4 MiB body of 150,000 content parts is refused
before it is structured), and the object is structured with a cattrs converter whose
primitive hooks never convert: ``"1"`` is not an integer and ``1`` is not a string.
Every failure is an :class:`InvalidRequestError` whose ``param`` names the field in
OpenAI's style (``messages[2].content``); unknown top-level fields are reported with
OpenAI's own wording, "Unrecognized request argument supplied: X".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import InvalidRequestError, UnsupportedMediaTypeError
from .extensions import take_extensions
from .json_body import JsonObject, kind_of, parse_json_object
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest
from .structuring import structure
from .tool_validation import SchemaChecker, check_tool_fields

__all__ = ["check_content_type", "decode_chat", "decode_completion", "decode_embedding"]

# -- the head --------------------------------------------------------------------------


#: What clients send nearly always, passed without parsing its parameters.
_PLAIN_JSON = frozenset((b"application/json", b"application/json; charset=utf-8"))


def check_content_type(headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse (415) a body declared as anything but JSON.

    ``application/json`` passes in any case and with any parameters
    (``; charset=utf-8``), except a charset other than UTF-8 (JSON is UTF-8, RFC 8259).
    A request without ``content-type`` passes too: the SDKs always send the header, and
    a hand-made request that leaves it out still means JSON. curl's ``-d`` is what sends
    a wrong one (``application/x-www-form-urlencoded``), so the message says what to add.
    Two ``content-type`` headers are refused: they could mean two different things.
    """
    values = [value for name, value in headers if name.lower() == b"content-type"]
    if not values:
        return
    if len(values) > 1:
        raise UnsupportedMediaTypeError(
            "The request has more than one content-type header; send one, "
            "'content-type: application/json'.",
            code="unsupported_media_type",
        )
    if values[0] in _PLAIN_JSON:
        return
    media, _, parameters = values[0].partition(b";")
    charset = b"utf-8"
    for parameter in parameters.split(b";"):
        name, _, value = parameter.partition(b"=")
        if name.strip().lower() == b"charset":
            charset = value.strip().strip(b'"').lower()
    if media.strip().lower() != b"application/json" or charset not in (b"utf-8", b"utf8"):
        shown = values[0].decode("latin-1")[:100]
        raise UnsupportedMediaTypeError(
            f"Unsupported content-type '{shown}': this endpoint takes a JSON body in "
            "UTF-8, sent with 'content-type: application/json' (with curl, add "
            "-H 'content-type: application/json').",
            code="unsupported_media_type",
        )


# -- sizes, before structuring --------------------------------------------------------


def _parse(body: bytes, limits: RequestLimits) -> JsonObject:
    return parse_json_object(
        body, limits.max_json_depth, limits.max_json_containers, limits.max_json_keys
    )


def _check_total(param: str, total: int, limit: int, what: str) -> None:
    if total > limit:
        raise InvalidRequestError(
            f"Invalid '{param}': too many {what}. Expected at most {limit} in one "
            f"request, all messages together.",
            param=param,
            code="array_above_max_length",
        )


def _check_shared_sizes(payload: JsonObject, limits: RequestLimits) -> None:
    stop = payload.get("stop")
    if type(stop) is list:
        _check_count("stop", len(stop), limits.max_stop_sequences, "stop sequences")
    bias = payload.get("logit_bias")
    if type(bias) is dict:
        _check_count("logit_bias", len(bias), limits.max_logit_bias, "entries")


def _check_chat_sizes(payload: JsonObject, limits: RequestLimits) -> None:
    """The chat request's arrays, counted before structuring walks them."""
    _check_shared_sizes(payload, limits)
    tools = payload.get("tools")
    if type(tools) is list:
        _check_count("tools", len(tools), limits.max_tools, "tools")
    messages = payload.get("messages")
    if type(messages) is not list:
        return
    _check_count("messages", len(messages), limits.max_messages, "messages")
    parts = calls = 0
    for i, message in enumerate(messages):
        if type(message) is not dict:
            continue
        content = message.get("content")
        if type(content) is list:
            parts += len(content)
            _check_total(f"messages[{i}].content", parts, limits.max_content_parts, "content parts")
        tool_calls = message.get("tool_calls")
        if type(tool_calls) is list:
            calls += len(tool_calls)
            _check_total(f"messages[{i}].tool_calls", calls, limits.max_tool_calls, "tool calls")


def _check_batch_sizes(param: str, value: object, limits: RequestLimits) -> None:
    """``prompt`` / ``input``: inputs in the batch and token ids, all inputs together."""
    if type(value) is not list or not value:
        return
    if type(value[0]) is int:
        ids = len(value)
    else:
        _check_count(param, len(value), limits.max_batch_inputs, "inputs")
        ids = sum(len(item) for item in value if type(item) is list)
    if ids > limits.max_token_ids:
        raise InvalidRequestError(
            f"Invalid '{param}': too many token ids. Expected at most {limits.max_token_ids} "
            f"in one request, all inputs together, got {ids}.",
            param=param,
            code="array_above_max_length",
        )


# -- range checks ------------------------------------------------------------------------


def _check_range(param: str, value: float | None, low: float, high: float) -> None:
    if value is None:
        return
    if value < low:
        raise InvalidRequestError(
            f"Invalid '{param}': value below minimum. Expected a value >= {low:g}, "
            f"but got {value!r} instead.",
            param=param,
            code="invalid_value",
        )
    if value > high:
        raise InvalidRequestError(
            f"Invalid '{param}': value above maximum. Expected a value <= {high:g}, "
            f"but got {value!r} instead.",
            param=param,
            code="invalid_value",
        )


def _check_count(param: str, count: int, limit: int, what: str) -> None:
    """Sizes checked before structuring (``stop``, ``tools``, ``messages``...)."""
    if count > limit:
        raise InvalidRequestError(
            f"Invalid '{param}': too many {what}. Expected at most {limit}, got {count}.",
            param=param,
            code="array_above_max_length",
        )


def _check_sampling(req: ChatCompletionRequest | CompletionRequest, limits: RequestLimits) -> None:
    _check_range("temperature", req.temperature, 0, 2)
    _check_range("top_p", req.top_p, 0, 1)
    _check_range("presence_penalty", req.presence_penalty, -2, 2)
    _check_range("frequency_penalty", req.frequency_penalty, -2, 2)
    _check_range("n", req.n, 1, limits.max_n)
    _check_range("max_tokens", req.max_tokens, 1, limits.max_output_tokens)
    if req.stop is not None:
        for i, seq in enumerate(req.stop):
            if not seq:
                raise InvalidRequestError(
                    f"Invalid 'stop[{i}]': a stop sequence must not be empty.",
                    param=f"stop[{i}]",
                    code="invalid_value",
                )
    if req.logit_bias is not None:
        for token, bias in req.logit_bias.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 10):
                raise InvalidRequestError(
                    f"Invalid 'logit_bias.{token}': keys are token ids, non-negative "
                    "integers of at most 10 digits.",
                    param=f"logit_bias.{token}",
                    code="invalid_value",
                )
            _check_range(f"logit_bias.{token}", bias, -100, 100)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequestError(
            "Invalid 'stream_options': only allowed when 'stream' is true.",
            param="stream_options",
            code="invalid_value",
        )


def _require_model(model: str) -> None:
    if not model:
        raise InvalidRequestError(
            "Invalid 'model': must not be empty.", param="model", code="invalid_value"
        )


def decode_chat(
    body: bytes,
    limits: RequestLimits,
    passed_on: frozenset[str] = frozenset(),
    *,
    schema_checker: SchemaChecker | None = None,
) -> ChatCompletionRequest:
    """Decode and validate a ``POST /v1/chat/completions`` body; extension
    parameters (:mod:`.extensions`) go to ``extensions``. Tools, tool calls and
    ``response_format`` are checked by :mod:`.tool_validation` (JSON Schemas by
    ``schema_checker`` too, when given)."""
    payload = _parse(body, limits)
    _check_chat_sizes(payload, limits)
    strict, extensions = take_extensions(payload, passed_on)
    req = structure(strict, ChatCompletionRequest, raw=payload, extensions=extensions)
    _require_model(req.model)
    if not req.messages:
        raise _empty_array("messages")
    for i, message in enumerate(req.messages):
        _check_message(i, message, limits)
    _check_sampling(req, limits)
    _check_range("max_completion_tokens", req.max_completion_tokens, 1, limits.max_output_tokens)
    if req.max_tokens is not None and req.max_completion_tokens not in (None, req.max_tokens):
        # Which one an upstream obeys varies: the cap checked and the tokens
        # reserved would not be those it generates to. OpenAI refuses both at once.
        raise InvalidRequestError(
            "Invalid 'max_tokens': 'max_tokens' and 'max_completion_tokens' differ; "
            "set only one (max_tokens is deprecated).",
            param="max_tokens",
            code="invalid_parameter_combination",
        )
    if req.metadata is not None:
        _check_metadata(req.metadata)
    _check_range("top_logprobs", req.top_logprobs, 0, 20)
    if req.tools is not None and not req.tools:
        raise _empty_array("tools")
    if req.tool_choice is not None and req.tool_choice.mode != "none" and not req.tools:
        raise InvalidRequestError(
            "Invalid 'tool_choice': only allowed when 'tools' are specified.",
            param="tool_choice",
            code="invalid_value",
        )
    check_tool_fields(req, limits, schema_checker)
    return req


def _empty_array(param: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"Invalid '{param}': empty array. Expected an array with minimum length 1, but "
        "got an empty array instead.",
        param=param,
        code="empty_array",
    )


def _check_metadata(metadata: dict[str, Any]) -> None:
    """OpenAI's rule: at most 16 pairs, keys up to 64 characters, string values up
    to 512."""
    _check_count("metadata", len(metadata), 16, "keys")
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequestError(
                "Invalid 'metadata': keys are at most 64 characters.",
                param="metadata",
                code="invalid_value",
            )
        if type(value) is not str:
            raise InvalidRequestError(
                f"Invalid type for 'metadata.{key}': expected a string, but got "
                f"{kind_of(value)} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > 512:
            raise InvalidRequestError(
                f"Invalid 'metadata.{key}': values are at most 512 characters.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )


def _check_message(i: int, message: ChatMessage, limits: RequestLimits) -> None:
    role = message.role
    if message.content is None and role not in ("assistant",):
        raise InvalidRequestError(
            f"Missing required parameter: 'messages[{i}].content'.",
            param=f"messages[{i}].content",
            code="missing_required_parameter",
        )
    if (
        role == "assistant"
        and message.content is None
        and not message.tool_calls
        and message.function_call is None
    ):
        raise InvalidRequestError(
            f"Invalid 'messages[{i}]': an assistant message needs 'content' or 'tool_calls'.",
            param=f"messages[{i}].content",
            code="missing_required_parameter",
        )
    if isinstance(message.content, tuple) and not message.content:
        raise _empty_array(f"messages[{i}].content")
    if role == "function" and message.name is None:
        raise InvalidRequestError(
            f"Missing required parameter: 'messages[{i}].name'.",
            param=f"messages[{i}].name",
            code="missing_required_parameter",
        )
    if role == "tool" and message.tool_call_id is None:
        raise InvalidRequestError(
            f"Missing required parameter: 'messages[{i}].tool_call_id'.",
            param=f"messages[{i}].tool_call_id",
            code="missing_required_parameter",
        )
    if message.tool_calls is not None and role != "assistant":
        raise InvalidRequestError(
            f"Invalid 'messages[{i}].tool_calls': only assistant messages carry tool calls.",
            param=f"messages[{i}].tool_calls",
            code="invalid_value",
        )
    if len(message.text()) > limits.max_message_chars:
        raise InvalidRequestError(
            f"Invalid 'messages[{i}].content': string too long. Expected at most "
            f"{limits.max_message_chars} characters.",
            param=f"messages[{i}].content",
            code="string_above_max_length",
        )


def _check_prompt_sizes(param: str, items: tuple[Any, ...], limits: RequestLimits) -> None:
    for i, item in enumerate(items):
        size = len(item)
        if size == 0 and not isinstance(item, str):
            raise InvalidRequestError(
                f"Invalid '{param}[{i}]': must not be empty.",
                param=f"{param}[{i}]",
                code="invalid_value",
            )
        if size > limits.max_message_chars:
            raise InvalidRequestError(
                f"Invalid '{param}[{i}]': too long. Expected at most "
                f"{limits.max_message_chars} characters or tokens.",
                param=f"{param}[{i}]",
                code="string_above_max_length",
            )


def decode_completion(
    body: bytes, limits: RequestLimits, passed_on: frozenset[str] = frozenset()
) -> CompletionRequest:
    """Decode and validate a ``POST /v1/completions`` body."""
    payload = _parse(body, limits)
    _check_shared_sizes(payload, limits)
    _check_batch_sizes("prompt", payload.get("prompt"), limits)
    strict, extensions = take_extensions(payload, passed_on)
    req = structure(strict, CompletionRequest, raw=payload, extensions=extensions)
    _require_model(req.model)
    _check_prompt_sizes("prompt", req.prompts(), limits)
    _check_sampling(req, limits)
    _check_range("best_of", req.best_of, 1, limits.max_n)
    choices = (req.n or 1) * len(req.prompts())
    if choices > limits.max_batch_inputs:
        raise InvalidRequestError(
            f"Invalid 'n': {req.n} choices for each of {len(req.prompts())} prompts is "
            f"{choices} choices; at most {limits.max_batch_inputs} are allowed.",
            param="n",
            code="invalid_value",
        )
    _check_range("logprobs", req.logprobs, 0, 5)
    return req


def decode_embedding(
    body: bytes, limits: RequestLimits, passed_on: frozenset[str] = frozenset()
) -> EmbeddingRequest:
    """Decode and validate a ``POST /v1/embeddings`` body."""
    payload = _parse(body, limits)
    _check_batch_sizes("input", payload.get("input"), limits)
    req = structure(payload, EmbeddingRequest)
    _require_model(req.model)
    _check_prompt_sizes("input", req.inputs(), limits)
    for i, item in enumerate(req.inputs()):
        if isinstance(item, str) and not item:
            raise InvalidRequestError(
                f"Invalid 'input[{i}]': must not be empty.",
                param=f"input[{i}]" if not isinstance(req.input, str) else "input",
                code="invalid_value",
            )
    _check_range("dimensions", req.dimensions, 1, 65_536)
    return req
