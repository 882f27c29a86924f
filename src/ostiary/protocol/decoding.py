"""Strict decoding of request bodies into the frozen types of :mod:`.requests`.

JSON is parsed with orjson (which rejects NaN, Infinity and invalid UTF-8), its
nesting depth is bounded, and the object is structured with a cattrs converter whose
primitive hooks never convert: ``"1"`` is not an integer and ``1`` is not a string.
Every failure is an :class:`InvalidRequestError` whose ``param`` names the field in
OpenAI's style (``messages[2].content``); unknown top-level fields are reported with
OpenAI's own wording, "Unrecognized request argument supplied: X".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import cattrs
import orjson
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, override

from .errors import InvalidRequestError
from .request_limits import RequestLimits
from .requests import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    EmbeddingRequest,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
)

__all__ = [
    "decode_chat",
    "decode_completion",
    "decode_embedding",
    "first_structure_error",
    "parse_json_object",
]

T = TypeVar("T")
JsonObject = dict[str, Any]


class _Invalid(Exception):
    """Raised inside hooks; turned into an InvalidRequestError with the full path."""

    def __init__(
        self, message: str, *, expected: str | None = None, suffix: tuple[str | int, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.suffix = suffix


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _wrong_type(expected: str) -> _Invalid:
    return _Invalid("", expected=expected)


# -- JSON ------------------------------------------------------------------------------


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether containers nest deeper than ``limit``: one level at a time, with
    comprehensions doing the per-node work (a million empty arrays cost ~0.1 s)."""
    level: list[Any] = [value]
    for _ in range(limit):
        level = [
            child
            for node in level
            for child in (node.values() if type(node) is dict else node)
            if type(child) is dict or type(child) is list
        ]
        if not level:
            return False
    return True


def parse_json_object(body: bytes, max_depth: int) -> JsonObject:
    """Parse a request body that must be one JSON object nested at most ``max_depth``."""
    if not body:
        raise InvalidRequestError(
            "The request body is empty; this endpoint expects a JSON object.",
            code="invalid_json",
        )
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequestError(
            "We could not parse the JSON body of your request. The API expects a JSON "
            "object, and what was sent is not valid JSON (or nests too deeply).",
            code="invalid_json",
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(
            f"The request body must be a JSON object, but got {_kind(value)} instead.",
            code="invalid_json",
        )
    if _depth_exceeds(value, max_depth):
        raise InvalidRequestError(
            f"The JSON body nests more than {max_depth} levels deep.",
            code="invalid_json",
        )
    return value


# -- the strict converter ----------------------------------------------------------------


def _strict_str(value: object, _: object) -> str:
    if type(value) is not str:
        raise _wrong_type("a string")
    return value


def _strict_int(value: object, _: object) -> int:
    if type(value) is not int:
        raise _wrong_type("an integer")
    return value


def _strict_float(value: object, _: object) -> float:
    if type(value) is float:
        return value
    if type(value) is int:
        return float(value)
    raise _wrong_type("a number")


def _strict_bool(value: object, _: object) -> bool:
    if type(value) is not bool:
        raise _wrong_type("a boolean")
    return value


def _json_object(value: object, _: object) -> JsonObject:
    if type(value) is not dict:
        raise _wrong_type("an object")
    return value


def _str_list(value: object) -> tuple[str, ...]:
    if type(value) is not list:
        raise _wrong_type("an array of strings")
    for i, item in enumerate(value):
        if type(item) is not str:
            raise _Invalid("", expected="a string", suffix=(i,))
    return tuple(value)


def _int_list(value: list[Any], prefix: tuple[str | int, ...] = ()) -> tuple[int, ...]:
    for i, item in enumerate(value):
        if type(item) is not int:
            raise _Invalid("", expected="an integer", suffix=(*prefix, i))
    return tuple(value)


def _stop(value: object, _: object) -> tuple[str, ...]:
    if type(value) is str:
        return (value,)
    return _str_list(value)


def _text_or_tokens(value: object, _: object) -> Any:
    """``prompt`` / ``input``: a string, strings, token ids, or lists of token ids."""
    if type(value) is str:
        return value
    if type(value) is not list:
        raise _wrong_type("a string or an array")
    if not value:
        raise _Invalid("must not be empty")
    first = value[0]
    if type(first) is str:
        return _str_list(value)
    if type(first) is int:
        return _int_list(value)
    if type(first) is list:
        out = []
        for i, item in enumerate(value):
            if type(item) is not list:
                raise _Invalid("", expected="an array of integers", suffix=(i,))
            out.append(_int_list(item, (i,)))
        return tuple(out)
    raise _Invalid("", expected="a string or an integer", suffix=(0,))


_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})


