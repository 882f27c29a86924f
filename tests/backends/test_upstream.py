"""The base both HTTP upstream backends share (``ostiary.backends.upstream``): one
mapping of upstream failures, clamped retry-after, bounded draining and one
redacted log record per failed call, checked against the ``openai`` and the
``ollama`` backend alike."""

from __future__ import annotations

import calendar
import logging
import math
import socket
from contextlib import aclosing
from typing import Any

import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ostiary.backends.ollama import OllamaBackend, OllamaSettings
from ostiary.backends.openai_compat import OpenAIBackend, OpenAISettings
from ostiary.backends.upstream import UpstreamError, parse_retry_after
from ostiary.protocol.actions import Respond
from ostiary.protocol.errors import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    OpenAIError,
)
from ostiary.protocol.events import BackendFailed, RequestReceived
from ostiary.protocol.gateway import Gateway, ModelRoute
from ostiary.protocol.generation import Delta, Usage
from ostiary.protocol.requests import ChatCompletionRequest, ChatMessage
from tests.backends.upstream import (
    LAST_CHUNK,
    MockStats,
    http_response,
    reply,
    sse_chunk,
    sse_head,
    start_scripted,
)
from tests.conftest import auth_headers, chat_body, key_table

KINDS = ("openai", "ollama")
SECRET_KEY = "sk-live0123456789abcdefXYZ"
SECRET_TOKEN = "eyJhbGciOi.J9.secret-token"


def make_backend(kind: str, url: str, **overrides: Any) -> OpenAIBackend | OllamaBackend:
    """A backend of ``kind`` for model ``m`` at ``url`` (a scripted upstream answers
    any path, so both kinds can talk to the same one)."""
    if kind == "openai":
        return OpenAIBackend(
            OpenAISettings(name="up-openai", models=("m",), base_url=url, **overrides)
        )
    return OllamaBackend(OllamaSettings(name="up-ollama", models=("m",), base_url=url, **overrides))


