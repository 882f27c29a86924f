"""Request bodies as JSON: one object, of bounded size and nesting, with no key twice.

orjson parses (it rejects NaN, Infinity and invalid UTF-8), but it builds every
container before anything can count them, and it keeps the last of two equal keys
without a word. Both matter here: a body of two million nested arrays costs half a
second of parsing alone, and a body in which ``"model"`` appears twice means one
thing to us and perhaps another to an upstream or a proxy that keeps the first.

So the bytes are scanned before they are parsed, with a few passes of
:meth:`bytes.translate`, :meth:`bytes.replace` and :meth:`bytes.count` (C loops, no
Python per byte): escaped quotes are dropped, strings are counted and cut out, and
what remains is one bracket per array or object and one colon per key, which bound
the containers and keys before anything is built; removing the innermost bracket
pairs once per level measures the depth. Duplicate keys are found by counting
strings: a valid body holds as many as orjson's rewrite of what it parsed, unless a
key was repeated (each repetition drops a key and its value). Only then is the body
parsed a second time, by the standard library, to name the key. On a 2 KB chat body
all this costs a few microseconds; on 4 MiB, tens of milliseconds at most
(``bench/decode_worst.py``).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from .errors import InvalidRequestError

__all__ = ["JsonObject", "kind_of", "parse_json_object"]

JsonObject = dict[str, Any]

#: Keeps quotes, colons and brackets; braces become brackets (only nesting matters).
_STRUCTURE = bytes.maketrans(b"{}", b"[]")
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}:'))


def kind_of(value: object) -> str:
    """How OpenAI's errors name a JSON value's type: ``an integer``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        # An integer past 64 bits is parsed as a float: not what the client wrote.
        return (
            "an integer out of range" if value.is_integer() and abs(value) >= 2**63 else "a decimal"
        )
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _without_escapes(text: bytes) -> bytes:
    """``text`` without the escapes that could hide a quote (``\\\\`` and ``\\"``):
    what is left has a ``"`` only where a string starts or ends."""
    if b"\\" not in text:  # one byte: found with memchr, much faster than two
        return text
    if b"\\\\" in text:
        text = text.replace(b"\\\\", b"")
    if b'\\"' in text:
        text = text.replace(b'\\"', b"")
    return text


#: Longest run of backslashes before a quote that :func:`_string_count` counts by
#: passes; longer runs (never sent by a real client) take the copying way.
_BACKSLASH_RUN = 8


def _string_count(text: bytes) -> int:
    """Strings (keys and values) in valid JSON ``text``.

    A quote is escaped when an odd number of backslashes precede it. With ``n(k)``
    the quotes that at least ``k`` backslashes precede (``count`` of ``k``
    backslashes and a quote: such matches cannot overlap), the escaped quotes are
    ``n(1) - n(2) + n(3) - ...``: a few counting passes, no copy of the text.
    """
    quotes = text.count(b'"')
    if b"\\" not in text:
        return quotes // 2
    escaped, k, sign = 0, 1, 1
    while (preceded := text.count(b"\\" * k + b'"')) and k <= _BACKSLASH_RUN:
        escaped += sign * preceded
        k, sign = k + 1, -sign
    if preceded:
        return _without_escapes(text).count(b'"') // 2
    return (quotes - escaped) // 2


def _structure(text: bytes) -> tuple[bytes, int]:
    """The brackets and colons of ``text`` outside its strings (braces as brackets),
    one ``[`` per array or object and one ``:`` per key; and the number of strings.

    Two adjacent quotes are dropped first: an empty string, or the end of one string
    and the start of the next with nothing between, so the split that cuts out what
    strings hold makes one piece per string that holds a mark, not one per string.
    Exact for valid JSON; for anything else, some marks and number (never an error).
    """
    marks = _without_escapes(text).translate(_STRUCTURE, _NOT_STRUCTURE)
    strings = marks.count(b'"') // 2
    if strings:
        marks = marks.replace(b'""', b"")
    if b'"' in marks:
        marks = b"".join(marks.split(b'"')[::2])
    return marks, strings


def _nests_deeper(structure: bytes, limit: int) -> bool:
    """Whether valid JSON's ``structure`` goes more than ``limit`` levels deep: each
    pass removes the innermost pairs, so it is empty after ``limit`` passes or too deep."""
    nesting = structure.replace(b":", b"")
    for _ in range(limit):
        if not nesting:
            return False
        nesting = nesting.replace(b"[]", b"")
    return bool(nesting)


class _Repeated(dict[str, Any]):
    """An object in which ``key`` appeared more than once (the second parse only)."""

    __slots__ = ("key",)
    key: str


def _keep_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = _Repeated(obj)
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            repeated.key = key
            break
        seen.add(key)
    return repeated


def _repeated_key(body: bytes) -> str | None:
    """The path of a repeated key in valid JSON ``body`` (``messages[0].role``)."""
    stack: list[tuple[object, str]] = [(json.loads(body, object_pairs_hook=_keep_repeats), "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            if isinstance(node, _Repeated):
                return f"{path}.{node.key}" if path else node.key
            stack.extend((v, f"{path}.{k}" if path else k) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(node))
    return None


def parse_json_object(
    body: bytes, max_depth: int, max_containers: int, max_keys: int
) -> JsonObject:
    """Parse a request body that must be one JSON object, nested at most ``max_depth``
    levels, holding at most ``max_containers`` arrays and objects and ``max_keys``
    keys (all levels together), no key twice in one object. Every refusal is an
    :class:`InvalidRequestError`; the counts are checked before parsing."""
    if not body:
        raise InvalidRequestError(
            "The request body is empty; this endpoint expects a JSON object.",
            code="invalid_json",
        )
    structure, strings = _structure(body)
    if structure.count(b"[") > max_containers:
        raise InvalidRequestError(
            f"The JSON body holds more than {max_containers} arrays and objects.",
            code="invalid_json",
        )
    if structure.count(b":") > max_keys:
        raise InvalidRequestError(
            f"The JSON body holds more than {max_keys} keys.", code="invalid_json"
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
            f"The request body must be a JSON object, but got {kind_of(value)} instead.",
            code="invalid_json",
        )
    if _nests_deeper(structure, max_depth):
        raise InvalidRequestError(
            f"The JSON body nests more than {max_depth} levels deep.",
            code="invalid_json",
        )
    if strings != _string_count(orjson.dumps(value)):
        path = _repeated_key(body)
        if path is not None:
            raise InvalidRequestError(
                f"Invalid JSON body: the key '{path}' appears more than once. Each key "
                "may appear only once in an object.",
                param=path,
                code="duplicate_key",
            )
    return value