def _content_part(value: object, _: object) -> ContentPart:
    if type(value) is not dict:
        raise _wrong_type("an object")
    kind = value.get("type")
    if kind not in _PART_TYPES:
        if kind is None:
            raise _Invalid("Missing required parameter", suffix=("type",))
        raise _Invalid(
            f"must be one of {', '.join(sorted(_PART_TYPES))}, but got {kind!r}",
            suffix=("type",),
        )
    if kind in ("text", "refusal"):
        text = value.get(kind)
        if type(text) is not str:
            raise _Invalid("", expected="a string", suffix=(kind,))
        extra = set(value) - {"type", kind}
        if extra:
            raise _Invalid(f"unrecognized parameter {sorted(extra)[0]!r}")
        return ContentPart(type=kind, text=text)
    if type(value.get(kind)) is not dict:
        raise _Invalid("", expected="an object", suffix=(kind,))
    return ContentPart(type=kind, data=value)


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


def _tool_choice(value: object, _: object) -> ToolChoice:
    if type(value) is str:
        if value not in ("none", "auto", "required"):
            raise _Invalid(f"must be 'none', 'auto', 'required' or an object, got {value!r}")
        return ToolChoice(mode=value)
    if type(value) is not dict:
        raise _wrong_type("a string or an object")
    if value.get("type") != "function":
        raise _Invalid("must be 'function'", suffix=("type",))
    fn = value.get("function")
    if type(fn) is not dict or type(fn.get("name")) is not str:
        raise _Invalid("", expected="a string", suffix=("function", "name"))
    return ToolChoice(mode="function", function=fn["name"])


def _enum(field: str, allowed: frozenset[str]) -> Callable[[object, object], str]:
    def check(value: object, _: object) -> str:
        if type(value) is not str:
            raise _wrong_type("a string")
        if value not in allowed:
            raise _Invalid(
                f"must be one of {', '.join(repr(a) for a in sorted(allowed))}, got {value!r}"
            )
        return value

    check.__name__ = f"check_{field}"
    return check


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(bool, _strict_bool)
    _register(conv, dict[str, Any], _json_object)
    conv.register_structure_hook(ContentPart, _content_part)
    conv.register_structure_hook(ToolChoice, _tool_choice)
    _register(conv, dict[str, float] | None, _optional(_logit_bias))
    _register(conv, tuple[str, ...] | None, _optional(_stop))
    _register(
        conv, str | tuple[str, ...] | tuple[int, ...] | tuple[tuple[int, ...], ...], _text_or_tokens
    )
    # Generated hooks look their field hooks up when generated, so the order below
    # matters: a sequence wrapper before any class that holds the sequence.
    for item_type in (ToolCall, Tool, ContentPart):
        _list_only(conv, item_type)

    def content(value: object, _: object) -> str | tuple[ContentPart, ...] | None:
        if value is None or type(value) is str:
            return value
        if type(value) is not list:
            raise _wrong_type("a string or an array of content parts")
        return conv.structure(value, tuple[ContentPart, ...])

    _register(conv, str | tuple[ContentPart, ...] | None, content)
    conv.register_structure_hook(
        ChatMessage,
        make_dict_structure_fn(ChatMessage, conv, role=override(struct_hook=_enum("role", _ROLES))),
    )
    _list_only(conv, ChatMessage)
    response_types = frozenset({"text", "json_object", "json_schema"})
    conv.register_structure_hook(
        ResponseFormat,
        make_dict_structure_fn(
            ResponseFormat, conv, type=override(struct_hook=_enum("type", response_types))
        ),
    )
    for cls in (ChatCompletionRequest, CompletionRequest):
        conv.register_structure_hook(
            cls,
            make_dict_structure_fn(cls, conv, raw=override(omit=True)),
        )
    formats = frozenset({"float", "base64"})
    conv.register_structure_hook(
        EmbeddingRequest,
        make_dict_structure_fn(
            EmbeddingRequest,
            conv,
            raw=override(omit=True),
            encoding_format=override(struct_hook=_enum("encoding_format", formats)),
        ),
    )
    return conv


