"""The h11 server's defences, over in-memory streams on trio's MockClock."""

from __future__ import annotations

import contextlib
import email.utils
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from unittest import mock

import h11
import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from ostiary.protocol.admission import Admission, refusal_error
from ostiary.protocol.errors import AuthenticationError
from ostiary.protocol.events import Refusal
from ostiary.protocol.responses import error_body, error_headers
from ostiary.runtime.http import (
    ClientDisconnected,
    HttpRequest,
    HttpServer,
    HttpSettings,
    Responder,
)
from ostiary.runtime.responder import _HttpDate, _reason

IMF_FIXDATE = re.compile(
    rb"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
    rb" \d{4} \d\d:\d\d:\d\d GMT"
)

Header = tuple[bytes, bytes]
FIXED_DATE = b"Tue, 01 Dec 2026 11:00:00 GMT"


class Recorder:
    """A handler that answers with the body length, or misbehaves on request. Heads
    to ``/refused`` are refused (their body is never read); a ``/nobody`` route takes
    no body; the rest may have up to ``max_body_bytes``."""

    def __init__(self, max_body_bytes: int = 1000) -> None:
        self.max_body_bytes = max_body_bytes
        self.requests: list[HttpRequest] = []
        self.refusals: list[tuple[Refusal, str, str]] = []
        self.heads = 0
        self.cancelled = 0
        self.entered = trio.Event()

    async def admits(
        self, method: str, target: str, headers: tuple[Header, ...], peer: str
    ) -> Admission:
        self.heads += 1
        if target == "/refused":
            return Admission(None, 0, peer, error=AuthenticationError("no"))
        return Admission(None, 0 if target == "/nobody" else self.max_body_bytes, peer)

    async def refuse(
        self, refusal: Refusal, responder: Responder, method: str, target: str, limit: int
    ) -> None:
        self.refusals.append((refusal, method, target))
        error = refusal_error(refusal, limit)
        await responder.respond(error.status, error_headers(error, "h1"), error_body(error))

    async def handle(self, request: HttpRequest, responder: Responder) -> None:
        self.requests.append(request)
        if request.target in ("/forever", "/v1/forever"):
            self.entered.set()
            try:
                await trio.sleep_forever()
            finally:
                self.cancelled += 1
        if request.target == "/firehose":
            await responder.start(200, ())
            while True:
                await responder.send(b"x" * 65536)
        if request.target == "/silent":
            return
        if request.target == "/slow":
            self.entered.set()
            await trio.sleep(5)
        body = str(len(request.body)).encode()
        await responder.respond(200, ((b"content-type", b"text/plain"),), body)


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, method: str = "POST", target: str = "/", body: bytes = b"", **headers: str
    ) -> None:
        hdrs = [("host", "t"), *headers.items()]
        if body or method == "POST":
            hdrs.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=target, headers=hdrs)) or b""
        data += self.conn.send(h11.Data(data=body)) or b"" if body else b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(data)

    async def send_head(self, content_length: int, target: str = "/") -> None:
        headers = [
            ("host", "t"),
            ("content-length", str(content_length)),
            ("expect", "100-continue"),
        ]
        await self.stream.send_all(
            self.conn.send(h11.Request(method="POST", target=target, headers=headers)) or b""
        )

    async def response(self) -> tuple[int, dict[bytes, bytes], bytes]:
        status = 0
        headers: dict[bytes, bytes] = {}
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(bytes(await self.stream.receive_some(65536)))
                continue
            if isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.InformationalResponse):
                return event.status_code, dict(event.headers), b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                    self.conn.start_next_cycle()
                return status, headers, body
            else:
                raise AssertionError(event)

    async def closed(self) -> bool:
        """True when the server has closed its side (reads EOF)."""
        while True:
            data = await self.stream.receive_some(65536)
            if not data:
                return True


