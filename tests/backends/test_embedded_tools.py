"""The embedded model's tool plan without the model: the schema its output is held
to accepts exactly the documents the plan reads, the conversation is rewritten for
a template without tools, and what the model wrote becomes calls or text."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import orjson
import pytest

from ostiary.backends.embedded_tools import plan_tools, template_messages
from ostiary.protocol.decoding import decode_chat
from ostiary.protocol.errors import BackendError
from ostiary.protocol.generation import Delta, ToolCallDelta
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.requests import ChatCompletionRequest

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "weather", "description": "Weather.", "parameters": CITY},
    },
    {"type": "function", "function": {"name": "now"}},
]
USER = [{"role": "user", "content": "Weather in Oslo?"}]


def chat(messages: list[Any] = USER, **fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": messages, **fields}
    return decode_chat(orjson.dumps(body), RequestLimits())


def test_no_plan_without_tools_or_with_none() -> None:
    assert plan_tools(chat()) is None
    assert plan_tools(chat(tools=TOOLS, tool_choice="none")) is None


def test_required_is_one_call_to_a_declared_function() -> None:
    plan = plan_tools(chat(tools=TOOLS, tool_choice="required"))
    assert plan is not None
    schema = plan.schema()
    assert jsonschema_rs.is_valid(schema, {"name": "weather", "arguments": {"city": "Oslo"}})
    assert jsonschema_rs.is_valid(schema, {"name": "now", "arguments": {}})
    assert not jsonschema_rs.is_valid(schema, {"name": "weather", "arguments": {"town": "x"}})
    assert not jsonschema_rs.is_valid(schema, {"name": "other", "arguments": {}})
    assert not jsonschema_rs.is_valid(schema, {"content": "hi"})
    deltas = plan.read('{"name": "weather", "arguments": {"city": "Oslo"}}', "stop")
    call = ToolCallDelta(0, name="weather", arguments='{"city":"Oslo"}')
    assert deltas == [Delta(tool_calls=(call,), finish_reason="tool_calls")]


def test_a_named_choice_allows_only_that_function() -> None:
    choice = {"type": "function", "function": {"name": "now"}}
    plan = plan_tools(chat(tools=TOOLS, tool_choice=choice))
    assert plan is not None
    assert not jsonschema_rs.is_valid(
        plan.schema(), {"name": "weather", "arguments": {"city": "x"}}
    )
    assert jsonschema_rs.is_valid(plan.schema(), {"name": "now", "arguments": {}})


def test_parallel_calls_and_auto_text() -> None:
    plan = plan_tools(chat(tools=TOOLS, parallel_tool_calls=True))
    assert plan is not None
    schema = plan.schema()
    two = {
        "tool_calls": [
            {"name": "now", "arguments": {}},
            {"name": "weather", "arguments": {"city": "a"}},
        ]
    }
    assert jsonschema_rs.is_valid(schema, two)
    assert jsonschema_rs.is_valid(schema, {"content": "It is sunny."})
    assert not jsonschema_rs.is_valid(schema, {"tool_calls": []})
    (delta,) = plan.read(orjson.dumps(two).decode(), "stop")
    assert [tc.name for tc in delta.tool_calls] == ["now", "weather"]
    assert [tc.index for tc in delta.tool_calls] == [0, 1]
    assert plan.read('{"content": "It is sunny."}', "stop") == [
        Delta(text="It is sunny.", finish_reason="stop")
    ]
    assert "tool_calls" in plan.instructions() and "content" in plan.instructions()


def test_auto_right_after_a_tool_result_answers_in_text() -> None:
    messages = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    assert plan_tools(chat(messages, tools=TOOLS)) is None
    assert plan_tools(chat(messages, tools=TOOLS, tool_choice="required")) is not None
    out = template_messages(chat(messages).messages)
    assert out == [
        USER[0],
        {"role": "assistant", "content": 'I called weather with {"city":"Oslo"}.'},
        {"role": "user", "content": "Result of weather: sunny"},
    ]


def test_the_tools_join_the_system_message() -> None:
    messages = [{"role": "developer", "content": "Be brief."}, *USER]
    plan = plan_tools(chat(messages, tools=TOOLS))
    assert plan is not None
    system, user = plan.messages(chat(messages).messages)
    assert system["role"] == "system"
    assert system["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert '"city"' in system["content"] and "Weather." in system["content"]
    assert user == USER[0]
    two = {"tool_calls": [{"name": "now", "arguments": {}}] * 3}
    parallel = plan_tools(chat(tools=TOOLS, parallel_tool_calls=True))
    assert parallel is not None
    assert not jsonschema_rs.is_valid(parallel.schema(), two), "at most one call per function"


def test_output_cut_short_is_passed_on_as_text() -> None:
    plan = plan_tools(chat(tools=TOOLS))
    assert plan is not None
    assert plan.read('{"name": "wea', "length") == [
        Delta(text='{"name": "wea', finish_reason="length")
    ]


@pytest.mark.parametrize("text", ["nope", "[1]", '{"tool_calls": 3}', '{"arguments": {}}'])
def test_output_that_makes_no_sense_is_a_502(text: str) -> None:
    plan = plan_tools(chat(tools=TOOLS, tool_choice="required"))
    assert plan is not None
    with pytest.raises(BackendError):
        plan.read(text, "stop")
