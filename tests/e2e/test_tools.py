"""Function calling and structured output end to end, through the official SDK
(strict response validation) with every body checked against the spec: the
scripted backend, and the ``openai`` backend relaying a fake upstream that sends
parallel tool calls in each broken shape real servers use
(:mod:`tests.e2e.quirky_upstream`). The SDK's ``chat.completions.stream`` helper,
plain streaming and non-streamed answers must all give the same calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jsonschema_rs
import openai
import orjson
import pytest

from tests.e2e.conftest import Api
from tests.e2e.quirky_upstream import CALLS, QUIRKS, RECEIVED, TOOLS, quirky_upstream

if TYPE_CHECKING:
    from tests.e2e.conftest import Launcher, ServerProcess
    from tests.e2e.spec import OpenAPI

MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Oslo, and the time?"}]
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 2},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
STRICT_TOOLS: list[Any] = [
    {"type": "function", "function": {"name": n, "parameters": p, "strict": True}}
    for n, p in (("get_weather", WEATHER), ("get_time", TIME))
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


def accumulate(chunks: list[Any]) -> tuple[list[dict[str, Any]], str | None]:
    """Calls and finish reason from parsed stream chunks, merged by index the way
    clients do it by hand."""
    calls: dict[int, dict[str, Any]] = {}
    reason = None
    for chunk in chunks:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or ():
                call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += tc.id or ""
                call["name"] += (tc.function and tc.function.name) or ""
                call["arguments"] += (tc.function and tc.function.arguments) or ""
            reason = choice.finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason


def as_dicts(calls: Any) -> list[dict[str, Any]]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in calls]


def three_ways(api: Api, model: str, tools: list[Any], **extra: Any) -> list[list[dict[str, Any]]]:
    """The calls of one request asked three ways, each checked against the spec:
    the SDK's stream helper, plain streaming, and a non-streamed answer."""
    found = []
    with api.client.chat.completions.stream(
        model=model, messages=MESSAGES, tools=tools, **extra
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    api.sse("CreateChatCompletionStreamResponse")
    assert final.choices[0].finish_reason == "tool_calls"
    found.append(as_dicts(final.choices[0].message.tool_calls))
    chunks = list(
        api.client.chat.completions.create(
            model=model, messages=MESSAGES, tools=tools, stream=True, **extra
        )
    )
    raw = api.sse("CreateChatCompletionStreamResponse")
    assert len(raw) == len(chunks)
    calls, reason = accumulate(chunks)
    assert reason == "tool_calls"
    found.append(calls)
    whole = api.client.chat.completions.create(model=model, messages=MESSAGES, tools=tools, **extra)
    api.json("CreateChatCompletionResponse")
    assert whole.choices[0].finish_reason == "tool_calls"
    assert whole.choices[0].message.content is None
    found.append(as_dicts(whole.choices[0].message.tool_calls))
    for calls in found:
        ids = [c["id"] for c in calls]
        assert all(ids) and len(set(ids)) == len(ids), ids
    return found


# -- scripted -----------------------------------------------------------------------------


def test_scripted_parallel_calls_validate_every_way(scripted_api: Api) -> None:
    ways = three_ways(scripted_api, "scripted", STRICT_TOOLS, parallel_tool_calls=True)
    for calls in ways:
        assert [c["name"] for c in calls] == ["get_weather", "get_time"]
        for call in calls:
            assert jsonschema_rs.is_valid(SCHEMAS[call["name"]], orjson.loads(call["arguments"]))
    assert ways[0] == [{**c, "id": ways[0][i]["id"]} for i, c in enumerate(ways[1])]


def test_scripted_stream_helper_parses_strict_arguments(scripted_api: Api) -> None:
    choice: Any = {"type": "function", "function": {"name": "get_time"}}
    with scripted_api.client.chat.completions.stream(
        model="scripted", messages=MESSAGES, tools=STRICT_TOOLS, tool_choice=choice
    ) as stream:
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
    assert [e.name for e in done] == ["get_time"]
    assert done[0].parsed_arguments == {"zone": "UTC"}


def test_scripted_tool_choice_none_answers_in_text(scripted_api: Api) -> None:
    completion = scripted_api.client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=STRICT_TOOLS, tool_choice="none"
    )
    scripted_api.json("CreateChatCompletionResponse")
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content