@asynccontextmanager
async def serving(
    settings: HttpSettings | None = None, *, lockstep: bool = False, max_body_bytes: int = 1000
) -> AsyncIterator[tuple[HttpServer, Recorder, Any]]:
    recorder = Recorder(max_body_bytes)
    server = HttpServer(recorder, settings or HttpSettings())

    async with trio.open_nursery() as nursery:

        async def connect() -> Client:
            pair = (
                trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
            )
            client, srv = pair()
            nursery.start_soon(server.serve_connection, srv)
            return Client(client)

        yield server, recorder, connect
        nursery.cancel_scope.cancel()


async def test_keep_alive_serves_several_requests(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (server, recorder, connect):
        client = await connect()
        for body in (b"abc", b"", b"12345"):
            await client.request(body=body)
            status, headers, data = await client.response()
            assert (status, data) == (200, str(len(body)).encode())
            assert b"connection" not in headers
        assert server.connections == 1
        assert [len(r.body) for r in recorder.requests] == [3, 0, 5]


async def test_pipelined_requests(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        raw = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\n\r\nx"
        await client.send_raw(raw + raw.replace(b"1\r\n\r\nx", b"2\r\n\r\nxy"))
        received = b""
        while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"2"):
            received += await client.stream.receive_some(65536)
        first, second = received.split(b"HTTP/1.1 200")[1:]
        assert first.endswith(b"\r\n\r\n1")
        assert second.endswith(b"\r\n\r\n2")
        assert len(recorder.requests) == 2


async def test_413_from_content_length_before_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.send_raw(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n")
        status, headers, body = await client.response()
        assert status == 413
        assert headers[b"connection"] == b"close"
        assert b'"type":"invalid_request_error"' in body
        assert await client.closed()
        assert recorder.requests == []


async def test_413_for_chunked_body_over_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(max_body_bytes=10) as (_, recorder, connect):
        client = await connect()
        await client.send_raw(
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
            b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
        )
        assert (await client.response())[0] == 413
        assert recorder.requests == []


async def test_chunked_body_within_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, _recorder, connect):
        client = await connect()
        await client.send_raw(
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        assert (await client.response())[2] == b"3"


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no host header
    ],
)
async def test_smuggling_and_malformed_requests_are_refused(
    head: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.send_raw(head + b"abc")
        status, headers, _ = await client.response()
        assert status == 400
        assert headers[b"connection"] == b"close"
        assert await client.closed()
        assert recorder.requests == []


async def test_oversized_head_is_refused(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(max_header_bytes=1024)) as (_, recorder, connect):
        client = await connect()
        await client.send_raw(b"GET / HTTP/1.1\r\nhost: t\r\nx-big: " + b"a" * 4096 + b"\r\n\r\n")
        assert (await client.response())[0] == 431
        assert recorder.requests == []


async def test_expect_100_continue(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, _recorder, connect):
        client = await connect()
        await client.send_head(content_length=2)
        assert (await client.response())[0] == 100
        await client.send_raw(
            (client.conn.send(h11.Data(data=b"ok")) or b"")
            + (client.conn.send(h11.EndOfMessage()) or b"")
        )
        assert (await client.response())[2] == b"2"


async def test_no_100_continue_when_refusing(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, _recorder, connect):
        client = await connect()
        await client.send_head(content_length=5000)
        assert (await client.response())[0] == 413


async def test_slow_head_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(header_timeout=3)) as (_, _recorder, connect):
        client = await connect()
        start = trio.current_time()
        await client.send_raw(b"POST / HTTP/1.1\r\nhost: t\r\n")
        status, _, _ = await client.response()
        assert status == 408
        assert trio.current_time() - start == pytest.approx(3)
        assert await client.closed()


async def test_slow_body_times_out(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(body_timeout=4)) as (_, recorder, connect):
        client = await connect()
        await client.send_raw(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc")
        assert (await client.response())[0] == 408
        assert recorder.requests == []


async def test_silent_new_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(header_timeout=2, idle_timeout=50)) as (_, _recorder, connect):
        client = await connect()
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(2)


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(idle_timeout=7)) as (server, _recorder, connect):
        client = await connect()
        await client.request()
        await client.response()
        start = trio.current_time()
        assert await client.closed()
        assert trio.current_time() - start == pytest.approx(7)
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0


