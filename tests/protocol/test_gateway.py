"""The gateway state machine: events in, actions out, every exchange ends once."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ostiary.protocol.actions import (
    Action,
    CancelBackend,
    CheckReadiness,
    Count,
    Dispatch,
    EndStream,
    Log,
    Respond,
    SendBytes,
    StartStream,
)
from ostiary.protocol.admission import route
from ostiary.protocol.capabilities import Capabilities, ModelKind
from ostiary.protocol.cors import CorsPolicy
from ostiary.protocol.errors import BackendUnavailableError, RateLimitError
from ostiary.protocol.events import (
    BackendChunk,
    BackendFailed,
    BackendFinished,
    ClientGone,
    EmbeddingsComputed,
    KeysReplaced,
    ReadinessChecked,
    RequestReceived,
    ResponseSent,
)
from ostiary.protocol.gateway import (
    ExchangeState,
    Gateway,
    GatewayUsageError,
    ModelRoute,
)
from ostiary.protocol.generation import Delta, EmbeddingResult, ToolCallDelta, Usage
from ostiary.protocol.request_limits import RequestLimits
from tests.conftest import ADMIN_SECRET, USER_SECRET, auth_headers, chat_body, key_table

CHAT = Capabilities(max_n=4)
EMBED = Capabilities(kind=ModelKind.EMBEDDING)


def gateway(**kwargs: Any) -> Gateway:
    return Gateway(
        routes=[
            ModelRoute("m", "b1", capabilities=CHAT),
            ModelRoute("e", "b2", owned_by="me", capabilities=EMBED),
        ],
        keys=key_table(),
        created=1700000000,
        **kwargs,
    )


def request(
    gw: Gateway,
    rid: str = "r1",
    body: bytes = b"",
    *,
    method: str = "POST",
    target: str = "/v1/chat/completions",
    headers: tuple[tuple[bytes, bytes], ...] | None = None,
    now: float = 10.0,
) -> RequestReceived:
    """A whole request as the runtime would feed it: its head judged by ``admits``."""
    hdrs = auth_headers() if headers is None else headers
    return RequestReceived(
        rid,
        gw.admits(method, target, hdrs, "127.0.0.1"),
        method,
        target,
        hdrs,
        body,
        now,
        1700000001.5,
    )


def only(actions: list[Action], kind: type) -> Any:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def json_of(actions: list[Action]) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
    respond = only(actions, Respond)
    return respond.status, orjson.loads(respond.body), dict(respond.headers)


def chunk(rid: str, pieces: tuple[Delta | Usage, ...], now: float = 10.2) -> BackendChunk:
    return BackendChunk(rid, pieces, now)


def sent(gw: Gateway, rid: str = "r1", now: float = 11.0) -> Log:
    """The runtime wrote the response: the exchange's one access-log record."""
    actions = gw.handle(ResponseSent(rid, now))
    assert gw.state_of(rid) is None
    log: Log = only(actions, Log)
    return log


def test_non_stream_chat_lifecycle() -> None:
    gw = gateway()
    actions = gw.handle(request(gw, body=chat_body()))
    dispatch = only(actions, Dispatch)
    assert dispatch.backend == "b1"
    assert dispatch.call.model == "m"
    assert gw.state_of("r1") is ExchangeState.RUNNING
    actions = gw.handle(chunk("r1", (Delta("Hel"), Delta("lo", finish_reason="stop"))))
    assert [type(a) for a in actions] == [Count]  # time to first token
    assert gw.handle(chunk("r1", (Usage(3, 2),))) == []
    actions = gw.handle(BackendFinished("r1", 10.5))
    status, body, headers = json_of(actions)
    assert status == 200
    assert headers[b"x-request-id"] == b"r1"
    assert body["id"] == "chatcmpl-r1"
    assert body["object"] == "chat.completion"
    assert body["created"] == 1700000001
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert not any(isinstance(a, Log) for a in actions)  # logged once the bytes are out
    assert gw.state_of("r1") is ExchangeState.SENDING
    log = sent(gw, now=10.5)
    assert log.fields["status"] == 200
    assert log.fields["duration_ms"] == 500.0
    assert log.fields["key_id"] == "a" * 12
    assert ADMIN_SECRET not in repr(log)
    assert gw.in_flight == 0
    with pytest.raises(GatewayUsageError):
        gw.handle(BackendFinished("r1", 11.0))


