"""A small instance of a JSON Schema, made deterministically: what the scripted
backend answers a tool call or a ``json_schema`` response format with.

It understands the keywords clients use for tools and structured output: ``type``
(one or several), ``properties`` / ``required`` / ``minProperties`` /
``additionalProperties``, ``items`` / ``prefixItems`` / ``minItems`` /
``contains``, ``enum``, ``const``, ``minimum`` / ``maximum`` (exclusive too) /
``multipleOf``, ``minLength`` / ``maxLength`` / common ``format``\\ s,
``anyOf`` / ``oneOf`` (the first branch), ``allOf`` (merged), local ``$ref``. It
does not solve ``pattern``, ``not`` or ``uniqueItems``: an instance it makes for a
schema that uses them may not validate. Each choice takes the least value the
keywords allow (the empty string, 0, ``false``, only the required properties), so
the instance is small; :class:`Unsatisfiable` when it finds none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["Unsatisfiable", "instance_of"]

#: ``$ref`` hops and nesting before giving up (a recursive schema that requires
#: itself has no finite instance).
_MAX_DEPTH = 32
_FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "email": "a@example.com",
    "uri": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "ipv4": "127.0.0.1",
    "hostname": "example.com",
}
_INFERRED = (
    ("object", ("properties", "required", "additionalProperties", "minProperties")),
    ("array", ("items", "prefixItems", "minItems", "contains")),
    ("string", ("minLength", "maxLength", "pattern", "format")),
    ("number", ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")),
)


class Unsatisfiable(ValueError):
    """The generator found no instance of the schema."""


def instance_of(schema: object) -> Any:
    """A small value valid against ``schema`` (see the module docstring)."""
    root = schema if isinstance(schema, Mapping) else {}
    return _make(schema, root, 0)


def _resolve(root: Mapping[str, Any], ref: str) -> object:
    node: object = root
    if not ref.startswith("#"):
        raise Unsatisfiable(f"cannot follow {ref!r}")
    for raw in ref[2:].split("/") if len(ref) > 1 else ():
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unsatisfiable(f"no {ref!r} in the schema")
    return node


def _merged(schema: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """``schema`` with its ``$ref`` and ``allOf`` folded in (properties and required
    lists united, other keywords: the first one found wins)."""
    out: dict[str, Any] = {}
    parts: list[object] = [schema]
    while parts:
        if len(parts) + depth > 4 * _MAX_DEPTH:
            raise Unsatisfiable("too many schemas to merge")
        part = parts.pop(0)
        if part is False:
            raise Unsatisfiable("false schema")
        if not isinstance(part, Mapping):
            continue
        for key, value in part.items():
            if key == "$ref" and isinstance(value, str):
                parts.append(_resolve(root, value))
            elif key == "allOf" and isinstance(value, list):
                parts.extend(value)
            elif key == "properties" and isinstance(value, Mapping):
                out["properties"] = {**value, **out.get("properties", {})}
            elif key == "required" and isinstance(value, list):
                out["required"] = [*out.get("required", []), *value]
            else:
                out.setdefault(key, value)
    return out


def _make(schema: object, root: Mapping[str, Any], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise Unsatisfiable("nested too deep")
    if schema is True or not isinstance(schema, Mapping):
        if schema is False:
            raise Unsatisfiable("false schema")
        return None
    s = _merged(schema, root, depth)
    if "const" in s:
        return s["const"]
    if isinstance(s.get("enum"), list) and s["enum"]:
        return s["enum"][0]
    for key in ("anyOf", "oneOf"):
        branches = s.get(key)
        if isinstance(branches, list) and branches:
            rest = {k: v for k, v in s.items() if k != key}
            errors: list[str] = []
            for branch in branches:
                try:
                    return _make({"allOf": [rest, branch]}, root, depth + 1)
                except Unsatisfiable as exc:
                    errors.append(str(exc))
            raise Unsatisfiable("; ".join(errors))
    kind = _kind(s)
    if kind == "object":
        return _object(s, root, depth)
    if kind == "array":
        return _array(s, root, depth)
    if kind == "string":
        return _string(s)
    if kind in ("integer", "number"):
        return _number(s, kind == "integer")
    if kind == "boolean":
        return False
    return None


def _kind(s: Mapping[str, Any]) -> str:
    kinds = s.get("type")
    if isinstance(kinds, str):
        return kinds
    if isinstance(kinds, list) and kinds:
        return next((k for k in kinds if k != "null"), kinds[0])  # type: ignore[no-any-return]
    for kind, keys in _INFERRED:
        if any(k in s for k in keys):
            return kind
    return "null"


def _object(s: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> dict[str, Any]:
    properties = s.get("properties") if isinstance(s.get("properties"), Mapping) else {}
    assert isinstance(properties, Mapping)
    names = list(dict.fromkeys(n for n in s.get("required", []) if isinstance(n, str)))
    wanted = s.get("minProperties", 0)
    for name in properties:
        if len(names) >= wanted:
            break
        if name not in names:
            names.append(name)
    extra = s.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for name in names:
        sub = properties.get(name, extra)
        out[name] = _make(sub, root, depth + 1)
    i = 0
    while len(out) < wanted:
        if extra is False:
            raise Unsatisfiable("minProperties beyond the properties allowed")
        out[f"k{i}"] = _make(extra, root, depth + 1)
        i += 1
    return out


def _array(s: Mapping[str, Any], root: Mapping[str, Any], depth: int) -> list[Any]:
    prefix = s.get("prefixItems") if isinstance(s.get("prefixItems"), list) else []
    items = s.get("items", True)
    if isinstance(items, list):  # draft 4-7 tuples
        prefix, items = items, s.get("additionalItems", True)
    assert isinstance(prefix, list)
    count = s.get("minItems", 0)
    if "contains" in s:
        count = max(count, 1)
    out: list[Any] = []
    for i in range(count):
        if i == 0 and "contains" in s:
            out.append(_make(s["contains"], root, depth + 1))
        else:
            out.append(_make(prefix[i] if i < len(prefix) else items, root, depth + 1))
    return out


def _string(s: Mapping[str, Any]) -> str:
    fmt = s.get("format")
    base = _FORMATS.get(fmt, "") if isinstance(fmt, str) else ""
    low = s.get("minLength", 0)
    high = s.get("maxLength", math.inf)
    if not low <= len(base) <= high:
        base = ""
    text: str = base + "a" * max(0, low - len(base))
    if len(text) > high:
        raise Unsatisfiable("minLength above maxLength")
    return text


def _number(s: Mapping[str, Any], integer: bool) -> int | float:
    def bound(key: str) -> float | None:
        v = s.get(key)
        return v if isinstance(v, int | float) and not isinstance(v, bool) else None

    low, high = bound("minimum"), bound("maximum")
    xlow, xhigh = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    step = bound("multipleOf") or (1 if integer else None)

    def fits(v: float) -> bool:
        return (
            (low is None or v >= low)
            and (high is None or v <= high)
            and (xlow is None or v > xlow)
            and (xhigh is None or v < xhigh)
            and (step is None or abs(v / step - round(v / step)) < 1e-9)
        )

    seeds: list[float] = [0.0]
    seeds += [b for b in (low, high) if b is not None]
    if xlow is not None:
        seeds += [xlow + 1, xlow + 0.5] + ([(xlow + high) / 2] if high is not None else [])
    if xhigh is not None:
        seeds += [xhigh - 1, xhigh - 0.5] + ([(xhigh + low) / 2] if low is not None else [])
    for seed in seeds:
        tries = [seed]
        if step is not None:
            tries = [math.ceil(seed / step) * step, math.floor(seed / step) * step]
            tries += [t + step for t in tries[:1]] + [t - step for t in tries[1:]]
        for value in tries:
            if fits(value):
                return int(value) if float(value).is_integer() else value
    raise Unsatisfiable("no number in range")
