"""Writing one HTTP/1.1 response over h11: whole or streamed, with a deadline on every
write, a cached ``Date``, and common whole responses written without h11 re-checking
headers the core built (:class:`Responder`); and the one response to a connection
refused before h11 has seen it (:class:`RawResponder`).
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import logging
import math
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import h11
import trio

from .connection import Connection

__all__ = ["ClientDisconnected", "RawResponder", "Responder", "ResponseWriter", "Tunnel"]

log = logging.getLogger("ostiary.http")

Header = tuple[bytes, bytes]


class ClientDisconnected(Exception):
    """The client went away (or stopped reading) before the response was complete."""


class _HttpDate:
    """The ``date`` header's value (RFC 9110 IMF-fixdate), formatted at most once a
    second: every response needs it, and formatting costs more than reading a clock."""

    __slots__ = ("_clock", "_second", "_value")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._value = email.utils.formatdate(second, usegmt=True).encode()
        return self._value


_date = _HttpDate()


class ResponseWriter(Protocol):
    """What a handler writes one response through, whichever door the request came
    in by: :class:`Responder` (h11) or the ASGI adapter's (:mod:`.asgi`)."""

    started: bool
    finished: bool

    async def respond(self, status: int, headers: tuple[Header, ...], body: bytes) -> None: ...

    async def start(self, status: int, headers: tuple[Header, ...]) -> None: ...

    async def send(self, data: bytes) -> None: ...

    async def end(self, data: bytes = b"") -> None: ...

    async def switch_protocol(self, headers: tuple[Header, ...]) -> Tunnel: ...


class Responder:
    """Writes one response: whole (:meth:`respond`) or streamed (:meth:`start`,
    :meth:`send`, :meth:`end`). Raises :class:`ClientDisconnected` if the client is
    gone or too slow to read."""

    __slots__ = (
        "_close",
        "_conn",
        "_connection",
        "_head",
        "_scope",
        "_send_timeout",
        "_stream",
        "finished",
        "started",
    )

    def __init__(
        self,
        conn: h11.Connection,
        stream: trio.abc.Stream,
        send_timeout: float,
        close: Callable[[], bool],
        *,
        head: bool = False,
        scope: trio.CancelScope | None = None,
        connection: Connection | None = None,
    ) -> None:
        self._conn = conn
        #: The connection's reader, for a protocol switch (:meth:`switch_protocol`).
        self._connection = connection
        self._head = head
        #: The handler's scope: a write that outlasts ``send_timeout`` cancels the
        #: whole handler (a client too slow to read is dropped).
        self._scope = scope
        self._stream = stream
        self._send_timeout = send_timeout
        self._close = close
        self.started = False
        self.finished = False

    def _headers(self, headers: tuple[Header, ...] | list[Header]) -> list[Header]:
        out = list(headers)
        out.append((b"date", _date()))
        if self._close():
            out.append((b"connection", b"close"))
        return out

    async def _write(self, data: bytes, *, last: bool = False) -> None:
        scope = self._scope
        if last and self._connection is not None:
            # The whole rest of the response goes in this write: a client that
            # half-closes now (an SDK that stops at ``[DONE]``) is not abandoned; only
            # a write that fails means it left before it had everything.
            self._connection.finishing()
        try:
            if scope is None:
                with trio.fail_after(self._send_timeout):
                    await self._stream.send_all(data)
            else:
                # Moving a deadline is cheaper than a new cancel scope per write; after
                # the last write the handler is done, so it need not be moved back.
                scope.deadline = trio.current_time() + self._send_timeout
                await self._stream.send_all(data)
                if not last:
                    scope.deadline = math.inf
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            raise ClientDisconnected() from exc

    def _send(self, event: h11.Event) -> bytes:
        try:
            return self._conn.send(event) or b""
        except h11.LocalProtocolError:
            # Our bug, not the client's: the connection is in an unknown state.
            log.exception("cannot write the response")
            raise ClientDisconnected() from None

    async def respond(self, status: int, headers: tuple[Header, ...], body: bytes) -> None:
        data = self._plain_response(status, headers, body)
        if data is None:
            hdrs = self._headers(headers)
            if status not in (204, 304):
                hdrs.append((b"content-length", str(len(body)).encode()))
            head = h11.Response(status_code=status, headers=hdrs, reason=_reason(status))
            data = self._send(head)
            if body and not self._head:
                data += self._send(h11.Data(data=body))
            data += self._send(h11.EndOfMessage())
        self.started = self.finished = True
        await self._write(data, last=True)

    def _plain_response(
        self, status: int, headers: tuple[Header, ...], body: bytes
    ) -> bytes | None:
        """The common case written without h11 re-checking our own headers: a whole
        response to a complete keep-alive HTTP/1.1 request that is not HEAD. The bytes
        are exactly what h11 would write; h11's state machine is then told of a
        response of the same status and keep-alive (a prebuilt head, no body), so it
        stays in step. Anything unusual (None) goes through h11 itself."""
        conn = self._conn
        if (
            self._head
            or conn.their_state is not h11.DONE
            or conn.our_state is not h11.SEND_RESPONSE
            or status in (204, 304)
            or not 200 <= status <= 999
        ):
            return None
        parts = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        for name, value in headers:
            if name.lower() in _FRAMING:
                return None
            parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(b"date: %s\r\n" % _date())
        close = self._close()
        if close:
            parts.append(b"connection: close\r\n")
        parts.append(b"content-length: %d\r\n\r\n" % len(body))
        parts.append(body)
        self._send(_sync_head(status, close))
        self._send(_END)
        return b"".join(parts)

    async def start(self, status: int, headers: tuple[Header, ...]) -> None:
        hdrs = self._headers(headers)
        hdrs.append((b"transfer-encoding", b"chunked"))
        data = self._send(h11.Response(status_code=status, headers=hdrs, reason=_reason(status)))
        self.started = True
        await self._write(data)

    async def send(self, data: bytes) -> None:
        if data and not self._head:
            await self._write(self._send(h11.Data(data=data)))

    async def end(self, data: bytes = b"") -> None:
        """End the stream; ``data``, its last bytes, goes out in the same write as
        the terminator (a client that leaves once it has read them does not race
        the end)."""
        out = self._send(h11.Data(data=data)) if data and not self._head else b""
        out += self._send(h11.EndOfMessage())
        self.finished = True
        await self._write(out, last=True)

    async def switch_protocol(self, headers: tuple[Header, ...]) -> Tunnel:
        """Answer ``101 Switching Protocols`` with ``headers`` (the client proposed
        an upgrade); the connection is then a raw :class:`Tunnel`, closed when the
        handler returns."""
        connection = self._connection
        if connection is None:
            raise ClientDisconnected()  # not a connection that can switch
        data = self._send(
            h11.InformationalResponse(
                status_code=101, headers=list(headers), reason=b"Switching Protocols"
            )
        )
        connection.take_over()
        self.started = self.finished = True
        await self._write(data)
        return Tunnel(self, connection)