async def test_connection_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(max_connections=1)) as (server, _recorder, connect):
        first = await connect()
        await first.request()
        await first.response()
        second = await connect()
        status, headers, body = await second.response()
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        assert b"connection limit" in body
        assert server.connections == 1


async def test_requests_per_connection_limit(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(max_requests_per_connection=2)) as (_, _recorder, connect):
        client = await connect()
        await client.request()
        assert b"connection" not in (await client.response())[1]
        await client.request()
        assert (await client.response())[1][b"connection"] == b"close"
        assert await client.closed()


async def test_client_leaving_cancels_the_handler(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (server, recorder, connect):
        client = await connect()
        await client.request(target="/v1/forever")
        await recorder.entered.wait()
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert recorder.cancelled == 1
        assert server.connections == 0


async def test_client_that_stops_reading_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    settings = HttpSettings(send_timeout=5)
    async with serving(settings, lockstep=True) as (server, _recorder, connect):
        client = await connect()
        await client.request(target="/firehose")
        await client.stream.receive_some(100)  # then never read again
        start = trio.current_time()
        while server.connections:  # noqa: ASYNC110 - polls virtual time
            await trio.sleep(1)
        assert trio.current_time() - start <= 6


async def test_handler_that_never_answers_closes_the_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (_, _recorder, connect):
        client = await connect()
        await client.request(target="/silent")
        assert await client.closed()


async def test_drain_closes_idle_and_finishes_busy(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (server, recorder, connect):
        idle = await connect()
        busy = await connect()
        await idle.request()
        await idle.response()
        await busy.request(target="/slow")
        await recorder.entered.wait()
        await server.drain(trio.current_time() + 30)
        status, headers, _ = await busy.response()
        assert (status, headers[b"connection"]) == (200, b"close")
        assert await idle.closed()
        assert await busy.closed()
        assert server.connections == 0


async def test_drain_deadline_returns(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (server, recorder, connect):
        await (await connect()).request(target="/forever")
        await recorder.entered.wait()
        start = trio.current_time()
        await server.drain(start + 3)
        assert trio.current_time() - start == pytest.approx(3)
        assert server.connections == 1
    assert recorder.cancelled == 1


async def test_drain_stops_accepting() -> None:
    """Over a real listener, with trio's own clock: no timing is involved."""
    server = HttpServer(Recorder(), HttpSettings())
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        client = Client(await trio.open_tcp_stream("127.0.0.1", port))
        await client.request()
        assert (await client.response())[0] == 200
        await server.drain(trio.current_time() + 30)  # the idle connection closes
        assert await client.closed()
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", port)
        nursery.cancel_scope.cancel()


async def test_refused_request_body_is_never_read(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.send_head(content_length=500, target="/refused")  # expect: 100-continue
        status, headers, body = await client.response()
        assert status == 200  # the handler's answer, not a 100 Continue
        assert body == b"0"
        assert headers[b"connection"] == b"close"
        assert recorder.requests[0].body_skipped
        assert recorder.heads == 1
        assert await client.closed()


async def test_a_route_without_a_body_never_reads_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.request(method="GET", target="/nobody", body=b"x" * 900)
        status, headers, body = await client.response()
        assert (status, body) == (200, b"0")
        assert headers[b"connection"] == b"close"
        assert recorder.requests[0].body_skipped
        assert await client.closed()


async def test_every_head_is_judged_once(autojump_clock: trio.testing.MockClock) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.request(method="GET", target="/x")
        status, headers, _ = await client.response()
        assert status == 200
        assert b"connection" not in headers
        assert not recorder.requests[0].body_skipped
        assert recorder.heads == 1


async def test_rejected_client_still_sending_gets_the_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (_, _recorder, connect):
        client = await connect()
        await client.send_raw(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 9999999\r\n\r\n")
        await client.send_raw(b"x" * 200_000)  # the server discards this while lingering
        status, headers, _ = await client.response()
        assert status == 413
        assert headers[b"x-request-id"]


POST_HEAD = b"POST / HTTP/1.1\r\nhost: t\r\n"


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (POST_HEAD + b"content-length: 0\r\ntransfer-encoding: chunked", 400),
        (POST_HEAD + b"transfer-encoding: chunked\r\ncontent-length: 0", 400),
        (POST_HEAD + b"content-length: 00\r\ntransfer-encoding: chunked", 400),
        (b"POST / HTTP/1.0\r\nhost: t\r\ntransfer-encoding: chunked", 400),
        (POST_HEAD + b"content-length: +3", 400),
        (POST_HEAD + b"content-length: -3", 400),
        (POST_HEAD + b"content-length: 3 3", 400),
        (POST_HEAD + b"content-length: 0x3", 400),
        (POST_HEAD + b"transfer-encoding: gzip, chunked", 501),
        (POST_HEAD + b"transfer-encoding: identity", 501),
        (POST_HEAD + b"transfer-encoding: chunked\r\ntransfer-encoding: chunked", 501),
    ],
)
async def test_ambiguous_framing_is_refused(
    head: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.send_raw(head + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")  # a chunked body
        got, headers, _ = await client.response()
        assert (got, headers[b"connection"]) == (status, b"close")
        assert await client.closed()
        assert recorder.requests == []


@pytest.mark.parametrize(
    "header",
    [
        b"content-length: 3\r\ncontent-length: 3",
        b"content-length: 3, 3",
        b"content-length:  3  ",
        b"transfer-encoding: Chunked",
    ],
)
async def test_equal_lengths_and_padding_are_one_length(
    header: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    body = b"3\r\nabc\r\n0\r\n\r\n" if b"chunked" in header.lower() else b"abc"
    async with serving() as (_, recorder, connect):
        client = await connect()
        await client.send_raw(POST_HEAD + header + b"\r\n\r\n" + body)
        assert (await client.response())[::2] == (200, b"3")
        assert [r.body for r in recorder.requests] == [b"abc"]


CHUNKED_HEAD = POST_HEAD + b"transfer-encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "pieces",
    [
        [CHUNKED_HEAD + b"ffffffff\r\n"],
        [CHUNKED_HEAD, b"ffffffff\r\n"],
        [CHUNKED_HEAD, b"ffff", b"ffff\r\n"],
        [CHUNKED_HEAD + b"5\r\n12345\r\n", b"6\r\n1"],
    ],
)
async def test_chunk_declared_over_the_limit_is_refused_at_once(
    pieces: list[bytes], autojump_clock: trio.testing.MockClock
) -> None:
    async with serving(max_body_bytes=10) as (_, recorder, connect):
        client = await connect()
        start = trio.current_time()
        for piece in pieces:
            await client.send_raw(piece)
            await trio.testing.wait_all_tasks_blocked()
        status, headers, _ = await client.response()
        assert (status, headers[b"connection"]) == (413, b"close")
        assert trio.current_time() == start  # not after the body timeout
        assert recorder.requests == []


@pytest.mark.parametrize(("chunks", "status"), [(4, 200), (5, 413)])
async def test_a_body_in_too_many_chunks_is_refused(
    chunks: int, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    """F9: every chunk costs CPU however small it is, so a chunked body may have at
    most ``max_body_chunks`` of them (a chunk that arrives in pieces is one)."""
    async with serving(HttpSettings(max_body_chunks=4)) as (_, recorder, connect):
        client = await connect()
        await client.send_raw(CHUNKED_HEAD + b"3\r\nab")
        await trio.testing.wait_all_tasks_blocked()  # the first chunk in two pieces
        await client.send_raw(b"c\r\n" + b"1\r\nx\r\n" * (chunks - 1) + b"0\r\n\r\n")
        got, headers, body = await client.response()
        assert got == status
        if status == 413:
            error = orjson.loads(body)["error"]
            assert error["code"] == "too_many_body_chunks"
            assert "more than 4 chunks" in error["message"]
            assert headers[b"connection"] == b"close"
            assert recorder.requests == []
        else:
            assert [r.body for r in recorder.requests] == [b"abcxxx"]


async def test_a_content_length_body_in_many_reads_is_not_counted_in_chunks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(HttpSettings(max_body_chunks=1)) as (_, _recorder, connect):
        client = await connect()
        await client.send_raw(POST_HEAD + b"content-length: 5\r\n\r\n")
        for byte in b"12345":
            await trio.testing.wait_all_tasks_blocked()
            await client.send_raw(bytes([byte]))
        assert (await client.response())[::2] == (200, b"5")


async def test_chunk_filling_the_limit_exactly_is_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(max_body_bytes=10) as (_, _recorder, connect):
        client = await connect()
        await client.send_raw(CHUNKED_HEAD + b"4\r\n1234\r\n6\r\n12")
        await trio.testing.wait_all_tasks_blocked()
        await client.send_raw(b"3456\r\n0\r\n\r\n")
        assert (await client.response())[::2] == (200, b"10")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_request_then_half_close_is_answered(
    method: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving() as (server, recorder, connect):
        client = await connect()
        await client.request(method=method, target="/slow")
        await recorder.entered.wait()
        await client.stream.send_eof()  # while the handler is still at work
        status, headers, _ = await client.response()
        assert (status, headers[b"connection"]) == (200, b"close")
        assert await client.closed()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0


@pytest.mark.parametrize("target", ["/", "/healthz"])
async def test_buffered_request_and_eof_are_answered(
    target: str, autojump_clock: trio.testing.MockClock
) -> None:
    async with serving() as (_, _recorder, connect):
        for _ in range(10):
            client = await connect()
            await client.request(method="GET", target=target)
            await client.stream.send_eof()
            assert (await client.response())[0] == 200
            assert await client.closed()


@pytest.mark.parametrize("partial", [b"", b"POST / HTTP/1.1\r\nhost: t\r\ncontent-le"])
async def test_pipelined_requests_then_half_close_are_all_answered(
    partial: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    """F5: every whole request read before the end of input is answered, and the last
    response says it closes; a partial request after them (known to be partial only
    when read) goes unanswered as the connection closes."""
    async with serving() as (server, recorder, connect):
        client = await connect()
        get = b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n"
        await client.send_raw(get * 3 + partial)
        await client.stream.send_eof()
        received = b""
        while data := await client.stream.receive_some(65536):
            received += data
        responses = received.split(b"HTTP/1.1 ")[1:]
        assert [r.startswith(b"200 ") for r in responses] == [True] * 3
        closing = [b"connection: close" in r for r in responses]
        assert closing == [False, False, not partial]
        await trio.testing.wait_all_tasks_blocked()
        assert (len(recorder.requests), server.connections) == (3, 0)
    # Connection.pending reads the length of h11's buffer, not a copy of it.
    assert len(h11.Connection(h11.SERVER)._receive_buffer) == 0


async def test_half_close_abandons_a_model_request(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving() as (server, recorder, connect):
        client = await connect()
        await client.request(target="/v1/forever")
        await client.stream.send_eof()
        assert await client.closed()
        await trio.testing.wait_all_tasks_blocked()
        assert (recorder.cancelled, server.connections) == (1, 0)
        assert client.conn.their_state is h11.SEND_RESPONSE  # no response at all


def _get_then_half_close(port: int, requests: int) -> bytes:
    """``requests`` GET /healthz in one write from a blocking socket in a thread, then
    a half-close, so that their bytes and the FIN reach the server at moments of their
    own, as from another process."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n" * requests)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                received += data
        return received


@pytest.mark.parametrize(("requests", "runs"), [(1, 40), (3, 5)])
async def test_half_close_over_loopback_is_always_answered(requests: int, runs: int) -> None:
    """Every request sent before the half-close is answered (with 3: F5, pipelined)."""
    # Real sockets on the real clock: nothing here sleeps or waits for time to pass.
    server = HttpServer(Recorder(), HttpSettings())
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, listeners)
        answers = [
            await trio.to_thread.run_sync(_get_then_half_close, port, requests) for _ in range(runs)
        ]
        nursery.cancel_scope.cancel()
    assert [a.startswith(b"HTTP/1.1 200 ") for a in answers] == [True] * runs
    assert [a.count(b"HTTP/1.1 200 ") for a in answers] == [requests] * runs


async def test_every_response_carries_a_date(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(HttpSettings(max_connections=1)) as (_, _recorder, connect):
        first = await connect()
        await first.request()
        answered = await first.response()
        refused = await (await connect()).response()  # over the connection limit
        await first.send_raw(b"GARBAGE\r\n\r\n")
        rejected = await first.response()
    assert [r[0] for r in (answered, refused, rejected)] == [200, 503, 400]
    for _, headers, _ in (answered, refused, rejected):
        assert IMF_FIXDATE.fullmatch(headers[b"date"])
        assert email.utils.parsedate_to_datetime(headers[b"date"].decode()).tzname() == "UTC"


def test_date_is_formatted_once_a_second() -> None:
    now = [0.25]
    date = _HttpDate(clock=lambda: now[0])
    first = date()
    assert first == b"Thu, 01 Jan 1970 00:00:00 GMT"
    now[0] = 0.99
    assert date() is first
    now[0] = 86401.0
    assert date() == b"Fri, 02 Jan 1970 00:00:01 GMT"


class _Capture:
    """A stream that keeps what is written to it."""

    def __init__(self) -> None:
        self.data = b""

    async def send_all(self, data: bytes) -> None:
        self.data += data


def _after_request(request: bytes) -> h11.Connection:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(request)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    return conn


_names = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)
_values = st.text("abc XYZ 0123456789-;=/,", max_size=20).map(lambda v: v.strip().encode())


@settings(max_examples=300, deadline=None)
@given(
    status=st.integers(100, 999),
    headers=st.lists(st.tuples(_names, _values), max_size=6),
    body=st.binary(max_size=64),
    close=st.booleans(),
    request=st.sampled_from(
        [
            b"POST /v1/x HTTP/1.1\r\nhost: a\r\ncontent-length: 2\r\n\r\n{}",
            b"GET /v1/x HTTP/1.1\r\nhost: a\r\n\r\n",
            b"GET /v1/x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
            b"GET /v1/x HTTP/1.0\r\n\r\n",
            b"HEAD /v1/x HTTP/1.1\r\nhost: a\r\n\r\n",
            b"GET /v1/x HTTP/1.1\r\nhost: a\r\nupgrade: h2c\r\nconnection: upgrade\r\n\r\n",
        ]
    ),
)
def test_responses_are_the_bytes_h11_writes(
    status: int, headers: list[tuple[bytes, bytes]], body: bytes, close: bool, request: bytes
) -> None:
    """``Responder.respond`` writes common responses itself: byte for byte what h11
    writes, and h11's state machine ends where it would have."""
    if status < 200:
        status += 100
    ours, theirs = _after_request(request), _after_request(request)
    stream = _Capture()
    head = request.startswith(b"HEAD")
    responder = Responder(ours, stream, 5.0, lambda: close, head=head)  # type: ignore[arg-type]
    hdrs = tuple(headers)
    try:
        # One Date for both writers, whatever second the clock turns over.
        with mock.patch(
            "ostiary.runtime.responder._date", lambda: b"Tue, 01 Dec 2026 11:00:00 GMT"
        ):
            trio.run(responder.respond, status, hdrs, body)
    except ClientDisconnected:  # h11 refused our headers (a duplicate content-length...)
        with pytest.raises(h11.LocalProtocolError):
            _reference(theirs, status, hdrs, body, close, head)
        return
    expected = _reference(theirs, status, hdrs, body, close, head)
    assert stream.data == expected
    assert (ours.our_state, ours.their_state) == (theirs.our_state, theirs.their_state)


def _reference(
    conn: h11.Connection,
    status: int,
    headers: tuple[tuple[bytes, bytes], ...],
    body: bytes,
    close: bool,
    head: bool,
) -> bytes:
    """What the h11-only responder wrote for this response."""
    hdrs = [*headers, (b"date", FIXED_DATE)]
    if close:
        hdrs.append((b"connection", b"close"))
    if status not in (204, 304):  # neither says a length (RFC 9110 8.6)
        hdrs.append((b"content-length", str(len(body)).encode()))
    reason = _reason(status)
    data = conn.send(h11.Response(status_code=status, headers=hdrs, reason=reason)) or b""
    if body and not head:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")
