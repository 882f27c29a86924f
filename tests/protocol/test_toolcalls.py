"""The tool-call normalizer: any quirky shape in, OpenAI's regular shape out."""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.errors import BackendError
from ostiary.protocol.generation import Delta, ToolCallDelta
from ostiary.protocol.responses import ChoiceAccumulator
from ostiary.protocol.toolcalls import ToolCallNormalizer

T = ToolCallDelta
PREFIX = "call_r1"


def run(*deltas: Delta, **kwargs: Any) -> tuple[list[Delta], ToolCallNormalizer]:
    norm = ToolCallNormalizer(PREFIX, **kwargs)
    out = norm.feed(deltas)
    out += norm.finish()
    return out, norm


def pieces(out: list[Delta]) -> list[ToolCallDelta]:
    return [tc for d in out for tc in d.tool_calls]


def final(norm: ToolCallNormalizer, choice: int = 0) -> list[tuple[str, str, str]]:
    return [(c.id, c.function.name, c.function.arguments) for c in norm.calls(choice)]


def reasons(out: list[Delta]) -> list[str]:
    return [d.finish_reason for d in out if d.finish_reason is not None]


def test_regular_output_passes_unchanged() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, id="a", name="get", arguments=""),)),
        Delta(tool_calls=(T(0, arguments='{"x":'),)),
        Delta(tool_calls=(T(0, arguments="1}"),), finish_reason="tool_calls"),
    )
    assert pieces(out) == [T(0, "a", "get", ""), T(0, arguments='{"x":'), T(0, arguments="1}")]
    assert reasons(out) == ["tool_calls"]
    assert final(norm) == [("a", "get", '{"x":1}')]


def test_empty_fragments_are_dropped() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, id="a", name="f"),)),
        Delta(tool_calls=(T(0, arguments=""),)),
        Delta(tool_calls=(T(0, arguments="{}"),)),
        Delta(tool_calls=(T(0, arguments=""),)),
    )
    assert pieces(out) == [T(0, "a", "f", ""), T(0, arguments="{}")]
    assert final(norm) == [("a", "f", "{}")]


def test_repeated_name_and_id_count_once() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, id="a", name="get", arguments='{"x"'),)),
        Delta(tool_calls=(T(0, id="a", name="get", arguments=":1}"),)),
        Delta(finish_reason="stop"),
    )
    assert pieces(out) == [T(0, "a", "get", '{"x"'), T(0, arguments=":1}")]
    assert final(norm) == [("a", "get", '{"x":1}')]
    assert reasons(out) == ["tool_calls"]


def test_arguments_sent_whole_at_the_end_are_not_doubled() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, id="a", name="f", arguments='{"x": '),)),
        Delta(tool_calls=(T(0, arguments="[1, 2]}"),)),
        Delta(tool_calls=(T(0, name="f", arguments='{"x":[1,2]}'),), finish_reason="tool_calls"),
    )
    assert final(norm) == [("a", "f", '{"x": [1, 2]}')]
    assert pieces(out)[-1] == T(0, arguments="[1, 2]}")


def test_other_text_after_complete_arguments_is_a_backend_error() -> None:
    norm = ToolCallNormalizer(PREFIX)
    norm.feed([Delta(tool_calls=(T(0, id="a", name="f", arguments="{}"),))])
    with pytest.raises(BackendError):
        norm.feed([Delta(tool_calls=(T(0, arguments='{"y":2}'),))])


def test_missing_and_repeated_ids_get_deterministic_ones() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, name="f", arguments="{}"), T(1, id="x", name="g", arguments="{}"))),
        Delta(tool_calls=(T(2, id="x", name="h", arguments="{}"),)),
        Delta(choice=1, tool_calls=(T(0, id="x", name="k", arguments="{}"),)),
    )
    assert final(norm) == [("call_r1_0_0", "f", "{}"), ("x", "g", "{}"), ("call_r1_0_2", "h", "{}")]
    assert final(norm, 1) == [("call_r1_1_0", "k", "{}")]
    assert reasons(out) == ["tool_calls", "tool_calls"]


def test_an_id_only_on_the_last_piece_is_not_waited_for() -> None:
    out, norm = run(
        Delta(tool_calls=(T(0, name="f", arguments='{"a":'),)),
        Delta(tool_calls=(T(0, id="late", arguments="1}"),)),
    )
    assert pieces(out)[0] == T(0, "call_r1_0_0", "f", '{"a":')
    assert final(norm) == [("call_r1_0_0", "f", '{"a":1}')]


def test_arguments_before_the_name_are_held() -> None:
    out, _ = run(
        Delta(tool_calls=(T(3, arguments='{"a":'),)),
        Delta(tool_calls=(T(3, id="i", name="f", arguments="1}"),)),
    )
    assert pieces(out) == [T(0, "i", "f", '{"a":1}')]


def test_a_call_never_named_is_a_backend_error() -> None:
    norm = ToolCallNormalizer(PREFIX)
    norm.feed([Delta(tool_calls=(T(0, arguments="{}"),))])
    with pytest.raises(BackendError):
        norm.finish()


