"""The scripted backend's tool calls and JSON output: arguments that validate
against each tool's schema, streamed in fragments; the instance generator behind
them, checked by a real JSON Schema validator."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.backends.instances import Unsatisfiable, instance_of
from ostiary.backends.scripted import ScriptedBackend, ScriptedSettings
from ostiary.protocol.decoding import decode_chat
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.requests import ChatCompletionRequest
from ostiary.protocol.toolcalls import ToolCallNormalizer
from tests.backends.test_scripted import run, text

SCRIPT = ScriptedSettings(chunks=4)
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "days", "unit"],
    "additionalProperties": False,
}
TIME: dict[str, Any] = {
    "type": "object",
    "properties": {"zone": {"type": "string", "format": "uuid"}},
}


def chat(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], **fields}
    return decode_chat(orjson.dumps(body), RequestLimits())


def tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


TOOLS = [tool("weather", WEATHER), tool("time", TIME)]


async def calls(request: ChatCompletionRequest) -> list[tuple[str, Any]]:
    deltas, usage = await run(ScriptedBackend(SCRIPT).chat(request))
    assert usage.completion_tokens > 0
    assert deltas[-1].finish_reason == "tool_calls"
    assert text(deltas) == ""
    fragments = [tc for d in deltas for tc in d.tool_calls if tc.arguments]
    assert len(fragments) > len({tc.index for tc in fragments}), "arguments come in pieces"
    normalizer = ToolCallNormalizer("call_x")
    normalizer.feed(deltas)
    normalizer.finish()
    return [(c.function.name, orjson.loads(c.function.arguments)) for c in normalizer.calls()]


async def test_auto_calls_the_first_tool_with_valid_arguments() -> None:
    made = await calls(chat(tools=TOOLS))
    assert [name for name, _ in made] == ["weather"]
    assert jsonschema_rs.is_valid(WEATHER, made[0][1])


async def test_parallel_calls_every_tool_in_order() -> None:
    made = await calls(chat(tools=TOOLS, parallel_tool_calls=True, tool_choice="required"))
    assert [name for name, _ in made] == ["weather", "time"]
    assert all(
        jsonschema_rs.is_valid(s, args) for s, (_, args) in zip((WEATHER, TIME), made, strict=True)
    )


async def test_a_named_tool_choice_calls_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "time"}}
    made = await calls(chat(tools=TOOLS, tool_choice=choice, parallel_tool_calls=True))
    assert [name for name, _ in made] == ["time"]


async def test_tool_choice_none_answers_in_text() -> None:
    deltas, _ = await run(ScriptedBackend(SCRIPT).chat(chat(tools=TOOLS, tool_choice="none")))
    assert text(deltas) == SCRIPT.reply
    assert not any(d.tool_calls for d in deltas)


async def test_json_object_and_json_schema_replies() -> None:
    backend = ScriptedBackend(SCRIPT)
    deltas, _ = await run(backend.chat(chat(response_format={"type": "json_object"})))
    assert orjson.loads(text(deltas)) == {"reply": SCRIPT.reply}
    assert sum(1 for d in deltas if d.text) > 1
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER, "strict": True}}
    deltas, _ = await run(backend.chat(chat(response_format=fmt)))
    assert jsonschema_rs.is_valid(WEATHER, orjson.loads(text(deltas)))
    deltas, _ = await run(backend.chat(chat(response_format=fmt, max_tokens=1)))
    assert deltas[-1].finish_reason == "length"


async def test_an_unsatisfiable_schema_gets_empty_arguments() -> None:
    made = await calls(
        chat(tools=[tool("f", {"type": "object", "required": ["a"], "properties": {"a": False}})])
    )
    assert made == [("f", {})]


SCALARS = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("integer")},
        optional={"minimum": st.integers(-50, 50), "multipleOf": st.integers(1, 9)},
    ),
    st.fixed_dictionaries(
        {"type": st.just("number")},
        optional={
            "exclusiveMinimum": st.integers(-5, 5),
            "maximum": st.integers(6, 20),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("string")},
        optional={
            "minLength": st.integers(0, 5),
            "format": st.sampled_from(["date", "email", "uri", "date-time"]),
        },
    ),
    st.builds(lambda v: {"enum": v}, st.lists(st.integers() | st.text(max_size=3), min_size=1)),
    st.builds(lambda v: {"const": v}, st.integers() | st.booleans() | st.none()),
    st.just({"type": "boolean"}),
    st.just({"type": ["null", "integer"]}),
)


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(st.sampled_from("abcdef"), children, max_size=4).flatmap(
        lambda props: st.fixed_dictionaries(
            {"type": st.just("object"), "properties": st.just(props)},
            optional={
                "required": st.lists(st.sampled_from(sorted(props)), unique=True)
                if props
                else st.just([]),
                "additionalProperties": st.just(False),
            },
        )
    )
    arrays = st.fixed_dictionaries(
        {"type": st.just("array"), "items": children}, optional={"minItems": st.integers(0, 3)}
    )
    choices = st.lists(children, min_size=1, max_size=3).map(lambda bs: {"anyOf": bs})
    return objects | arrays | choices


SCHEMAS = st.recursive(SCALARS, containers, max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(SCHEMAS)
def test_the_instance_of_a_schema_validates(schema: dict[str, Any]) -> None:
    value = instance_of(schema)
    assert jsonschema_rs.is_valid(schema, value), (schema, value)


def test_refs_and_all_of_are_followed() -> None:
    schema = {
        "$defs": {"pos": {"type": "integer", "exclusiveMinimum": 0}},
        "allOf": [
            {"type": "object", "properties": {"n": {"$ref": "#/$defs/pos"}}, "required": ["n"]},
            {"properties": {"s": {"type": "string", "maxLength": 3}}, "required": ["s"]},
        ],
    }
    value = instance_of(schema)
    assert value == {"n": 1, "s": ""}
    assert jsonschema_rs.is_valid(schema, value)


@pytest.mark.parametrize(
    "schema",
    [
        False,
        {"type": "integer", "minimum": 5, "maximum": 4},
        {"type": "string", "minLength": 3, "maxLength": 2},
        {"type": "object", "minProperties": 2, "additionalProperties": False},
        {"$ref": "http://127.0.0.1:9/x"},
        {"$ref": "#/$defs/missing"},
        {"anyOf": [False, {"type": "integer", "maximum": -1, "minimum": 0}]},
    ],
)
def test_unsatisfiable_schemas_say_so(schema: Any) -> None:
    with pytest.raises(Unsatisfiable):
        instance_of(schema)