def test_scripted_strict_json_schema_output(scripted_api: Api) -> None:
    fmt: Any = {
        "type": "json_schema",
        "json_schema": {"name": "w", "schema": WEATHER, "strict": True},
    }
    completion = scripted_api.client.chat.completions.create(
        model="scripted", messages=MESSAGES, response_format=fmt
    )
    scripted_api.json("CreateChatCompletionResponse")
    content = completion.choices[0].message.content
    assert content is not None and jsonschema_rs.is_valid(WEATHER, orjson.loads(content))


#: A strict tool whose pattern the scripted backend's small instance cannot meet:
#: its output fails strict mode, as a small model's can.
UNMET: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "code",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"pin": {"type": "string", "pattern": "^[0-9]{4}$"}},
                "required": ["pin"],
                "additionalProperties": False,
            },
        },
    }
]


def test_output_failing_strict_mode_is_a_502(scripted_api: Api) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        scripted_api.client.chat.completions.create(
            model="scripted", messages=MESSAGES, tools=UNMET
        )
    assert info.value.status_code == 502
    error = scripted_api.error(502)
    assert error["code"] == "invalid_model_output"
    assert "'pin'" in error["message"]


def test_a_stream_failing_strict_mode_ends_with_an_error_event(scripted_api: Api) -> None:
    stream = scripted_api.client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=UNMET, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="Strict mode"):
        for chunk in stream:
            seen.append(chunk)
    assert all(c.choices[0].finish_reason is None for c in seen if c.choices)
    assert b"invalid_model_output" in bytes(scripted_api.last.body)
    assert b"[DONE]" not in bytes(scripted_api.last.body)


# -- the openai backend and a quirky upstream -------------------------------------------


@pytest.fixture(scope="module")
def quirky_port() -> Iterator[int]:
    with quirky_upstream() as port:
        yield port


@pytest.fixture(scope="module")
def quirky_relay(launch_server: Launcher, quirky_port: int) -> ServerProcess:
    models = ", ".join(f'"{m}"' for m in QUIRKS)
    return launch_server(
        "quirky-relay",
        "[[backends]]\n"
        'name = "quirky"\n'
        'kind = "openai"\n'
        f"models = [{models}]\n"
        f'base_url = "http://127.0.0.1:{quirky_port}/v1"\n'
        "connect_timeout = 2.0\n"
        "read_timeout = 10.0\n",
    )


@pytest.fixture(scope="module")
def quirky_api(quirky_relay: ServerProcess, openapi: OpenAPI) -> Iterator[Api]:
    api = Api(quirky_relay, openapi)
    yield api
    api.close()


@pytest.mark.parametrize("quirk", sorted(QUIRKS))
def test_every_quirk_normalizes_to_the_same_calls(quirky_api: Api, quirk: str) -> None:
    expected = [(name, args) for name, args in CALLS]
    for calls in three_ways(quirky_api, quirk, TOOLS, parallel_tool_calls=True):
        assert [(c["name"], orjson.loads(c["arguments"])) for c in calls] == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {"type": "object", "uniqueItems": 3},
                        },
                    }
                ]
            },
            "tools[0].function.parameters",
        ),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_1", "content": "42"},
                ]
            },
            "messages[1].tool_call_id",
        ),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_invalid_tool_fields_are_400s_that_never_reach_the_upstream(
    quirky_api: Api, fields: dict[str, Any], param: str
) -> None:
    body = {"model": "regular", "messages": MESSAGES, "tools": TOOLS, **fields}
    reached = len(RECEIVED)
    response = quirky_api.http.post(
        "/chat/completions",
        content=orjson.dumps(body),
        headers={
            "authorization": f"Bearer {quirky_api.server.key}",
            "content-type": "application/json",
        },
    )
    assert response.status_code == 400, response.text
    error = quirky_api.error(400)
    assert error["param"] == param, error
    assert len(RECEIVED) == reached
