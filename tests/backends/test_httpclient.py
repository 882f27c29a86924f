"""HttpClient against real loopback servers run in the test's nursery: the fast mock
upstream for the happy paths, scripted servers for misbehaviour. The pool's rules
(reuse, staleness, resending) are in ``test_httpclient_pool.py``."""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import math
import ssl
import sys
import tracemalloc
import types
from pathlib import Path

import pytest
import trio
import trio.testing

from ostiary.backends.httpclient import (
    ConnectError,
    ConnectTimeout,
    HttpClient,
    HttpClientError,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
)
from tests.backends.upstream import (
    LAST_CHUNK,
    Handler,
    MockStats,
    ScriptedRequest,
    abort,
    http_response,
    reply,
    start_mock,
    start_scripted,
)
from tests.timers import finishes_at

# -- happy paths and keep-alive --------------------------------------------------------


async def test_request_roundtrip_and_keep_alive_reuse(nursery: trio.Nursery) -> None:
    stats = MockStats()
    async with HttpClient(await start_mock(nursery, stats)) as client:
        status, headers, body = await client.request("GET", "/models")
        assert status == 200
        assert (b"content-type", b"application/json") in headers
        assert b"mock-model" in body
        for _ in range(20):
            status, _, body = await client.request("POST", "/chat/completions", body=b"{}")
            assert status == 200
            assert body.startswith(b'{"id":"mock-1"')
    assert stats.accepted == 1
    assert stats.requests == 21


async def test_path_prefix_headers_and_body_sent(nursery: trio.Nursery) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, reply(http_response(200, b"ok")), stats)
    client = HttpClient(
        url + "/", default_headers=[("X-Default", "1"), ("Content-Type", "text/plain")]
    )
    async with client:
        response = await client.request(
            "post", "/things?x=1", headers=[("content-type", "application/json")], body=b"{}"
        )
    assert response == (
        200,
        [(b"content-type", b"application/json"), (b"content-length", b"2")],
        b"ok",
    )
    seen = stats.last_request
    assert seen is not None
    assert (seen.method, seen.path, seen.body) == ("POST", "/v1/things?x=1", b"{}")
    assert seen.headers["host"] == url.split("/")[2]
    assert seen.headers["x-default"] == "1"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["content-length"] == "2"


async def test_empty_post_sends_content_length_zero(nursery: trio.Nursery) -> None:
    stats = MockStats()
    url = await start_scripted(nursery, reply(http_response(204, b"")), stats)
    async with HttpClient(url) as client:
        assert (await client.request("POST", "/x"))[0] == 204
    assert stats.last_request is not None
    assert stats.last_request.headers["content-length"] == "0"


async def test_iter_bytes_joins_buffered_chunks(nursery: trio.Nursery) -> None:
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    body = b"".join(b"1\r\n%d\r\n" % (i % 10) for i in range(30)) + LAST_CHUNK
    stats = MockStats()
    async with HttpClient(await start_scripted(nursery, reply(head + body), stats)) as client:
        for _ in range(2):
            async with client.stream("GET", "/s") as response:
                assert response.header(b"transfer-encoding") == b"chunked"
                assert response.header(b"missing") is None
                assert not response.complete
                chunks = [c async for c in response.iter_bytes()]
                assert response.complete
            assert b"".join(chunks) == b"".join(b"%d" % (i % 10) for i in range(30))
            assert len(chunks) < 30
    assert stats.accepted == 1


async def test_informational_response_is_skipped(nursery: trio.Nursery) -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\n" + http_response(200, b"done")
    async with HttpClient(await start_scripted(nursery, reply(data))) as client:
        assert (await client.request("POST", "/x", body=b"1"))[2] == b"done"


async def test_connection_close_response_is_not_reused(nursery: trio.Nursery) -> None:
    stats = MockStats()
    data = http_response(200, b"x", headers=[("connection", "close")])
    async with HttpClient(await start_scripted(nursery, reply(data, False), stats)) as client:
        for _ in range(3):
            assert (await client.request("GET", "/x"))[2] == b"x"
    assert stats.accepted == 3


async def test_body_read_to_end_before_an_exception_keeps_the_connection(
    nursery: trio.Nursery,
) -> None:
    stats = MockStats()
    async with HttpClient(await start_mock(nursery, stats)) as client:
        with pytest.raises(KeyError):
            async with client.stream("GET", "/models") as response:
                await response.read()
                raise KeyError("boom")
        await client.request("GET", "/models")
    assert stats.accepted == 1