def test_non_stream_tool_calls_and_choices() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(n=2)))
    gw.handle(
        chunk(
            "r1",
            (
                Delta(tool_calls=(ToolCallDelta(0, id="c1", name="get"),)),
                Delta(tool_calls=(ToolCallDelta(0, arguments='{"a":'),)),
                Delta(tool_calls=(ToolCallDelta(0, id="c1b", name="x", arguments="1}"),)),
                Delta(finish_reason="tool_calls"),
                Delta("second", choice=1, finish_reason="length"),
                Usage(1, 4),
            ),
        )
    )
    _, body, _ = json_of(gw.handle(BackendFinished("r1", 11.0)))
    first, second = body["choices"]
    assert first["message"]["content"] is None
    # No tools declared, but the calls are made regular all the same: the first
    # id and name stand, a name is never concatenated.
    assert first["message"]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}
    ]
    assert first["finish_reason"] == "tool_calls"
    assert second["message"]["content"] == "second"
    assert second["finish_reason"] == "length"


def sse_events(data: bytes) -> list[Any]:
    assert data.endswith(b"\n\n")
    out = []
    for block in data.split(b"\n\n")[:-1]:
        assert block.startswith(b"data: ")
        payload = block[len(b"data: ") :]
        out.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
    return out


def test_stream_chat_lifecycle_with_usage() -> None:
    gw = gateway()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    assert isinstance(gw.handle(request(gw, body=body))[0], Dispatch)
    actions = gw.handle(chunk("r1", (Delta("Hel"), Delta("lo"))))
    start = only(actions, StartStream)
    assert start.status == 200
    assert dict(start.headers)[b"content-type"].startswith(b"text/event-stream")
    assert gw.state_of("r1") is ExchangeState.STREAMING
    events = sse_events(only(actions, SendBytes).data)
    assert [e["choices"][0]["delta"] for e in events] == [
        {"role": "assistant", "content": "Hel"},
        {"content": "lo"},
    ]
    assert all(e["usage"] is None and e["id"] == "chatcmpl-r1" for e in events)
    actions = gw.handle(chunk("r1", (Delta("", finish_reason="stop"), Usage(2, 2))))
    assert only(actions, SendBytes)
    assert not any(isinstance(a, StartStream) for a in actions)
    actions = gw.handle(BackendFinished("r1", 12.0))
    events = sse_events(only(actions, SendBytes).data)
    assert events[0]["choices"] == []
    assert events[0]["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert events[1] == "[DONE]"
    assert isinstance(actions[-1], EndStream)
    assert sent(gw, now=12.0).fields["stream"] is True


def test_stream_tool_call_deltas() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(stream=True)))
    actions = gw.handle(
        chunk(
            "r1",
            (
                Delta(tool_calls=(ToolCallDelta(0, id="c", name="f"),)),
                Delta(tool_calls=(ToolCallDelta(0, arguments="{}"),)),
            ),
        )
    )
    first, second = sse_events(only(actions, SendBytes).data)
    assert first["choices"][0]["delta"]["tool_calls"] == [
        {"index": 0, "id": "c", "type": "function", "function": {"arguments": "", "name": "f"}}
    ]
    assert second["choices"][0]["delta"] == {
        "tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]
    }


def test_stream_that_ends_without_output_still_starts_and_finishes() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(stream=True)))
    assert [type(a) for a in gw.handle(chunk("r1", (Usage(1, 0),)))] == [Count]
    actions = gw.handle(BackendFinished("r1", 11.0))
    assert isinstance(actions[0], StartStream)
    assert sse_events(only(actions, SendBytes).data) == ["[DONE]"]


def test_error_before_stream_starts_is_a_plain_response() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(stream=True)))
    error = RateLimitError("slow down", retry_after=1.5)
    status, body, headers = json_of(gw.handle(BackendFailed("r1", error, 11.0)))
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert headers[b"retry-after"] == b"2"
    assert headers[b"retry-after-ms"] == b"1500"
    assert sent(gw).fields["status"] == 429
    assert gw.in_flight == 0


