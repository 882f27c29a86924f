"""HttpClient's pool against loopback servers: how many sockets, when an idle one
expires or is retired (bytes or EOF after its response), and when a request is sent
again (a safe method on a stale connection) or never (a POST, once written)."""

from __future__ import annotations

import contextlib
import math
import ssl
from typing import Any

import pytest
import trio
import trio.testing

from ostiary.backends.httpclient import (
    HttpClient,
    HttpClientError,
    ReadTimeout,
    RemoteProtocolError,
    _Connection,
)
from ostiary.protocol import wire
from tests.backends.upstream import (
    Handler,
    MockStats,
    ScriptedRequest,
    abort,
    http_response,
    replies,
    reply,
    start_mock,
    start_scripted,
)
from tests.protocol.meters import ScanMeter
from tests.timers import finishes_at

# -- the pool ------------------------------------------------------------------------------


async def test_pool_never_exceeds_max_connections(nursery: trio.Nursery) -> None:
    stats = MockStats()
    gate = trio.Event()
    waiting = 0

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        nonlocal waiting
        waiting += 1
        if waiting == 3:
            gate.set()
        await gate.wait()
        await stream.send_all(http_response(200, b"ok"))
        return True

    results: list[int] = []
    async with HttpClient(await start_scripted(nursery, handler, stats), max_connections=3) as c:

        async def one() -> None:
            results.append((await c.request("GET", "/x"))[0])

        async with trio.open_nursery() as inner:
            for _ in range(25):
                inner.start_soon(one)
    assert results == [200] * 25
    assert stats.accepted == 3
    assert stats.peak_open == 3


