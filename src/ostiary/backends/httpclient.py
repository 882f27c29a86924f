"""A lean HTTP/1.1 client over Trio, with a keep-alive pool for one origin.

Built for the ``openai`` backend, which hits one upstream at high concurrency. The
pool costs O(1) per request however many are in flight: a :class:`trio.Semaphore`
caps requests at ``max_connections``, and a deque holds idle connections (popped
LIFO, so the warmest socket is reused; expired ones drop off the cold end). No
background or per-request tasks; every timeout is a Trio cancel scope.

The wire format is handled here, not by h11: request heads are written from a header
block validated once, response heads are parsed with a few regexes (RFC 9112; the
tests check them against h11) and bodies are de-framed in bulk. On this box h11 cost
~60 µs per request and ~300 µs per 20-chunk stream (one event per chunk); this
costs ~10 µs and ~25 µs.

Contract:

- A connection is pooled only when its whole response has arrived (read by the
  caller or not), nothing follows it, keep-alive is allowed, the framing was
  unambiguous, and the body of ``async with client.stream(...)`` exited normally or
  with an ordinary exception. Early exit before the end, cancellation or a protocol
  error close it at once; it is never reused mid-response.
- An idle connection is reused only if nothing has arrived on it since its last
  response ended: a byte (the upstream sent more than its framing said), an EOF or a
  reset each mean it is closed instead, so one request can never read another's
  answer. Idle connections expire after ``idle_timeout`` (4 s, below the 5 s of
  uvicorn, which vLLM runs on, so that the upstream rarely closes one first).
- A request is resent only if it is a GET, HEAD or OPTIONS and a *reused*
  connection closed before any response byte. Anything else (a POST above all) is
  never sent twice: the upstream may have run it.
- Sockets open at once never exceed ``max_connections``: a request holds a permit
  until its connection is pooled or closed, and opens a socket only when no idle one
  is left.
"""

from __future__ import annotations

import contextlib
import math
import select
import ssl
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Self
from urllib.parse import urlsplit

import trio

from ostiary.protocol.wire import (
    _TARGET,
    _TOKEN,
    Body,
    ConnectError,
    ConnectTimeout,
    Headers,
    HeadReader,
    HttpClientError,
    ReadTimeout,
    RemoteProtocolError,
    ResponseTooLarge,
    header_block,
    response_framing,
)

__all__ = [
    "ConnectError",
    "ConnectTimeout",
    "HttpClient",
    "HttpClientError",
    "HttpResponse",
    "ReadTimeout",
    "RemoteProtocolError",
    "ResponseTooLarge",
]

_RECEIVE_SIZE = 64 * 1024
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: Safe methods: resending one that a stale connection lost has no effect upstream.
_RESENDABLE = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class _StaleConnection(Exception):
    """A reused connection was closed by the peer before any response byte."""


# -- connections and responses ---------------------------------------------------------------


class _Connection:
    """One socket. ``socket`` is kept for a synchronous, non-blocking close that is
    safe in ``finally`` blocks and cancelled scopes."""

    __slots__ = ("_poller", "_tls", "idle_since", "read_timeout", "socket", "stream")

    def __init__(
        self,
        stream: trio.abc.Stream,
        socket: trio.socket.SocketType,
        read_timeout: float,
        tls: trio.SSLStream[trio.SocketStream] | None = None,
    ) -> None:
        self.stream = stream
        self.socket = socket
        self.read_timeout = read_timeout
        self.idle_since = 0.0
        self._tls = tls
        # Registered once, so that the check at checkout is one poll(2): ~0.25 us,
        # against ~0.5 us for select(2) (which also fails above fd 1023) and ~1.2 us
        # for a peeking recv that raises BlockingIOError.
        self._poller = select.poll()
        self._poller.register(socket.fileno(), select.POLLIN)

    def quiet(self) -> bool:
        """True if nothing has arrived since the last response ended: no byte, EOF
        or reset on the socket (POLLHUP and POLLERR are always reported), and, for
        TLS, nothing in the SSL buffers (decrypted, or records that came in the same
        read as the response's end: trio keeps those in ``_incoming``)."""
        if self._poller.poll(0):
            return False
        tls = self._tls
        return tls is None or not (tls.pending() or tls._incoming.pending)

    def close(self) -> None:
        self.socket.close()

    async def receive(self) -> bytes:
        """The next bytes from the socket (empty at EOF), or :class:`ReadTimeout`.
        A reset surfaces as :class:`trio.BrokenResourceError` for the caller."""
        if self.read_timeout == math.inf:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
        else:
            with trio.move_on_after(self.read_timeout) as scope:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            if scope.cancelled_caught:
                raise ReadTimeout(f"no data from upstream within {self.read_timeout:g} s")
        return data if type(data) is bytes else bytes(data)


