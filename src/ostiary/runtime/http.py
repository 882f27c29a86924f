"""An HTTP/1.1 server: h11 driven directly over trio sockets, one task per connection.

Defences, each a setting with a default (:class:`HttpSettings`): a deadline for the
request head counted from its first byte (slow-loris), a deadline for the body, an
idle deadline between keep-alive requests, a deadline for every write (a client that
stops reading is dropped), bounds on head and body size (413 from ``content-length``
alone, before a byte of the body is read), a bound on connections (503 beyond), a
bound on requests per connection, refusal of any ``content-length`` beside
``transfer-encoding`` and of ``transfer-encoding`` in HTTP/1.0 (request smuggling: 400
and close; h11 already refuses conflicting or signed lengths and codings other than
``chunked``), 413 for a chunk whose declared size alone passes the body limit,
``expect: 100-continue`` answered only when we mean to read the body, and a graceful
drain: on :meth:`HttpServer.drain` no new connections are taken, idle ones close at
once, and busy ones close after their current response.

Each connection has one reader task for its whole life (:mod:`.connection`); while a
request is being handled it keeps reading, so if the client goes away during a model
request (``POST /v1/...``) the handler's cancel scope is cancelled at once and its
backend work stops. End of input is taken as the client leaving only for those, as
nginx does: a client that half-closes after any other request (``nc -N``, health
checkers) is answered (so is every whole request it pipelined before), and the
connection closes after the last response. A request whose head the handler's
admission refuses (unknown route, bad credentials, a route that takes no body) is
answered without its body ever being read. Every response carries ``date``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import attrs
import h11
import trio

from ostiary.protocol.admission import Admission
from ostiary.protocol.events import Refusal

from .connection import Connection
from .responder import ClientDisconnected, RawResponder, Responder

__all__ = [
    "ClientDisconnected",
    "Handler",
    "HttpRequest",
    "HttpServer",
    "HttpSettings",
    "RawResponder",
    "Responder",
]

log = logging.getLogger("ostiary.http")

Header = tuple[bytes, bytes]


@attrs.frozen(kw_only=True)
class HttpSettings:
    """Connection-level limits; the ``[server]`` table of the config file."""

    #: Seconds from a request's first byte until its head must be complete.
    header_timeout: float = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    #: Seconds from the end of the head until the body must be complete.
    body_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: Seconds a keep-alive connection may wait for its next request.
    idle_timeout: float = attrs.field(default=75.0, validator=attrs.validators.gt(0))
    #: Seconds one write may take (a client that stops reading is dropped).
    send_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    #: Bytes of a request line plus headers.
    max_header_bytes: int = attrs.field(default=16 * 1024, validator=attrs.validators.gt(0))
    #: Connections open at once; more get 503 and are closed.
    max_connections: int = attrs.field(default=1024, validator=attrs.validators.gt(0))
    #: Requests served on one connection before it is closed.
    max_requests_per_connection: int = attrs.field(default=10_000, validator=attrs.validators.gt(0))
    #: Chunks of one chunked request body (413 beyond): each costs some
    #: microseconds of CPU however small it is, so a body of 1-byte chunks must not
    #: cost seconds of it.
    max_body_chunks: int = attrs.field(default=4096, validator=attrs.validators.gt(0))
    #: Bytes of pipelined requests read ahead while one request is being handled
    #: (past it, reading pauses until the handler is done).
    max_pipelined_bytes: int = attrs.field(
        default=4 * 1024 * 1024, validator=attrs.validators.gt(0)
    )


@attrs.define
class HttpRequest:
    method: str
    target: str
    headers: tuple[Header, ...]
    body: bytes
    client: str
    #: What the handler said of the head (:meth:`Handler.admits`).
    admission: Admission
    #: The request had a body that was never read (refused, or a route that takes
    #: none), so the connection closes after the response.
    body_skipped: bool = False


class Handler(Protocol):
    """What the server serves: it judges each head before any body is read, answers
    whole requests, and words the answer to requests the server could not read."""

    async def admits(
        self, method: str, target: str, headers: tuple[Header, ...], peer: str
    ) -> Admission: ...

    async def handle(self, request: HttpRequest, responder: Responder) -> None: ...

    async def refuse(
        self, refusal: Refusal, responder: Responder, method: str, target: str, limit: int
    ) -> None: ...


class _BadRequest(Exception):
    """A request the server cannot read; ``method`` and ``target`` are filled in
    once its request line is known."""

    def __init__(self, refusal: Refusal, limit: int = 0) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal
        self.limit = limit
        self.method = ""
        self.target = ""


class _Reading:
    """What a connection is reading, for the answer to a read that ran out of time:
    ``phase`` "idle" (waiting for a first byte), "head", "body" (its request line
    known) or None (not reading)."""

    __slots__ = ("method", "phase", "target")

    def __init__(self) -> None:
        self.phase: str | None = None
        self.method = ""
        self.target = ""


def _peer(stream: trio.abc.Stream) -> str:
    """The client's address, or "" for a stream that is not a socket."""
    sock = getattr(stream, "socket", None)
    try:
        peer = sock.getpeername() if sock is not None else ""
    except OSError:
        return ""
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _event(conn: h11.Connection) -> object:
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        hint = exc.error_status_hint
        if hint == 431:
            refusal = Refusal.HEAD_TOO_LARGE
        elif hint == 501:
            refusal = Refusal.UNSUPPORTED_CODING
        else:
            refusal = Refusal.MALFORMED
        raise _BadRequest(refusal) from None