def test_error_after_stream_started_is_an_sse_event() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(stream=True)))
    gw.handle(chunk("r1", (Delta("x"),)))
    actions = gw.handle(BackendFailed("r1", BackendUnavailableError("gone"), 11.0))
    events = sse_events(only(actions, SendBytes).data)
    assert events == [
        {"error": {"message": "gone", "type": "server_error", "param": None, "code": None}}
    ]
    assert isinstance(actions[-1], EndStream)
    assert sent(gw).fields["status"] == 503


def test_client_gone_cancels_backend() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body(stream=True)))
    actions = gw.handle(ClientGone("r1", 11.0))
    assert isinstance(actions[0], CancelBackend)
    assert only(actions, Log).fields["status"] == 499
    assert gw.in_flight == 0
    with pytest.raises(GatewayUsageError):
        gw.handle(chunk("r1", (Delta("late"),)))


def test_last_write_failing_is_logged_as_499_by_the_core() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body()))
    gw.handle(BackendFinished("r1", 10.4))
    actions = gw.handle(ClientGone("r1", 10.6))
    assert not any(isinstance(a, CancelBackend) for a in actions)  # nothing runs any more
    assert only(actions, Log).fields["status"] == 499
    assert gw.in_flight == 0


def test_completions_stream_and_non_stream() -> None:
    gw = gateway()
    body = orjson.dumps({"model": "m", "prompt": "hi", "stream": True})
    gw.handle(request(gw, body=body, target="/v1/completions"))
    actions = gw.handle(chunk("r1", (Delta("a", finish_reason="stop"),)))
    (event,) = sse_events(only(actions, SendBytes).data)
    assert event["object"] == "text_completion"
    assert event["id"] == "cmpl-r1"
    assert event["choices"] == [
        {"index": 0, "text": "a", "logprobs": None, "finish_reason": "stop"}
    ]
    gw.handle(
        request(gw, "r2", orjson.dumps({"model": "m", "prompt": "x"}), target="/v1/completions")
    )
    gw.handle(chunk("r2", (Delta("b"), Usage(1, 1))))
    _, result, _ = json_of(gw.handle(BackendFinished("r2", 11.0)))
    assert result["choices"][0]["text"] == "b"
    assert result["choices"][0]["finish_reason"] == "stop"
    assert "system_fingerprint" not in result


def test_embeddings_float_and_base64() -> None:
    gw = gateway()
    result = EmbeddingResult(vectors=((1.0, 0.5),), usage=Usage(3))
    gw.handle(request(gw, body=orjson.dumps({"model": "e", "input": "x"}), target="/v1/embeddings"))
    _, body, _ = json_of(gw.handle(EmbeddingsComputed("r1", result, 11.0)))
    assert body["data"] == [{"object": "embedding", "index": 0, "embedding": [1.0, 0.5]}]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    gw.handle(
        request(
            gw,
            "r2",
            orjson.dumps({"model": "e", "input": "x", "encoding_format": "base64"}),
            target="/v1/embeddings",
        )
    )
    _, body, _ = json_of(gw.handle(EmbeddingsComputed("r2", result, 11.0)))
    assert body["data"][0]["embedding"] == "AACAPwAAAD8="


def test_mismatched_backend_reports_are_server_errors_not_crashes() -> None:
    gw = gateway()
    gw.handle(request(gw, body=orjson.dumps({"model": "e", "input": "x"}), target="/v1/embeddings"))
    assert json_of(gw.handle(BackendFinished("r1", 11.0)))[0] == 503
    gw.handle(request(gw, "r2", chat_body()))
    result = EmbeddingResult(vectors=(), usage=Usage(0))
    assert json_of(gw.handle(EmbeddingsComputed("r2", result, 11.0)))[0] == 503
    assert gw.scheduler("b1").running == gw.scheduler("b2").running == 0


def test_models() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(request(gw, method="GET", target="/v1/models")))
    assert status == 200
    assert body == {
        "object": "list",
        "data": [
            {"id": "m", "object": "model", "created": 1700000000, "owned_by": "ostiary"},
            {"id": "e", "object": "model", "created": 1700000000, "owned_by": "me"},
        ],
    }
    _, body, _ = json_of(gw.handle(request(gw, "r2", method="GET", target="/v1/models/e")))
    assert body["owned_by"] == "me"
    status, body, _ = json_of(gw.handle(request(gw, "r3", method="GET", target="/v1/models/nope")))
    assert status == 404
    assert body["error"]["code"] == "model_not_found"


