"""Function calling and structured output in requests: each refusal names its param;
valid conversations pass."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import pytest

from ostiary.protocol.decoding import decode_chat
from ostiary.protocol.request_limits import RequestLimits
from tests.protocol.test_decoding import LIMITS, USER, chat, reject


def tool(name: str = "get", parameters: Any = None, **extra: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name, **extra}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "where", "minLength": 1},
        "days": {"type": ["integer", "null"], "minimum": 1, "maximum": 7},
        "units": {"enum": ["c", "f"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "at": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
    },
    "required": ["city"],
    "additionalProperties": False,
    "$defs": {"x": True},
}


def call(call_id: str = "c1", name: str = "get", arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def assistant(*calls: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": None, "tool_calls": list(calls)}


def answer(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "42"}


def accept(body: dict[str, Any], limits: RequestLimits = LIMITS) -> None:
    decode_chat(orjson.dumps(body), limits)


def test_a_full_valid_tool_conversation_passes() -> None:
    accept(
        chat(
            messages=[
                USER,
                assistant(call("a"), call("b", "put", '{"x":1}')),
                answer("b"),
                answer("a"),
                {"role": "assistant", "content": "done"},
                USER,
                assistant(call("c")),
                answer("c"),
            ],
            tools=[tool("get", SCHEMA, strict=True), tool("put"), tool("a-b_9")],
            tool_choice={"type": "function", "function": {"name": "put"}},
            parallel_tool_calls=False,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "out", "schema": SCHEMA, "strict": True},
            },
        )
    )
    accept(chat(tools=[tool()], tool_choice="none"))
    accept(chat(response_format={"type": "json_object"}))
    accept(chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [tool("")]}, "tools[0].function.name"),
        ({"tools": [tool("a b")]}, "tools[0].function.name"),
        ({"tools": [tool("x" * 65)]}, "tools[0].function.name"),
        ({"tools": [tool(), tool("put"), tool()]}, "tools[2].function.name"),
        ({"tools": [tool(parameters={"type": "string"})]}, "tools[0].function.parameters.type"),
        ({"tools": [tool(parameters={"type": "objekt"})]}, "tools[0].function.parameters.type"),
        (
            {"tools": [tool(parameters={"properties": {"a": {"type": 3}}})]},
            "tools[0].function.parameters.properties.a.type",
        ),
        (
            {"tools": [tool(parameters={"properties": []})]},
            "tools[0].function.parameters.properties",
        ),
        (
            {"tools": [tool(parameters={"required": ["a", "a"]})]},
            "tools[0].function.parameters.required",
        ),
        (
            {"tools": [tool(parameters={"anyOf": []})]},
            "tools[0].function.parameters.anyOf",
        ),
        (
            {"tools": [tool(parameters={"items": [5]})]},
            "tools[0].function.parameters.items[0]",
        ),
        (
            {"tools": [tool(parameters={"properties": {"a": {"minLength": -1}}})]},
            "tools[0].function.parameters.properties.a.minLength",
        ),
        (
            {"tools": [tool(parameters={"multipleOf": 0})]},
            "tools[0].function.parameters.multipleOf",
        ),
        ({"tools": [tool(parameters={"pattern": 1})]}, "tools[0].function.parameters.pattern"),
        (
            {"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "no"}}},
            "tool_choice",
        ),
        ({"parallel_tool_calls": True}, "parallel_tool_calls"),
        ({"tools": [tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "text", "json_schema": {"name": "x"}}},
            "response_format.json_schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a.b"}}},
            "response_format.json_schema.name",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "x": 1}}},
            "response_format.json_schema.x",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": 1}}},
            "response_format.json_schema.strict",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": []},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": {"not": 5}},
                }
            },
            "response_format.json_schema.schema.not",
        ),
    ],
)
def test_bad_tools_choices_and_formats_name_their_param(fields: dict[str, Any], param: str) -> None:
    error = reject(chat(**fields))
    assert error.param == param
    assert param in error.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([USER, answer("c1")], "messages[1].tool_call_id"),
        ([USER, assistant(call("c1")), answer("c2")], "messages[2].tool_call_id"),
        ([USER, assistant(call("c1")), USER, answer("c1")], "messages[3].tool_call_id"),
        ([USER, assistant(call("c1"), call("c1"))], "messages[1].tool_calls[1].id"),
        ([USER, assistant(call(""))], "messages[1].tool_calls[0].id"),
        ([USER, assistant(call(name="a b"))], "messages[1].tool_calls[0].function.name"),
        (
            [USER, assistant({**call(), "type": "retrieval"})],
            "messages[1].tool_calls[0].type",
        ),
        (
            [USER, assistant({**call(), "function": {"name": "f", "arguments": {}}})],
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_tool_conversations_name_the_message(
    messages: list[dict[str, Any]], param: str
) -> None:
    assert reject(chat(messages=messages)).param == param


def test_schema_bounds() -> None:
    limits = RequestLimits(max_schema_nodes=3, max_schema_depth=2, max_schema_bytes=60)
    accept(chat(tools=[tool(parameters={"properties": {"a": {}}})]), limits)
    wide: dict[str, Any] = {"properties": {"a": {}, "b": {}, "c": {}}}
    assert reject(chat(tools=[tool(parameters=wide)]), limits).param == (
        "tools[0].function.parameters"
    )
    deep: dict[str, Any] = {"properties": {"a": {"items": {}}}}
    assert reject(chat(tools=[tool(parameters=deep)]), limits).param == (
        "tools[0].function.parameters.properties.a.items"
    )
    big = {"description": "x" * 60}
    error = reject(chat(tools=[tool(parameters=big)]), limits)
    assert error.param == "tools[0].function.parameters"
    assert error.code == "invalid_function_parameters"


class Refuses:
    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []

    def check(self, schema: Mapping[str, Any], strict: bool = False) -> str | None:
        self.seen.append(schema)
        return "not a schema, says the metaschema" if "bad" in schema else None

    def validate(self, instance: object, schema: Mapping[str, Any]) -> str | None:
        raise AssertionError("decoding never validates output")


def test_the_runtime_schema_checker_has_the_last_word() -> None:
    checker = Refuses()
    good = orjson.dumps(chat(tools=[tool(parameters={"type": "object"})]))
    decode_chat(good, LIMITS, schema_checker=checker)
    assert checker.seen == [{"type": "object"}]
    bad = orjson.dumps(chat(tools=[tool(), tool("p", parameters={"bad": 1})]))
    with pytest.raises(Exception, match="metaschema") as info:
        decode_chat(bad, LIMITS, schema_checker=checker)
    assert getattr(info.value, "param", None) == "tools[1].function.parameters"