class HttpResponse:
    """A response whose head has arrived; the body is read on demand, once."""

    __slots__ = ("_body", "_conn", "_keep_alive", "_max_bytes", "_pending", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: Headers,
        *,
        body: Body,
        keep_alive: bool,
        pending: bytes,
        conn: _Connection,
        max_bytes: int,
    ) -> None:
        self.status = status
        #: Header names are lower-cased.
        self.headers = headers
        self._body = body
        self._keep_alive = keep_alive
        #: Bytes that arrived with the head: the start of the body.
        self._pending = pending
        self._conn = conn
        self._max_bytes = max_bytes

    @property
    def complete(self) -> bool:
        """True once the whole body has arrived (and been returned by the iterator)."""
        return self._body.done and not self._pending

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def iter_bytes(self) -> AsyncIterator[bytes]:
        """Body chunks as they arrive. Everything received at once comes out as one
        chunk, so a consumer parses many small upstream chunks in one go."""
        return _BodyChunks(self)

    async def read(self, max_bytes: int | None = None) -> bytes | bytearray:
        """The whole (remaining) body; :class:`ResponseTooLarge` as soon as its
        declared length or the bytes received pass ``max_bytes`` (default: the
        client's ``max_response_bytes``), before more is read.

        The body is held once: a body that arrives in one piece is returned as is;
        otherwise the pieces go into one ``bytearray`` (of the declared length when
        there is one, so it never grows), never a list joined at the end. On any
        failure nothing received is kept, not even by the traceback."""
        limit = self._max_bytes if max_bytes is None else max_bytes
        declared = self._body.length
        if declared is not None and declared > limit:
            raise ResponseTooLarge(limit)
        chunk = await self._next_chunk()
        if chunk is None:
            return b""
        if self._body.done and len(chunk) <= limit:
            return chunk
        buffer = bytearray(0 if declared is None else declared)
        # With a declared length (within the limit; the framing never passes it)
        # the pieces are copied into place; otherwise appended, checked one by one.
        view = None if declared is None else memoryview(buffer)
        filled = 0
        try:
            while chunk is not None:
                end = filled + len(chunk)
                if view is not None:
                    view[filled:end] = chunk
                elif end > limit:
                    raise ResponseTooLarge(limit)
                else:
                    buffer += chunk
                filled = end
                chunk = await self._next_chunk()
        except BaseException:
            # The traceback keeps this frame, and so its locals: drop the body.
            if view is not None:
                view.release()
            view, buffer, chunk = None, bytearray(), None
            raise
        if view is not None:
            view.release()
            del buffer[filled:]  # part of the body had been read before
        return buffer

    async def _next_chunk(self) -> bytes | None:
        body = self._body
        while not body.done:
            data = self._pending
            if data:
                self._pending = b""
            else:
                try:
                    data = await self._conn.receive()
                except trio.BrokenResourceError as exc:
                    raise RemoteProtocolError("upstream connection lost mid-response") from exc
                if not data:
                    body.end()
                    continue
            payload = body.feed(data)
            if payload:
                return payload
        return None

    def _reusable(self) -> bool:
        """True if the whole response is here (read or not: only bytes already
        received are looked at), nothing follows it, and keep-alive is allowed."""
        body = self._body
        if not body.done and self._pending:
            data, self._pending = self._pending, b""
            try:
                body.feed(data)
            except RemoteProtocolError:
                return False
        return self._keep_alive and body.done and not body.excess and not self._pending


class _BodyChunks:
    """``AsyncIterator[bytes]`` over a response body; a plain object rather than an
    async generator so abandoning it needs no finalization."""

    __slots__ = ("_response",)

    def __init__(self, response: HttpResponse) -> None:
        self._response = response

    def __aiter__(self) -> _BodyChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._response._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


# -- the pool -------------------------------------------------------------------------------


