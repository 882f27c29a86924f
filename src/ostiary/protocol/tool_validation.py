"""Validation of what a chat request says about function calling and structured
output: ``tools``, ``tool_choice``, ``parallel_tool_calls``, the tool calls and tool
answers of the conversation, and ``response_format``.

Every refusal is a 400 ``invalid_request_error`` whose ``param`` names the path
(``tools[1].function.name``, ``messages[3].tool_call_id``). JSON Schemas
(``parameters``, ``response_format.json_schema.schema``) are checked structurally
here, within bounds on their nodes, nesting and size: each keyword the core knows
has the kind of value JSON Schema gives it. A full metaschema check needs a JSON
Schema library, which the core may not import (it imports ``socket`` and
``random``); the runtime passes one in as a :class:`SchemaChecker`, run after the
structural checks.

The deprecated ``functions`` and ``function_call`` are refused with a 400 naming
them, never accepted and ignored: ``tools`` and ``tool_choice`` say the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from .errors import InvalidRequestError
from .request_limits import RequestLimits
from .requests import ChatCompletionRequest, ChatMessage, ResponseFormat

__all__ = ["FUNCTION_NAME", "SchemaChecker", "check_schema", "check_tool_fields"]

#: OpenAI's rule for function and schema names.
FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")

_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_SCHEMA = frozenset(
    {
        "additionalProperties",
        "additionalItems",
        "not",
        "contains",
        "propertyNames",
        "if",
        "then",
        "else",
        "unevaluatedProperties",
        "unevaluatedItems",
    }
)
_SCHEMA_MAPS = frozenset(
    {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
)
_SCHEMA_LISTS = frozenset({"anyOf", "allOf", "oneOf", "prefixItems"})
_COUNTS = frozenset(
    {"minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties"}
)
_NUMBERS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_STRINGS = frozenset({"pattern", "format", "$ref", "$id", "$schema", "title", "description"})


class SchemaChecker(Protocol):
    """A JSON Schema library's verdicts, supplied by the runtime: the metaschema
    check of what clients send, and (strict mode) the check of what models produce.
    Both must be bounded in time: the core calls them on its own thread."""

    def check(self, schema: Mapping[str, Any], strict: bool = False) -> str | None:
        """Why ``schema`` is not a valid JSON Schema (a message safe to show the
        client), or None when it is. ``strict``: the schema will be run on model
        output (a strict tool or ``response_format``), so it must also be one the
        checker can run in bounded time."""

    def validate(self, instance: object, schema: Mapping[str, Any]) -> str | None:
        """Why ``instance`` does not satisfy ``schema`` (already :meth:`check`-ed
        with ``strict``), or None when it does."""


def _invalid(param: str, message: str, code: str = "invalid_value") -> InvalidRequestError:
    return InvalidRequestError(f"Invalid '{param}': {message}", param=param, code=code)


def check_tool_fields(
    req: ChatCompletionRequest, limits: RequestLimits, checker: SchemaChecker | None = None
) -> None:
    """Raise the 400 for the first thing wrong with the request's function calling
    or structured-output fields."""
    for field in ("functions", "function_call"):
        if getattr(req, field) is not None:
            raise InvalidRequestError(
                f"'{field}' is deprecated and not supported; use 'tools' and 'tool_choice'.",
                param=field,
                code="unsupported_parameter",
            )
    names = _check_tools(req, limits, checker)
    choice = req.tool_choice
    if choice is not None and choice.mode == "function" and choice.function not in names:
        raise _invalid(
            "tool_choice",
            f"the function {choice.function!r} is not one of 'tools'.",
        )
    if req.parallel_tool_calls is not None and not req.tools:
        raise _invalid("parallel_tool_calls", "only allowed when 'tools' are specified.")
    _check_conversation(req.messages)
    if req.response_format is not None:
        _check_response_format(req.response_format, limits, checker)


def _check_tools(
    req: ChatCompletionRequest, limits: RequestLimits, checker: SchemaChecker | None
) -> set[str]:
    names: set[str] = set()
    for i, tool in enumerate(req.tools or ()):
        where = f"tools[{i}]"
        if tool.type != "function":
            raise _invalid(f"{where}.type", "expected 'function'.")
        name = tool.function.name
        if not FUNCTION_NAME.fullmatch(name):
            raise _invalid(
                f"{where}.function.name",
                "a function name is 1 to 64 letters, digits, underscores or dashes.",
            )
        if name in names:
            raise _invalid(f"{where}.function.name", f"the function {name!r} is declared twice.")
        names.add(name)
        parameters = tool.function.parameters
        if parameters is not None:
            param = f"{where}.function.parameters"
            check_schema(
                param,
                parameters,
                limits,
                checker,
                "invalid_function_parameters",
                strict=tool.function.strict is True,
            )
            kind = parameters.get("type")
            if kind is not None and kind != "object":
                raise _invalid(
                    f"{param}.type",
                    "a function's parameters are an object schema.",
                    "invalid_function_parameters",
                )
    return names


def _check_conversation(messages: tuple[ChatMessage, ...]) -> None:
    """Assistant tool calls well formed; every tool message answers a call of the
    assistant message before it (only tool messages in between)."""
    open_ids: set[str] | None = None
    for i, message in enumerate(messages):
        if message.role == "tool":
            if open_ids is None or message.tool_call_id not in open_ids:
                raise _invalid(
                    f"messages[{i}].tool_call_id",
                    "a 'tool' message must answer a tool call of the assistant message "
                    "before it, by that call's id.",
                )
            continue
        open_ids = None
        if message.role != "assistant" or not message.tool_calls:
            continue
        open_ids = set()
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{i}].tool_calls[{j}]"
            if not call.id:
                raise _invalid(f"{where}.id", "must not be empty.")
            if call.id in open_ids:
                raise _invalid(f"{where}.id", f"the id {call.id!r} is used twice.")
            if call.type != "function":
                raise _invalid(f"{where}.type", "expected 'function'.")
            if not FUNCTION_NAME.fullmatch(call.function.name):
                raise _invalid(
                    f"{where}.function.name",
                    "a function name is 1 to 64 letters, digits, underscores or dashes.",
                )
            open_ids.add(call.id)


_JSON_SCHEMA_KEYS = frozenset({"name", "description", "schema", "strict"})


def _check_response_format(
    fmt: ResponseFormat, limits: RequestLimits, checker: SchemaChecker | None
) -> None:
    spec = fmt.json_schema
    if fmt.type != "json_schema":
        if spec is not None:
            raise _invalid(
                "response_format.json_schema", "only allowed when 'type' is 'json_schema'."
            )
        return
    if spec is None:
        raise InvalidRequestError(
            "Missing required parameter: 'response_format.json_schema'.",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    where = "response_format.json_schema"
    for key in spec:
        if key not in _JSON_SCHEMA_KEYS:
            raise InvalidRequestError(
                f"Unrecognized parameter: '{where}.{key}'.",
                param=f"{where}.{key}",
                code="unknown_parameter",
            )
    name = spec.get("name")
    if name is None:
        raise InvalidRequestError(
            f"Missing required parameter: '{where}.name'.",
            param=f"{where}.name",
            code="missing_required_parameter",
        )
    if type(name) is not str or not FUNCTION_NAME.fullmatch(name):
        raise _invalid(f"{where}.name", "a name is 1 to 64 letters, digits, underscores or dashes.")
    description = spec.get("description")
    if description is not None and type(description) is not str:
        raise _invalid(f"{where}.description", "expected a string.", "invalid_type")
    strict = spec.get("strict")
    if strict is not None and type(strict) is not bool:
        raise _invalid(f"{where}.strict", "expected a boolean.", "invalid_type")
    schema = spec.get("schema")
    if schema is not None:
        if type(schema) is not dict:
            raise _invalid(f"{where}.schema", "expected an object.", "invalid_type")
        check_schema(f"{where}.schema", schema, limits, checker, strict=strict is True)


def check_schema(
    param: str,
    schema: Mapping[str, Any],
    limits: RequestLimits,
    checker: SchemaChecker | None = None,
    code: str = "invalid_value",
    *,
    strict: bool = False,
) -> None:
    """Check the JSON Schema ``schema`` found at ``param``: its size, its nesting,
    the kind of value of every keyword known here, then ``checker``'s verdict
    (``strict``: see :meth:`SchemaChecker.check`)."""
    size = len(orjson.dumps(schema))
    if size > limits.max_schema_bytes:
        raise _invalid(
            param,
            f"the schema is {size} bytes; at most {limits.max_schema_bytes} are allowed.",
            code,
        )
    nodes = 0
    stack: list[tuple[str, object, int]] = [(param, schema, 1)]
    while stack:
        where, node, depth = stack.pop()
        nodes += 1
        if nodes > limits.max_schema_nodes:
            raise _invalid(
                param, f"more than {limits.max_schema_nodes} schemas in one schema.", code
            )
        if depth > limits.max_schema_depth:
            raise _invalid(
                where, f"schemas nest more than {limits.max_schema_depth} levels deep.", code
            )
        if type(node) is bool:
            continue
        if type(node) is not dict:
            raise _invalid(where, "a schema is an object or a boolean.", code)
        for key, value in node.items():
            _check_keyword(f"{where}.{key}", key, value, depth, stack=stack, code=code)
    if checker is not None:
        verdict = checker.check(schema, strict)
        if verdict is not None:
            raise _invalid(param, verdict, code)


def _check_keyword(
    where: str,
    key: str,
    value: object,
    depth: int,
    *,
    stack: list[tuple[str, object, int]],
    code: str,
) -> None:
    if key == "type":
        kinds = value if type(value) is list else [value]
        if not kinds or any(k not in _TYPES for k in kinds) or len(set(kinds)) != len(kinds):
            raise _invalid(where, f"a type is one of {', '.join(sorted(_TYPES))}.", code)
    elif key in _SCHEMA:
        stack.append((where, value, depth + 1))
    elif key in _SCHEMA_MAPS:
        if type(value) is not dict:
            raise _invalid(where, "expected an object of schemas.", code)
        stack.extend((f"{where}.{name}", sub, depth + 1) for name, sub in value.items())
    elif key in _SCHEMA_LISTS or (key == "items" and type(value) is list):
        if type(value) is not list or not value:
            raise _invalid(where, "expected a non-empty array of schemas.", code)
        stack.extend((f"{where}[{i}]", sub, depth + 1) for i, sub in enumerate(value))
    elif key == "items":
        stack.append((where, value, depth + 1))
    elif key == "required":
        if (
            type(value) is not list
            or any(type(v) is not str for v in value)
            or len(set(value)) != len(value)
        ):
            raise _invalid(where, "expected an array of distinct property names.", code)
    elif key == "enum":
        if type(value) is not list:
            raise _invalid(where, "expected an array.", code)
    elif key in _COUNTS:
        if type(value) is not int or value < 0:
            raise _invalid(where, "expected a non-negative integer.", code)
    elif key in _NUMBERS:
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or (key == "multipleOf" and value <= 0)
        ):
            raise _invalid(where, "expected a number.", code)
    elif key in _STRINGS and type(value) is not str:
        raise _invalid(where, "expected a string.", code)