async def test_close_delimited_and_http10_responses_are_not_pooled(nursery: trio.Nursery) -> None:
    stats = MockStats()
    answers = iter(
        [
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            http_response(200, b"kept"),
        ]
    )

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        answer = next(answers)
        await stream.send_all(answer)
        return b"content-length" in answer or b"204" in answer

    async with HttpClient(await start_scripted(nursery, handler, stats)) as client:
        assert (await client.request("GET", "/x"))[2] == b"until the end"
        assert (await client.request("GET", "/x"))[2] == b"ok"
        assert (await client.request("GET", "/x"))[2] == b"ok"
        assert (await client.request("GET", "/x"))[:2] == (204, [])
        assert (await client.request("GET", "/x"))[2] == b"kept"
    assert stats.accepted == 4


async def test_head_request_has_no_body(nursery: trio.Nursery) -> None:
    stats = MockStats()
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n"
    async with HttpClient(await start_scripted(nursery, reply(data), stats)) as client:
        for _ in range(2):
            assert await client.request("HEAD", "/x") == (200, [(b"content-length", b"1000")], b"")
    assert stats.accepted == 1


async def test_chunked_body_trickling_in(nursery: trio.Nursery) -> None:
    stats = MockStats()
    data = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1 \r\n,\r\n6\r\n world\r\n0\r\ntrailer: x\r\n\r\n"
    )

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.testing.wait_all_tasks_blocked()
        return True

    async with HttpClient(
        await start_scripted(nursery, handler, stats), read_timeout=math.inf
    ) as c:
        for _ in range(2):
            assert (await c.request("GET", "/x"))[2] == b"hello, world"
    assert stats.accepted == 1


# -- early exit and cancellation ----------------------------------------------------------------


def stalled_stream(closed: trio.Event) -> Handler:
    """Sends a head and one chunk, then waits for the client to hang up."""

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n")
        try:
            while await stream.receive_some():
                pass  # pragma: no cover
        except trio.BrokenResourceError:  # pragma: no cover
            pass
        closed.set()
        return False

    return handler


async def test_early_exit_closes_the_connection(nursery: trio.Nursery) -> None:
    stats = MockStats()
    closed = trio.Event()
    async with HttpClient(await start_scripted(nursery, stalled_stream(closed), stats)) as client:
        async with client.stream("GET", "/s") as response:
            async for chunk in response.iter_bytes():
                assert chunk == b"abc"
                break
        await closed.wait()


async def test_cancellation_closes_the_connection(nursery: trio.Nursery) -> None:
    closed = trio.Event()
    async with HttpClient(await start_scripted(nursery, stalled_stream(closed))) as client:
        with trio.CancelScope() as scope:
            async with client.stream("GET", "/s") as response:
                chunks = response.iter_bytes()
                assert await chunks.__anext__() == b"abc"
                scope.cancel()
                await chunks.__anext__()
        assert scope.cancelled_caught
        await closed.wait()


async def test_unread_but_complete_body_is_pooled(nursery: trio.Nursery) -> None:
    stats = MockStats()
    async with HttpClient(await start_mock(nursery, stats)) as client:
        async with client.stream("GET", "/models"):
            pass
        await client.request("GET", "/models")
    assert stats.accepted == 1


async def test_unread_and_incomplete_body_is_not_pooled(nursery: trio.Nursery) -> None:
    closed = trio.Event()

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some()
        closed.set()
        return False

    async with HttpClient(await start_scripted(nursery, handler)) as client:
        async with client.stream("GET", "/x"):
            pass
        await closed.wait()


# -- errors ---------------------------------------------------------------------------------------


async def test_refused_port_is_a_connect_error(closed_port: int) -> None:
    async with HttpClient(f"http://127.0.0.1:{closed_port}") as client:
        with pytest.raises(ConnectError) as info:
            await client.request("GET", "/")
        assert not isinstance(info.value, ConnectTimeout)


