"""The common chat body's fast structuring path gives what cattrs gives, or steps aside."""

from __future__ import annotations

from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.requests import ChatCompletionRequest
from ostiary.protocol.structuring import _CONVERTER, simple_chat

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = [
    f.name for f in attrs.fields(ChatCompletionRequest) if f.name not in ("raw", "extensions")
]
ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "bot"])
MESSAGE_KEYS = st.sampled_from(
    ["content", "name", "tool_call_id", "refusal", "audio", "function_call", "tool_calls", "x"]
)
MESSAGE = st.builds(
    lambda role, rest: {"role": role, **rest} if role is not None else rest,
    st.one_of(st.none(), ROLES, SCALARS),
    st.dictionaries(MESSAGE_KEYS, JSON | st.text(max_size=5), max_size=3),
)
PAYLOAD = st.builds(
    lambda base, rest: {**rest, **base},
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.text(max_size=3) | SCALARS,
            "messages": st.lists(MESSAGE | JSON, max_size=3) | JSON,
        },
    ),
    st.dictionaries(st.sampled_from([*FIELDS, "unknown"]), JSON, max_size=5),
)
SIMPLE_PAYLOAD = st.fixed_dictionaries(
    {
        "model": st.text(max_size=3),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()},
                optional={"name": st.text(max_size=3)},
            ),
            max_size=3,
        ),
    },
    optional={
        "stream": st.booleans() | st.none(),
        "temperature": st.integers(0, 2) | st.floats(0, 2),
        "max_tokens": st.integers(1, 100),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
        "user": st.text(max_size=3),
    },
)


def _fields(request: ChatCompletionRequest) -> list[tuple[str, Any, type]]:
    """Every field (those left out of ``==`` too) with its value's type."""
    out = []
    for field in attrs.fields(ChatCompletionRequest):
        value = getattr(request, field.name)
        out.append((field.name, value, type(value)))
    return out


def _by_cattrs(payload: dict[str, Any]) -> ChatCompletionRequest | None:
    try:
        request = _CONVERTER.structure(payload, ChatCompletionRequest)
    except Exception:
        return None
    object.__setattr__(request, "raw", payload)
    return request


@settings(max_examples=1500)
@given(PAYLOAD)
def test_fast_path_agrees_with_cattrs_or_steps_aside(payload: dict[str, Any]) -> None:
    fast = simple_chat(payload, payload, None)
    if fast is None:
        return
    slow = _by_cattrs(payload)
    assert slow is not None, "the fast path took a body cattrs refuses"
    assert _fields(fast) == _fields(slow)
    for a, b in zip(fast.messages, slow.messages, strict=True):
        assert attrs.astuple(a, recurse=False) == attrs.astuple(b, recurse=False)


@settings(max_examples=300)
@given(SIMPLE_PAYLOAD)
def test_fast_path_takes_the_common_body(payload: dict[str, Any]) -> None:
    fast = simple_chat(payload, payload, {"top_k": 3})
    assert fast is not None
    slow = _by_cattrs(payload)
    assert slow is not None
    assert _fields(fast)[:-1] == _fields(slow)[:-1]
    assert fast.extensions == {"top_k": 3}
