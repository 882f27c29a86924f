"""Serving a driver in-process over memory streams, from any client address."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
import trio.testing

from ostiary.runtime.driver import Driver
from ostiary.runtime.http import HttpServer, HttpSettings
from tests.runtime.test_http import Client

#: Opens a client connection; the server sees it come from the given address.
Connect = Callable[..., Awaitable[Client]]


class _Socket:
    def __init__(self, peer: str) -> None:
        self._peer = peer

    def getpeername(self) -> tuple[str, int]:
        return (self._peer, 40000)


class PeerStream(trio.abc.Stream):
    """A memory stream that says it comes from ``peer``, as a socket would."""

    def __init__(self, inner: trio.abc.Stream, peer: str) -> None:
        self._inner = inner
        self.socket = _Socket(peer)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._inner.aclose()


@asynccontextmanager
async def in_memory(driver: Driver, settings: HttpSettings | None = None) -> AsyncIterator[Connect]:
    """Run ``driver`` (its timers and an HTTP server) until the block ends; yield a
    ``connect(peer="")`` that opens a connection (from ``peer``, if given)."""
    server = HttpServer(driver, settings if settings is not None else HttpSettings())
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run_timers)

        async def connect(peer: str = "") -> Client:
            client, srv = trio.testing.memory_stream_pair()
            stream: trio.abc.Stream = PeerStream(srv, peer) if peer else srv
            nursery.start_soon(server.serve_connection, stream)
            return Client(client)

        yield connect
        nursery.cancel_scope.cancel()