def test_calls_without_index_go_by_order() -> None:
    out, norm = run(
        Delta(tool_calls=(T(None, name="f", arguments='{"a":'),)),
        Delta(tool_calls=(T(None, arguments="1}"),)),
        Delta(tool_calls=(T(None, name="f", arguments='{"a":2}'),)),
        Delta(tool_calls=(T(None, name="g"),)),
        Delta(tool_calls=(T(None, arguments="{}"),), finish_reason="stop"),
    )
    assert final(norm) == [
        ("call_r1_0_0", "f", '{"a":1}'),
        ("call_r1_0_1", "f", '{"a":2}'),
        ("call_r1_0_2", "g", "{}"),
    ]
    assert reasons(out) == ["tool_calls"]


def test_index_less_name_repeated_on_every_piece_is_one_call() -> None:
    out, norm = run(
        Delta(tool_calls=(T(None, name="f", arguments='{"a"'),)),
        Delta(tool_calls=(T(None, name="f", arguments=":1}"),)),
        Delta(tool_calls=(T(None, name="f"),)),
        Delta(tool_calls=(T(None, name="f", arguments='{"a":1}'),)),
    )
    assert final(norm) == [("call_r1_0_0", "f", '{"a":1}')]
    assert [tc.index for tc in pieces(out)] == [0, 0]


def test_index_less_calls_told_apart_by_id() -> None:
    _, norm = run(
        Delta(tool_calls=(T(None, id="a", name="f", arguments='{"a"'),)),
        Delta(tool_calls=(T(None, id="a", name="f", arguments=":1}"),)),
        Delta(tool_calls=(T(None, id="b", name="f", arguments='{"a":1}'),)),
    )
    assert final(norm) == [("a", "f", '{"a":1}'), ("b", "f", '{"a":1}')]


def test_a_call_without_arguments_gets_an_empty_object() -> None:
    out, norm = run(Delta(tool_calls=(T(0, id="a", name="now"),), finish_reason="tool_calls"))
    assert pieces(out) == [T(0, "a", "now", ""), T(0, arguments="{}")]
    assert final(norm) == [("a", "now", "{}")]


def test_finish_reasons_and_text() -> None:
    out, _ = run(
        Delta("hi"),
        Delta(""),
        Delta(finish_reason="tool_calls"),
        Delta("x", choice=1, finish_reason="length"),
    )
    assert [(d.text, d.choice, d.finish_reason) for d in out] == [
        ("hi", 0, None),
        ("", 0, "stop"),
        ("x", 1, "length"),
    ]


def test_bounds_are_backend_errors() -> None:
    with pytest.raises(BackendError, match="more than 2 tool calls"):
        run(Delta(tool_calls=tuple(T(i, id=str(i), name="f") for i in range(3))), max_calls=2)
    with pytest.raises(BackendError, match="over 8 bytes"):
        run(
            Delta(tool_calls=(T(0, id="a", name="f", arguments='{"a":"é12"}'),)),
            max_argument_bytes=8,
        )
    with pytest.raises(BackendError, match="choices"):
        run(*(Delta(choice=i, finish_reason="stop") for i in range(3)), max_choices=2)


def test_escaped_quotes_and_brackets_inside_strings_do_not_end_the_arguments() -> None:
    _, norm = run(
        Delta(tool_calls=(T(0, id="a", name="f", arguments='{"s":"}\\'),)),
        Delta(tool_calls=(T(0, arguments='"]{"'),)),
        Delta(tool_calls=(T(0, arguments=',"t":1}'),)),
    )
    assert orjson.loads(final(norm)[0][2]) == {"s": '}"]{', "t": 1}


# -- the property ----------------------------------------------------------------------

NAMES = st.from_regex(r"[a-zA-Z0-9_-]{1,12}", fullmatch=True)
SCALARS = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
ARGS = st.dictionaries(st.text(max_size=5), VALUES, max_size=3)
IDS = ("first", "every", "last", "none", "same")