def test_model_ids_with_slashes_and_escapes() -> None:
    gw = Gateway(routes=[ModelRoute("org/model v1", "b")], keys=key_table())
    status, body, _ = json_of(
        gw.handle(request(gw, method="GET", target="/v1/models/org%2Fmodel%20v1"))
    )
    assert (status, body["id"]) == (200, "org/model v1")
    status, body, _ = json_of(
        gw.handle(request(gw, "r2", method="GET", target="/v1/models/org/model v1"))
    )
    assert status == 200
    status, _, _ = json_of(gw.handle(request(gw, "r3", method="GET", target="/v1/models/%zz%2")))
    assert status == 404


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ((), "missing_api_key"),
        (((b"authorization", b"Basic abc"),), "invalid_api_key"),
        (((b"authorization", b"Bearer "),), "invalid_api_key"),
        (((b"authorization", b"Bearer sk-123"),), "invalid_api_key"),
        (((b"authorization", b"Bearer " + ADMIN_SECRET.encode()[:-1] + b"x"),), "invalid_api_key"),
        (((b"authorization", b"Bearer ost_cccccccccccc_" + b"C" * 43),), "invalid_api_key"),
    ],
)
def test_authentication_failures(headers: tuple[tuple[bytes, bytes], ...], code: str) -> None:
    gw = gateway()
    status, body, hdrs = json_of(gw.handle(request(gw, body=chat_body(), headers=headers)))
    assert status == 401
    assert body["error"]["code"] == code
    assert hdrs[b"www-authenticate"].startswith(b"Bearer")
    assert ADMIN_SECRET[20:] not in body["error"]["message"]


def test_key_table_is_replaced_by_an_event() -> None:
    gw = gateway()
    admitted = request(gw, body=chat_body())  # judged by the old table...
    users = key_table().__class__.of([k for k in key_table().keys.values() if k.role == "user"])
    assert only(gw.handle(KeysReplaced(users, 10.0)), Log).fields == {"active_keys": 1}
    assert gw.keys is users
    assert json_of(gw.handle(admitted))[0] == 401  # ...is judged again by the new one
    assert json_of(gw.handle(request(gw, "r2", body=chat_body())))[0] == 401
    assert isinstance(
        gw.handle(request(gw, "r3", chat_body(), headers=auth_headers(USER_SECRET)))[0], Dispatch
    )


def test_routing_errors() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(request(gw, target="/v1/nothing")))
    assert status == 404
    assert body["error"]["message"] == "Invalid URL (POST /v1/nothing)"
    status, _, headers = json_of(
        gw.handle(request(gw, "r2", method="GET", target="/v1/chat/completions"))
    )
    assert status == 405
    assert headers[b"allow"] == b"POST"
    status, _, headers = json_of(gw.handle(request(gw, "r3", method="POST", target="/healthz")))
    assert (status, headers[b"allow"]) == (405, b"GET, HEAD")
    assert route("HEAD", "/v1/models?x=1")[0].value == "models"


def test_unknown_model_and_bad_body() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(request(gw, body=chat_body(model="gpt-9"))))
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        404,
        "model_not_found",
        "model",
    )
    status, body, _ = json_of(gw.handle(request(gw, "r2", b"{not json")))
    assert (status, body["error"]["code"]) == (400, "invalid_json")


def test_body_limit_travels_in_the_admission() -> None:
    gw = gateway(limits=RequestLimits(max_body_bytes=10))
    assert gw.admits("POST", "/v1/chat/completions", auth_headers()).max_body_bytes == 10
    assert gw.admits("GET", "/v1/models", auth_headers()).max_body_bytes == 0
    assert not gw.admits("GET", "/healthz", ()).read_body


def test_a_body_that_is_not_json_gets_415() -> None:
    gw = gateway()
    form = (*auth_headers(), (b"content-type", b"application/x-www-form-urlencoded"))
    status, body, _ = json_of(gw.handle(request(gw, body=chat_body(), headers=form)))
    assert status == 415
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "unsupported_media_type"
    assert "-H 'content-type: application/json'" in body["error"]["message"]
    json_utf8 = (*auth_headers(), (b"content-type", b"Application/JSON; charset=UTF-8"))
    assert only(gw.handle(request(gw, "r2", chat_body(), headers=json_utf8)), Dispatch)


