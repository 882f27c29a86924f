"""Request bodies as JSON: bounded before parsing, exact in what they count, and never
ambiguous (no key twice)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.errors import InvalidRequestError
from ostiary.protocol.json_body import parse_json_object

#: A string holding nine backslashes and a quote: a run of 19 before an escaped quote.
RUN = json.dumps("\\" * 9 + '"').encode()


def parse(body: bytes, depth: int = 64, containers: int = 10**6, keys: int = 10**6) -> Any:
    return parse_json_object(body, depth, containers, keys)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"model": "a", "messages": [], "model": "b"}', "model"),
        (b'{"messages": [{"role": "user", "content": "x", "role": "system"}]}', "messages[0].role"),
        (b'{"a": {"b": [1, {"c": 1, "c": 2}]}}', "a.b[1].c"),
        # Equal once decoded: \u0065 is "e".
        (b'{"model": "a", "mod\\u0065l": "b"}', "model"),
        (b'{"x": "\\"", "x": "\\\\"}', "x"),
        (b'{"": 1, "": 1}', ""),
        # Long runs of backslashes before a quote: even runs end the string.
        (b'{"a": %s, "a": %s}' % (json.dumps("\\" * 10).encode(), RUN), "a"),
    ],
)
def test_a_key_twice_is_refused_at_any_depth(body: bytes, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    assert info.value.status == 400
    assert info.value.code == "duplicate_key"
    assert info.value.param == param


@pytest.mark.parametrize(
    "body",
    [
        b'{"a": 1, "A": 1, "a ": 1}',
        b'{"a": {"a": {"a": 1}}, "b": [{"a": 1}, {"a": 2}]}',
        b'{"a": "\\\\", "b": "\\\\\\"", "c": "\\"\\"", "d": "[{\\":"}',
        b'{"q": "\\u0022", "r": "\\u005c", "s": "\\u005c\\""}',
        b' {\n\t"a" :\r [ ] , "b":{ } }\n',
        b'{"a": %s, "b": %s, "c": "\\\\\\""}' % (json.dumps("\\" * 10).encode(), RUN),
    ],
)
def test_distinct_keys_pass(body: bytes) -> None:
    assert parse(body) == json.loads(body)


#: Strings with every character that matters to the scan, and long backslash runs.
tricky_text = st.text(alphabet='ab"\\[]{}:, \n\u00e9\u2028', max_size=6) | st.sampled_from(
    ["\\" * 9 + '"', "\\" * 12]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | tricky_text,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4)
    ),
    max_leaves=25,
)


def _shape(value: Any, level: int = 1) -> tuple[int, int, int]:
    """(containers, keys, depth) of a parsed JSON value."""
    if isinstance(value, dict):
        children = [_shape(v, level + 1) for v in value.values()]
        own = len(value)
    elif isinstance(value, list):
        children = [_shape(v, level + 1) for v in value]
        own = 0
    else:
        return 0, 0, level - 1
    return (
        1 + sum(c for c, _, _ in children),
        own + sum(k for _, k, _ in children),
        max([level, *(d for _, _, d in children)]),
    )


def _encodings(value: Any) -> list[bytes]:
    return [
        orjson.dumps(value),
        json.dumps(value).encode(),
        json.dumps(value, ensure_ascii=False, indent=1).encode(),
    ]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(tricky_text, json_values, max_size=4))
def test_counts_are_exact(value: dict[str, Any]) -> None:
    containers, keys, depth = _shape(value)
    for body in _encodings(value):
        assert parse(body, depth, containers, keys) == value
        for tighter in ((depth - 1, containers, keys), (depth, containers - 1, keys)):
            if min(tighter) >= 1:
                with pytest.raises(InvalidRequestError):
                    parse(body, *tighter)
        if keys:
            with pytest.raises(InvalidRequestError, match="keys"):
                parse(body, depth, containers, keys - 1)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(tricky_text, json_values, min_size=1, max_size=4), st.data())
def test_any_repeated_key_is_found(value: dict[str, Any], data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(sorted(value)))
    again = orjson.dumps({key: data.draw(json_values)})
    body = orjson.dumps(value)[:-1] + b"," + again[1:]
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    assert (info.value.code, info.value.param) == ("duplicate_key", key)


def test_sizes_are_refused_before_parsing() -> None:
    # Over the limits and not JSON at all: refused for the count, not the syntax.
    with pytest.raises(InvalidRequestError, match="more than 3 arrays and objects"):
        parse(b"[[[[", 64, 3, 10)
    with pytest.raises(InvalidRequestError, match="more than 2 keys"):
        parse(b'{"a":1,"b":2,"c":', 64, 10, 2)
    # Brackets and colons inside strings are not structure.
    assert parse(b'{"a": "[[[[::::{{{{"}', 1, 1, 1) == {"a": "[[[[::::{{{{"}