@st.composite
def quirky(draw: st.DrawFn) -> tuple[list[tuple[str, str, str | None]], list[Delta], str, bool]:
    n = draw(st.integers(1, 4))
    indexed = draw(st.booleans())
    # Without an index, an id that comes late cannot be told from the next call's id;
    # one id for every call would make them one call.
    ids = draw(st.sampled_from(IDS if indexed else ("first", "every", "none")))
    repeat_name = draw(st.booleans())
    whole_at_end = draw(st.booleans())
    empties = draw(st.booleans())
    calls = []
    per_call: list[list[ToolCallDelta]] = []
    for i in range(n):
        name = draw(NAMES)
        args = orjson.dumps({"n": i, **draw(ARGS)}).decode()
        if draw(st.booleans()):
            args = args.replace(",", ", ")
        upstream = "same" if ids == "same" else f"up{i}"
        cuts = sorted(draw(st.lists(st.integers(0, len(args)), max_size=6)))
        fragments = [args[a:b] for a, b in zip([0, *cuts], [*cuts, len(args)], strict=True)]
        if empties:
            fragments = [f for frag in fragments for f in (frag, "")]
        if whole_at_end:
            fragments.append(args)
        index = i if indexed else None
        out = []
        for k, fragment in enumerate(fragments):
            last = k == len(fragments) - 1
            out.append(
                T(
                    index,
                    id=upstream
                    if (ids == "first" and k == 0)
                    or ids in ("every", "same")
                    or (ids == "last" and last)
                    else None,
                    name=name if k == 0 or repeat_name else None,
                    arguments=fragment,
                )
            )
        per_call.append(out)
        calls.append((name, args, upstream if ids in ("first", "every") else None))
    order: list[int] = []
    if indexed:
        remaining = [len(p) for p in per_call]
        while any(remaining):
            live = [i for i, r in enumerate(remaining) if r]
            i = draw(st.sampled_from(live))
            order.append(i)
            remaining[i] -= 1
    else:
        order = [i for i, p in enumerate(per_call) for _ in p]
    positions = [0] * n
    flat = []
    for i in order:
        flat.append(per_call[i][positions[i]])
        positions[i] += 1
    first_seen = list(dict.fromkeys(order))
    calls = [calls[i] for i in first_seen]
    deltas: list[Delta] = [Delta("thinking")] if draw(st.booleans()) else []
    while flat:
        size = draw(st.integers(1, 3)) if indexed else 1
        deltas.append(Delta(tool_calls=tuple(flat[:size])))
        flat = flat[size:]
    reason = draw(st.sampled_from(["stop", "tool_calls", None]))
    if reason is not None:
        deltas.append(Delta(finish_reason=reason))
    return calls, deltas, ids, draw(st.booleans())


def sdk_accumulate(deltas: list[Delta], choice: int = 0) -> list[dict[str, Any]]:
    """What the OpenAI SDK's stream helper does: merge by position ``index``."""
    acc: list[dict[str, Any]] = []
    for d in deltas:
        if d.choice != choice:
            continue
        for tc in d.tool_calls:
            assert tc.index is not None
            if tc.index == len(acc):
                assert tc.id is not None and tc.name is not None
                acc.append({"id": tc.id, "name": tc.name, "arguments": tc.arguments})
            else:
                assert tc.index < len(acc), "a call's start comes after all earlier ones"
                assert tc.id is None and tc.name is None and tc.arguments
                acc[tc.index]["arguments"] += tc.arguments
    return acc


@settings(max_examples=300, deadline=None)
@given(quirky(), st.data())
def test_any_quirky_shape_normalizes_to_the_same_calls(
    case: tuple[list[tuple[str, str, str | None]], list[Delta], str, bool], data: st.DataObject
) -> None:
    calls, deltas, ids, two_choices = case
    if two_choices:  # the same output for choice 1, interleaved with choice 0's
        deltas = [d for d0 in deltas for d in (d0, attrs.evolve(d0, choice=1))]
    # Streamed: fed in batches of any size.
    stream = ToolCallNormalizer(PREFIX)
    streamed: list[Delta] = []
    rest = list(deltas)
    while rest:
        size = data.draw(st.integers(1, len(rest)))
        streamed += stream.feed(rest[:size])
        rest = rest[size:]
    streamed += stream.finish()
    # Not streamed: everything at once, collected.
    whole = ToolCallNormalizer(PREFIX)
    collected = ChoiceAccumulator()
    for delta in [*whole.feed(deltas), *whole.finish()]:
        collected.add(delta)
    choice, *other = collected.chat_choices()

    got = sdk_accumulate(streamed)
    assert [(c["name"], c["arguments"]) for c in got] == [(n, a) for n, a, _ in calls]
    assert choice["finish_reason"] == "tool_calls"
    assert reasons(streamed) == ["tool_calls"] * (2 if two_choices else 1)
    if two_choices:
        again = sdk_accumulate(streamed, 1)
        assert [(c["name"], c["arguments"]) for c in again] == [(n, a) for n, a, _ in calls]
        assert all(c["id"].startswith(PREFIX + "_1_") for c in again)
        assert other[0]["finish_reason"] == "tool_calls"
    message_calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": c["arguments"]},
        }
        for c in got
    ]
    assert choice["message"]["tool_calls"] == message_calls
    assert [(c.id, c.function.name, c.function.arguments) for c in whole.calls()] == [
        (c["id"], c["name"], c["arguments"]) for c in got
    ]
    got_ids = [c["id"] for c in got]
    assert len(set(got_ids)) == len(got_ids)
    if ids in ("first", "every"):
        assert got_ids == [u for _, _, u in calls]
    elif ids == "same":
        assert got_ids[0] == "same"
        assert all(i.startswith(PREFIX + "_0_") for i in got_ids[1:])
    elif ids == "last":  # ours, unless the id came with the call's start
        assert all(i.startswith((PREFIX + "_0_", "up")) for i in got_ids)
    else:
        assert all(i.startswith(PREFIX + "_0_") for i in got_ids)
