"""Structuring parsed JSON into the request types, strictly, with OpenAI-style errors.

The cattrs converter here never converts: its primitive hooks accept ``"1"`` as a
string only and ``1`` as an integer only, a JSON array only where a sequence is
expected, and unknown keys nowhere. A refusal becomes an
:class:`~ostiary.protocol.errors.InvalidRequestError` whose ``param`` names the field
in OpenAI's style (``messages[2].content``). :mod:`.decoding` builds on this.
"""

from __future__ import annotations

from collections.abc import Callable
from types import UnionType
from typing import Any, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)
from cattrs.gen import make_dict_structure_fn, override

from .errors import InvalidRequestError
from .json_body import JsonObject, kind_of
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

__all__ = ["first_structure_error", "format_path", "simple_chat", "structure"]

T = TypeVar("T")


class _Invalid(Exception):
    """Raised inside hooks; turned into an InvalidRequestError with the full path."""

    def __init__(
        self, message: str, *, expected: str | None = None, suffix: tuple[str | int, ...] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.expected = expected
        self.suffix = suffix


def _wrong_type(expected: str) -> _Invalid:
    return _Invalid("", expected=expected)


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


_INTS = frozenset({int})


def _int_list(value: list[Any], prefix: tuple[str | int, ...] = ()) -> tuple[int, ...]:
    # map(type) runs in C: token arrays are the longest arrays a request carries.
    if not set(map(type, value)) <= _INTS:
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
            make_dict_structure_fn(
                cls, conv, raw=override(omit=True), extensions=override(omit=True)
            ),
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


# -- the common chat body, without cattrs ------------------------------------------------

_NONE = type(None)


def _simple_fields(cls: type) -> tuple[dict[str, frozenset[type] | None], frozenset[str]]:
    """``cls``'s fields whose value the strict converter takes as it is, each with
    the JSON types it accepts (None: any value); and its ``float`` fields."""
    taken: dict[str, frozenset[type] | None] = {}
    floats: set[str] = set()
    simple: dict[object, set[type]] = {str: {str}, int: {int}, bool: {bool}}
    for field in attrs.fields(attrs.resolve_types(cls)):
        kind = field.type
        if kind is Any:
            taken[field.name] = None
            continue
        options = set(get_args(kind)) if get_origin(kind) in (Union, UnionType) else {kind}
        optional = _NONE in options
        options.discard(_NONE)
        if len(options) != 1:
            continue
        (only,) = options
        if only is float:
            floats.add(field.name)
        elif only in simple:
            none: set[type] = {_NONE} if optional else set()
            taken[field.name] = frozenset(simple[only] | none)
    return taken, frozenset(floats)


_CHAT_FIELDS, _CHAT_FLOATS = _simple_fields(ChatCompletionRequest)
_MESSAGE_FIELDS, _ = _simple_fields(ChatMessage)
_MESSAGE_FIELDS.pop("role")
_MESSAGE_FIELDS["content"] = frozenset({str, _NONE})
_FLOAT_TYPES = frozenset({int, float, _NONE})
#: Integers float() takes without overflow, far beyond what orjson ever gives.
_FLOAT_INTS = 1 << 1000


def _simple_messages(value: object) -> tuple[ChatMessage, ...] | None:
    if type(value) is not list:
        return None
    messages = []
    fields = _MESSAGE_FIELDS
    for item in value:
        if type(item) is not dict:
            return None
        role = item.get("role")
        if type(role) is not str or role not in _ROLES:
            return None
        for key, field_value in item.items():
            if key == "role":
                continue
            accepted = fields.get(key, ())
            if accepted is not None and type(field_value) not in accepted:
                return None
        messages.append(ChatMessage(**item))
    return tuple(messages)


def simple_chat(
    payload: JsonObject, raw: JsonObject, extensions: JsonObject | None
) -> ChatCompletionRequest | None:
    """``payload`` as the converter would structure it, when every field is one it
    takes as it is (or a number, or a plain ``stop``) and every message has a role
    and text content; None for anything else (the converter then decides, and
    words any error). What nearly every chat request is, at a fraction of the cost."""
    if "messages" not in payload or "model" not in payload:
        return None
    kwargs = dict(payload)
    fields = _CHAT_FIELDS
    floats = _CHAT_FLOATS
    for key, value in payload.items():
        if key in fields:
            accepted = fields[key]
            if accepted is not None and type(value) not in accepted:
                return None
        elif key in floats:
            if type(value) not in _FLOAT_TYPES:
                return None
            if type(value) is int:
                if not -_FLOAT_INTS < value < _FLOAT_INTS:
                    return None
                kwargs[key] = float(value)
        elif key == "messages":
            messages = _simple_messages(value)
            if messages is None:
                return None
            kwargs[key] = messages
        elif key == "stop":
            if type(value) is str:
                kwargs[key] = (value,)
            elif value is not None:
                if type(value) is not list or set(map(type, value)) - {str}:
                    return None
                kwargs[key] = tuple(value)
        else:
            return None
    kwargs["raw"] = raw
    if extensions:
        kwargs["extensions"] = extensions
    return ChatCompletionRequest(**kwargs)


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
            got = kind_of(_lookup(payload, full))
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


def structure(
    payload: JsonObject,
    cls: type[T],
    *,
    raw: JsonObject | None = None,
    extensions: JsonObject | None = None,
) -> T:
    """``payload`` as a ``cls``, or the InvalidRequestError naming the bad field.
    ``raw`` (default: ``payload``) is the body as sent; ``extensions`` its
    parameters outside OpenAI's API."""
    if cls is ChatCompletionRequest:
        fast = simple_chat(payload, payload if raw is None else raw, extensions)
        if fast is not None:
            return fast  # type: ignore[return-value]
    try:
        value = _CONVERTER.structure(payload, cls)
    except (ClassValidationError, IterableValidationError, _Invalid, KeyError) as exc:
        raise _to_openai_error(exc, payload) from None
    # ``raw`` and ``extensions`` are never structured from the body (a client cannot
    # set them); they are set here once, as attrs itself sets frozen fields
    # (evolve() would copy it all).
    object.__setattr__(value, "raw", payload if raw is None else raw)
    if extensions:
        object.__setattr__(value, "extensions", extensions)
    return value
