"""Strict mode through the gateway: output that breaks the client's schema is never
passed off as valid, streamed or not; the schemas themselves are checked by the
runtime's checker when the request comes in."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ostiary.protocol.actions import Dispatch, EndStream, Respond, SendBytes
from ostiary.protocol.capabilities import RESPONSE_FORMATS, Capabilities
from ostiary.protocol.decoding import decode_chat
from ostiary.protocol.errors import InvalidRequestError
from ostiary.protocol.events import BackendChunk, BackendFinished
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, ToolCallDelta, Usage
from ostiary.protocol.request_limits import RequestLimits
from ostiary.protocol.tool_validation import SchemaChecker
from ostiary.runtime.schemas import JsonSchemaChecker
from tests.conftest import chat_body, key_table
from tests.protocol.test_gateway import only, request, sse_events

T = ToolCallDelta
LIMITS = RequestLimits(max_strict_output_bytes=200)
CHECKER = JsonSchemaChecker(LIMITS)
PARAMS = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]+$"}},
    "required": ["city"],
    "additionalProperties": False,
}
STRICT_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {"name": "weather", "strict": True, "parameters": PARAMS},
}
LOOSE_TOOL = {"type": "function", "function": {"name": "loose", "parameters": PARAMS}}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "city", "strict": True, "schema": PARAMS},
}


def gateway(checker: SchemaChecker | None = CHECKER) -> Gateway:
    caps = Capabilities(tools=True, response_formats=RESPONSE_FORMATS)
    return Gateway(
        routes=[ModelRoute("m", "b1", capabilities=caps)],
        keys=key_table(),
        limits=LIMITS,
        schema_checker=checker,
    )


def call(name: str, arguments: str) -> Delta:
    return Delta(tool_calls=(T(0, id="c1", name=name, arguments=arguments),))


def run(
    body: bytes, pieces: tuple[Delta | Usage, ...], checker: SchemaChecker | None = CHECKER
) -> tuple[int, Any]:
    """Status and decoded body (a stream: its events) of one exchange."""
    gw = gateway(checker)
    assert isinstance(gw.handle(request(gw, body=body))[0], Dispatch)
    data = b""
    for piece in pieces:
        for action in gw.handle(BackendChunk("r1", (piece,), 10.2)):
            if isinstance(action, Respond):
                return action.status, orjson.loads(action.body)
            if isinstance(action, SendBytes):
                data += action.data
            if isinstance(action, EndStream):
                return 200, sse_events(data)
    actions = gw.handle(BackendFinished("r1", 10.5))
    if orjson.loads(body).get("stream"):
        data += b"".join(a.data for a in actions if isinstance(a, SendBytes))
        assert isinstance(actions[-1], EndStream)
        return 200, sse_events(data)
    respond = only(actions, Respond)
    return respond.status, orjson.loads(respond.body)


def test_valid_strict_arguments_pass() -> None:
    body = chat_body(tools=[STRICT_TOOL])
    status, out = run(body, (call("weather", '{"city":"Paris"}'), Usage(1, 1)))
    assert status == 200
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == (
        '{"city":"Paris"}'
    )


@pytest.mark.parametrize(
    ("arguments", "reason"),
    [
        ('{"city":"paris"}', "does not match"),
        ('{"town":"Paris"}', "does not match"),
        ('{"city":', "not JSON"),
        ('{"city":"' + "A" + "a" * 300 + '"}', "longer than"),
    ],
)
def test_invalid_strict_arguments_are_a_502(arguments: str, reason: str) -> None:
    status, out = run(chat_body(tools=[STRICT_TOOL]), (call("weather", arguments), Usage(1, 1)))
    assert status == 502
    assert out["error"]["code"] == "invalid_model_output"
    assert reason in out["error"]["message"]


def test_a_loose_tool_is_not_checked() -> None:
    body = chat_body(tools=[LOOSE_TOOL, STRICT_TOOL])
    status, out = run(body, (call("loose", '{"city":1}'), Usage(1, 1)))
    assert status == 200
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "loose"


def test_a_call_to_an_undeclared_function_fails_strict_mode() -> None:
    status, out = run(chat_body(tools=[STRICT_TOOL]), (call("other", "{}"), Usage(1, 1)))
    assert (status, out["error"]["code"]) == (502, "invalid_model_output")
    assert "'other'" in out["error"]["message"]


def test_a_streamed_invalid_call_ends_with_an_error_event_and_no_finish() -> None:
    body = chat_body(tools=[STRICT_TOOL], stream=True)
    pieces = (
        Delta(tool_calls=(T(0, id="c1", name="weather", arguments='{"city":'),)),
        Delta(tool_calls=(T(0, arguments='"nope"}'),), finish_reason="tool_calls"),
        Usage(1, 1),
    )
    _, events = run(body, pieces)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "invalid_model_output"
    assert all(c["finish_reason"] is None for e in events[:-1] for c in e["choices"])


def test_a_streamed_valid_call_gets_its_finish_reason_after_the_check() -> None:
    body = chat_body(tools=[STRICT_TOOL], stream=True)
    pieces = (
        Delta(tool_calls=(T(0, id="c1", name="weather", arguments='{"city":'),)),
        Delta(tool_calls=(T(0, arguments='"Rome"}'),), finish_reason="stop"),
        Usage(1, 1),
    )
    _, events = run(body, pieces)
    assert events[-1] == "[DONE]"
    reasons = [c["finish_reason"] for e in events[:-1] for c in e["choices"]]
    assert reasons[-1] == "tool_calls"
    assert reasons.count("tool_calls") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_strict_json_schema_content(stream: bool) -> None:
    body = chat_body(response_format=FORMAT, stream=stream)
    good = (Delta('{"city":'), Delta('"Oslo"}', finish_reason="stop"), Usage(1, 2))
    status, out = run(body, good)
    assert status == 200
    if stream:
        assert out[-1] == "[DONE]"
        text = "".join(c["delta"].get("content") or "" for e in out[:-1] for c in e["choices"])
        assert orjson.loads(text) == {"city": "Oslo"}
    else:
        assert orjson.loads(out["choices"][0]["message"]["content"]) == {"city": "Oslo"}
    bad = (Delta('{"city":'), Delta('"oslo"}', finish_reason="stop"), Usage(1, 2))
    status, out = run(body, bad)
    error = out[-1]["error"] if stream else out["error"]
    assert error["code"] == "invalid_model_output"
    assert "the model's content" in error["message"]
    assert stream or status == 502


def test_content_cut_by_length_is_not_checked() -> None:
    body = chat_body(response_format=FORMAT)
    status, out = run(body, (Delta('{"city":', finish_reason="length"), Usage(1, 1)))
    assert status == 200
    assert out["choices"][0]["finish_reason"] == "length"


def test_content_past_the_bound_fails_while_streaming() -> None:
    body = chat_body(response_format=FORMAT, stream=True)
    _, events = run(body, (Delta("x" * 150), Delta("x" * 150), Usage(1, 2)))
    assert events[-1]["error"]["code"] == "invalid_model_output"
    assert "[DONE]" not in events


def test_without_a_checker_strict_content_must_still_parse() -> None:
    body = chat_body(response_format=FORMAT)
    status, _ = run(body, (Delta('{"any":1}', finish_reason="stop"), Usage(1, 1)), None)
    assert status == 200
    status, out = run(body, (Delta("{", finish_reason="stop"), Usage(1, 1)), None)
    assert (status, out["error"]["code"]) == (502, "invalid_model_output")


def test_tool_choice_none_leaves_strict_tools_unchecked() -> None:
    body = chat_body(tools=[STRICT_TOOL], tool_choice="none")
    status, out = run(body, (Delta("just text", finish_reason="stop"), Usage(1, 1)))
    assert status == 200
    assert out["choices"][0]["message"]["content"] == "just text"


def decode(body: dict[str, Any]) -> InvalidRequestError:
    raw = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **body})
    with pytest.raises(InvalidRequestError) as info:
        decode_chat(raw, LIMITS, schema_checker=CHECKER)
    return info.value


def strict_tool(parameters: dict[str, Any]) -> dict[str, Any]:
    function = {"name": "weather", "strict": True, "parameters": parameters}
    return {"tools": [{"type": "function", "function": function}]}


@pytest.mark.parametrize(
    ("parameters", "words"),
    [
        ({"type": "object", "properties": {"a": {"pattern": "(?=x)"}}}, "regex"),
        ({"type": "object", "properties": {"a": {"pattern": "a" * 1001}}}, "at most 1000"),
        ({"type": "object", "$ref": "http://127.0.0.1:9/s.json"}, "refers outside"),
        (
            {
                "type": "object",
                "$defs": {
                    **{f"d{i}": {"anyOf": [{"$ref": f"#/$defs/d{i + 1}"}] * 2} for i in range(14)},
                    "d14": {"type": "integer"},
                },
                "properties": {"a": {"$ref": "#/$defs/d0"}},
            },
            "expand to more than",
        ),
    ],
)
def test_strict_schemas_must_run_in_bounded_time(parameters: dict[str, Any], words: str) -> None:
    error = decode(strict_tool(parameters))
    assert error.param == "tools[0].function.parameters"
    assert words in error.message
    # The same schema on a tool that is not strict is never run: it is accepted.
    raw = orjson.dumps(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
        }
    )
    decode_chat(raw, RequestLimits(), schema_checker=CHECKER)


def test_the_metaschema_judges_every_schema() -> None:
    error = decode(
        {
            "response_format": {
                **FORMAT,
                "json_schema": {"name": "n", "schema": {"type": "object", "uniqueItems": "yes"}},
            }
        }
    )
    assert error.param == "response_format.json_schema.schema"
    assert "uniqueItems" in error.message


def test_recursive_schemas_validate() -> None:
    tree = {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            }
        },
        "$ref": "#/$defs/node",
    }
    assert CHECKER.check(tree, strict=True) is None
    assert CHECKER.validate({"kids": [{"kids": []}]}, tree) is None
    verdict = CHECKER.validate({"kids": [{"kids": 3}]}, tree)
    assert verdict is not None and "['kids'][0]['kids']" in verdict
    assert CHECKER.validate("a" * 100_000 + "!", {"pattern": "^(a+)+$"}) is not None
    assert CHECKER.validate(1, {"$ref": "#/$defs/missing"}) is not None
