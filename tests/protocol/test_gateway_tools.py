"""Tool calls through the gateway: quirky backend pieces, regular OpenAI shapes out,
streamed and not."""

from __future__ import annotations

from typing import Any

import orjson

from ostiary.protocol.actions import (
    CancelBackend,
    Dispatch,
    EndStream,
    Respond,
    SendBytes,
    StartStream,
)
from ostiary.protocol.capabilities import Capabilities
from ostiary.protocol.events import BackendChunk, BackendFinished
from ostiary.protocol.gateway import ExchangeState, Gateway, ModelRoute
from ostiary.protocol.generation import Delta, ToolCallDelta, Usage
from ostiary.protocol.request_limits import RequestLimits
from tests.conftest import chat_body, key_table
from tests.protocol.test_gateway import only, request, sse_events

T = ToolCallDelta
TOOLS = [
    {"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "put"}},
]
#: Two parallel calls in the worst shape: names repeated, no ids, arguments sent
#: whole again at the end, empty fragments, stop for a finish reason.
QUIRKY: tuple[Delta | Usage, ...] = (
    Delta(tool_calls=(T(0, name="get", arguments=""), T(1, name="put", arguments='{"b"'))),
    Delta(tool_calls=(T(0, name="get", arguments='{"a":'), T(1, name="put", arguments=""))),
    Delta(tool_calls=(T(1, name="put", arguments=":2}"),)),
    Delta(tool_calls=(T(0, name="get", arguments="1}"),)),
    Delta(tool_calls=(T(0, name="get", arguments='{"a":1}'),), finish_reason="stop"),
    Usage(5, 7),
)
CALLS = [
    {"id": "call_r1_0_0", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}},
    {"id": "call_r1_0_1", "type": "function", "function": {"name": "put", "arguments": '{"b":2}'}},
]


def gateway() -> Gateway:
    return Gateway(
        routes=[ModelRoute("m", "b1", capabilities=Capabilities(tools=True))], keys=key_table()
    )


def test_non_streamed_tool_calls_are_regular() -> None:
    gw = gateway()
    assert isinstance(gw.handle(request(gw, body=chat_body(tools=TOOLS)))[0], Dispatch)
    gw.handle(BackendChunk("r1", QUIRKY, 10.2))
    respond = only(gw.handle(BackendFinished("r1", 10.5)), Respond)
    assert respond.status == 200
    (choice,) = orjson.loads(respond.body)["choices"]
    assert choice["message"]["tool_calls"] == CALLS
    assert choice["message"]["content"] is None
    assert choice["finish_reason"] == "tool_calls"


def test_streamed_tool_calls_are_regular_and_agree_with_the_non_streamed() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(tools=TOOLS, stream=True)))
    data = b""
    for piece in QUIRKY:
        for action in gw.handle(BackendChunk("r1", (piece,), 10.2)):
            if isinstance(action, SendBytes):
                data += action.data
    actions = gw.handle(BackendFinished("r1", 10.5))
    data += only(actions, SendBytes).data
    assert isinstance(actions[-1], EndStream)
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    calls: list[dict[str, Any]] = []
    finish = []
    for event in events[:-1]:
        (choice,) = event["choices"]
        finish.append(choice["finish_reason"])
        for tc in choice["delta"].get("tool_calls", ()):
            if tc["index"] == len(calls):  # a start: all of it, once
                assert set(tc) == {"index", "id", "type", "function"}
                assert tc["type"] == "function" and "name" in tc["function"]
                calls.append({"id": tc["id"], "type": "function", "function": tc["function"]})
            else:
                assert tc == {
                    "index": tc["index"],
                    "function": {"arguments": tc["function"]["arguments"]},
                }
                assert tc["function"]["arguments"]
                calls[tc["index"]]["function"]["arguments"] += tc["function"]["arguments"]
    assert calls == CALLS
    assert [f for f in finish if f is not None] == ["tool_calls"]


def test_a_backend_error_in_the_tool_calls_ends_the_stream_cleanly() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(tools=TOOLS, stream=True)))
    gw.handle(BackendChunk("r1", (Delta(tool_calls=(T(0, name="get", arguments="{}"),)),), 10.2))
    assert gw.state_of("r1") is ExchangeState.STREAMING
    actions = gw.handle(BackendChunk("r1", (Delta(tool_calls=(T(0, arguments="]]"),)),), 10.3))
    (error,) = sse_events(only(actions, SendBytes).data)
    assert error["error"]["type"] == "server_error"
    assert isinstance(actions[-1], EndStream)


def test_a_call_never_named_is_a_502_before_the_stream_starts() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(tools=TOOLS, stream=True)))
    held = gw.handle(BackendChunk("r1", (Delta(tool_calls=(T(0, arguments="{}"),)),), 10.2))
    assert not any(isinstance(a, StartStream | SendBytes) for a in held)
    actions = gw.handle(BackendFinished("r1", 10.5))
    assert not any(isinstance(a, StartStream) for a in actions)
    assert only(actions, Respond).status == 502


def test_the_output_bounds_are_limits() -> None:
    gw = Gateway(
        routes=[ModelRoute("m", "b1", capabilities=Capabilities(tools=True))],
        keys=key_table(),
        limits=RequestLimits(max_output_tool_calls=1),
    )
    gw.handle(request(gw, body=chat_body(tools=TOOLS)))
    actions = gw.handle(BackendChunk("r1", QUIRKY, 10.2))
    assert any(isinstance(a, CancelBackend) for a in actions)
    respond = only(actions, Respond)
    assert respond.status == 502
    assert b"more than 1 tool calls" in respond.body


def test_tool_calls_without_declared_tools_are_made_regular_too() -> None:
    """An upstream may make calls the request declared no tools for (it has its own):
    they go through the same normalizer, streamed and not."""
    text = Delta(text="let me see")
    for stream in (False, True):
        gw = Gateway(routes=[ModelRoute("m", "b1")], keys=key_table())
        gw.handle(request(gw, body=chat_body(stream=stream)))
        actions = gw.handle(BackendChunk("r1", (text, *QUIRKY), 10.2))
        actions += gw.handle(BackendFinished("r1", 10.5))
        if not stream:
            (choice,) = orjson.loads(only(actions, Respond).body)["choices"]
            assert choice["message"]["tool_calls"] == CALLS
            assert choice["finish_reason"] == "tool_calls"
            continue
        data = b"".join(a.data for a in actions if isinstance(a, SendBytes))
        events = sse_events(data)[:-1]
        starts = [
            tc
            for event in events
            for tc in event["choices"][0]["delta"].get("tool_calls", ())
            if "id" in tc
        ]
        assert [(tc["id"], tc["type"]) for tc in starts] == [
            ("call_r1_0_0", "function"),
            ("call_r1_0_1", "function"),
        ]
        assert events[0]["choices"][0]["delta"]["content"] == "let me see"
        assert [e["choices"][0]["finish_reason"] for e in events][-1] == "tool_calls"