def test_health_and_readiness() -> None:
    gw = gateway()
    status, body, _ = json_of(gw.handle(request(gw, method="GET", target="/healthz", headers=())))
    assert (status, body) == (200, {"status": "ok"})
    actions = gw.handle(request(gw, "r2", method="GET", target="/readyz", headers=()))
    assert actions == [CheckReadiness("r2")]
    with pytest.raises(GatewayUsageError, match="CHECKING"):
        gw.handle(chunk("r2", (Delta("x"),)))
    status, body, _ = json_of(gw.handle(ReadinessChecked("r2", (), 11.0)))
    assert (status, body) == (200, {"status": "ready"})
    gw.handle(request(gw, "r3", method="GET", target="/readyz", headers=()))
    actions = gw.handle(ReadinessChecked("r3", (("b1", "connection refused"),), 11.0))
    status, body, _ = json_of(actions)
    assert status == 503
    assert body["backends"] == {"b1": "unavailable"}
    assert "connection refused" not in str(body)


def test_duplicate_request_id_is_a_runtime_bug() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body()))
    with pytest.raises(GatewayUsageError, match="already in flight"):
        gw.handle(request(gw, body=chat_body()))


def test_admits_judges_the_head_alone() -> None:
    gw = gateway()
    assert gw.admits("POST", "/v1/chat/completions", auth_headers()).read_body
    assert gw.admits("GET", "/healthz", ()).error is None
    assert not gw.admits("POST", "/v1/chat/completions", ()).read_body
    assert not gw.admits("POST", "/v1/nothing", auth_headers()).read_body
    assert not gw.admits("GET", "/v1/chat/completions", auth_headers()).read_body
    two = auth_headers() + auth_headers(USER_SECRET)
    assert gw.admits("POST", "/v1/chat/completions", two).error is not None


def test_two_authorization_headers_are_refused() -> None:
    gw = gateway()
    headers = (*auth_headers(), (b"authorization", b"Bearer junk"))
    status, body, _ = json_of(gw.handle(request(gw, body=chat_body(), headers=headers)))
    assert status == 401
    assert "exactly one" in body["error"]["message"]


def test_every_429_and_503_says_when_to_retry() -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body()))
    _, _, headers = json_of(gw.handle(BackendFailed("r1", BackendUnavailableError("down"), 11.0)))
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"1000")
    gw.handle(request(gw, "r2", chat_body()))
    _, _, headers = json_of(gw.handle(BackendFailed("r2", RateLimitError("slow"), 11.0)))
    assert headers[b"retry-after-ms"] == b"1000"


@pytest.mark.parametrize(
    ("hint", "seconds", "ms"),
    [
        (1e306, b"3600", b"3600000"),
        (float("inf"), b"1", b"1000"),
        (float("nan"), b"1", b"1000"),
        (-5.0, b"1", b"1"),
        (0.25, b"1", b"250"),
        (2.0001, b"3", b"2001"),
    ],
)
def test_retry_after_is_clamped_and_agrees(hint: float, seconds: bytes, ms: bytes) -> None:
    gw = gateway()
    gw.handle(request(gw, body=chat_body()))
    error = BackendUnavailableError("busy", code="upstream_busy", retry_after=hint)
    _, _, headers = json_of(gw.handle(BackendFailed("r1", error, 11.0)))
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (seconds, ms)


@pytest.mark.parametrize(
    ("target", "fields", "param", "code"),
    [
        ("/v1/chat/completions", {"n": 5}, "n", "unsupported_parameter"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs", "unsupported_parameter"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "unsupported_parameter"),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "unsupported_parameter",
        ),
        (
            "/v1/chat/completions",
            {"response_format": {"type": "json_object"}},
            "response_format",
            "unsupported_parameter",
        ),
        ("/v1/chat/completions", {"model": "e"}, "model", "unsupported_model"),
        ("/v1/completions", {"echo": True}, "echo", "unsupported_parameter"),
        ("/v1/completions", {"suffix": "x"}, "suffix", "unsupported_parameter"),
        ("/v1/completions", {"prompt": [1, 2]}, "prompt", "unsupported_parameter"),
        ("/v1/embeddings", {"model": "m"}, "model", "unsupported_model"),
        ("/v1/embeddings", {"dimensions": 3}, "dimensions", "unsupported_parameter"),
    ],
)
def test_what_a_model_cannot_honour_never_reaches_it(
    target: str, fields: dict[str, Any], param: str, code: str
) -> None:
    gw = gateway()
    if target == "/v1/chat/completions":
        body = chat_body(**fields)
    elif target == "/v1/completions":
        body = orjson.dumps({"model": "m", "prompt": "hi", **fields})
    else:
        body = orjson.dumps({"model": "e", "input": "hi", **fields})
    actions = gw.handle(request(gw, body=body, target=target))
    status, error, _ = json_of(actions)
    assert (status, error["error"]["param"], error["error"]["code"]) == (400, param, code)
    assert not any(isinstance(a, Dispatch) for a in actions)