async def test_connect_timeout(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def hang(host: str, port: int) -> trio.SocketStream:
        await trio.sleep_forever()
        raise AssertionError  # pragma: no cover

    monkeypatch.setattr(trio, "open_tcp_stream", hang)
    async with HttpClient("http://127.0.0.1:9", connect_timeout=2) as client:
        with pytest.raises(ConnectTimeout):
            await client.request("GET", "/")
        assert trio.current_time() == pytest.approx(2)


async def test_read_timeout_before_and_during_the_body(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    asked = trio.Event()

    async def never(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        asked.set()
        await trio.sleep_forever()
        return False  # pragma: no cover

    async with HttpClient(await start_scripted(nursery, never), read_timeout=7) as client:
        with pytest.raises(ReadTimeout):
            await finishes_at(mock_clock, 7, lambda: client.request("GET", "/x"), asked.wait)
    closed = trio.Event()
    async with (
        HttpClient(await start_scripted(nursery, stalled_stream(closed)), read_timeout=3) as client,
        client.stream("GET", "/s") as response,
    ):
        chunks = response.iter_bytes()
        assert await chunks.__anext__() == b"abc"  # all that was sent has been read
        with pytest.raises(ReadTimeout):
            await finishes_at(mock_clock, 3, chunks.__anext__, trio.lowlevel.checkpoint)


@pytest.mark.parametrize(
    "data",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nabc",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000,
        b"\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: h2c\r\n\r\n",
    ],
    ids=["garbage", "truncated", "truncated-chunked", "bad-chunk", "huge-head", "empty", "101"],
)
async def test_protocol_errors(nursery: trio.Nursery, data: bytes) -> None:
    async with HttpClient(await start_scripted(nursery, reply(data, False))) as client:
        with pytest.raises(RemoteProtocolError):
            await client.request("GET", "/x")


async def test_body_over_the_limit(nursery: trio.Nursery) -> None:
    url = await start_scripted(nursery, reply(http_response(200, b"x" * 100)))
    async with HttpClient(url, max_response_bytes=99) as client:
        with pytest.raises(RemoteProtocolError, match="exceeds 99 bytes"):
            await client.request("GET", "/x")
    async with HttpClient(url, max_response_bytes=100) as client:
        assert len((await client.request("GET", "/x"))[2]) == 100


def _large_locals(error: BaseException, floor: int) -> list[int]:
    """Sizes of the byte buffers over ``floor`` that the frames of ``error``'s
    traceback (and its causes') still hold."""
    sizes = []
    seen: BaseException | None = error
    while seen is not None:
        tb: types.TracebackType | None = seen.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                parts = value if isinstance(value, list | tuple) else [value]
                size = sum(len(p) for p in parts if isinstance(p, bytes | bytearray | memoryview))
                if size > floor:
                    sizes.append(size)
            tb = tb.tb_next
        seen = seen.__cause__ or seen.__context__
    return sizes


async def test_declared_length_over_the_limit_is_refused_before_reading(
    nursery: trio.Nursery,
) -> None:
    # The upstream declares 3 GB, sends a little and hangs up: the refusal comes
    # from the head alone (reading on would meet the early close instead).
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 3000000000\r\n\r\n" + b"x" * 1000
    url = await start_scripted(nursery, reply(head, False))
    async with HttpClient(url, max_response_bytes=1 << 20) as client:
        with pytest.raises(ResponseTooLarge, match="exceeds 1048576 bytes") as caught:
            await client.request("GET", "/x")
    assert caught.value.limit == 1 << 20


async def test_chunked_body_over_the_limit_is_refused_and_dropped(nursery: trio.Nursery) -> None:
    piece = b"a" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        with contextlib.suppress(trio.BrokenResourceError):
            for _ in range(64):  # 4 MiB, never ended
                await stream.send_all(chunk)
            await trio.sleep_forever()
        return False

    url = await start_scripted(nursery, handler)
    async with HttpClient(url, max_response_bytes=1 << 20) as client:
        with pytest.raises(ResponseTooLarge) as caught:
            await client.request("GET", "/x")
        # Nothing received stays referenced from the traceback's frames.
        assert _large_locals(caught.value, 100_000) == []
        # The limit of one call overrides the client's.
        with pytest.raises(ResponseTooLarge, match="exceeds 1000 bytes"):
            await client.request("GET", "/x", max_bytes=1000)


async def test_body_in_many_pieces_is_held_once(nursery: trio.Nursery) -> None:
    size = 4 << 20
    body = bytes(range(256)) * (size // 256)
    framed = {
        "length": http_response(200, body),
        "chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (65536, body[i : i + 65536]) for i in range(0, size, 65536))
        + LAST_CHUNK,
    }

    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(framed[request.path.rsplit("/", 1)[1]])
        return True

    url = await start_scripted(nursery, handler)
    async with HttpClient(url, max_response_bytes=size) as client:
        for kind in framed:
            tracemalloc.start()
            try:
                _, _, data = await client.request("GET", f"/{kind}")
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert data == body
            # Parts joined at the end would peak at twice the body.
            assert peak < 1.5 * size, (kind, peak)
            if kind == "length":
                # Allocated once at the declared length: no slack from growing.
                assert sys.getsizeof(data) - len(data) < 100


async def test_connection_reset_mid_body(nursery: trio.Nursery) -> None:
    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        abort(stream)
        return False

    async with HttpClient(await start_scripted(nursery, handler)) as client:
        with pytest.raises(RemoteProtocolError):
            await client.request("GET", "/x")


async def test_connection_reset_before_response(nursery: trio.Nursery) -> None:
    async def handler(request: ScriptedRequest, stream: trio.SocketStream) -> bool:
        abort(stream)
        return False

    async with HttpClient(await start_scripted(nursery, handler)) as client:
        with pytest.raises(RemoteProtocolError, match=r"lost|without"):
            await client.request("GET", "/x")


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="http"):
        HttpClient("ftp://example.com")
    with pytest.raises(ValueError, match="http"):
        HttpClient("http://")
    with pytest.raises(ValueError, match="max_connections"):
        HttpClient("http://127.0.0.1", max_connections=0)
    with pytest.raises(HttpClientError, match="encodable"):
        HttpClient("http://127.0.0.1", default_headers=[("x", "\u2603")])


async def test_invalid_requests_are_refused_before_sending() -> None:
    async with HttpClient("http://[::1]:1/v1") as client:
        with pytest.raises(ValueError, match="start with"):
            await client.request("GET", "models")
        with pytest.raises(ValueError, match="URL-encoded"):
            await client.request("GET", "/a b")
        with pytest.raises(ValueError, match="method"):
            await client.request("GE T", "/x")
        with pytest.raises(HttpClientError, match="invalid request header"):
            await client.request("GET", "/x", headers=[("x-bad", "a\r\nb")])
        with pytest.raises(HttpClientError, match="invalid request header"):
            await client.request("GET", "/x", headers=[("bad name", "v")])


# -- https ---------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting it) for 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cafile=str(cert_file))
    return server, client


async def test_https(nursery: trio.Nursery, tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += await stream.receive_some()
            await stream.send_all(http_response(200, b"secure"))
            await stream.receive_some()
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"), handle, 0, server_context
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    async with HttpClient(f"https://127.0.0.1:{port}", ssl_context=client_context) as client:
        assert (await client.request("GET", "/"))[2] == b"secure"
    async with HttpClient(f"https://127.0.0.1:{port}") as client:
        with pytest.raises(ConnectError):
            await client.request("GET", "/")


async def test_https_connection_is_reused(nursery: trio.Nursery, tmp_path: Path) -> None:
    server_context, client_context = self_signed(tmp_path)
    accepted = 0

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        nonlocal accepted
        accepted += 1
        data = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some():
                data += chunk
                while b"\r\n\r\n" in data:
                    _, data = data.split(b"\r\n\r\n", 1)
                    await stream.send_all(http_response(200, b"secure"))

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"), handle, 0, server_context
    )
    port = listeners[0].transport_listener.socket.getsockname()[1]
    async with HttpClient(f"https://127.0.0.1:{port}", ssl_context=client_context) as client:
        for _ in range(3):
            assert (await client.request("GET", "/"))[2] == b"secure"
    assert accepted == 1


async def test_cancelled_tls_handshake_closes_the_socket(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    hello = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        """Reads the ClientHello and never answers it."""
        await stream.receive_some()
        hello.set()
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.receive_some()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host="127.0.0.1"), silent, 0)
    port = listeners[0].socket.getsockname()[1]
    opened: list[trio.SocketStream] = []
    open_tcp_stream = trio.open_tcp_stream

    async def spy(host: str, port: int) -> trio.SocketStream:
        opened.append(await open_tcp_stream(host, port))
        return opened[-1]

    monkeypatch.setattr(trio, "open_tcp_stream", spy)
    async with HttpClient(f"https://127.0.0.1:{port}") as client:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as inner:

                async def cancel_at_hello() -> None:
                    await hello.wait()
                    scope.cancel()

                inner.start_soon(cancel_at_hello)
                await client.request("GET", "/")
        assert scope.cancelled_caught
    # Still referenced here, so only an explicit close can have closed it.
    assert opened[0].socket.fileno() == -1