class Tunnel:
    """A connection after a protocol switch: raw bytes each way, every write with
    the responder's deadline (a client that stops reading is dropped)."""

    __slots__ = ("_connection", "_responder")

    def __init__(self, responder: Responder, connection: Connection) -> None:
        self._responder = responder
        self._connection = connection

    async def send(self, data: bytes) -> None:
        await self._responder._write(data)

    async def receive(self) -> bytes:
        """What the client sent since the last call; ``b""``: it closed."""
        return await self._connection.receive_raw()


#: Headers h11 treats specially (framing, keep-alive, host first): never our fast path.
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection", b"host"))
_END = h11.EndOfMessage()


@functools.cache
def _sync_head(status: int, close: bool) -> h11.Response:
    """What h11's state machine is told was sent by :meth:`Responder._plain_response`."""
    headers = [(b"content-length", b"0")]
    if close:
        headers.append((b"connection", b"close"))
    return h11.Response(status_code=status, headers=headers, reason=_reason(status))


@functools.cache
def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


class RawResponder:
    """Writes the one response to a connection that is refused before h11 has seen
    a byte of it (the connection limit), then nothing more."""

    __slots__ = ("_send_timeout", "_stream", "finished", "started")

    def __init__(self, stream: trio.abc.Stream, send_timeout: float) -> None:
        self._stream = stream
        self._send_timeout = send_timeout
        self.started = False
        self.finished = False

    async def respond(self, status: int, headers: tuple[Header, ...], body: bytes) -> None:
        self.started = self.finished = True
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        lines.extend(name + b": " + value + b"\r\n" for name, value in headers)
        lines.append(b"date: " + _date() + b"\r\n")
        lines.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        with (
            trio.move_on_after(self._send_timeout),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self._stream.send_all(b"".join(lines) + body)

    async def start(self, status: int, headers: tuple[Header, ...]) -> None:
        raise ClientDisconnected()

    async def send(self, data: bytes) -> None:
        raise ClientDisconnected()

    async def end(self, data: bytes = b"") -> None:
        raise ClientDisconnected()
