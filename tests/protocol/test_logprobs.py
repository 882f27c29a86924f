"""Logprobs through the gateway: a backend's pieces carry them, the whole answer
concatenates them per choice, a stream sends each piece's own; the tool-call
normalizer and strict mode keep them."""

from __future__ import annotations

from typing import Any

import orjson

from ostiary.protocol.actions import Respond, SendBytes
from ostiary.protocol.capabilities import Capabilities
from ostiary.protocol.events import BackendChunk, BackendFinished
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, ToolCallDelta, Usage
from tests.conftest import chat_body, key_table
from tests.protocol.test_gateway import only, request, sse_events

CAPS = Capabilities(logprobs=True, tools=True, max_n=2)


def token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}


A, B, C = token("a", -0.5), token("b", -1.0), token("", -2.0)
PIECES: tuple[Delta | Usage, ...] = (
    Delta("a", 0, logprobs={"content": [A], "refusal": None}),
    Delta("x", 1),
    Delta("b", 0, logprobs={"content": [B], "refusal": None}),
    # A token with no text: only its logprob.
    Delta("", 0, logprobs={"content": [C], "refusal": None}),
    Delta(finish_reason="stop"),
    Delta(choice=1, finish_reason="stop"),
    Usage(3, 4),
)


def gateway() -> Gateway:
    return Gateway(routes=[ModelRoute("m", "b1", capabilities=CAPS)], keys=key_table())


def run(gw: Gateway, body: bytes, pieces: tuple[Delta | Usage, ...], target: str) -> list[Any]:
    actions = gw.handle(request(gw, body=body, target=target))
    actions += gw.handle(BackendChunk("r1", pieces, 10.2))
    actions += gw.handle(BackendFinished("r1", 10.5))
    return actions


def test_chat_logprobs_whole_and_streamed() -> None:
    body = chat_body(logprobs=True, n=2)
    actions = run(gateway(), body, PIECES, "/v1/chat/completions")
    choices = orjson.loads(only(actions, Respond).body)["choices"]
    assert choices[0]["message"]["content"] == "ab"
    assert choices[0]["logprobs"] == {"content": [A, B, C], "refusal": None}
    assert choices[1]["logprobs"] is None
    body = chat_body(logprobs=True, n=2, stream=True)
    actions = run(gateway(), body, PIECES, "/v1/chat/completions")
    events = sse_events(b"".join(a.data for a in actions if isinstance(a, SendBytes)))[:-1]
    got = [(e["choices"][0]["index"], e["choices"][0]["logprobs"]) for e in events]
    assert got == [
        (0, {"content": [A], "refusal": None}),
        (1, None),
        (0, {"content": [B], "refusal": None}),
        (0, {"content": [C], "refusal": None}),
        (0, None),
        (1, None),
    ]


def test_completion_logprobs_concatenate() -> None:
    def legacy(text: str, offset: int) -> dict[str, Any]:
        return {
            "tokens": [text],
            "token_logprobs": [-0.5],
            "top_logprobs": [{text: -0.5}],
            "text_offset": [offset],
        }

    pieces: tuple[Delta | Usage, ...] = (
        Delta(" a", logprobs=legacy(" a", 0)),
        Delta(" b", logprobs=legacy(" b", 2), finish_reason="length"),
        Usage(1, 2),
    )
    body = orjson.dumps({"model": "m", "prompt": "p", "logprobs": 1})
    actions = run(gateway(), body, pieces, "/v1/completions")
    (choice,) = orjson.loads(only(actions, Respond).body)["choices"]
    assert choice["logprobs"] == {
        "tokens": [" a", " b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{" a": -0.5}, {" b": -0.5}],
        "text_offset": [0, 2],
    }
    body = orjson.dumps({"model": "m", "prompt": "p", "logprobs": 1, "stream": True})
    actions = run(gateway(), body, pieces, "/v1/completions")
    events = sse_events(b"".join(a.data for a in actions if isinstance(a, SendBytes)))[:-1]
    assert [e["choices"][0]["logprobs"] for e in events] == [legacy(" a", 0), legacy(" b", 2)]


def test_tool_calls_and_strict_mode_keep_logprobs() -> None:
    tools = [{"type": "function", "function": {"name": "f", "strict": True}}]
    lp = {"content": [A], "refusal": None}
    pieces: tuple[Delta | Usage, ...] = (
        Delta("a", logprobs=lp),
        Delta(tool_calls=(ToolCallDelta(0, "c1", "f", "{}"),), logprobs=lp),
        Delta(finish_reason="stop", logprobs=lp),
        Usage(1, 1),
    )
    body = chat_body(logprobs=True, tools=tools)
    actions = run(gateway(), body, pieces, "/v1/chat/completions")
    (choice,) = orjson.loads(only(actions, Respond).body)["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["logprobs"] == {"content": [A, A, A], "refusal": None}