def test_tools_disabled_by_tool_choice_none_are_left_out_for_a_model_without_tools() -> None:
    gw = gateway()
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = chat_body(tools=tools, tool_choice="none")
    call = only(gw.handle(request(gw, body=body)), Dispatch).call
    assert call.tools is None and call.tool_choice is None
    assert "tools" not in call.raw and "tool_choice" not in call.raw


def test_an_upstream_model_takes_everything_openai_accepts() -> None:
    gw = Gateway(
        routes=[ModelRoute("u", "up", capabilities=Capabilities.upstream(ModelKind.CHAT))],
        keys=key_table(),
    )
    tools = [{"type": "function", "function": {"name": "f"}}]
    body = chat_body(
        model="u", n=4, logprobs=True, tools=tools, response_format={"type": "json_object"}
    )
    call = only(gw.handle(request(gw, body=body)), Dispatch).call
    assert call.tools is not None and call.n == 4


class Letters:
    """A token codec for tests: id n is the n-th lower-case letter."""

    def decode(self, ids: Any) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)

    def count(self, text: str, limit: int) -> int:
        return min(len(text), limit)


def test_token_id_embedding_input_becomes_text_for_a_text_model() -> None:
    gw = gateway(tokens=Letters())
    body = orjson.dumps({"model": "e", "input": [[7, 8], [0]]})
    call = only(gw.handle(request(gw, body=body, target="/v1/embeddings")), Dispatch).call
    assert call.inputs() == ("hi", "a")
    assert call.raw["input"] == ["hi", "a"]
    # Without a codec, the model cannot take them: refused by name, never passed on.
    gw = gateway()
    status, error, _ = json_of(gw.handle(request(gw, body=body, target="/v1/embeddings")))
    assert (status, error["error"]["param"]) == (400, "input")


def test_a_body_that_is_not_json_is_refused_from_the_head() -> None:
    gw = gateway()
    headers = (*auth_headers(), (b"content-type", b"application/x-www-form-urlencoded"))
    admission = gw.admits("POST", "/v1/chat/completions", headers)
    assert not admission.read_body  # the runtime never reads it
    assert admission.principal is not None
    status, body, _ = json_of(gw.handle(request(gw, body=b"", headers=headers)))
    assert (status, body["error"]["code"]) == (415, "unsupported_media_type")


def test_no_cors_headers_unless_configured() -> None:
    gw = gateway()
    headers = (*auth_headers(), (b"origin", b"https://app.example"))
    _, _, out = json_of(gw.handle(request(gw, body=chat_body(model="nope"), headers=headers)))
    assert not any(k.startswith(b"access-control") for k in out)
    respond = json_of(
        gw.handle(request(gw, "r2", method="GET", target="/v1/models", headers=headers))
    )
    assert not any(k.startswith(b"access-control") for k in respond[2])


