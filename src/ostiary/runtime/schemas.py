"""The JSON Schema library behind the core's :class:`SchemaChecker`: metaschema
checks of the schemas clients send, and strict mode's check of model output.

The library is ``jsonschema-rs`` (compiled): the metaschema check of a 5,000-node
schema takes milliseconds where the pure-Python ``jsonschema`` takes seconds, and
both checks run on the event loop thread, inside the core's call. So both are
bounded:

* a schema is checked against the metaschema of the draft its ``$schema`` names
  (2020-12 by default), after the core's own bounds on its size, nodes and nesting;
* a schema that will run on model output (``strict``) is compiled with the linear
  time regex engine (a client's ``(a+)+$`` cannot backtrack: no lookaround, no
  backreferences; a ``pattern`` is at most ``max_schema_pattern_chars``), offline
  (a ``$ref`` outside the schema is refused, never fetched), and its ``$ref``s may
  not expand to more than ``max_schema_nodes`` schemas (references that branch
  would otherwise cost exponential time on one value);
* the instance is at most ``max_strict_output_bytes`` (the core's bound).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jsonschema_rs
import orjson

from ostiary.protocol.request_limits import RequestLimits

__all__ = ["JsonSchemaChecker"]

_MESSAGE_CHARS = 300
#: Keys whose values are data, never schemas.
_DATA = frozenset({"enum", "const", "examples", "default"})
_MAPS = frozenset({"properties", "$defs", "definitions", "dependentSchemas", "patternProperties"})


class _TooLarge(Exception):
    pass


def _clip(message: str) -> str:
    first = message.split("\n", 1)[0]
    return first if len(first) <= _MESSAGE_CHARS else first[: _MESSAGE_CHARS - 3] + "..."


def _path(path: Any) -> str:
    return "".join(f"[{p!r}]" for p in path)


def _pointer(root: Mapping[str, Any], ref: str) -> object:
    node: object = root
    for raw in ref[2:].split("/") if ref != "#" else ():
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _expanded_size(root: Mapping[str, Any], limit: int) -> None:
    """Raise :class:`_TooLarge` when the schema's local ``$ref``s expand to more
    than ``limit`` schemas (a reference back to a schema being expanded counts once:
    recursion goes one level of the instance deeper each time)."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: object) -> int:
        if not isinstance(node, dict):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            return 1
        active.add(key)
        total = 1
        for name, value in node.items():
            if name in _DATA:
                continue
            if name == "$ref" and isinstance(value, str) and value.startswith("#/"):
                total += size(_pointer(root, value))
            elif name in _MAPS and isinstance(value, dict):
                total += sum(size(v) for v in value.values())
            elif isinstance(value, list):
                total += sum(size(v) for v in value if isinstance(v, dict))
            elif isinstance(value, dict):
                total += size(value)
            if total > limit:
                raise _TooLarge
        active.discard(key)
        sizes[key] = total
        return total

    size(root)


class JsonSchemaChecker:
    """The :class:`~ostiary.protocol.tool_validation.SchemaChecker` the server
    passes to the gateway; see the module docstring. Compiled strict schemas are
    kept (a few hundred, least recently used first out): clients send the same
    tools with every request."""

    def __init__(self, limits: RequestLimits) -> None:
        self._limits = limits
        self._compile = functools.lru_cache(maxsize=256)(self._compile_uncached)

    def check(self, schema: Mapping[str, Any], strict: bool = False) -> str | None:
        try:
            jsonschema_rs.meta.validate(dict(schema))
        except jsonschema_rs.ValidationError as error:
            where = _path(error.instance_path)
            return f"not a valid JSON Schema{' at ' + where if where else ''}: " + _clip(
                error.message
            )
        except jsonschema_rs.ReferencingError as error:
            return "not a valid JSON Schema: " + _clip(str(error))
        if not strict:
            return None
        try:
            self._validator(schema)
        except _TooLarge:
            return (
                f"its references expand to more than {self._limits.max_schema_nodes} schemas; "
                "strict mode cannot check it in bounded time."
            )
        except (jsonschema_rs.ValidationError, jsonschema_rs.ReferencingError, ValueError) as error:
            return "strict mode cannot run this schema: " + _clip(str(error))
        return None

    def validate(self, instance: object, schema: Mapping[str, Any]) -> str | None:
        try:
            validator = self._validator(schema)
        except (
            _TooLarge,
            jsonschema_rs.ValidationError,
            jsonschema_rs.ReferencingError,
            ValueError,
        ):
            return "the schema cannot be run in strict mode."
        if validator.is_valid(instance):
            return None
        try:
            validator.validate(instance)
        except jsonschema_rs.ValidationError as error:
            where = _path(error.instance_path)
            return (f"at {where}: " if where else "") + _clip(error.message)
        return "it is not valid."  # pragma: no cover - is_valid and validate agree

    def _validator(self, schema: Mapping[str, Any]) -> Any:
        return self._compile(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS))

    def _compile_uncached(self, canonical: bytes) -> Any:
        schema = orjson.loads(canonical)
        limits = self._limits
        stack: list[object] = [schema]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                for key, value in node.items():
                    if key in _DATA:
                        continue
                    if key == "pattern" and isinstance(value, str):
                        if len(value) > limits.max_schema_pattern_chars:
                            raise ValueError(
                                f"a 'pattern' is at most {limits.max_schema_pattern_chars} "
                                "characters."
                            )
                    elif key == "$ref" and isinstance(value, str) and not value.startswith("#"):
                        raise ValueError(f"it refers outside itself: {value[:60]!r}.")
                    stack.append(value)
        _expanded_size(schema, limits.max_schema_nodes)
        return jsonschema_rs.validator_for(
            schema,
            pattern_options=jsonschema_rs.RegexOptions(),
            offline=True,
            validate_formats=False,
        )