def _abandoned_on_eof(request: HttpRequest) -> bool:
    """Whether end of input while ``request`` is handled means the client left. The
    layer cannot know which requests need backend work, so the rule is nginx's (with
    ``proxy_ignore_client_abort off``) for model requests, ``POST /v1/...``; any other
    request, and a screened one (only an error to write), is answered."""
    return (
        request.method == "POST" and request.target.startswith("/v1/") and not request.body_skipped
    )


def _promised(h: h11.Connection) -> int:
    """Bytes of the current chunk that its size line declared and have not come yet.
    h11 keeps the size line to itself, so this reads its chunked reader's count (0 for
    any other reader, or if h11 renames it: then the limit holds only as bytes come)."""
    return int(getattr(getattr(h, "_reader", None), "_bytes_in_chunk", 0))


class HttpServer:
    """Serves ``handler`` on listeners until cancelled (see the module docstring)."""

    def __init__(self, handler: Handler, settings: HttpSettings | None = None) -> None:
        self._handler = handler
        self.settings = settings if settings is not None else HttpSettings()
        self._connections = 0
        self._idle: set[trio.CancelScope] = set()
        self._draining = False
        self._accepting = trio.CancelScope()
        self._all_closed = trio.Event()
        self._all_closed.set()

    @property
    def connections(self) -> int:
        return self._connections

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections until :meth:`drain`, then wait for the open ones to
        close (cancel the caller's scope to stop them sooner)."""
        async with trio.open_nursery() as handlers:
            with self._accepting:
                task_status.started()
                await trio.serve_listeners(
                    self.serve_connection, listeners, handler_nursery=handlers
                )
            for listener in listeners:
                await listener.aclose()

    async def drain(self, deadline: float) -> None:
        """Stop accepting, close idle connections, and wait (until ``deadline``,
        trio time) for busy ones to finish their current response."""
        self._draining = True
        self._accepting.cancel()
        for scope in list(self._idle):
            scope.cancel()
        with trio.move_on_at(deadline):
            await self._all_closed.wait()

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until it closes (public so tests and other
        transports can hand in any trio stream)."""
        settings = self.settings
        if self._connections >= settings.max_connections or self._draining:
            await self._refuse(stream)
            return
        self._connections += 1
        self._all_closed = self._all_closed if self._connections > 1 else trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                conn = Connection(stream, settings.max_header_bytes, settings.max_pipelined_bytes)
                nursery.start_soon(conn.read_forever)
                try:
                    await self._connection_loop(conn)
                except (trio.BrokenResourceError, trio.ClosedResourceError, ClientDisconnected):
                    pass
                except Exception:
                    # A bug must cost one connection, never the server.
                    log.exception("connection failed")
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._connections -= 1
            if self._connections == 0:
                self._all_closed.set()
            await trio.aclose_forcefully(stream)

    async def _refuse(self, stream: trio.abc.Stream) -> None:
        responder = RawResponder(stream, 1.0)
        try:
            await self._handler.refuse(Refusal.CONNECTION_LIMIT, responder, "", "", 0)  # type: ignore[arg-type]
        finally:
            await trio.aclose_forcefully(stream)

    async def _connection_loop(self, conn: Connection) -> None:
        settings = self.settings
        client = _peer(conn.stream)
        served = 0
        reading = _Reading()
        # One cancel scope for the whole connection, reading and handling alike (a
        # scope per request costs more than a deadline moved): its deadline bounds the
        # read of each request (see _read_request) and then each write; it is
        # cancelled when the client left or was too slow to read, when a read ran out
        # of time, or by a drain while idle, and any of those ends the connection.
        with trio.CancelScope() as scope:
            while True:
                try:
                    request = await self._read_request(
                        conn, scope, reading, client, first=served == 0
                    )
                except _BadRequest as bad:
                    scope.deadline = math.inf  # the read's; the answer has its own
                    await self._reject(conn, bad)
                    return
                if request is None:
                    return
                served += 1
                responder = Responder(
                    conn.h11,
                    conn.stream,
                    settings.send_timeout,
                    self._closer(conn, served, request.body_skipped),
                    head=request.method == "HEAD",
                    scope=scope,
                    connection=conn,
                )
                conn.start_handling(scope, abandon_on_eof=_abandoned_on_eof(request))
                try:
                    await self._handler.handle(request, responder)
                except ClientDisconnected:
                    return
                finally:
                    conn.stop_handling()
                if conn.eof and not conn.pending():
                    return  # the client stopped sending: it may have left
                if request.body_skipped:
                    scope.deadline = math.inf  # the last write's, left for the handler's end
                    await conn.linger()
                    return
                if not responder.finished:
                    # The handler must always answer; if it did not, the connection is
                    # in an unknown state and is closed.
                    log.error("handler returned without a complete response")
                    return
                h = conn.h11
                if h.our_state is h11.MUST_CLOSE or h.their_state is h11.MUST_CLOSE:
                    return
                try:
                    h.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        phase = reading.phase
        if not scope.cancelled_caught or phase is None or phase == "idle":
            return
        # The read ran out of time: answered (out of the cancelled scope), then closed.
        timeout = _BadRequest(Refusal.HEAD_TIMEOUT if phase == "head" else Refusal.BODY_TIMEOUT)
        timeout.method, timeout.target = reading.method, reading.target
        await self._reject(conn, timeout)

    def _closer(self, conn: Connection, served: int, body_skipped: bool) -> Callable[[], bool]:
        """Whether the response to the ``served``-th request must close the
        connection; asked when its head is written, so a drain that began (or an end
        of input that came) while it was being handled is honoured. Requests the
        client pipelined before its end of input are answered first."""
        last = body_skipped or served >= self.settings.max_requests_per_connection
        return lambda: last or self._draining or (conn.eof and not conn.pending())

    async def _read_request(
        self,
        conn: Connection,
        scope: trio.CancelScope,
        reading: _Reading,
        client: str,
        *,
        first: bool,
    ) -> HttpRequest | None:
        """The next request, whole; None when the connection should just close.
        The connection's ``scope`` bounds all of it: its deadline is the wait for a
        first byte (``header_timeout`` on a new connection, ``idle_timeout`` between
        requests), then, only if the request is not all there yet, the head's and the
        body's. What is being read when it runs out is in ``reading`` (the
        connection loop answers a head or body that came too slowly)."""
        settings = self.settings
        h = conn.h11
        wait = settings.header_timeout if first else settings.idle_timeout
        scope.deadline = trio.current_time() + wait
        reading.phase = "idle"
        reading.method = reading.target = ""
        event = _event(h)
        if event is h11.NEED_DATA and not conn.has_unread():
            self._idle.add(scope)
            try:
                if self._draining:
                    return None
                arrived = await conn.wait_data()
            finally:
                self._idle.discard(scope)
            if conn.eof and not arrived:
                return None
        reading.phase = "head"
        deadline = trio.current_time() + settings.header_timeout
        while event is h11.NEED_DATA:
            event = await self._next_event(conn, scope, deadline)
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):
            raise _BadRequest(Refusal.MALFORMED)
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        reading.phase = "body"
        reading.method, reading.target = method, target
        try:
            request = await self._admit(
                conn, scope, event, method=method, target=target, client=client
            )
        except _BadRequest as bad:
            bad.method, bad.target = method, target
            raise
        reading.phase = None
        scope.deadline = math.inf
        return request

    async def _admit(
        self,
        conn: Connection,
        scope: trio.CancelScope,
        event: h11.Request,
        *,
        method: str,
        target: str,
        client: str,
    ) -> HttpRequest:
        """Judge the head (the handler's admission), then read the body it allows."""
        headers = tuple(event.headers)
        length = self._check_head(event, headers)
        has_body = bool(length) or length is None
        admission = await self._handler.admits(method, target, headers, client)
        if has_body and not admission.read_body:
            return HttpRequest(method, target, headers, b"", client, admission, body_skipped=True)
        if not has_body:
            if not isinstance(_event(conn.h11), h11.EndOfMessage):
                raise _BadRequest(Refusal.MALFORMED)
            return HttpRequest(method, target, headers, b"", client, admission)
        limit = admission.max_body_bytes
        if length is not None and length > limit:
            raise _BadRequest(Refusal.BODY_TOO_LARGE, limit)
        deadline = trio.current_time() + self.settings.body_timeout
        body = await self._read_body(conn, scope, deadline, limit)
        return HttpRequest(method, target, headers, body, client, admission)

    def _check_head(self, event: h11.Request, headers: tuple[Header, ...]) -> int | None:
        """The body length (None: chunked), after the head's own checks."""
        # h11 bounds a head that arrives in pieces; one that arrives whole is
        # measured here.
        head_size = len(event.target) + sum(len(n) + len(v) + 4 for n, v in headers)
        if head_size > self.settings.max_header_bytes:
            raise _BadRequest(Refusal.HEAD_TOO_LARGE, self.settings.max_header_bytes)
        length: int | None = None
        chunked = False
        for name, value in headers:
            if name == b"content-length":
                length = int(value)  # h11 has checked it: digits, one value
            elif name == b"transfer-encoding":
                chunked = True
        if chunked:
            # RFC 9112 section 6.1: framings that a proxy in front may read otherwise.
            if length is not None:
                raise _BadRequest(Refusal.SMUGGLING)
            if event.http_version != b"1.1":
                raise _BadRequest(Refusal.OLD_CHUNKED)
            return None
        if length is None:
            return 0
        return length

    async def _next_event(
        self, conn: Connection, scope: trio.CancelScope, deadline: float
    ) -> object:
        """The next h11 event, waiting for bytes (until ``deadline``) as needed. The
        deadline is only set when there is something to wait for: most requests
        arrive whole, and moving a deadline is not free."""
        h = conn.h11
        while True:
            event = _event(h)
            if event is not h11.NEED_DATA:
                return event
            await self._wait(conn, scope, deadline)

    async def _wait(self, conn: Connection, scope: trio.CancelScope, deadline: float) -> None:
        """Until more bytes come, once h11 needs them (400 if the input has ended)."""
        h = conn.h11
        if h.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            await conn.stream.send_all(h.send(continue_) or b"")
        if conn.eof:
            raise _BadRequest(Refusal.ENDED_EARLY)
        if scope.deadline != deadline:
            scope.deadline = deadline
        await conn.wait_data()

    async def _read_body(
        self, conn: Connection, scope: trio.CancelScope, deadline: float, limit: int
    ) -> bytes:
        h = conn.h11
        parts: list[bytes] = []
        size = 0
        # Chunks counted as they start (a Content-Length body has none): h11 hands
        # over at least one event each, whatever its size.
        chunks = self.settings.max_body_chunks
        while True:
            event = _event(h)
            if type(event) is h11.Data:
                data = event.data
                size += len(data)
                if size > limit:
                    raise _BadRequest(Refusal.BODY_TOO_LARGE, limit)
                if event.chunk_start:
                    chunks -= 1
                    if chunks < 0:
                        raise _BadRequest(Refusal.TOO_MANY_CHUNKS, self.settings.max_body_chunks)
                parts.append(data)  # bytes or bytearray: the join makes them one bytes
            elif event is h11.NEED_DATA:
                if size + _promised(h) > limit:
                    raise _BadRequest(Refusal.BODY_TOO_LARGE, limit)
                await self._wait(conn, scope, deadline)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            else:
                raise _BadRequest(Refusal.MALFORMED)

    async def _reject(self, conn: Connection, bad: _BadRequest) -> None:
        """Answer a request we could not read (through the handler, which words
        it), then close the connection."""
        h = conn.h11
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        responder = Responder(h, conn.stream, self.settings.send_timeout, lambda: True)
        with trio.move_on_after(self.settings.send_timeout):
            await self._handler.refuse(bad.refusal, responder, bad.method, bad.target, bad.limit)
        await conn.linger()