def test_cors_for_listed_origins_and_preflights() -> None:
    gw = gateway(cors=CorsPolicy(frozenset({"https://app.example"})))
    good = (*auth_headers(), (b"origin", b"https://app.example"))
    _, _, headers = json_of(gw.handle(request(gw, method="GET", target="/v1/models", headers=good)))
    assert headers[b"access-control-allow-origin"] == b"https://app.example"
    assert headers[b"vary"] == b"origin"
    exposed = headers[b"access-control-expose-headers"].split(b", ")
    # Every header a page may act on: the id, when to retry, whether to, the budgets.
    assert {b"x-request-id", b"retry-after", b"retry-after-ms", b"x-should-retry"} <= set(exposed)
    assert {b"x-ratelimit-remaining-requests", b"x-ratelimit-reset-tokens"} <= set(exposed)
    # Errors carry them too, or the browser hides the error from the page.
    status, _, headers = json_of(
        gw.handle(request(gw, "r2", body=chat_body(model="nope"), headers=good))
    )
    assert (status, headers[b"access-control-allow-origin"]) == (404, b"https://app.example")
    evil = (*auth_headers(), (b"origin", b"https://evil.example"))
    _, _, headers = json_of(
        gw.handle(request(gw, "r3", method="GET", target="/v1/models", headers=evil))
    )
    assert b"access-control-allow-origin" not in headers
    # A preflight comes without a key and gets 204.
    asked = (
        (b"origin", b"https://app.example"),
        (b"access-control-request-method", b"POST"),
        (b"access-control-request-headers", b"authorization, content-type, x-stainless-os"),
    )
    respond = only(
        gw.handle(
            request(gw, "p1", method="OPTIONS", target="/v1/chat/completions", headers=asked)
        ),
        Respond,
    )
    headers = dict(respond.headers)
    assert respond.status == 204 and respond.body == b""
    assert headers[b"access-control-allow-methods"] == b"POST, OPTIONS"
    assert (
        headers[b"access-control-allow-headers"] == b"authorization, content-type, x-stainless-os"
    )
    assert b"access-control-allow-credentials" not in headers


def test_a_wildcard_origin_never_comes_with_credentials() -> None:
    gw = gateway(cors=CorsPolicy(frozenset({"*"})))
    headers = (*auth_headers(), (b"origin", b"https://anything.example"))
    _, _, out = json_of(gw.handle(request(gw, method="GET", target="/v1/models", headers=headers)))
    assert out[b"access-control-allow-origin"] == b"*"
    assert b"access-control-allow-credentials" not in out
    assert b"vary" not in out


def extension_gateway() -> Gateway:
    sampler = Capabilities(extensions=frozenset({"top_k", "min_p"}))
    upstream = Capabilities.upstream(ModelKind.CHAT, frozenset({"chat_template_kwargs"}))
    return Gateway(
        routes=[
            ModelRoute("plain", "b"),
            ModelRoute("llama", "b", capabilities=sampler),
            ModelRoute("vllm", "u", capabilities=upstream),
        ],
        keys=key_table(),
    )


def test_extension_parameters_reach_only_models_that_declare_them() -> None:
    gw = extension_gateway()
    call = only(gw.handle(request(gw, "a", chat_body(model="llama", top_k=40))), Dispatch).call
    assert dict(call.extensions) == {"top_k": 40}
    assert call.raw["top_k"] == 40
    status, body, _ = json_of(gw.handle(request(gw, "b", chat_body(model="plain", top_k=40))))
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400,
        "unknown_parameter",
        "top_k",
    )
    assert body["error"]["message"] == "Unrecognized request argument supplied: top_k"
    status, body, _ = json_of(gw.handle(request(gw, "c", chat_body(model="llama", min_p="x"))))
    assert (status, body["error"]["code"]) == (400, "invalid_value")
    kwargs = {"enable_thinking": False}
    body_bytes = chat_body(model="vllm", chat_template_kwargs=kwargs)
    call = only(gw.handle(request(gw, "d", body_bytes)), Dispatch).call
    assert call.raw["chat_template_kwargs"] == kwargs
    # A name no configured backend passes on stays unknown everywhere.
    status, body, _ = json_of(gw.handle(request(gw, "e", chat_body(model="vllm", bogus=1))))
    assert (status, body["error"]["code"]) == (400, "unknown_parameter")


def test_a_request_whose_handling_broke_is_still_ended_once() -> None:
    """A bug while the gateway handled RequestReceived leaves the exchange RECEIVED;
    the runtime's fallbacks (a 500, or the client gone) still end it, once."""
    gw = gateway()
    gw._new_exchange("r1", None, "POST", "/v1/chat/completions", 1.0)
    assert gw.state_of("r1") is ExchangeState.RECEIVED
    from ostiary.protocol.errors import InternalServerError

    status, _, _ = json_of(gw.handle(BackendFailed("r1", InternalServerError("x"), 2.0)))
    assert status == 500
    assert sent(gw).fields["status"] == 500
    gw._new_exchange("r2", None, "POST", "/v1/chat/completions", 1.0)
    assert only(gw.handle(ClientGone("r2", 2.0)), Log).fields["status"] == 499
    assert gw.in_flight == 0
