"""One viewer of ``/v1/queue/live``: the WebSocket after the core accepted it.

The core has judged the handshake and the key and said how often to push
(:class:`~ostiary.protocol.actions.AcceptWebSocket`); this carries it out with
``wsproto``'s frame layer over the connection h11 has handed over. Three tasks:

- the pusher takes a snapshot (``snapshot(now)``, the core's bytes) and writes it,
  at most once per ``interval``, each start at least ``interval`` after the last.
  The buffer is that one snapshot: the next is taken only once the last is written,
  so a viewer that reads slowly skips snapshots and never makes the server hold
  more than one message (plus the socket's own buffer); one that stops reading is
  dropped when a write passes the server's ``send_timeout``;
- the reader answers pings, closes the feed when the client asks (or sends a
  message larger than ``max_message_bytes``: the client has nothing to say), and
  notices a client that vanished;
- the mailbox watcher closes the feed when the core says so: 1001 (going away)
  when the server drains, 1008 when the viewer's key was revoked.

Writes go through one lock (a trio stream takes one writer at a time).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Sequence

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Event, Message, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from ostiary.protocol.actions import AcceptWebSocket, Action, CloseWebSocket

from .responder import ClientDisconnected, ResponseWriter, Tunnel

__all__ = ["serve_viewer"]

#: Seconds the server waits for the client's answer to its close frame.
CLOSE_TIMEOUT = 1.0


class _Viewer:
    __slots__ = ("_lock", "_tunnel", "ws")

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._lock = trio.Lock()
        self.ws = Connection(ConnectionType.SERVER)

    @property
    def open(self) -> bool:
        return self.ws.state is ConnectionState.OPEN

    async def send(self, event: Event) -> None:
        async with self._lock:
            state = self.ws.state
            if isinstance(event, CloseConnection):
                allowed = state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING)
            else:
                allowed = state is ConnectionState.OPEN
            if allowed:  # else a close is under way: nothing more to say
                await self._tunnel.send(self.ws.send(event))

    async def close(self, code: int) -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            await self.send(CloseConnection(code=code))

    async def push(self, snapshot: Callable[[float], bytes], interval: float) -> None:
        """Snapshots until the feed stops being open."""
        while self.open:
            started = trio.current_time()
            await self.send(TextMessage(data=snapshot(started).decode("utf-8")))
            await trio.sleep_until(started + interval)

    async def read(self, max_message_bytes: int) -> bool:
        """Until the close handshake ends (True) or the client vanishes (False)."""
        size = 0
        while True:
            data = await self._tunnel.receive()
            if not data:
                return False
            self.ws.receive_data(data)
            for event in self.ws.events():
                if isinstance(event, Ping):
                    await self.send(event.response())
                elif isinstance(event, CloseConnection):
                    if self.ws.state is ConnectionState.REMOTE_CLOSING:
                        await self.send(event.response())
                    elif self.open:  # a frame wsproto could not parse
                        await self.close(event.code)
                    return True
                elif isinstance(event, Message):
                    data = event.data
                    size += len(data.encode()) if isinstance(data, str) else len(data)
                    if size > max_message_bytes:
                        await self.close(CloseReason.MESSAGE_TOO_BIG)
                        return True
                    if event.message_finished:
                        size = 0

    async def watch(self, take: Callable[[], Awaitable[Sequence[Action]]]) -> None:
        """Until the core says to close (the server drains, the key was revoked),
        then close with the code it gives."""
        while True:
            for action in await take():
                if isinstance(action, CloseWebSocket):
                    await self.close(action.code)
                    return


async def serve_viewer(
    responder: ResponseWriter,
    action: AcceptWebSocket,
    snapshot: Callable[[float], bytes],
    take: Callable[[], Awaitable[Sequence[Action]]],
) -> None:
    """Run one feed until it closes with a close frame (either side's); raise
    :class:`ClientDisconnected` if the client vanished instead."""
    tunnel = await responder.switch_protocol(action.headers)
    viewer = _Viewer(tunnel)
    clean = False
    async with trio.open_nursery() as nursery:
        scope = nursery.cancel_scope

        async def read() -> None:
            nonlocal clean
            with contextlib.suppress(ClientDisconnected):
                clean = await viewer.read(action.max_message_bytes)
            scope.cancel()

        async def push() -> None:
            with contextlib.suppress(ClientDisconnected):
                await viewer.push(snapshot, action.interval)
                # The feed is closing: the client answers our close frame, or is
                # given up on.
                scope.deadline = min(scope.deadline, trio.current_time() + CLOSE_TIMEOUT)
                return
            scope.cancel()

        async def watch() -> None:
            with contextlib.suppress(ClientDisconnected):
                await viewer.watch(take)
                return
            scope.cancel()

        nursery.start_soon(read)
        nursery.start_soon(push)
        nursery.start_soon(watch)
    if not clean and viewer.ws.state is not ConnectionState.LOCAL_CLOSING:
        raise ClientDisconnected()