class HttpClient:
    """An HTTP/1.1 connection pool for one base URL (``http://`` or ``https://``).

    ``idle_timeout`` is how long an idle connection stays pooled; keep it below the
    upstream's keep-alive timeout, or the upstream may close one as it is reused.

    ``path`` arguments are appended to the base URL's path, so with base
    ``http://127.0.0.1:8001/v1``, ``stream("GET", "/models")`` asks for ``/v1/models``.
    ``ssl_context`` (https only) defaults to :func:`ssl.create_default_context`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 256,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        idle_timeout: float = 4.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        default_headers: Sequence[tuple[str, str]] = (),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        tls = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if tls else 80)
        self._ssl_context = (ssl_context or ssl.create_default_context()) if tls else None
        self._prefix = url.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            host = f"{host}:{url.port}"
        self._defaults, self._default_block = header_block([("host", host), *default_headers])
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._max_response_bytes = max_response_bytes
        self._permits = trio.Semaphore(max_connections)
        self._idle: deque[_Connection] = deque()
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> AsyncIterator[HttpResponse]:
        """Send a request and yield its response once the head has arrived."""
        wire, method_bytes = await self._begin(method, path, headers, body)
        try:
            conn, response = await self._send(wire, method_bytes)
            try:
                yield response
            except Exception:
                self._release(conn, response._reusable())
                raise
            except BaseException:
                conn.close()
                raise
            self._release(conn, response._reusable())
        finally:
            self._permits.release()

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
        max_bytes: int | None = None,
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes | bytearray]:
        """Send a request and read the whole response: ``(status, headers, body)``,
        the body within ``max_bytes`` (default: ``max_response_bytes``) as for
        :meth:`HttpResponse.read`. The steps of :meth:`stream`, without a context
        manager's overhead."""
        wire, method_bytes = await self._begin(method, path, headers, body)
        try:
            conn, response = await self._send(wire, method_bytes)
            try:
                content = await response.read(max_bytes)
            except BaseException:
                conn.close()
                raise
            self._release(conn, response._reusable())
        finally:
            self._permits.release()
        return response.status, response.headers, content

    async def aclose(self) -> None:
        """Close idle connections; connections in use close when released."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        await trio.lowlevel.checkpoint()

    async def _begin(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> tuple[bytes, bytes]:
        """The request's bytes and method, once a connection permit is held (the
        caller releases it)."""
        if self._closed:
            raise HttpClientError("the HTTP client is closed")
        head, method_bytes = self._request_head(method, path, headers, body)
        try:
            self._permits.acquire_nowait()
        except trio.WouldBlock:
            await self._permits.acquire()
        return head + body if body else head, method_bytes

    def _request_head(
        self, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> tuple[bytes, bytes]:
        method_bytes = method.upper().encode("ascii", "replace")
        target = (self._prefix + path).encode("utf-8")
        if not path.startswith("/") or not _TARGET.fullmatch(target):
            raise ValueError(f"path must start with '/' and be URL-encoded, got {path!r}")
        if not _TOKEN.fullmatch(method_bytes):
            raise ValueError(f"invalid method {method!r}")
        block = self._default_block
        if headers:
            extra, extra_block = header_block(headers)
            names = {name for name, _ in extra}
            block = b"".join(b"%s: %s\r\n" % h for h in self._defaults if h[0] not in names)
            block += extra_block
        if body or method_bytes in _BODY_METHODS:
            block += b"content-length: %d\r\n" % len(body)
        return b"%s %s HTTP/1.1\r\n%s\r\n" % (method_bytes, target, block), method_bytes

    def _checkout(self) -> _Connection | None:
        """The warmest idle connection that has not expired and is quiet."""
        idle = self._idle
        if not idle:
            return None
        cutoff = trio.current_time() - self._idle_timeout
        while idle and idle[0].idle_since < cutoff:
            idle.popleft().close()
        while idle:
            conn = idle.pop()
            if conn.quiet():
                return conn
            conn.close()
        return None

    def _release(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not self._closed:
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            conn.close()

    async def _send(self, request: bytes, method: bytes) -> tuple[_Connection, HttpResponse]:
        conn = self._checkout()
        if conn is not None:
            try:
                resend = method in _RESENDABLE
                return conn, await self._exchange(conn, request, method, resend=resend)
            except _StaleConnection:
                conn.close()
            except BaseException:
                conn.close()
                raise
        conn = await self._connect()
        try:
            return conn, await self._exchange(conn, request, method, resend=False)
        except BaseException:
            conn.close()
            raise

    async def _connect(self) -> _Connection:
        try:
            with trio.fail_after(self._connect_timeout):
                stream = await trio.open_tcp_stream(self._host, self._port)
                if self._ssl_context is None:
                    return _Connection(stream, stream.socket, self._read_timeout)
                tls = trio.SSLStream(
                    stream, self._ssl_context, server_hostname=self._host, https_compatible=True
                )
                try:
                    await tls.do_handshake()
                except BaseException:
                    await trio.aclose_forcefully(tls)
                    raise
                return _Connection(tls, stream.socket, self._read_timeout, tls)
        except (trio.TooSlowError, OSError, trio.BrokenResourceError) as exc:
            where = f"{self._host}:{self._port}"
            if isinstance(exc, trio.TooSlowError):
                raise ConnectTimeout(f"connecting to {where} timed out") from exc
            raise ConnectError(f"cannot connect to {where}: {exc}") from exc

    async def _exchange(
        self, conn: _Connection, request: bytes, method: bytes, *, resend: bool
    ) -> HttpResponse:
        """Write the request and read the response head. ``resend``: a failure before
        any response byte raises :class:`_StaleConnection`, so that the caller sends
        the request again on a fresh connection."""
        try:
            await conn.stream.send_all(request)
        except trio.BrokenResourceError as exc:
            if resend:
                raise _StaleConnection from exc
            raise RemoteProtocolError("upstream closed the connection during the request") from exc
        reader = HeadReader()
        got_bytes = False
        while True:
            try:
                data = await conn.receive()
            except trio.BrokenResourceError as exc:
                if resend and not got_bytes:
                    raise _StaleConnection from exc
                raise RemoteProtocolError("upstream connection lost before a response") from exc
            if not data:
                if resend and not got_bytes:
                    raise _StaleConnection
                raise RemoteProtocolError("upstream closed the connection without responding")
            got_bytes = True
            head = reader.feed(data)
            if head is not None:
                status, keep_alive, headers, rest = head
                body, keep = response_framing(method, status, headers)
                return HttpResponse(
                    status,
                    headers,
                    body=body,
                    keep_alive=keep_alive and keep,
                    pending=rest,
                    conn=conn,
                    max_bytes=self._max_response_bytes,
                )