def chat_request(stream: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest(
        model="m", messages=(ChatMessage(role="user", content="hi"),), stream=stream
    )


async def chat_items(
    backend: OpenAIBackend | OllamaBackend, stream: bool = False
) -> list[Delta | Usage]:
    async with aclosing(backend.chat(chat_request(stream))) as pieces:
        return [piece async for piece in pieces]


async def chat_error(backend: OpenAIBackend | OllamaBackend, stream: bool = False) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        await chat_items(backend, stream)
    return info.value


def error_body(kind: str, message: str) -> bytes:
    """An error body in the upstream's own form."""
    if kind == "openai":
        return orjson.dumps({"error": {"message": message, "type": "server_error"}})
    return orjson.dumps({"error": message})


# -- an upstream's 429 (issue 6 item 6, issue 7 item 10) ---------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("headers", "retry_after"),
    [
        ((("retry-after", "7"),), 7.0),
        ((("retry-after", "2.5"),), 2.5),
        ((("retry-after-ms", "1500"),), 1.5),
        ((("retry-after-ms", "soon"), ("retry-after", "2")), 2.0),
        ((("retry-after", "1e306"),), 60.0),
        ((("retry-after", "9" * 400),), 60.0),
        ((("retry-after-ms", "1e400"),), 60.0),
        ((("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),), 60.0),
        ((("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),), 0.0),
        ((("retry-after", "inf"),), 1.0),
        ((("retry-after", "nan"),), 1.0),
        ((("retry-after", "-5"),), 1.0),
        ((("retry-after", "soon, I promise"),), 1.0),
        ((("retry-after", ""),), 1.0),
        ((), 1.0),
    ],
)
async def test_upstream_429_is_503_upstream_busy_with_clamped_retry_after(
    nursery: trio.Nursery, kind: str, headers: tuple[tuple[str, str], ...], retry_after: float
) -> None:
    body = error_body(kind, "Rate limit reached for requests")
    url = await start_scripted(nursery, reply(http_response(429, body, headers=headers)))
    async with make_backend(kind, url) as backend:
        error = await chat_error(backend)
    assert type(error) is BackendUnavailableError
    assert (error.status, error.code) == (503, "upstream_busy")
    assert error.retry_after == retry_after
    assert "Rate limit" not in error.message
    assert isinstance(error.__cause__, UpstreamError)
    assert error.__cause__.status == 429


@pytest.mark.parametrize("kind", KINDS)
async def test_max_retry_after_is_a_setting(nursery: trio.Nursery, kind: str) -> None:
    answer = http_response(429, b"", headers=(("retry-after", "7"),))
    url = await start_scripted(nursery, reply(answer))
    async with make_backend(kind, url, max_retry_after=5.0) as backend:
        assert (await chat_error(backend)).retry_after == 5.0
    with pytest.raises(ValueError, match="max_retry_after"):
        make_backend(kind, url, max_retry_after=math.inf)


async def test_a_huge_upstream_retry_after_reaches_the_client_as_a_clean_503(
    nursery: trio.Nursery,
) -> None:
    """Issue 7 item 10: ``retry-after: 1e306`` used to overflow in the gateway (500)."""
    url = await start_scripted(
        nursery, reply(http_response(429, b"", headers=(("retry-after", "1e306"),)))
    )
    async with make_backend("openai", url) as backend:
        error = await chat_error(backend)
    gateway = Gateway(routes=[ModelRoute("m", "up-openai")], keys=key_table(), created=1)
    admission = gateway.admits("POST", "/v1/chat/completions", auth_headers())
    gateway.handle(
        RequestReceived(
            "r1",
            admission,
            "POST",
            "/v1/chat/completions",
            auth_headers(),
            chat_body(model="m"),
            1.0,
            1.0,
        )
    )
    [respond] = [
        a for a in gateway.handle(BackendFailed("r1", error, 2.0)) if isinstance(a, Respond)
    ]
    headers = dict(respond.headers)
    assert respond.status == 503
    assert orjson.loads(respond.body)["error"]["code"] == "upstream_busy"
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"60", b"60000")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Wed, 21 Oct 2015 07:28:30 GMT", 30.0),  # IMF-fixdate
        (b"Wednesday, 21-Oct-15 07:28:30 GMT", 30.0),  # RFC 850
        (b"Wed Oct 21 07:28:30 2015", 30.0),  # asctime
        (b"Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
        (b"Wed, 21 Oct 2015 08:28:00 GMT", 45.0),  # beyond the ceiling
        (b"Wed, 99 Oct 2015 07:28:00 GMT", 1.0),  # not a date
    ],
)
def test_retry_after_http_dates(value: bytes, expected: float) -> None:
    wall = float(calendar.timegm((2015, 10, 21, 7, 28, 0)))
    headers = [(b"retry-after", value)]
    assert parse_retry_after(headers, wall=wall, ceiling=45.0) == expected


@given(
    retry_after=st.one_of(st.none(), st.binary(max_size=40), st.text(max_size=40).map(str.encode)),
    retry_after_ms=st.one_of(st.none(), st.binary(max_size=40)),
    wall=st.floats(0, 4e9),
    ceiling=st.floats(0, 86400),
)
def test_retry_after_is_always_finite_and_within_bounds(
    retry_after: bytes | None, retry_after_ms: bytes | None, wall: float, ceiling: float
) -> None:
    headers = [
        (name, value)
        for name, value in ((b"retry-after", retry_after), (b"retry-after-ms", retry_after_ms))
        if value is not None
    ]
    seconds = parse_retry_after(headers, wall=wall, ceiling=ceiling)
    assert math.isfinite(seconds)
    assert 0.0 <= seconds <= ceiling


@pytest.mark.parametrize("kind", KINDS)
async def test_upstream_503_keeps_its_clamped_retry_after(nursery: trio.Nursery, kind: str) -> None:
    url = await start_scripted(
        nursery, reply(http_response(503, b"", headers=(("retry-after", "1e306"),)))
    )
    async with make_backend(kind, url) as backend:
        error = await chat_error(backend)
    assert type(error) is BackendUnavailableError
    assert (error.code, error.retry_after) == ("backend_unavailable", 60.0)


# -- failures are logged, once, redacted (issue 7 item 12) -----------------------------------


def upstream_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ostiary.upstream"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "generic"),
    [(401, "rejected our credentials"), (500, "failed (HTTP 500)")],
)
async def test_upstream_failure_is_logged_once_redacted(
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
    kind: str,
    stream: bool,
    status: int,
    generic: str,
) -> None:
    caplog.set_level(logging.INFO, logger="ostiary.upstream")
    text = f"quota exceeded for key {SECRET_KEY} (Bearer {SECRET_TOKEN})\nsecond line"
    url = await start_scripted(nursery, reply(http_response(status, error_body(kind, text))))
    async with make_backend(kind, url) as backend:
        error = await chat_error(backend, stream)
    assert type(error) is BackendError
    assert generic in error.message
    assert "quota" not in error.message
    [record] = upstream_records(caplog)
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    fields: dict[str, Any] = record.fields  # type: ignore[attr-defined]
    assert f"upstream HTTP {status}" in message
    assert backend.name in message
    assert "quota exceeded for key [redacted] ([redacted])" in message
    assert "\n" not in message
    for secret in (SECRET_KEY, SECRET_TOKEN, "sk-live"):
        assert secret not in message
        assert secret not in repr(fields)
    assert fields["backend"] == backend.name
    assert fields["upstream_status"] == status
    assert fields["status"] == error.status


@pytest.mark.parametrize("kind", KINDS)
async def test_a_refused_client_request_is_logged_at_info_and_passed_on(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO, logger="ostiary.upstream")
    url = await start_scripted(
        nursery, reply(http_response(400, error_body(kind, "prompt too\tlong" + "!" * 900)))
    )
    async with make_backend(kind, url) as backend:
        error = await chat_error(backend)
    assert type(error) is InvalidRequestError
    assert error.message.startswith("prompt too long!!")
    assert len(error.message) == 500
    [record] = upstream_records(caplog)
    assert record.levelno == logging.INFO


@pytest.mark.parametrize("kind", KINDS)
async def test_refused_connection_is_logged_once(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO, logger="ostiary.upstream")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with make_backend(kind, f"http://127.0.0.1:{port}") as backend:
        error = await chat_error(backend)
        assert type(error) is BackendUnavailableError
        assert (error.code, error.retry_after) == ("backend_unavailable", 1.0)
        [record] = upstream_records(caplog)
        assert record.levelno == logging.WARNING
        assert record.fields["upstream_status"] is None  # type: ignore[attr-defined]
        assert "ConnectError" in record.getMessage()
        with pytest.raises(BackendUnavailableError):
            await backend.check_ready()
    assert len(upstream_records(caplog)) == 2


# -- draining ------------------------------------------------------------------------------

PADDING = b" " * (256 * 1024)
NDJSON_HEAD = (
    b"HTTP/1.1 200 X\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
)


def padded_stream(kind: str) -> bytes:
    """A complete streamed answer, then 256 KiB of filler before the body's end."""
    pad = b"%x\r\n%s\r\n" % (len(PADDING), PADDING)
    if kind == "openai":
        piece = {"choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}
        events = sse_chunk(orjson.dumps(piece)) + sse_chunk(b"[DONE]")
        return sse_head() + events + pad + LAST_CHUNK
    line = b'{"message": {"content": "a"}, "done": true, "eval_count": 1}\n'
    return NDJSON_HEAD + b"%x\r\n%s\r\n" % (len(line), line) + pad + LAST_CHUNK


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("max_bytes", "connections"), [(64 * 1024, 2), (1024 * 1024, 1)])
async def test_draining_is_bounded_in_bytes(
    nursery: trio.Nursery, kind: str, max_bytes: int, connections: int
) -> None:
    """Past ``response_drain_max_bytes`` the connection is closed, not pooled."""
    stats = MockStats()
    url = await start_scripted(nursery, reply(padded_stream(kind)), stats)
    async with make_backend(kind, url, response_drain_max_bytes=max_bytes) as backend:
        for _ in range(2):
            items = await chat_items(backend, stream=True)
            assert [i.text for i in items if isinstance(i, Delta)] == ["a"]
    assert stats.accepted == connections


def failing_stream(kind: str) -> bytes:
    """One piece, then an error reported inside the stream."""
    text = f"CUDA out of memory; key {SECRET_KEY}"
    if kind == "openai":
        piece = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
        failure = {"error": {"message": text}}
        return sse_head() + sse_chunk(orjson.dumps(piece)) + sse_chunk(orjson.dumps(failure))
    lines = b'{"message": {"content": "a"}, "done": false}\n' + orjson.dumps({"error": text})
    return NDJSON_HEAD + b"%x\r\n%s\r\n" % (len(lines) + 1, lines + b"\n") + LAST_CHUNK


@pytest.mark.parametrize("kind", KINDS)
async def test_an_error_inside_a_stream_is_logged_once(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO, logger="ostiary.upstream")
    url = await start_scripted(nursery, reply(failing_stream(kind), keep_alive=False))
    async with make_backend(kind, url) as backend:
        error = await chat_error(backend, stream=True)
    assert (type(error), error.code) == (BackendError, "backend_error")
    assert "CUDA" not in error.message
    [record] = upstream_records(caplog)
    assert record.levelno == logging.WARNING
    assert "upstream HTTP 200" in record.getMessage()
    assert "CUDA out of memory; key [redacted]" in record.getMessage()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_success_logs_nothing(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="ostiary.upstream")
    url = await start_scripted(nursery, reply(padded_stream(kind)))
    async with make_backend(kind, url) as backend:
        assert [i.text for i in await chat_items(backend, stream=True) if isinstance(i, Delta)]
    assert upstream_records(caplog) == []
