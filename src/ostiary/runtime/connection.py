"""One client connection of the HTTP server: its h11 state and its reader task."""

from __future__ import annotations

import h11
import trio

__all__ = ["Connection"]

_READ_SIZE = 65536
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 1024 * 1024


class Connection:
    """One client connection: its h11 state and the one task that reads its socket.

    The reader runs for the connection's whole life. Between requests it feeds the
    request being read; while a handler runs it keeps reading, so that a client that
    leaves is noticed at once and a pipelined request is kept for later (bounded: past
    the bound, reading pauses until the handler is done). No task is started per
    request.

    End of input is recorded in :attr:`eof`; it cancels the handler's scope only for
    a request handled with ``abandon_on_eof`` (see :meth:`start_handling`), since a
    client that half-closes after its request still reads the answer.

    After a protocol switch (:meth:`take_over`) the reader hands its bytes to
    :meth:`receive_raw` instead of h11, with the same bound on what it buffers.
    """

    __slots__ = (
        "_abandon_on_eof",
        "_budget",
        "_handler_scope",
        "_paused",
        "_raw",
        "_unread",
        "_waiter",
        "discarding",
        "eof",
        "h11",
        "stream",
    )

    def __init__(self, stream: trio.abc.Stream, max_header_bytes: int, max_body_bytes: int) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.eof = False
        self.discarding = False
        #: Bytes the reader may buffer while a handler runs (pipelined requests).
        self._budget = max_header_bytes + max_body_bytes
        self._unread = 0
        self._handler_scope: trio.CancelScope | None = None
        self._abandon_on_eof = False
        self._waiter: trio.Event | None = None
        self._paused: trio.Event | None = None
        self._raw: bytearray | None = None

    def has_unread(self) -> bool:
        """Whether bytes were received since the main loop last waited."""
        return self._unread > 0

    async def read_forever(self) -> None:
        discarded = 0
        while True:
            if self._handler_scope is not None and self._unread > self._budget:
                self._paused = trio.Event()
                await self._paused.wait()
                continue
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self.eof = True
                if self._handler_scope is not None and self._abandon_on_eof:
                    self._handler_scope.cancel()
                self._wake()
                return
            if self.discarding:
                discarded += len(data)
                if discarded > _LINGER_BYTES:
                    self.eof = True
                    self._wake()
                    return
                continue
            if self._raw is not None:
                self._raw += data
            else:
                self.h11.receive_data(bytes(data))
            self._unread += len(data)
            self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def wait_data(self) -> bool:
        """Until the reader has more bytes (or the client closed); whether bytes
        came (they may have come just before the end of input)."""
        if not (self._unread or self.eof):
            self._waiter = trio.Event()
            await self._waiter.wait()
        arrived = self._unread > 0
        self._unread = 0
        return arrived

    def pending(self) -> bool:
        """Whether bytes past the current request wait in h11's buffer (requests
        the client pipelined; whole or not, the next read tells). Asked once per
        response after an end of input: h11's ``trailing_data`` copies the whole
        buffer (up to ``max_pipelined_bytes``, for each of many tiny requests), so
        its buffer's length is read, and the copy is only a fallback."""
        buffer = getattr(self.h11, "_receive_buffer", None)
        if buffer is not None:
            return len(buffer) > 0
        return bool(self.h11.trailing_data[0])  # pragma: no cover (h11 renamed it)

    def start_handling(self, scope: trio.CancelScope, *, abandon_on_eof: bool) -> None:
        """While ``scope``'s handler runs, end of input means the client left (the
        scope is cancelled, at once if the input has already ended) only if
        ``abandon_on_eof``; otherwise the handler runs on, and is stopped only by a
        write that fails."""
        self._handler_scope = scope
        self._abandon_on_eof = abandon_on_eof
        self._unread = 0
        if abandon_on_eof and self.eof:
            scope.cancel()

    def finishing(self) -> None:
        """The handler has begun the last write of its response: end of input no
        longer cancels it (the client has all it asked for once the write is done)."""
        self._abandon_on_eof = False

    def take_over(self) -> None:
        """The connection switched protocols (h11 is done with it): what h11 holds
        past the request, and all that comes later, goes to :meth:`receive_raw`."""
        data, _ = self.h11.trailing_data
        self._raw = bytearray(data)
        self._unread = len(data)
        self._wake()

    async def receive_raw(self) -> bytes:
        """The bytes received since the last call (waiting for some); ``b""`` once
        the client has closed and all was taken."""
        assert self._raw is not None, "receive_raw before take_over"
        await self.wait_data()
        data = bytes(self._raw)
        self._raw.clear()
        if self._paused is not None:
            self._paused.set()
            self._paused = None
        return data

    def stop_handling(self) -> None:
        self._handler_scope = None
        if self._paused is not None:
            self._paused.set()
            self._paused = None

    async def linger(self) -> None:
        """Close without a reset: a client still sending a body we will not read
        would otherwise lose the response just sent. Half-close, then let the
        reader discard what arrives for a moment (bounded in time and bytes)."""
        self.discarding = True
        with trio.move_on_after(_LINGER_SECONDS):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            while not self.eof:
                await self.wait_data()