async def test_idle_connections_expire(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    stats = MockStats()
    async with HttpClient(await start_mock(nursery, stats), idle_timeout=30) as client:
        await client.request("GET", "/models")
        mock_clock.jump(10)
        await client.request("GET", "/models")
        assert stats.accepted == 1
        mock_clock.jump(31)
        await client.request("GET", "/models")
        assert stats.accepted == 2


def hang_up_detector(closed: trio.Event) -> Handler:
    """Answers one request, then sets ``closed`` when the client hangs up."""

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(http_response(200, b"ok"))
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some()
        closed.set()
        return False

    return handler


async def test_aclose_closes_idle_and_refuses_new_requests(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    client = HttpClient(await start_scripted(nursery, hang_up_detector(closed)))
    await client.request("GET", "/x")
    await client.aclose()
    await closed.wait()
    with pytest.raises(HttpClientError, match="closed"):
        await client.request("GET", "/x")


async def test_connection_in_use_at_aclose_is_closed_on_release(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    client = HttpClient(await start_scripted(nursery, hang_up_detector(closed)))
    async with client.stream("GET", "/x") as response:
        await client.aclose()
        assert await response.read() == b"ok"
    await closed.wait()


# -- stale keep-alive retry, and when not to retry -------------------------------------------


async def test_idle_connection_closed_by_the_upstream_is_not_reused(
    nursery: trio.Nursery,
) -> None:
    stats = MockStats()
    send_closed, closed = trio.open_memory_channel[None](1)

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        # Claims keep-alive but closes after every response.
        await stream.send_all(http_response(200, b"ok"))
        await stream.aclose()
        await send_closed.send(None)
        return False

    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        for _ in range(3):
            assert (await client.request("POST", "/x", body=b"{}"))[2] == b"ok"
            await closed.receive()
    assert stats.accepted == 3
    assert stats.requests == 3


def dies_on_the_second_request(stats: MockStats, reset: bool) -> Handler:
    """Answers the first request and any after the second; the second, it reads and
    drops the connection without a byte, as an upstream that crashes mid-generation."""

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        if stats.requests == 2:
            if reset:
                abort(stream)
            return False
        await stream.send_all(http_response(200, b"answer-%d" % stats.requests))
        return True

    return handler


@pytest.mark.parametrize("reset", [False, True], ids=["eof", "reset"])
async def test_post_lost_on_a_reused_connection_is_not_resent(
    nursery: trio.Nursery, reset: bool
) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, dies_on_the_second_request(stats, reset), stats)
    async with HttpClient(url) as client:
        assert (await client.request("POST", "/x", body=b"{}"))[2] == b"answer-1"
        with pytest.raises(RemoteProtocolError, match=r"without responding|lost"):
            await client.request("POST", "/x", body=b"{}")
    assert stats.requests == 2


async def test_get_lost_on_a_reused_connection_is_resent(nursery: trio.Nursery) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, dies_on_the_second_request(stats, False), stats)
    async with HttpClient(url) as client:
        assert (await client.request("GET", "/x"))[2] == b"answer-1"
        assert (await client.request("GET", "/x"))[2] == b"answer-3"
    assert (stats.requests, stats.accepted) == (3, 2)


async def test_default_idle_timeout_is_below_uvicorns_keep_alive(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    stats = MockStats()
    async with HttpClient(await start_mock(nursery, stats)) as client:
        await client.request("GET", "/models")
        mock_clock.jump(3.9)
        await client.request("GET", "/models")
        assert stats.accepted == 1
        mock_clock.jump(4.1)  # uvicorn closes an idle connection after 5 s
        await client.request("GET", "/models")
        assert stats.accepted == 2


async def test_connection_close_after_a_tab_is_honoured(nursery: trio.Nursery) -> None:
    stats = MockStats()
    data = http_response(200, b"x", headers=[("connection", "keep-alive,\tclose")])
    async with HttpClient(await start_scripted(nursery, reply(data), stats)) as client:
        for _ in range(2):
            assert (await client.request("GET", "/x"))[2] == b"x"
    assert stats.accepted == 2


async def test_reset_idle_connection_is_retried(nursery: trio.Nursery) -> None:
    stats = MockStats()
    reset = trio.Event()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(http_response(200, b"ok"))
        if stats.requests == 1:
            # Close with an RST so that the client's next send fails outright.
            abort(stream)
            stream.socket.close()
            reset.set()
            return False
        return True

    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        await client.request("GET", "/x")
        await reset.wait()
        assert (await client.request("POST", "/x", body=b"1" * 100_000))[2] == b"ok"
    assert stats.accepted == 2


async def test_fresh_connection_closed_without_response_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, reply(b"", False), stats)
    async with HttpClient(url) as client:
        with pytest.raises(RemoteProtocolError, match="without responding"):
            await client.request("GET", "/x")
    assert stats.accepted == 1


async def test_reused_connection_failing_mid_response_is_not_retried(
    nursery: trio.Nursery,
) -> None:
    stats = MockStats()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        if stats.requests == 1:
            await stream.send_all(http_response(200, b"ok"))
            return True
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-le")
        return False

    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        await client.request("GET", "/x")
        with pytest.raises(RemoteProtocolError):
            await client.request("GET", "/x")
    assert stats.accepted == 1


async def test_reused_connection_timing_out_is_not_retried(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    stats = MockStats()
    asked = trio.Event()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        if stats.requests == 1:
            await stream.send_all(http_response(200, b"ok"))
            return True
        asked.set()
        await trio.sleep_forever()
        return False  # pragma: no cover

    async with HttpClient(await start_scripted(nursery, handler, stats), read_timeout=5) as c:
        await c.request("GET", "/x")
        with pytest.raises(ReadTimeout):
            await finishes_at(mock_clock, 5, lambda: c.request("GET", "/x"), asked.wait)
    assert stats.accepted == 1


# -- nothing crosses from one request to the next --------------------------------------------


@pytest.mark.parametrize(
    ("first", "late"),
    [
        (http_response(200, b"answer-1"), http_response(200, b"answer-1")),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"a body a 204 cannot have"),
        (http_response(200, b"answer-1"), b"more than its content-length"),
    ],
    ids=["duplicate-response", "204-with-body", "over-length"],
)
async def test_bytes_arriving_on_an_idle_connection_retire_it(
    nursery: trio.Nursery, first: bytes, late: bytes
) -> None:
    # The upstream writes something after a correctly framed response, once the
    # client has read it; the next request must not take it as its answer.
    stats = MockStats()
    first_read, late_sent = trio.Event(), trio.Event()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        if stats.requests == 1:
            await stream.send_all(first)
            await first_read.wait()
            await stream.send_all(late)
            late_sent.set()
        else:
            await stream.send_all(http_response(200, b"answer-%d" % stats.requests))
        return True

    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        await client.request("POST", "/x", body=b"{}")
        first_read.set()
        await late_sent.wait()
        assert (await client.request("POST", "/x", body=b"{}"))[2] == b"answer-2"
        assert (await client.request("POST", "/x", body=b"{}"))[2] == b"answer-3"
    assert stats.accepted == 2


async def test_bytes_after_a_204_in_the_same_segment_close_the_connection(
    nursery: trio.Nursery,
) -> None:
    stats = MockStats()
    handler = replies(b"HTTP/1.1 204 No Content\r\n\r\nstray", http_response(200, b"next"))
    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        assert (await client.request("GET", "/x"))[:2] == (204, [])
        assert (await client.request("GET", "/x"))[2] == b"next"
    assert stats.accepted == 2


class _Tls:
    """Stands in for a trio.SSLStream's buffers."""

    def __init__(self, decrypted: int, encrypted: int) -> None:
        self._decrypted = decrypted
        self._incoming = ssl.MemoryBIO()
        self._incoming.write(b"r" * encrypted)

    def pending(self) -> int:
        return self._decrypted


@pytest.mark.parametrize(("decrypted", "encrypted"), [(0, 0), (1, 0), (0, 5)])
def test_tls_buffers_count_as_arrived_bytes(decrypted: int, encrypted: int) -> None:
    near, far = trio.socket.socketpair()
    with near, far:
        tls: Any = _Tls(decrypted, encrypted)
        conn = _Connection(trio.SocketStream(near), near, 1.0, tls)
        assert conn.quiet() is (decrypted == encrypted == 0)


async def test_ambiguous_framing_is_an_error_and_closes(nursery: trio.Nursery) -> None:
    stats = MockStats()
    both = (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n"
    )
    handler = replies(both, http_response(200, b"clean"))
    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        with pytest.raises(RemoteProtocolError, match="both content-length"):
            await client.request("GET", "/x")
        assert (await client.request("GET", "/x"))[2] == b"clean"
    assert stats.accepted == 2


async def test_a_head_trickling_in_is_scanned_once(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = ScanMeter(wire._HEAD_END)
    monkeypatch.setattr(wire, "_HEAD_END", meter)
    data = http_response(200, b"ok", headers=[("x-pad", "p" * 4096)])
    head_size = data.index(b"\r\n\r\n") + 4

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        for i in range(head_size):
            await stream.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()  # one receive per byte
        await stream.send_all(data[head_size:])
        return True

    url = await start_scripted(nursery, handler)
    async with HttpClient(url, read_timeout=math.inf) as client:
        assert (await client.request("GET", "/x"))[2] == b"ok"
    assert meter.examined <= 3 * head_size