def _logit_bias(value: object, _: object) -> dict[str, float]:
    obj = _json_object(value, None)
    for key, bias in obj.items():
        if type(bias) not in (int, float):
            raise _Invalid("", expected="a number", suffix=(key,))
    return obj


def _optional(hook: Callable[[Any, Any], T]) -> Callable[[Any, Any], T | None]:
    return lambda value, cls: None if value is None else hook(value, cls)


def _register(conv: cattrs.Converter, type_: Any, hook: Callable[[Any, Any], Any]) -> None:
    """Register a hook for a generic alias or union (``==`` match, not subclassing)."""
    conv.register_structure_hook_func(lambda t: t == type_, hook)


def _list_only(conv: cattrs.Converter, item_type: type) -> None:
    """Make ``tuple[item_type, ...]`` accept only a JSON array (a string is iterable)."""
    seq = tuple[item_type, ...]  # type: ignore[valid-type]
    hook = conv.get_structure_hook(seq)

    def structure(value: object, cls: Any) -> Any:
        if type(value) is not list:
            raise _wrong_type("an array")
        return hook(value, cls)

    _register(conv, seq, structure)


_CONVERTER = _make_converter()


# -- error translation -------------------------------------------------------------------


Path = tuple[str | int, ...]


def format_path(path: Path) -> str:
    """OpenAI's way of naming a field: ``messages[2].content``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _first_leaf(exc: BaseException) -> tuple[BaseException, Path]:
    """Walk cattrs' exception groups down to the first leaf and its field path."""
    path: Path = ()
    while isinstance(exc, ClassValidationError | IterableValidationError):
        if isinstance(exc, ClassValidationError):
            named, _ = exc.group_exceptions()
            if not named:
                return exc.exceptions[0], path
            exc, note = named[0]
            path = (*path, note.name)
        else:
            indexed, _ = exc.group_exceptions()
            if not indexed:
                return exc.exceptions[0], path
            exc, inote = indexed[0]
            path = (*path, int(inote.index))
    return exc, path


def first_structure_error(exc: BaseException) -> tuple[BaseException, str]:
    """The first leaf error inside cattrs' exception groups, and its field path
    (``messages[2].content``). Shared with the runtime's config loader."""
    leaf, path = _first_leaf(exc)
    return leaf, format_path(path)


def _to_openai_error(exc: BaseException, payload: JsonObject) -> InvalidRequestError:
    # Extra keys come unattributed (no note), but in the group of their own class.
    leaf, tokens = _first_leaf(exc)
    path = format_path(tokens)
    if isinstance(leaf, ForbiddenExtraKeysError):
        name = sorted(leaf.extra_fields)[0]
        param = format_path((*tokens, name))
        if not path:
            return InvalidRequestError(
                f"Unrecognized request argument supplied: {name}",
                param=param,
                code="unknown_parameter",
            )
        return InvalidRequestError(
            f"Unrecognized parameter: '{param}'.", param=param, code="unknown_parameter"
        )
    if isinstance(leaf, KeyError):
        return InvalidRequestError(
            f"Missing required parameter: '{path}'.", param=path, code="missing_required_parameter"
        )
    if isinstance(leaf, _Invalid):
        full = (*tokens, *leaf.suffix)
        param = format_path(full)
        if leaf.expected is not None:
            got = _kind(_lookup(payload, full))
            return InvalidRequestError(
                f"Invalid type for '{param}': expected {leaf.expected}, but got {got} instead.",
                param=param,
                code="invalid_type",
            )
        if leaf.message == "Missing required parameter":
            return InvalidRequestError(
                f"Missing required parameter: '{param}'.",
                param=param,
                code="missing_required_parameter",
            )
        return InvalidRequestError(
            f"Invalid '{param}': {leaf.message}.", param=param, code="invalid_value"
        )
    # Any other structuring failure is still the client's input, never a 500.
    return InvalidRequestError(
        f"Invalid value for '{path}'.", param=path or None, code="invalid_value"
    )


def _lookup(payload: object, path: Path) -> object:
    """The value at ``path`` in the parsed body, or None."""
    node = payload
    for part in path:
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return None
            node = node[part]
        else:
            if not isinstance(node, dict):
                return None
            node = node.get(part)
    return node


def _structure(payload: JsonObject, cls: type[T]) -> T:
    try:
        value = _CONVERTER.structure(payload, cls)
    except (ClassValidationError, IterableValidationError, _Invalid, KeyError) as exc:
        raise _to_openai_error(exc, payload) from None
    # ``raw`` is never structured from the body (a client cannot set it); it is set
    # here once, as attrs itself sets frozen fields (evolve() would copy it all).
    object.__setattr__(value, "raw", payload)
    return value


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
        _check_count("stop", len(req.stop), limits.max_stop_sequences, "stop sequences")
        for i, seq in enumerate(req.stop):
            if not seq:
                raise InvalidRequestError(
                    f"Invalid 'stop[{i}]': a stop sequence must not be empty.",
                    param=f"stop[{i}]",
                    code="invalid_value",
                )
    if req.logit_bias is not None:
        for token, bias in req.logit_bias.items():
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


def decode_chat(body: bytes, limits: RequestLimits) -> ChatCompletionRequest:
    """Decode and validate a ``POST /v1/chat/completions`` body."""
    payload = parse_json_object(body, limits.max_json_depth)
    req = _structure(payload, ChatCompletionRequest)
    _require_model(req.model)
    if not req.messages:
        raise InvalidRequestError(
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
            param="messages",
            code="empty_array",
        )
    _check_count("messages", len(req.messages), limits.max_messages, "messages")
    for i, message in enumerate(req.messages):
        _check_message(i, message, limits)
    _check_sampling(req, limits)
    _check_range("max_completion_tokens", req.max_completion_tokens, 1, limits.max_output_tokens)
    if req.metadata is not None:
        _check_metadata(req.metadata)
    _check_range("top_logprobs", req.top_logprobs, 0, 20)
    if req.tools is not None:
        _check_count("tools", len(req.tools), limits.max_tools, "tools")
        for i, tool in enumerate(req.tools):
            if tool.type != "function":
                raise InvalidRequestError(
                    f"Invalid 'tools[{i}].type': expected 'function'.",
                    param=f"tools[{i}].type",
                    code="invalid_value",
                )
    if req.tool_choice is not None and req.tool_choice.mode != "none" and not req.tools:
        raise InvalidRequestError(
            "Invalid 'tool_choice': only allowed when 'tools' are specified.",
            param="tool_choice",
            code="invalid_value",
        )
    return req


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
                f"{_kind(value)} instead.",
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
    _check_count(param, len(items), limits.max_batch_inputs, "inputs")
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


def decode_completion(body: bytes, limits: RequestLimits) -> CompletionRequest:
    """Decode and validate a ``POST /v1/completions`` body."""
    payload = parse_json_object(body, limits.max_json_depth)
    req = _structure(payload, CompletionRequest)
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


def decode_embedding(body: bytes, limits: RequestLimits) -> EmbeddingRequest:
    """Decode and validate a ``POST /v1/embeddings`` body."""
    payload = parse_json_object(body, limits.max_json_depth)
    req = _structure(payload, EmbeddingRequest)
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
